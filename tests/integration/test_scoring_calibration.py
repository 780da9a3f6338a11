"""The shipped scoring calibration, on a stream of the closed world it never saw.

Real encoders, real media bytes (PNG/JPEG, espeak-ng WAV, MP4): new
colour-shape combinations outscore more of the same, noise and re-encodings
earn (almost) nothing. These are the figures `poc-node eval` prints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from encoders.modality import Modality
from encoders.shard import Shard
from tests.conftest import ROOT
from training.scoring import report

pytestmark = pytest.mark.integration


def test_the_shipped_calibration_pays_new_combinations_and_not_noise_or_copies() -> None:
    config = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())
    pin = config["encoders"]
    shard = Shard.load(ROOT / "weights" / "default" / "manifest.json", pin["manifest_sha256"])
    assert shard.genesis is not None and shard.scoring.junk_radius
    figures = report(
        shard,
        dict.fromkeys(Modality, 0.75),
        shard.scoring,
        k=config["scoring"]["k"],
        seed=5,
        per_kind=24,
        log=lambda _: None,
    )
    seen, novel, noise, copies = (figures[k] for k in ("seen", "novel", "noise", "reencoding"))
    assert novel["qualified"] >= 0.6 and seen["qualified"] >= 0.6  # the mechanism fires
    assert novel["mean_score"] > seen["mean_score"] > 0
    assert noise["mean_score"] < 0.2 * novel["mean_score"]  # mostly known junk or cut off
    assert copies["duplicates"] >= 0.9 and copies["mean_score"] < 0.1 * novel["mean_score"]


def test_the_manifest_records_what_it_was_calibrated_for() -> None:
    import json

    raw = json.loads((ROOT / "weights" / "default" / "manifest.json").read_text())
    calibration = raw["scoring"]["figures"]["calibration"]
    assert (
        calibration["k"]
        == yaml.safe_load((ROOT / "config" / "default.yaml").read_text())["scoring"]["k"]
    )
    assert raw["genesis"]["items"] == calibration["genesis"]["concept_items"] > 0
    assert Path(ROOT / "weights" / "default" / raw["genesis"]["file"]).is_file()
