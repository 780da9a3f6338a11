"""Proof of Curiosity where it must fire: the shipped encoders, a real broker, real media.

A fresh node (shipped weights, their calibrated cutoff and radii, their
genesis history) receives captioned pictures of the closed world through
Mosquitto. New data is paid: the ledger holds exactly the rewards of the
final Results, and they are not zero. Then the cheapest attacks on the
reward: near-copies of a paid pair from other keys (new bytes, same datum)
and noise pictures earn nothing, and a caption reused with a new picture (as it was, or
with marks added: punctuation, case, quotes, look-alike letters, markup, an
emoji) pays for the picture alone.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
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
    # Captions of paid pairs copied with marks a copier adds for free (each alone beyond
    # text's radius as the bytes read: 0.015-0.48), each beside a fresh picture.
    marked = [
        WorldSubmission(
            "marked",
            (
                replace(caption, data=mark(caption.data.decode()).encode()),
                maker.item(Modality.IMAGE, caption.concept),  # type: ignore[arg-type]
            ),
        )
        for caption, mark in zip(
            [pair.items[0] for pair in novel[2:6]],
            [
                lambda text: f"{text}!!!",
                lambda text: f'"{text.upper()}"',
                lambda text: text.replace("e", "\u0435").replace("a", "\u0430"),  # Cyrillic
                lambda text: f"<b>{text}</b> \U0001f534",
            ],
            strict=True,
        )
    ]

    async def scenario() -> dict[bytes, dict[str, object]]:
        async with ResultListener(broker.port) as listener:
            first = [Peer().submission(wire(s)) for s in novel + seen]
            for raw in first:
                await listener.publish(raw)
            for raw in first:
                await listener.final(submission_id(raw), timeout=90)
            later = [Peer().submission(wire(s)) for s in [*copies, reused, *noise, *marked]]
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
    first_ids, copy_ids, reused_id, noise_ids = ids[:16], ids[16:19], ids[19], ids[20:23]
    marked_ids = ids[23:]
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
    # the same for a paid caption copied with marks: read as its original, a duplicate
    assert len(marked_ids) == 4
    for identity in marked_ids:
        result = finals[identity]
        assert result["status"] == "final", result
        caption_score, picture_score = result["scores_ppm"]  # type: ignore[misc]
        assert caption_score is None and picture_score is not None, result
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


def _same_pixels(item: WorldItem, note: str = "mine now") -> WorldItem:
    """New bytes, the very same pixels: the cheapest copy (a metadata chunk added)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", note)
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
    into a pair, was judged against the wrong point and paid again.

    A copy's bytes differ, so its masks do (they are seeded by the bytes' hash):
    its own embedding lies near the original's, and now and then beyond ε, which
    is the encoders' limit, not this check's. So each copy is judged against the
    original's own embedding as certified (the store's ``own_vectors``): within ε,
    it must be a duplicate."""
    broker = start_mosquitto(tmp_path)
    config = write_node_config(
        tmp_path / "node.yaml",
        rounds={"round_seconds": 2},
        encoders=shipped_weights(),
        scoring={"emission": EMISSION, "top_k": 8},
    )
    manifest = json.loads(Path(shipped_weights()["manifest"]).read_text())
    within = manifest["scoring"]["duplicate_radius"]["image"] - 1e-4  # clear of knife edges
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

    copies = [  # three copies of each paid pair's picture, alone, each its own bytes
        WorldSubmission("copy", (_same_pixels(pair.items[1], f"copy {n}"),))
        for pair in pairs
        for n in range(3)
    ]
    copies += [
        WorldSubmission("copy", (caption_other_than(pairs[0]), _same_pixels(pairs[0].items[1]))),
        WorldSubmission(
            "copy", (maker.item(Modality.TEXT, novel[6]), _same_pixels(alone.items[0]))
        ),
    ]
    first_raws = [Peer().submission(wire(s)) for s in [*pairs, alone]]  # a new key each
    copy_raws = [Peer().submission(wire(s)) for s in copies]

    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        async with ResultListener(broker.port) as listener:
            outcomes = []
            for raws in (first_raws, copy_raws):
                for raw in raws:
                    await listener.publish(raw)
                outcomes.append(
                    [await listener.final(submission_id(raw), timeout=90) for raw in raws]
                )
            return outcomes[0], outcomes[1]

    try:
        first, later = asyncio.run(scenario())
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]
        broker.stop()
    database = sqlite3.connect(tmp_path / "node" / "data" / "node.sqlite3")

    def own_in_store(raw: bytes, item: int) -> np.ndarray | None:
        row = database.execute(
            "SELECT vector FROM own_vectors WHERE submission_id = ? AND item = ?",
            (submission_id(raw), item),
        ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype="<f2").astype(np.float64)

    # the originals are paid, their pictures scored: the mechanism fires
    for result, picture in [*((r, 1) for r in first[:-1]), (first[-1], 0)]:
        assert result["status"] == "final", result
        assert result["scores_ppm"][picture] is not None, result  # type: ignore[index]
    assert sum(int(r["reward"]) for r in first) > 0  # type: ignore[call-overload]
    originals = [own_in_store(raw, 1) for raw in first_raws[:-1]]
    assert all(own is not None for own in originals)
    *copies_alone, copy_repaired, copy_paired = later
    missed_by_the_old_rule = 0
    for index, result in enumerate(copies_alone):
        original, fused = originals[index // 3], _vector(first[index // 3], 1)
        copy = _vector(result, 0)  # alone: its own embedding
        if _distance(copy, original) <= within:  # type: ignore[arg-type]
            assert (result["status"], result["reason"], result["reward"]) == (
                "rejected",
                "duplicate",
                0,
            ), result
            missed_by_the_old_rule += _distance(copy, fused) > within + 2e-4
    # Fusion moved some of those pictures in H beyond the radius of their copies: the
    # old rule (against the fused embedding) could not see those copies.
    assert missed_by_the_old_rule >= 1
    # Re-paired, and paid alone then copied into a pair: the picture earns nothing,
    # unless its own embedding lies beyond ε of the original's.
    for result, raw, original in (
        (copy_repaired, copy_raws[-2], originals[0]),
        (copy_paired, copy_raws[-1], _vector(first[-1], 0)),
    ):
        if result["status"] != "final" or result["scores_ppm"][1] is None:  # type: ignore[index]
            continue
        own = own_in_store(raw, 1)
        assert own is not None and _distance(own, original) > within, result  # type: ignore[arg-type]
    database.close()
