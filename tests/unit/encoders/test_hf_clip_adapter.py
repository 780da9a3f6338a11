"""The Hugging Face CLIP adapter, offline, on a tiny randomly initialised checkpoint.

The checkpoint is built by ``tests.tiny_clip`` (random weights, a tokenizer
whose vocabulary and merges it writes, nothing downloaded); loading is
checked to pass ``local_files_only`` and to open no socket.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from encoders.adapters import hf_clip
from encoders.embedding import EncodeRequest
from encoders.errors import WeightsError
from encoders.modality import Modality
from encoders.shard import Shard
from encoders.weights import sha256_file
from tests.tiny_clip import PROJECTION, SIDE, write_tiny_clip

TEXT_BEACON = b"beacon"


@pytest.fixture(scope="module")
def clip_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf-clip")
    write_tiny_clip(folder / "clip")
    return hf_clip.write_manifest(folder)


@pytest.fixture(scope="module")
def clip_shard(clip_manifest: Path) -> Shard:
    return Shard.load(clip_manifest, sha256_file(clip_manifest), mask_count=2)


def _picture(seed: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(seed).uniform(-1, 1, (3, SIDE, SIDE)).astype(np.float32)


def _requests() -> list[EncodeRequest]:
    return [
        EncodeRequest(Modality.TEXT, "a red circle", hashlib.sha256(b"t").digest()),
        EncodeRequest(Modality.IMAGE, _picture(0), hashlib.sha256(b"i").digest()),
    ]


def test_manifest_pins_every_file_of_the_checkpoint(clip_manifest: Path) -> None:
    manifest = json.loads(clip_manifest.read_text(encoding="utf-8"))
    on_disk = sorted(
        p.relative_to(clip_manifest.parent).as_posix()
        for p in (clip_manifest.parent / "clip").rglob("*")
        if p.is_file()
    )
    assert sorted(entry["path"] for entry in manifest["files"]) == on_disk
    assert "clip/config.json" in on_disk and "clip/model.safetensors" in on_disk
    assert manifest["encoders"] == [
        {"kind": "hf_clip", "file": "clip/model.safetensors", "config": {}}
    ]
    assert manifest["dim"] == PROJECTION
    assert manifest["preprocess"]["image_size"] == SIDE


def test_shard_embeds_text_and_images_deterministically(clip_shard: Shard) -> None:
    assert clip_shard.dim == PROJECTION
    assert clip_shard.preprocess.image_size == SIDE
    first = clip_shard.embed(_requests(), TEXT_BEACON)
    again = clip_shard.embed(_requests(), TEXT_BEACON)
    for a, b in zip(first, again, strict=True):
        assert a.vector.shape == (PROJECTION,)
        assert abs(float(np.linalg.norm(a.vector)) - 1.0) < 1e-6
        assert a.vector.tobytes() == b.vector.tobytes()
        assert np.isfinite(a.diff_loss)
    assert not np.allclose(first[0].vector, first[1].vector)


def test_a_loaded_shard_matches_a_fresh_load(clip_manifest: Path, clip_shard: Shard) -> None:
    other = Shard.load(clip_manifest, sha256_file(clip_manifest), mask_count=2)
    for a, b in zip(
        clip_shard.embed(_requests(), TEXT_BEACON),
        other.embed(_requests(), TEXT_BEACON),
        strict=True,
    ):
        assert a.vector.tobytes() == b.vector.tobytes()


def test_hidden_patches_do_not_reach_the_model() -> None:
    """Two pictures that differ only under a hidden patch give the same masked variant."""
    from encoders.patches import image_patches

    seen: list[torch.Tensor] = []

    class Spy:
        config = type(
            "C",
            (),
            {
                "projection_dim": 4,
                "vision_config": type("V", (), {"image_size": SIDE}),
                "text_config": type("T", (), {"max_position_embeddings": 77}),
            },
        )

        def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            seen.append(pixel_values)
            return pixel_values.flatten(1)[:, :4] + 10.0

    encoder = hf_clip.HfClipEncoder(Spy(), None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "cpu")
    a = torch.from_numpy(_picture(1)).unsqueeze(0)
    b = a.clone()
    b[:, :, :16, :16] = -a[:, :, :16, :16]
    keep = torch.ones(1, 2, 4, dtype=torch.bool)
    keep[0, 1, 0] = False
    encoder.embed_patches(Modality.IMAGE, image_patches(a), keep)
    encoder.embed_patches(Modality.IMAGE, image_patches(b), keep)
    # normalised with mean = std = 0.5, so the grey of a hidden patch reads 0 and a
    # shown pixel its node value in [-1, 1]
    assert torch.equal(seen[0][1], seen[1][1])
    assert torch.all(seen[0][1][:, :16, :16] == 0)
    assert torch.allclose(seen[0][0], a[0], atol=1e-6)
    assert not torch.equal(seen[0][0], seen[1][0])


def test_other_sizes_are_resized_to_the_model_input() -> None:
    seen: list[torch.Tensor] = []

    class Spy:
        config = type(
            "C",
            (),
            {
                "projection_dim": 4,
                "vision_config": type("V", (), {"image_size": 48}),
                "text_config": type("T", (), {"max_position_embeddings": 77}),
            },
        )

        def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            seen.append(pixel_values)
            return torch.ones(pixel_values.shape[0], 4)

    from encoders.patches import image_patches

    encoder = hf_clip.HfClipEncoder(Spy(), None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "cpu")
    flat = torch.full((1, 3, SIDE, SIDE), 0.5)
    out = encoder.embed_patches(Modality.IMAGE, image_patches(flat), torch.ones(1, 1, 4).bool())
    assert out.shape == (1, 1, 4)
    assert seen[0].shape == (1, 3, 48, 48)
    assert torch.allclose(seen[0], torch.full_like(seen[0], 0.75), atol=1e-5)


def test_video_and_audio_are_not_read(clip_shard: Shard) -> None:
    encoder = next(iter(clip_shard._encoders))
    assert encoder.modalities == frozenset({Modality.TEXT, Modality.IMAGE})
    with pytest.raises(ValueError, match="images and text"):
        encoder.embed_patches(Modality.AUDIO, torch.zeros(1, 4, 256), torch.ones(1, 1, 4).bool())


def test_loading_is_offline(clip_manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPModel, CLIPProcessor

    calls: list[dict[str, Any]] = []

    def spy(original: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return original(*args, **kwargs)

        return wrapped

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access during load: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(CLIPModel, "from_pretrained", spy(CLIPModel.from_pretrained))
    monkeypatch.setattr(CLIPProcessor, "from_pretrained", spy(CLIPProcessor.from_pretrained))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    Shard.load(clip_manifest, sha256_file(clip_manifest), mask_count=1)
    assert len(calls) == 2
    assert all(call.get("local_files_only") is True for call in calls)
    assert calls[0].get("use_safetensors") is True


def _copy(manifest: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(manifest.parent, target)
    return target / manifest.name


def test_a_changed_file_is_refused_naming_it(clip_manifest: Path, tmp_path: Path) -> None:
    manifest = _copy(clip_manifest, tmp_path / "w")
    tokenizer = manifest.parent / "clip" / "tokenizer.json"
    expected = sha256_file(tokenizer)
    tokenizer.write_text(tokenizer.read_text(encoding="utf-8") + " ", encoding="utf-8")
    with pytest.raises(WeightsError) as error:
        Shard.load(manifest, sha256_file(manifest))
    message = str(error.value)
    assert "tokenizer.json" in message
    assert expected in message and sha256_file(tokenizer) in message


def test_an_unpinned_file_in_the_checkpoint_is_refused(clip_manifest: Path, tmp_path: Path) -> None:
    manifest = _copy(clip_manifest, tmp_path / "w")
    (manifest.parent / "clip" / "pytorch_model.bin").write_bytes(b"not pinned")
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin.*not pinned"):
        Shard.load(manifest, sha256_file(manifest))


def test_a_folder_without_safetensors_weights_gets_no_manifest(tmp_path: Path) -> None:
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        hf_clip.write_manifest(tmp_path)


# --- δ from the operator's own pairs (training/pairs.py, `poc-node calibrate-pairs`)


def _write_pairs(folder: Path, count: int, mismatched: bool = False) -> Path:
    from PIL import Image

    folder.mkdir()
    lines = []
    words = ["red", "blue", "green", "black", "white", "grey", "pink", "gold"]
    for i in range(count):
        pixels = np.random.default_rng(100 + i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
        lines.append({"text": f"a {words[i]} thing", "file": f"p{i}.png"})
        if mismatched:
            lines.append({"text": f"a {words[i]} thing", "file": f"p{(i + 1) % count}.png"})
            lines[-1]["match"] = False
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def test_calibrate_pairs_command_writes_delta_and_a_new_hash(
    clip_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.ops.cli import main

    manifest = _copy(clip_manifest, tmp_path / "w")
    before = sha256_file(manifest)
    pairs = _write_pairs(tmp_path / "pairs", 6)
    assert main(["calibrate-pairs", "--weights", str(manifest), "--pairs", str(pairs)]) == 0
    out = capsys.readouterr().out
    after = sha256_file(manifest)
    assert after != before
    assert f"sha256 {after}" in out
    assert "image-text: 6 matched, 6 mismatched (derived" in out
    raw = json.loads(manifest.read_text(encoding="utf-8"))
    delta = raw["pair_delta"]["image-text"]
    record = raw["pair_calibration"]["image-text"]
    assert record["pairs_sha256"] == sha256_file(pairs)
    assert record["rule"] == "best separation"
    low = min(record["matched_distance"]["min"], record["mismatched_distance"]["min"])
    high = max(record["matched_distance"]["max"], record["mismatched_distance"]["max"])
    assert low - 1e-5 <= delta <= high + 1e-5
    assert raw["pair_delta"]["audio-text"] == 2.0  # only pairs present are calibrated
    shard = Shard.load(manifest, after)
    assert shard.delta(Modality.TEXT, Modality.IMAGE) == delta


def test_calibrate_pairs_quantile_accepts_that_share(
    clip_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.commands import main

    manifest = _copy(clip_manifest, tmp_path / "w")
    pairs = _write_pairs(tmp_path / "pairs", 4, mismatched=True)
    args = ["calibrate-pairs", "--weights", str(manifest), "--pairs", str(pairs)]
    assert main([*args, "--quantile", "1"]) == 0
    raw = json.loads(manifest.read_text(encoding="utf-8"))
    record = raw["pair_calibration"]["image-text"]
    assert record["mismatched_derived"] is False and record["mismatched"] == 4
    assert record["matched_accepted"] == 1.0
    assert abs(raw["pair_delta"]["image-text"] - record["matched_distance"]["max"]) < 1e-5
    assert "from the file" in capsys.readouterr().out


def test_calibrate_pairs_refuses_a_wrong_manifest_hash(
    clip_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.commands import main

    manifest = _copy(clip_manifest, tmp_path / "w")
    before = manifest.read_bytes()
    pairs = _write_pairs(tmp_path / "pairs", 2)
    args = ["calibrate-pairs", "--weights", str(manifest), "--pairs", str(pairs)]
    assert main([*args, "--manifest-sha256", "0" * 64]) == 1
    assert "has sha256" in capsys.readouterr().err
    assert manifest.read_bytes() == before


class _StubShard:
    """Embeds by a fixed table keyed by the item's SHA-256: distances chosen by the test."""

    def __init__(self, table: dict[bytes, np.ndarray[Any, Any]]) -> None:
        from encoders.weights import DEFAULT_PREPROCESS

        self.preprocess = DEFAULT_PREPROCESS
        self.table = table

    def embed(self, requests: list[EncodeRequest], beacon: bytes) -> list[Any]:
        from encoders.embedding import ItemEmbedding

        return [
            ItemEmbedding(self.table[r.data_sha256].astype(np.float32), 0.0, 1.0, (0.0,), (True,))
            for r in requests
        ]

    def delta(self, a: Modality, b: Modality) -> float:
        return 2.0


