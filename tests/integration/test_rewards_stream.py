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
import io
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from encoders.modality import Modality
from tests.conftest import POC_NODE, ROOT, start_mosquitto, start_node, write_node_config
from tests.peer import Peer, ResultListener, submission_id
from training.stream import WorldItem, WorldMaker, WorldSubmission, concepts

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


def _same_pixels(item: WorldItem) -> WorldItem:
    """New bytes, the very same pixels: the cheapest copy (a metadata chunk added)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "mine now")
    out = io.BytesIO()
    Image.open(io.BytesIO(item.data)).convert("RGB").save(out, format="PNG", pnginfo=info)
    return replace(item, mime="image/png", data=out.getvalue())


def _vector(result: dict, index: int) -> np.ndarray:
    entry = result["embeddings"][index]
    return np.frombuffer(entry["vector"], dtype="<f2").astype(np.float64)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_a_copy_is_not_paid_again_by_changing_its_pairing(tmp_path: Path):
    """Found from the outside: a pair's items join H fused, a quarter of the partner
    mixed in, which moves them past the near-duplicate radius. A copy of a paid
    picture sent alone, or beside another caption, or a picture paid alone copied
    into a pair, was judged against the wrong point and paid again."""
    broker = start_mosquitto(tmp_path)
    config = write_node_config(
        tmp_path / "node.yaml",
        rounds={"round_seconds": 2},
        encoders=shipped_weights(),
        scoring={"emission": EMISSION, "top_k": 8},
    )
    manifest = json.loads(Path(shipped_weights()["manifest"]).read_text())
    radius = manifest["scoring"]["duplicate_radius"]["image"]
    node = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{broker.port}", config)
    maker = WorldMaker(12)
    novel = concepts(novel=True)
    pairs = [maker.pair("novel", concept, Modality.IMAGE) for concept in novel[:6]]
    alone = WorldSubmission("novel", (maker.item(Modality.IMAGE, novel[6]),))

    def caption_other_than(pair: WorldSubmission) -> WorldItem:
        """Another partner that still makes a valid pair: a caption of the same concept."""
        concept = pair.items[1].concept
        assert concept is not None
        return next(
            caption
            for caption in (maker.item(Modality.TEXT, concept) for _ in range(50))
            if caption.data != pair.items[0].data
        )

    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        async with ResultListener(broker.port) as listener:
            originals = [*pairs, alone]
            raws = [Peer().submission(wire(s)) for s in originals]  # a new key each
            for raw in raws:
                await listener.publish(raw)
            first = [await listener.final(submission_id(raw), timeout=90) for raw in raws]
            copies = [
                *(WorldSubmission("copy", (_same_pixels(pair.items[1]),)) for pair in pairs),
                WorldSubmission(
                    "copy", (caption_other_than(pairs[0]), _same_pixels(pairs[0].items[1]))
                ),
                WorldSubmission(
                    "copy",
                    (maker.item(Modality.TEXT, novel[6]), _same_pixels(alone.items[0])),
                ),
            ]
            raws = [Peer().submission(wire(s)) for s in copies]
            for raw in raws:
                await listener.publish(raw)
            later = [await listener.final(submission_id(raw), timeout=90) for raw in raws]
            return first, later

    try:
        first, later = asyncio.run(scenario())
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]
        broker.stop()
    # the originals are paid, their pictures scored: the mechanism fires
    for result, picture in [*((r, 1) for r in first[:-1]), (first[-1], 0)]:
        assert result["status"] == "final", result
        assert result["scores_ppm"][picture] is not None, result  # type: ignore[index]
    assert sum(int(r["reward"]) for r in first) > 0  # type: ignore[call-overload]
    *copies_alone, copy_repaired, copy_paired = later
    for result in copies_alone:
        assert (result["status"], result["reason"], result["reward"]) == (
            "rejected",
            "duplicate",
            0,
        ), result
    # Some of those pictures lie in H beyond the radius of their copies, as fusion
    # moved them: the old rule (fused against fused) could not see those copies.
    moved = [
        _distance(_vector(copy, 0), _vector(original, 1))
        for copy, original in zip(copies_alone, first, strict=False)
    ]
    assert max(moved) > radius, (moved, radius)
    for result in (copy_repaired, copy_paired):  # the picture earns nothing
        if result["status"] == "final":
            assert result["scores_ppm"][1] is None, result  # type: ignore[index]
        else:
            assert (result["reason"], result["reward"]) == ("duplicate", 0), result
