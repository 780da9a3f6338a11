"""Proof of Curiosity where it must fire: the shipped encoders, a real broker, real media.

A fresh node (shipped weights, their calibrated cutoff and radii, their
genesis history) receives captioned pictures of the closed world through
Mosquitto. New data is paid: the ledger holds exactly the rewards of the
final Results, and they are not zero. Then the cheapest attacks on the
reward: near-copies of a paid pair from other keys (new bytes, same datum)
and noise pictures earn nothing, and a caption reused with a new picture
pays for the picture alone.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from encoders.modality import Modality
from tests.conftest import POC_NODE, ROOT, start_mosquitto, start_node, write_node_config
from tests.peer import Peer, ResultListener, submission_id
from training.stream import WorldMaker, WorldSubmission, concepts

pytestmark = pytest.mark.integration

EMISSION = 1_000_000


def shipped_weights() -> dict[str, str]:
    encoders = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())["encoders"]
    return {
        "manifest": str(ROOT / "weights" / "default" / "manifest.json"),
        "manifest_sha256": encoders["manifest_sha256"],
    }


def wire(submission: WorldSubmission) -> list[tuple[str, str, bytes]]:
    return [(str(item.modality), item.mime, item.data) for item in submission.items]


def test_new_data_is_paid_and_copies_are_not(tmp_path: Path):
    broker = start_mosquitto(tmp_path)
    config = write_node_config(
        tmp_path / "node.yaml",
        rounds={"round_seconds": 2},
        encoders=shipped_weights(),
        scoring={"emission": EMISSION, "top_k": 5},
    )
    node = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{broker.port}", config)
    maker = WorldMaker(11)
    novel = [maker.pair("novel", concept, Modality.IMAGE) for concept in concepts(novel=True)]
    seen = [maker.pair("seen", c, Modality.IMAGE) for c in concepts(novel=False)[:8]]
    original, other = novel[0], novel[1]
    copies = [
        WorldSubmission("copy", (original.items[0], maker.reencode(original.items[1])))
        for _ in range(3)
    ]
    fresh_picture = maker.item(Modality.IMAGE, other.items[1].concept)  # type: ignore[arg-type]
    reused = WorldSubmission("reused", (other.items[0], fresh_picture))
    noise = [maker.noise(Modality.IMAGE) for _ in range(3)]  # random pixels, each its own key

    async def scenario() -> dict[bytes, dict[str, object]]:
        async with ResultListener(broker.port) as listener:
            first = [Peer().submission(wire(s)) for s in novel + seen]
            for raw in first:
                await listener.publish(raw)
            for raw in first:
                await listener.final(submission_id(raw), timeout=90)
            later = [Peer().submission(wire(s)) for s in [*copies, reused, *noise]]
            for raw in later:
                await listener.publish(raw)
            for raw in later:
                await listener.final(submission_id(raw), timeout=90)
            finals = {}
            for raw in first + later:
                [result] = [
                    r for r in listener.about(submission_id(raw)) if r["status"] != "accepted"
                ]
                finals[submission_id(raw)] = result
            return finals

    try:
        finals = asyncio.run(scenario())
        duplicates_counted = node.metric("poc_rejections_total", 'reason="duplicate"')
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]
        broker.stop()

    ids = list(finals)
    first_ids, copy_ids, reused_id, noise_ids = ids[:16], ids[16:19], ids[19], ids[20:]
    # new data is paid: the mechanism fires
    paid = [finals[i]["reward"] for i in first_ids]
    assert sum(paid) > 0 and sum(1 for r in paid if r) >= 2, paid  # type: ignore[operator]
    novel_scores = [
        s
        for i in first_ids[:8]
        for s in finals[i]["scores_ppm"] or []  # type: ignore[attr-defined]
    ]
    assert sum(1 for s in novel_scores if s) >= 4, novel_scores
    # near-copies of a paid pair from other keys: duplicate, nothing paid
    for identity in copy_ids:
        result = finals[identity]
        assert (result["status"], result["reason"], result["reward"]) == (
            "rejected",
            "duplicate",
            0,
        ), result
    # noise pictures repeat the genesis history's known junk: duplicates, nothing paid
    assert len(noise_ids) == 3
    for identity in noise_ids:
        result = finals[identity]
        assert (result["status"], result["reason"], result["reward"]) == (
            "rejected",
            "duplicate",
            0,
        ), result
    # every duplicate is counted once, whether judged at intake or after its round
    assert duplicates_counted == len(copy_ids) + len(noise_ids)
    # a caption reused with a new picture: the caption earns nothing, the picture is scored
    result = finals[reused_id]
    assert result["status"] == "final", result
    caption_score, picture_score = result["scores_ppm"]  # type: ignore[misc]
    assert caption_score is None and picture_score is not None
    # the ledger holds exactly the final rewards, and they are not zero
    total = sum(int(r["reward"]) for r in finals.values())  # type: ignore[call-overload]
    ledger = subprocess.run(
        [str(POC_NODE), "ledger", "--data-dir", str(tmp_path / "node" / "data"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert sum(json.loads(ledger.stdout).values()) == total > 0
    assert total % EMISSION == 0  # each round that paid paid its whole emission