def test_delta_falls_between_separated_matched_and_mismatched(tmp_path: Path) -> None:
    from training.pairs import measure, read_pairs

    pairs = _write_pairs(tmp_path / "pairs", 5, mismatched=True)
    lines = read_pairs(pairs)
    table = {}
    for i, line in enumerate(line for line in lines if line.match):
        axis = np.zeros(8)
        axis[i] = 1.0
        tilt = np.zeros(8)
        tilt[(i + 3) % 8] = 0.2 + 0.02 * i
        table[hashlib.sha256(line.text.encode()).digest()] = axis
        table[hashlib.sha256(line.path.read_bytes()).digest()] = axis + tilt
    [figure] = measure(_StubShard(table), lines)
    assert figure.pair == "image-text" and len(figure.matched) == len(figure.mismatched) == 5
    assert max(figure.matched) < figure.delta < min(figure.mismatched)
    assert figure.accepted == 1.0 and figure.rejected == 1.0


def test_a_bad_pairs_line_is_named(tmp_path: Path) -> None:
    from training.pairs import read_pairs

    pairs = _write_pairs(tmp_path / "pairs", 2)
    pairs.write_text(
        pairs.read_text(encoding="utf-8") + '{"text": "x", "file": "missing.png"}\n',
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: no file"):
        read_pairs(pairs)
    pairs.write_text('{"text": "x", "picture": "p0.png"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: unknown field"):
        read_pairs(pairs)


def test_init_hf_clip_command_pins_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.commands import main

    write_tiny_clip(tmp_path / "w" / "clip")
    assert main(["init-hf-clip", "--dir", str(tmp_path / "w")]) == 0
    manifest = tmp_path / "w" / "manifest.json"
    assert f"manifest_sha256: {sha256_file(manifest)}" in capsys.readouterr().out
    assert main(["init-hf-clip", "--dir", str(tmp_path / "none")]) == 1
    assert "poc-node init-hf-clip: error:" in capsys.readouterr().err
