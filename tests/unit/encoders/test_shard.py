from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.caption import read_caption
from encoders.embedding import EncodeRequest
from encoders.masks import batch_token_masks, token_masks
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.shard import Shard, variant_keeps
from encoders.text_backbone import TextBackbone, backbone_dir
from encoders.weights import DEFAULT_PREPROCESS, UNCALIBRATED_DELTA, sha256_file
from tests.media import image_bytes, mp4_bytes, wav_bytes

BEACON = b"epoch-7-beacon"


def request(modality: Modality, mime: str, data: bytes) -> EncodeRequest:
    media = decode_media(modality, mime, data, MediaLimits(), DEFAULT_PREPROCESS)
    return EncodeRequest(modality, media, hashlib.sha256(data).digest())


@pytest.fixture(scope="module")
def requests() -> list[EncodeRequest]:
    return [
        request(Modality.TEXT, "text/plain", b"a dog runs across a sunny field"),
        request(Modality.IMAGE, "image/png", image_bytes("RGB")),
        request(Modality.AUDIO, "audio/wav", wav_bytes("PCM_16", 16000, 1)),
        request(Modality.VIDEO, "video/mp4", mp4_bytes(frames=10)),
        request(Modality.TEXT, "text/plain", "une phrase en français, assez longue".encode()),
        request(Modality.IMAGE, "image/jpeg", image_bytes("L", "JPEG", size=(90, 120))),
        request(Modality.TEXT, "text/plain", b"x"),
        # No content token (read from a submission, it would be refused: no letter or
        # digit; the shard still embeds it, as it does the blank caption it warms up on).
        EncodeRequest(Modality.TEXT, "\u200b", hashlib.sha256("\u200b".encode()).digest()),
    ]


def test_every_modality_gives_unit_vectors_of_dim_d(
    shard: Shard, requests: list[EncodeRequest]
) -> None:
    out = shard.embed(requests, BEACON)
    assert len(out) == len(requests)
    for item in out:
        assert item.vector.shape == (shard.dim,)
        assert item.vector.dtype == np.float32
        assert np.linalg.norm(item.vector) == pytest.approx(1.0, abs=1e-5)
        assert item.diff_loss >= 0.0
        assert item.quality == pytest.approx(np.exp(-item.diff_loss))
        assert len(item.encoder_losses) == len(item.used) == 2
        assert all(item.used)


def test_embedding_is_deterministic(shard: Shard, requests: list[EncodeRequest]) -> None:
    first = shard.embed(requests, BEACON)
    second = shard.embed(requests, BEACON)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.vector, b.vector)
        assert a.diff_loss == b.diff_loss


def test_batch_matches_single(shard: Shard, requests: list[EncodeRequest]) -> None:
    batched = shard.embed(requests, BEACON)
    for req, together in zip(requests, batched, strict=True):
        (alone,) = shard.embed([req], BEACON)
        np.testing.assert_allclose(alone.vector, together.vector, atol=1e-5)
        assert alone.diff_loss == pytest.approx(together.diff_loss, abs=1e-5)


def test_beacon_changes_the_masks_and_so_the_loss(
    shard: Shard, requests: list[EncodeRequest]
) -> None:
    one = shard.embed(requests[:2], BEACON)
    other = shard.embed(requests[:2], b"another beacon")
    for a, b in zip(one, other, strict=True):
        assert a.diff_loss != b.diff_loss


def test_shard_exposes_weights_id_and_pair_bounds(shard: Shard, shard_manifest: Path) -> None:
    assert shard.weights_id == sha256_file(shard_manifest)
    assert shard.preprocess == DEFAULT_PREPROCESS
    assert shard.delta(Modality.TEXT, Modality.IMAGE) == UNCALIBRATED_DELTA
    assert shard.delta(Modality.IMAGE, Modality.TEXT) == UNCALIBRATED_DELTA
    with pytest.raises(ValueError):
        shard.delta(Modality.TEXT, Modality.TEXT)


def test_empty_call_embeds_nothing(shard: Shard) -> None:
    assert shard.embed([], BEACON) == []


def test_warm_up_embeds_every_modality_and_changes_nothing(
    shard: Shard, requests: list[EncodeRequest], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = shard.embed(requests, BEACON)
    calls: list[list[Modality]] = []
    embed = shard.embed

    def recording(batch: list[EncodeRequest], beacon: bytes) -> list[object]:
        calls.append([r.modality for r in batch])
        return embed(batch, beacon)  # type: ignore[return-value]

    monkeypatch.setattr(shard, "embed", recording)
    assert shard.warm_up() == [Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO]
    assert calls == [[m, m] for m in Modality]
    monkeypatch.undo()
    after = shard.embed(requests, BEACON)
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a.vector, b.vector) and a.diff_loss == b.diff_loss


