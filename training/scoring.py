"""Calibrating the gap cutoff ``qualify_ratio`` and the near-duplicate radii ε.

Both depend on the embedding space, so they are measured on the shipped
encoders and stored beside the weights, as δ is (``encoders.weights``):

- A history H of the closed world: captioned pictures, speech and clips of
  every concept the encoders were trained on, embedded and fused exactly as
  the node does.
- ``qualify_ratio``: the ratio ``d_E / d_nn`` of genuine new data (new
  renderings of known concepts and colour-shape combinations H has never
  held) against that of noise (random pixels, tones, tokens, flicker), each
  scored against H; the cutoff is chosen as δ is (``calibrate_delta``:
  most genuine accepted plus noise rejected, the middle of a tie).
- ``duplicate_radius`` per modality: the cosine distance between an item of
  H and the same datum in new bytes (re-saved, resized, a few pixels
  changed, trimmed or re-sampled, re-encoded, re-cased) against the distance
  between that item and another datum of the same concept; chosen the same
  way.

A second stream from another seed then reports, by kind, what scoring makes
of data it did not calibrate on (``report``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from encoders.fusion import cosine_distance
from encoders.modality import Modality
from encoders.shard import Shard
from encoders.weights import (
    FORMAT_VERSION,
    GENESIS_FILE,
    UNCALIBRATED_SCORING,
    ScoringCalibration,
    sha256_file,
    write_genesis,
)
from rewards.curiosity import DEFAULT_K, PPM, RoundItem, ScoringRules, gap_scores, score_in_order
from rewards.history import History
from training.calibration import calibrate_delta, rates
from training.stream import (
    MEDIA,
    Embedded,
    WorldMaker,
    WorldSubmission,
    concepts,
    embed_submissions,
)

Log = Callable[[str], None]
BEACON = b"poc-scoring-calibration"
HISTORY_MEDIA = (Modality.IMAGE, Modality.IMAGE, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)
"""The pairs each known concept contributes to the calibration history."""


JUNK_PER_MODALITY = 24
"""Noise items of each modality that the genesis history holds (see ``add_junk``)."""
JUNK_SPARED = 0.99
"""A junk radius is used only where it spares this share of genuine items. Where
the radius that best separates noise from genuine data spares fewer, the largest
radius that spares this share is taken instead (``sparing_radius``)."""
JUNK_MARGIN = 0.01
"""Cosine distance kept between a sparing junk radius and the genuine item it spares."""
JUNK_CAUGHT = 0.5
"""...and only where it catches at least this share of the noise: a modality whose
noise mixes with genuine data (text: random tokens land among captions) is left to
the gap cutoff."""


def sparing_radius(genuine: Sequence[float]) -> float:
    """About the largest radius within which at most ``1 - JUNK_SPARED`` of ``genuine`` lie.

    ``JUNK_MARGIN`` short of the nearest genuine item that would be one too many
    (but never nearer than halfway to the one before it): genuine data the
    calibration did not see sits about as far, not exactly as far.
    """
    ordered = sorted(genuine)
    allowed = int((1.0 - JUNK_SPARED) * len(ordered) + 1e-9)
    below = ordered[allowed - 1] if allowed > 0 else 0.0
    return max(0.5 * (below + ordered[allowed]), ordered[allowed] - JUNK_MARGIN)


@dataclass(frozen=True)
class WorldHistory:
    """H built from embedded history submissions, and where each item came from."""

    history: History
    embedded: list[Embedded]
    hashes: set[bytes]
    modalities: list[str]
    vectors: list[npt.NDArray[np.float64]]
    junk: list[bool]

    def add(self, embedded: Sequence[Embedded], *, junk: bool = False) -> None:
        """Append items to H, or to the known junk beside it (and to the genesis file)."""
        items = [
            (str(item.modality), vector, item.sha256)
            for e in embedded
            if not e.too_far
            for item, vector in zip(e.submission.items, e.vectors, strict=True)
        ]
        if not items:
            return
        add = self.history.add_junk if junk else self.history.add
        add([m for m, _, _ in items], np.stack([v for _, v, _ in items]))
        self.modalities.extend(m for m, _, _ in items)
        self.vectors.extend(v for _, v, _ in items)
        self.junk.extend(junk for _ in items)
        self.hashes.update(h for _, _, h in items)


def build_history(
    shard: Shard, alpha: Mapping[Modality, float], maker: WorldMaker, rounds: int = 1
) -> WorldHistory:
    """Pairs of every known concept (``HISTORY_MEDIA`` per concept, ``rounds`` times)."""
    submissions = [
        maker.pair("seen", concept, media)
        for _ in range(rounds)
        for concept in concepts(novel=False)
        for media in HISTORY_MEDIA
    ]
    embedded = [e for e in embed_submissions(shard, submissions, alpha, BEACON) if not e.too_far]
    world = WorldHistory(History(shard.dim), embedded, set(), [], [], [])
    world.add(embedded)
    return world


def add_junk(
    shard: Shard, alpha: Mapping[Modality, float], maker: WorldMaker, world: WorldHistory
) -> list[Embedded]:
    """Keep samples of every noise family beside H as known junk.

    Noise pictures and clips land within a few hundredths of each other,
    about as far from every concept as new combinations do, so no gap rule
    tells them apart; but they repeat each other. An item within the junk
    radius of its modality of known junk repeats it and earns nothing. Junk
    is kept beside H, not in it, so that it never shrinks the gap of genuine
    new data near it.
    """
    junk = [maker.noise(m) for m in Modality for _ in range(JUNK_PER_MODALITY)]
    embedded = embed_submissions(shard, junk, alpha, BEACON)
    world.add(embedded, junk=True)
    return embedded


def _ratios(history: History, vectors: Sequence[npt.NDArray[np.float64]], k: int) -> list[float]:
    if not vectors:
        return []
    scores = gap_scores(history, np.stack(vectors), k=k, qualify_ratio=1.0)
    return [s.d_e / s.d_nn for s in scores if s.d_nn > 0]


def _reencoded(maker: WorldMaker, original: WorldSubmission, modality: Modality) -> WorldSubmission:
    """The same submission with its ``modality`` item saved again in new bytes."""
    items = tuple(
        maker.reencode(item) if item.modality is modality else item for item in original.items
    )
    return WorldSubmission("reencoding", items)


def _vector_of(embedded: Embedded, modality: Modality) -> npt.NDArray[np.float64]:
    for item, vector in zip(embedded.submission.items, embedded.vectors, strict=True):
        if item.modality is modality:
            return vector
    raise ValueError(f"no {modality} item")


def _radius_samples(
    shard: Shard,
    alpha: Mapping[Modality, float],
    maker: WorldMaker,
    world: WorldHistory,
    per_modality: int,
) -> dict[Modality, tuple[list[float], list[float]]]:
    """Per modality: (re-encoding distances, distinct same-concept distances)."""
    out: dict[Modality, tuple[list[float], list[float]]] = {}
    for modality in Modality:
        originals = [
            e
            for e in world.embedded
            if any(item.modality is modality for item in e.submission.items)
        ]
        count = min(per_modality, len(originals))
        picks = [originals[int(i)] for i in maker.rng.sample(range(len(originals)), count)]
        copies = [_reencoded(maker, e.submission, modality) for e in picks]
        fresh = []
        for e in picks:
            media = next(i.modality for i in e.submission.items if i.modality is not Modality.TEXT)
            concept = e.submission.items[0].concept
            assert concept is not None
            pair = maker.pair("seen", concept, media)
            while modality is Modality.TEXT and pair.items[0].data == e.submission.items[0].data:
                pair = maker.pair("seen", concept, media)
            fresh.append(pair)
        embedded = embed_submissions(shard, copies + fresh, alpha, BEACON)
        same, distinct = [], []
        for index, original in enumerate(picks):
            mine = _vector_of(original, modality)
            copy, other = embedded[index], embedded[len(picks) + index]
            if not copy.too_far:
                same.append(cosine_distance(mine, _vector_of(copy, modality)))
            if not other.too_far:
                distinct.append(cosine_distance(mine, _vector_of(other, modality)))
        out[modality] = (same, distinct)
    return out


def _genuine_and_noise(
    maker: WorldMaker, per_kind: int
) -> tuple[list[WorldSubmission], list[WorldSubmission], list[WorldSubmission]]:
    known, novel = concepts(novel=False), concepts(novel=True)
    seen = [
        maker.pair("seen", maker.rng.choice(known), maker.rng.choice(MEDIA))
        for _ in range(per_kind)
    ]
    new = [
        maker.pair("novel", novel[i % len(novel)], MEDIA[(i // len(novel)) % len(MEDIA)])
        for i in range(per_kind)
    ]
    noise = [maker.noise(list(Modality)[i % len(Modality)]) for i in range(per_kind)]
    return seen, new, noise


@dataclass(frozen=True)
class Calibrated:
    """The outcome of ``calibrate_scoring``: the constants, the figures, the genesis history."""

    calibration: ScoringCalibration
    figures: dict[str, Any]
    genesis_modalities: list[str]
    genesis_vectors: npt.NDArray[np.float16]
    genesis_junk: list[bool]


def calibrate_scoring(
    shard: Shard,
    alpha: Mapping[Modality, float],
    *,
    k: int = DEFAULT_K,
    seed: int = 0,
    per_kind: int = 64,
    log: Log = print,
) -> Calibrated:
    """Measure ``qualify_ratio`` and the ε of every modality against a genesis history.

    The history the constants were measured against is returned as well: it
    ships beside the weights as the genesis history, so that a fresh node
    scores from its first round and its first rounds judge "new" exactly as
    the calibration did.
    """
    maker = WorldMaker(seed)
    log("scoring calibration: building the history")
    world = build_history(shard, alpha, maker)
    log(f"scoring calibration: |H| = {len(world.history)}; genuine data and noise")
    seen, new, noise = _genuine_and_noise(maker, per_kind)
    embedded = embed_submissions(shard, seen + new + noise, alpha, BEACON)
    by_kind: dict[str, list[npt.NDArray[np.float64]]] = {"seen": [], "novel": [], "noise": []}
    labelled: list[tuple[str, Modality, npt.NDArray[np.float64]]] = []
    for e in embedded:
        if not e.too_far:
            by_kind[e.submission.kind].extend(e.vectors)
            labelled.extend(
                (e.submission.kind, item.modality, vector)
                for item, vector in zip(e.submission.items, e.vectors, strict=True)
            )
    log("scoring calibration: known junk, noise against genuine data")
    junk = add_junk(shard, alpha, maker, world)
    junk_radius: dict[Modality, float] = {}
    junk_figures: dict[str, Any] = {}
    for modality in Modality:
        mine = [e.vectors[0] for e in junk if e.submission.items[0].modality is modality]
        near_noise = [
            _nearest(mine, v) for kind, m, v in labelled if kind == "noise" and m is modality
        ]
        near_genuine = [
            _nearest(mine, v) for kind, m, v in labelled if kind != "noise" and m is modality
        ]
        if not near_noise or not near_genuine:
            continue
        cut = calibrate_delta(near_noise, near_genuine)
        rule = "best separation"
        if rates(near_noise, near_genuine, cut).rejected < JUNK_SPARED:
            cut, rule = sparing_radius(near_genuine), "sparing genuine data"
        spared = rates(near_noise, near_genuine, cut).rejected
        caught = rates(near_noise, near_genuine, cut).accepted
        used = spared >= JUNK_SPARED and caught >= JUNK_CAUGHT
        junk_figures[str(modality)] = {
            "noise": _quantiles(near_noise),
            "genuine": _quantiles(near_genuine),
            "radius": cut,
            "rule": rule,
            "noise_caught": caught,
            "genuine_spared": spared,
            "used": used,
        }
        if used:
            junk_radius[modality] = cut
    # The cutoff has to stop the noise that the junk radius lets through.
    by_kind["noise"] = [
        v
        for kind, m, v in labelled
        if kind == "noise"
        and (
            m not in junk_radius
            or _nearest([e.vectors[0] for e in junk if e.submission.items[0].modality is m], v)
            > junk_radius[m]
        )
    ]
    ratios = {kind: _ratios(world.history, vectors, k) for kind, vectors in by_kind.items()}
    genuine = ratios["seen"] + ratios["novel"]
    # With no noise left past the junk radius, every genuine item qualifies.
    ratio = calibrate_delta(genuine, ratios["noise"]) if ratios["noise"] else 1.01 * max(genuine)
    log("scoring calibration: re-encodings against distinct data of one concept")
    samples = _radius_samples(shard, alpha, maker, world, per_kind)
    radius = {m: calibrate_delta(same, distinct) for m, (same, distinct) in samples.items()}
    figures: dict[str, Any] = {
        "seed": seed,
        "k": k,
        "history": len(world.history),
        "ratio_quantiles": {kind: _quantiles(values) for kind, values in ratios.items() if values},
        "noise_past_junk": len(ratios["noise"]),
        "qualify_ratio": {
            "genuine_qualified": rates(genuine, ratios["noise"] or [2.0], ratio).accepted,
            "novel_qualified": rates(ratios["novel"], ratios["noise"] or [2.0], ratio).accepted,
            "noise_refused": rates(genuine, ratios["noise"] or [2.0], ratio).rejected,
        },
        "duplicate_radius": {
            str(m): {
                "reencoding": _quantiles(same),
                "distinct": _quantiles(distinct),
                "reencodings_caught": rates(same, distinct, radius[m]).accepted,
                "distinct_spared": rates(same, distinct, radius[m]).rejected,
            }
            for m, (same, distinct) in samples.items()
        },
    }
    figures["junk_radius"] = junk_figures
    figures["genesis"] = {"concept_items": len(world.history), "junk_items": sum(world.junk)}
    log(f"scoring calibration: genesis history of {len(world.vectors)} items")
    return Calibrated(
        ScoringCalibration(ratio, radius, junk_radius),
        figures,
        list(world.modalities),
        np.stack(world.vectors).astype(np.float16),
        list(world.junk),
    )


def _nearest(points: Sequence[npt.NDArray[np.float64]], vector: npt.NDArray[np.float64]) -> float:
    return min(cosine_distance(p, vector) for p in points)


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "min": float(array.min()),
        "median": float(np.median(array)),
        "p95": float(np.quantile(array, 0.95)),
        "max": float(array.max()),
    }


def report(
    shard: Shard,
    alpha: Mapping[Modality, float],
    calibration: ScoringCalibration,
    *,
    k: int = DEFAULT_K,
    seed: int = 1,
    per_kind: int = 48,
    log: Log = print,
) -> dict[str, Any]:
    """Qualification rate and mean score by kind, on a stream the calibration never saw.

    Each submission is scored alone against H, as the first of its round, by
    the node's own ``score_in_order``; duplicates count as scoring 0.
    """
    maker = WorldMaker(seed)
    log("scoring report: building the history")
    world = build_history(shard, alpha, maker)
    add_junk(shard, alpha, maker, world)
    seen, new, noise = _genuine_and_noise(maker, per_kind)
    picks = maker.rng.sample(world.embedded, per_kind)  # concept pairs, never junk
    copies = [
        _reencoded(maker, e.submission, maker.rng.choice(list(e.submission.items)).modality)
        for e in picks
    ]
    log("scoring report: scoring seen, novel, noise and re-encoded data")
    embedded = embed_submissions(shard, seen + new + noise + copies, alpha, BEACON)
    rules = ScoringRules(
        k,
        calibration.qualify_ratio,
        {str(m): r for m, r in calibration.duplicate_radius.items()},
        junk_radius={str(m): r for m, r in calibration.junk_radius.items()},
    )
    rows: dict[str, list[tuple[bool, bool, int]]] = {}
    for e in embedded:
        if e.too_far:
            continue
        items = [
            RoundItem(str(item.modality), vector, item.sha256 in world.hashes)
            for item, vector in zip(e.submission.items, e.vectors, strict=True)
        ]
        [verdicts] = score_in_order(world.history, [items], rules)
        rows.setdefault(e.submission.kind, []).extend(
            (v.duplicate, v.gap.qualified, v.gap.score_ppm) for v in verdicts
        )
    out: dict[str, Any] = {"seed": seed, "k": k, "history": len(world.history)}
    for kind, values in rows.items():
        fresh = [row for row in values if not row[0]]
        out[kind] = {
            "items": len(values),
            "duplicates": sum(row[0] for row in values) / len(values),
            "qualified": (sum(row[1] for row in fresh) / len(fresh)) if fresh else 0.0,
            "mean_score": sum(row[2] for row in values) / len(values) / PPM,
        }
    return out


def format_report(calibration: ScoringCalibration, figures: Mapping[str, Any]) -> str:
    """The scoring section of ``poc-node eval``'s report."""
    lines = [
        f"scoring (k = {figures.get('k', 16)}, |H| = {figures['history']}): "
        f"qualify_ratio {calibration.qualify_ratio:.3f}, duplicate radius "
        + ", ".join(f"{m} {r:.4f}" for m, r in calibration.duplicate_radius.items())
        + "; junk radius "
        + ", ".join(f"{m} {r:.3f}" for m, r in calibration.junk_radius.items()),
        f"  {'kind':<11} {'items':>5} {'duplicate':>9} {'qualified':>9} {'mean score':>10}",
    ]
    for kind in ("seen", "novel", "noise", "reencoding"):
        row = figures.get(kind)
        if row:
            lines.append(
                f"  {kind:<11} {row['items']:>5} {row['duplicates']:>9.2f} "
                f"{row['qualified']:>9.2f} {row['mean_score']:>10.3f}"
            )
    return "\n".join(lines)


