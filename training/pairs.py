"""δ from an operator's own pairs: ``poc-node calibrate-pairs``.

A shard whose encoders were not trained here (a Hugging Face CLIP, say)
has no held-out split to calibrate δ on, so the operator brings pairs: a
JSON Lines file, one pair a line, paths relative to the file::

    {"text": "a red circle", "file": "pictures/circle.png"}
    {"text": "a blue star", "file": "pictures/circle.png", "match": false}

A line is a caption and a PNG, JPEG, WAV or MP4 file (recognised by
content, decoded by the node's own ``decode_media`` at the manifest's
sizes); ``"match": false`` marks a mismatched pair, anything else is a
matched one. Each item is embedded by the shard exactly as the node embeds
it, and a pair's distance is the node's ``cosine_distance`` of the two
ensemble vectors.

Per modality pair present (text-image for a CLIP shard), δ is chosen by
``training.calibration.calibrate_delta`` (the threshold that maximises
matched acceptance + mismatched rejection, mid-gap when they separate). A
pair with no mismatched line gets mismatched pairs derived from its
matched ones: each caption with the next matched line's item (skipped where
the two lines share their caption or their file), which is only right if
the captions describe different things. ``quantile=q`` instead sets δ to the q-quantile of the
matched distances (at least a share q of them accepted), mismatched pairs
then only reported. The manifest is rewritten in place with the new
``pair_delta`` and a ``pair_calibration`` record (figures, rule and the
pairs file's SHA-256, which loading ignores); its new SHA-256 is what the
node's config must pin.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoders.embedding import EncodeRequest
from encoders.fusion import cosine_distance
from encoders.media import MediaLimits, decode_media, media_type_of
from encoders.modality import MEDIA_TYPES, Modality
from encoders.weights import pair_key, sha256_file

CALIBRATION_BEACON = b"poc-calibrate-pairs"
"""Seeds the differential-loss masks that weigh a multi-encoder ensemble."""
FEW_PAIRS = 20
"""Below this many matched pairs the report warns that δ is rough."""
_BATCH = 16


@dataclass(frozen=True)
class PairLine:
    """One line of the pairs file: a caption, a media file, and whether they match."""

    line: int
    text: str
    path: Path
    match: bool


@dataclass(frozen=True)
class PairFigures:
    """What was measured for one modality pair, and the δ chosen from it."""

    pair: str
    matched: list[float]
    mismatched: list[float]
    derived: bool
    delta: float
    previous: float
    rule: str

    @property
    def accepted(self) -> float:
        return float(np.mean(np.asarray(self.matched) <= self.delta))

    @property
    def rejected(self) -> float | None:
        if not self.mismatched:
            return None
        return float(np.mean(np.asarray(self.mismatched) > self.delta))

    def record(self) -> dict[str, Any]:
        """The manifest's ``pair_calibration`` entry for this pair."""
        m = np.asarray(self.matched)
        out: dict[str, Any] = {
            "rule": self.rule,
            "matched": len(self.matched),
            "mismatched": len(self.mismatched),
            "mismatched_derived": self.derived,
            "matched_accepted": round(self.accepted, 6),
            "matched_distance": _summary(m),
        }
        if self.mismatched:
            out["mismatched_rejected"] = round(self.rejected or 0.0, 6)
            out["mismatched_distance"] = _summary(np.asarray(self.mismatched))
        return out


def _summary(values: np.ndarray[Any, Any]) -> dict[str, float]:
    return {
        "min": round(float(values.min()), 6),
        "median": round(float(np.median(values)), 6),
        "p95": round(float(np.quantile(values, 0.95)), 6),
        "max": round(float(values.max()), 6),
    }


def read_pairs(path: Path) -> list[PairLine]:
    """Parse the pairs file; raise ``ValueError`` naming ``FILE:LINE`` for a bad line."""
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
            unknown = set(entry) - {"text", "file", "match"}
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)}")
            text, file, match = entry["text"], entry["file"], entry.get("match", True)
            if not isinstance(text, str) or not isinstance(file, str):
                raise ValueError('"text" and "file" must be strings')
            if not isinstance(match, bool):
                raise ValueError('"match" must be true or false')
        except (ValueError, KeyError) as error:
            raise ValueError(f"{path}:{number}: {error}") from error
        target = path.parent / file
        if not target.is_file():
            raise ValueError(f"{path}:{number}: no file {target}")
        lines.append(PairLine(number, text, target, match))
    if not lines:
        raise ValueError(f"{path} holds no pairs")
    return lines


