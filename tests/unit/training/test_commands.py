"""``train``/``eval``/``embed`` through their argparse front end, on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from encoders.shard import Shard
from encoders.weights import create_untrained_shard, sha256_file
from training.commands import main
from training.corpus import Corpus
from training.evaluation import calibrate, embed_halves, evaluate, format_report


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_untrained_shard(tmp_path_factory.mktemp("w"), seeds=(0, 1))


@pytest.mark.parametrize("command", ["train", "eval", "embed"])
def test_help_and_bad_usage(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "usage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main([command, "--no-such-flag"])
    assert done.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_embed_prints_a_unit_vector(untrained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["embed", "--weights", str(untrained), "text:a red circle"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["modality"] == "text" and out["dim"] == 256 == len(out["vector"])
    assert abs(float(np.linalg.norm(out["vector"])) - 1.0) < 1e-3
    assert out["weights"] == sha256_file(untrained)


def test_embed_reports_a_wrong_hash_on_one_line(
    untrained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["embed", "--weights", str(untrained), "--manifest-sha256", "0" * 64, "text:x"]) == 1
    )
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["embed", "--weights", str(untrained), "/no/such/file"]) == 1


def test_eval_figures_on_tiny_data(untrained: Path, micro_corpus: Corpus) -> None:
    shard = Shard.load(untrained, sha256_file(untrained))
    halves = embed_halves(shard, micro_corpus)
    deltas = calibrate(halves)
    figures = evaluate(halves, deltas, trials=3)
    assert len(figures["retrieval"]) == 12 and len(figures["pairs"]) == 6
    for row in figures["retrieval"].values():
        assert 0.0 <= row["r1"] <= row["r5"] <= 1.0
    assert len(figures["retrieval_every_concept"]) == 12
    for row in figures["retrieval_every_concept"].values():
        assert 0.0 <= row["r1"] <= row["r5"] <= 1.0
    for row in figures["pairs"].values():
        assert 0.0 <= row["accepted"] <= 1.0 and 0.0 <= row["rejected"] <= 1.0
    assert "rejected_shape" in figures["pairs"]["image-text"]
    assert set(figures["fusion"]) == {
        "image+audio->text",
        "image+video->text",
        "audio+image->text",
        "audio+video->text",
        "video+image->text",
        "video+audio->text",
    }
    report = format_report(figures)
    assert "text->image" in report and "image-text" in report