def test_text_without_content_tokens_still_embeds(shard: Shard) -> None:
    blank = EncodeRequest(Modality.TEXT, "\u200b", hashlib.sha256(b"zwsp").digest())
    (item,) = shard.embed([blank], BEACON)
    assert np.linalg.norm(item.vector) == pytest.approx(1.0, abs=1e-5)
    assert item.diff_loss == pytest.approx(1.0, abs=1e-5)


def test_keep_rows_are_all_tokens_then_each_mask_and_its_complement() -> None:
    masks = torch.from_numpy(
        batch_token_masks([16, 16], 0.85, BEACON, [bytes(32), b"\x01" * 32], 3)
    )
    keep = variant_keeps(masks)
    assert keep.shape == (2, 7, 16)
    assert keep[:, 0].all()
    for k in range(3):
        assert torch.equal(keep[:, 1 + 2 * k], masks[:, k])
        assert torch.equal(keep[:, 2 + 2 * k], ~masks[:, k])


def test_text_keep_variants_mask_only_each_caption_s_own_words() -> None:
    """Captions of different lengths in one batch: each mask covers positions
    1..n of its caption; [CLS], [SEP] and padding keep their attention."""
    backbone = TextBackbone(backbone_dir(), DEFAULT_PREPROCESS.text_max_tokens, "cpu")
    texts = ["a red circle moves left across a white background", "x", "", "two words"]
    tokens = backbone.tokenize(texts)
    shas = [hashlib.sha256(t.encode()).digest() for t in texts]
    masks = batch_token_masks(tokens.n_tokens, 0.15, BEACON, shas, 4)
    keep = backbone.keep_variants(tokens, torch.from_numpy(masks))
    assert keep.shape == (4, 9, tokens.attention.shape[1])
    for i, n in enumerate(tokens.n_tokens):
        attention = tokens.attention[i]
        assert torch.equal(keep[i, 0], attention)
        for k in range(4):
            chosen = torch.from_numpy(token_masks(n, 0.15, BEACON, shas[i], 4)[k])
            for row, content in ((keep[i, 1 + 2 * k], chosen), (keep[i, 2 + 2 * k], ~chosen)):
                assert torch.equal(row[1 : 1 + n], content)
                assert torch.equal(row[:1], attention[:1])
                assert torch.equal(row[1 + n :], attention[1 + n :])


def test_input_length_is_the_width_a_caption_pads_its_batch_to(
    shard: Shard, requests: list[EncodeRequest]
) -> None:
    backbone = shard._backbone
    texts = [r for r in requests if r.modality is Modality.TEXT]
    for text in texts:  # alone, a caption's batch is exactly as wide as its input length
        assert shard.input_length(text) == backbone.tokenize([str(text.media)]).attention.shape[1]
    # Together, a batch is as wide as its longest caption: what batching by length saves.
    together = backbone.tokenize([str(t.media) for t in texts]).attention.shape[1]
    assert together == max(shard.input_length(t) for t in texts)
    assert len({shard.input_length(t) for t in texts}) > 1  # the captions differ in length
    for other in (r for r in requests if r.modality is not Modality.TEXT):
        assert shard.input_length(other) == 0  # one shape for every picture, sound, clip


def test_a_64_kib_caption_counts_as_the_longest_input(shard: Shard) -> None:
    words = " ".join(f"word{i}" for i in range(12_000)).encode()[:65536]
    long = EncodeRequest(Modality.TEXT, words.decode(), hashlib.sha256(words).digest())
    assert shard.input_length(long) == shard._backbone.max_tokens
    # Blanks in front, or between the words, do not make a long caption look short.
    words = " ".join(f"word{i}" for i in range(80))
    for padded in (" " * 4000 + words, words.replace(" ", " " * 50)):
        request = EncodeRequest(Modality.TEXT, padded, bytes(32))
        assert shard.input_length(request) == shard._backbone.max_tokens
    # Nor does hiding the words: one 64 KiB word, words joined by punctuation, or
    # characters the tokenizer splits one by one count as the batch will pad them.
    for hidden in ("a" * 65536, "a," * 32768, "猫" * 21000):
        request = EncodeRequest(Modality.TEXT, hidden, bytes(32))
        width = shard._backbone.tokenize([read_caption(hidden)]).attention.shape[1]
        assert shard.input_length(request) == width


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=2500))
def test_any_caption_s_input_length_lies_within_the_backbone_s_bounds(
    shard: Shard, text: str
) -> None:
    """Any text strict UTF-8 can carry is counted, never refused: [CLS] and [SEP] at
    least, ``max_tokens`` at most (the length only chooses batch companions)."""
    length = shard.input_length(EncodeRequest(Modality.TEXT, text, bytes(32)))
    assert 2 <= length <= shard._backbone.max_tokens