class _Embedder:
    """Embeds captions and files once each, in batches, as the node would."""

    def __init__(self, shard: Any, log: Callable[[str], None]) -> None:
        self._shard = shard
        self._log = log
        self._limits = MediaLimits()

    def vectors(self, lines: Sequence[PairLine]) -> tuple[dict[str, Any], dict[Path, Any]]:
        texts = sorted({line.text for line in lines})
        paths = sorted({line.path for line in lines})
        requests: list[tuple[Any, EncodeRequest]] = []
        for text in texts:
            data = text.encode("utf-8")
            media = decode_media(
                Modality.TEXT, "text/plain", data, self._limits, self._shard.preprocess
            )
            requests.append((text, EncodeRequest(Modality.TEXT, media, _sha(data))))
        modality_of = {}
        for path in paths:
            mime = media_type_of(path)
            data = path.read_bytes()
            modality = MEDIA_TYPES[mime]
            if modality is Modality.TEXT:
                raise ValueError(f"{path} is text: a pair is a caption and a media file")
            media = decode_media(modality, mime, data, self._limits, self._shard.preprocess)
            modality_of[path] = modality
            requests.append((path, EncodeRequest(modality, media, _sha(data))))
        out: dict[Any, Any] = {}
        for start in range(0, len(requests), _BATCH):
            chunk = requests[start : start + _BATCH]
            embeddings = self._shard.embed([r for _, r in chunk], CALIBRATION_BEACON)
            for (key, request), embedding in zip(chunk, embeddings, strict=True):
                out[key] = (request.modality, embedding.vector)
            self._log(f"embedded {min(start + _BATCH, len(requests))}/{len(requests)} items")
        return {t: out[t] for t in texts}, {p: out[p] for p in paths}


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def choose_delta(
    matched: Sequence[float], mismatched: Sequence[float], quantile: float | None
) -> tuple[float, str]:
    """δ and the name of the rule that chose it."""
    from training.calibration import calibrate_delta

    if quantile is not None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile {quantile} is not in (0, 1]")
        value = float(np.quantile(np.asarray(matched, dtype=np.float64), quantile, method="higher"))
        return min(value, 2.0), f"matched quantile {quantile:g}"
    if not mismatched:
        raise ValueError('no mismatched pairs: add lines with "match": false or use --quantile')
    return calibrate_delta(matched, mismatched), "best separation"


def measure(
    shard: Any,
    lines: Sequence[PairLine],
    *,
    quantile: float | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[PairFigures]:
    """Distances of every pair, grouped by modality pair, and the δ of each group."""
    texts, media = _Embedder(shard, log).vectors(lines)
    groups: dict[Modality, list[PairLine]] = defaultdict(list)
    for line in lines:
        groups[media[line.path][0]].append(line)
    figures = []
    for modality, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        key = pair_key(Modality.TEXT, modality)

        def distance(text: str, path: Path) -> float:
            return cosine_distance(texts[text][1], media[path][1])

        positives = [line for line in members if line.match]
        if not positives:
            raise ValueError(f'{key}: no matched pair (every line says "match": false)')
        matched = [distance(line.text, line.path) for line in positives]
        mismatched = [distance(line.text, line.path) for line in members if not line.match]
        derived = not mismatched
        if derived:
            following = positives[1:] + positives[:1]
            mismatched = [
                distance(line.text, other.path)
                for line, other in zip(positives, following, strict=True)
                if line.text != other.text and line.path != other.path
            ]
        delta, rule = choose_delta(matched, mismatched, quantile)
        previous = float(shard.delta(Modality.TEXT, modality))
        figures.append(PairFigures(key, matched, mismatched, derived, delta, previous, rule))
    return figures


def write_deltas(manifest: Path, figures: Sequence[PairFigures], pairs_file: Path) -> str:
    """Put each pair's δ and its record in the manifest, in place; return the new SHA-256."""
    raw = json.loads(manifest.read_text(encoding="utf-8"))
    records = dict(raw.get("pair_calibration", {}))
    for figure in figures:
        raw["pair_delta"][figure.pair] = float(figure.delta)
        records[figure.pair] = {**figure.record(), "pairs_sha256": sha256_file(pairs_file)}
    raw["pair_calibration"] = records
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(manifest)
    return sha256_file(manifest)


def calibrate_pairs(
    manifest: Path,
    pairs_file: Path,
    *,
    manifest_sha256: str | None = None,
    quantile: float | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[list[PairFigures], str]:
    """Load the shard, measure the pairs, write δ into the manifest; return figures and hash."""
    from encoders.shard import Shard

    lines = read_pairs(pairs_file)
    shard = Shard.load(manifest, manifest_sha256 or sha256_file(manifest))
    figures = measure(shard, lines, quantile=quantile, log=log)
    return figures, write_deltas(manifest, figures, pairs_file)


def format_report(figures: Sequence[PairFigures]) -> str:
    """One block per modality pair: counts, distances, δ and the rates it gives."""
    out = []
    for f in figures:
        how = "derived: each caption with the next line's item" if f.derived else "from the file"
        out.append(f"{f.pair}: {len(f.matched)} matched, {len(f.mismatched)} mismatched ({how})")
        out.append("  matched distance     " + _row(f.matched))
        if f.mismatched:
            out.append("  mismatched distance  " + _row(f.mismatched))
        rejected = "-" if f.rejected is None else f"{f.rejected:.3f}"
        out.append(
            f"  δ {f.delta:.4f} (was {f.previous:.4f}; rule: {f.rule}): "
            f"matched accepted {f.accepted:.3f}, mismatched rejected {rejected}"
        )
        if len(f.matched) < FEW_PAIRS:
            out.append(f"  warning: only {len(f.matched)} matched pairs; δ is rough")
        if f.mismatched and min(f.mismatched) <= max(f.matched):
            out.append("  note: matched and mismatched distances overlap")
    return "\n".join(out)


def _row(values: Sequence[float]) -> str:
    s = _summary(np.asarray(values, dtype=np.float64))
    return f"min {s['min']:.4f}  median {s['median']:.4f}  p95 {s['p95']:.4f}  max {s['max']:.4f}"