def write_calibration(
    manifest: Path,
    calibration: ScoringCalibration,
    figures: Mapping[str, Any] | None = None,
    genesis: tuple[Sequence[str], npt.NDArray[np.float16], Sequence[bool]] | None = None,
) -> str:
    """Store the calibration, its figures and its genesis history in ``manifest``.

    Returns the manifest's new SHA-256 (pin it in the configuration).
    """
    raw = json.loads(manifest.read_text(encoding="utf-8"))
    raw["scoring"] = {**calibration.body(), **({"figures": dict(figures)} if figures else {})}
    if genesis is not None:
        path = manifest.parent / GENESIS_FILE
        write_genesis(path, genesis[0], genesis[1], genesis[2])
        raw["files"] = [f for f in raw["files"] if f["path"] != GENESIS_FILE] + [
            {"path": GENESIS_FILE, "sha256": sha256_file(path)}
        ]
        raw["genesis"] = {
            "file": GENESIS_FILE,
            "items": len(genesis[0]) - sum(genesis[2]),
            "junk": sum(genesis[2]),
        }
    manifest.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sha256_file(manifest)


@contextmanager
def loadable_manifest(manifest: Path) -> Iterator[tuple[Path, str]]:
    """``(path, sha256)`` of a manifest the node reads, for calibrating ``manifest``.

    A manifest with a ``scoring`` block is itself, and so is one of another
    format (the node's own check then refuses it, naming the format). One of
    the current format without a ``scoring`` block is copied, beside it so that
    its files resolve, with uncalibrated scoring; the copy is removed afterwards
    and ``manifest`` is left as it was, so a calibration that fails never leaves
    an uncalibrated manifest for a node to load.
    """
    raw = json.loads(manifest.read_text(encoding="utf-8"))
    if raw.get("format_version") != FORMAT_VERSION or "scoring" in raw:
        yield manifest, sha256_file(manifest)
        return
    staging = manifest.with_name(f".{manifest.name}.calibrating")
    raw.update(scoring=UNCALIBRATED_SCORING.body())
    staging.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    try:
        yield staging, sha256_file(staging)
    finally:
        staging.unlink(missing_ok=True)


def calibrate_manifest(
    manifest: Path, *, k: int = DEFAULT_K, seed: int = 0, log: Log = print
) -> tuple[ScoringCalibration, dict[str, Any], str]:
    """Calibrate the weights ``manifest`` pins, in place: ``poc-node calibrate`` and ``train``.

    Returns the calibration, the report on a stream of ``seed + 1`` and the
    manifest's new SHA-256.
    """
    alpha = dict.fromkeys(Modality, 0.75)
    with loadable_manifest(manifest) as (path, sha):
        shard = Shard.load(path, sha)
    found = calibrate_scoring(shard, alpha, k=k, seed=seed, log=log)
    figures = {
        "calibration": found.figures,
        "report": report(shard, alpha, found.calibration, k=k, seed=seed + 1, log=log),
    }
    sha = write_calibration(
        manifest,
        found.calibration,
        figures,
        (found.genesis_modalities, found.genesis_vectors, found.genesis_junk),
    )
    return found.calibration, figures["report"], sha
