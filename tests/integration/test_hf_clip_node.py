"""A node runs on a Hugging Face CLIP manifest: it starts, and a caption-picture pair is final.

The checkpoint is the tiny random one of ``tests.tiny_clip``, pinned by
``poc-node init-hf-clip`` and calibrated by ``poc-node calibrate-pairs`` with
``--quantile 1`` (every matched pair accepted), the path an operator takes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from encoders.weights import sha256_file
from tests.conftest import POC_NODE, ROOT, start_mosquitto, start_node, write_node_config
from tests.media import image_bytes, wav_bytes
from tests.tiny_clip import write_tiny_clip


def _poc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(POC_NODE), *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def test_a_node_on_a_clip_manifest_finalizes_a_caption_picture_pair(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_tiny_clip(weights / "clip")
    made = _poc("init-hf-clip", "--dir", str(weights))
    assert made.returncode == 0, made.stderr
    manifest = weights / "manifest.json"
    picture = tmp_path / "picture.png"
    picture.write_bytes(image_bytes("RGB", "PNG", (40, 30)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"text": "a red circle", "file": "picture.png"}) + "\n", encoding="utf-8"
    )
    calibrated = _poc(
        "calibrate-pairs", "--weights", str(manifest), "--pairs", str(pairs), "--quantile", "1"
    )
    assert calibrated.returncode == 0, calibrated.stderr
    sha = sha256_file(manifest)
    assert f"sha256 {sha}" in calibrated.stdout

    broker = start_mosquitto(tmp_path)
    bus = f"mqtt://127.0.0.1:{broker.port}"
    config = write_node_config(
        tmp_path / "node.yaml",
        encoders={"manifest": str(manifest), "manifest_sha256": sha},
        rounds={"round_seconds": 1},
    )
    node = start_node(tmp_path / "node", bus, config)
    try:
        key = tmp_path / "submitter.key"
        assert _poc("keygen", "--out", str(key)).returncode == 0
        submit = _poc(
            "submit",
            "--key",
            str(key),
            "--bus",
            bus,
            "--json",
            "--timeout",
            "60",
            "text:a red circle",
            str(picture),
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr + node.log_text()
        results = [json.loads(line) for line in submit.stdout.splitlines()]
        assert [r["status"] for r in results] == ["accepted", "final"]
        delta = json.loads(manifest.read_text(encoding="utf-8"))["pair_delta"]["image-text"]
        # the node measures the pair exactly as calibrate-pairs did
        assert abs(results[-1]["pair_distance"] - delta) < 1e-4

        # A CLIP reads no sound: an audio item is refused for what it is, before decoding.
        sound = tmp_path / "tone.wav"
        sound.write_bytes(wav_bytes("PCM_16"))
        refused = _poc("submit", "--key", str(key), "--bus", bus, "--json", str(sound))
        assert refused.returncode == 1, refused.stdout + refused.stderr
        answer = json.loads(refused.stdout.splitlines()[-1])
        assert (answer["status"], answer["reason"]) == ("rejected", "unsupported_modality")
        assert "event=encode_failed" not in node.log_text()
    finally:
        assert node.stop() == 0, node.log_text()
        broker.stop()
