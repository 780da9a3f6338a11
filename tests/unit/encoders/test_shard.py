from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from encoders.embedding import EncodeRequest
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.shard import Shard
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
        request(Modality.TEXT, "text/plain", "\u200b".encode()),
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


def test_text_without_content_tokens_still_embeds(shard: Shard) -> None:
    (item,) = shard.embed([request(Modality.TEXT, "text/plain", "\u200b".encode())], BEACON)
    assert np.linalg.norm(item.vector) == pytest.approx(1.0, abs=1e-5)
    assert item.diff_loss == pytest.approx(1.0, abs=1e-5)
