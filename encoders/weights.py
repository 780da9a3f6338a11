"""Weight files and their manifest: creation, hashing and verification.

A manifest pins every file a shard needs by SHA-256 (our encoder files and
the pretrained MiniLM), and carries the preprocessing and the per-pair
distance bounds δ, so that one manifest hash identifies everything that
determines an embedding. Tensors are stored with safetensors only: a pickle
would let a weight file run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from encoders.errors import WeightsError
from encoders.media import PreprocessSpec
from encoders.modality import Modality
from encoders.model import EncoderConfig, MultimodalEncoder
from encoders.patches import AUDIO_TOKEN_FRAMES, PATCH, TUBELET
from encoders.text_backbone import BACKBONE_FILE, BACKBONE_PACKAGE, backbone_dir

FORMAT_VERSION = 4
"""2: the manifest carries the scoring calibration (qualify ratio, near-duplicate radii).
3: encoders v2 (one architecture, continuous channels, pictures of any shape).
4: encoders v3 (audio tokens are 40 ms time slices of every mel band)."""
_OLD_FORMATS = {
    1: (
        "no scoring calibration, encoders v1",
        "train new weights with `poc-node train`, or pin the shipped weights/default",
    ),
    2: (
        "encoders v1, whose principal-contrast channel can put validators apart",
        "train new weights with `poc-node train`, or pin the shipped weights/default; "
        "a manifest of another kind (hf_clip, open_clip) only needs `format_version: 4` "
        "and a new hash",
    ),
    3: (
        "encoders v2, whose audio tower reads 16x16 log-mel patches",
        "train new weights with `poc-node train`, or pin the shipped weights/default; "
        "a manifest of another kind (hf_clip, open_clip) only needs `format_version: 4` "
        "and a new hash",
    ),
}
MANIFEST_NAME = "manifest.json"
DEFAULT_KIND = "poc"
"""Encoder kind of the project's own ``MultimodalEncoder`` (``encoders.registry``)."""
DEFAULT_PREPROCESS = PreprocessSpec(
    image_size=64,
    video_frames=8,
    video_size=64,
    audio_sample_rate=16_000,
    n_mels=64,
    audio_frames=256,
    text_max_tokens=64,
)
UNCALIBRATED_DELTA = 2.0
"""δ for untrained weights: disqualifying on noise would refuse honest pairs at random."""
UNCALIBRATED_NOTE = (
    "Untrained weights: random initialisation from the listed seeds, stored as float16. "
    "pair_delta cannot be calibrated on untrained encoders, whose pair distances are "
    "noise around 1.0, so every pair uses UNCALIBRATED_DELTA = 2.0, the largest cosine "
    "distance: no pair is disqualified. Calibration on held-out matched and mismatched "
    "pairs replaces it once trained."
)


@dataclass(frozen=True)
class ScoringCalibration:
    """The scoring constants that depend on the embedding space, calibrated beside δ.

    ``qualify_ratio``: an item qualifies when ``d_E <= ratio * d_nn``
    (DESIGN.md §6). ``duplicate_radius``: per modality, the cosine distance
    below which two items are re-encodings of one datum (DESIGN.md §3).
    """

    qualify_ratio: float
    duplicate_radius: dict[Modality, float]
    junk_radius: dict[Modality, float] = dataclasses.field(default_factory=dict)
    """Per modality: an item this close to the genesis history's known junk repeats it."""
    k: int | None = None
    """The ``scoring.k`` ``qualify_ratio`` was measured for, where the manifest records it."""

    def body(self) -> dict[str, Any]:
        return {
            "qualify_ratio": float(self.qualify_ratio),
            "duplicate_radius": {str(m): float(self.duplicate_radius[m]) for m in Modality},
            "junk_radius": {str(m): float(r) for m, r in self.junk_radius.items()},
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ScoringCalibration:
        ratio = float(body["qualify_ratio"])
        radius = {m: float(body["duplicate_radius"][str(m)]) for m in Modality}
        junk = {Modality(m): float(r) for m, r in body.get("junk_radius", {}).items()}
        radii = [*radius.values(), *junk.values()]
        if not ratio > 0 or not all(0 <= r < 2 for r in radii):
            raise ValueError(f"scoring calibration out of range: {dict(body)}")
        k = body.get("figures", {}).get("calibration", {}).get("k")
        return cls(ratio, radius, junk, None if k is None else int(k))


UNCALIBRATED_SCORING = ScoringCalibration(2.0, dict.fromkeys(Modality, 1e-6))
"""For untrained weights: every item qualifies; only identical embeddings are duplicates."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def pair_key(a: Modality, b: Modality) -> str:
    """Manifest key of a modality pair: the two names sorted and joined by ``-``."""
    return "-".join(sorted((str(a), str(b))))


def config_for(
    spec: PreprocessSpec,
    dim: int,
    width: int,
    depth: int,
    heads: int,
) -> EncoderConfig:
    """Architecture whose token counts match the preprocessing."""
    image = (spec.image_size // PATCH) ** 2
    video = (spec.video_frames // TUBELET) * (spec.video_size // PATCH) ** 2
    audio = spec.audio_frames // AUDIO_TOKEN_FRAMES
    return EncoderConfig(
        dim=dim,
        width=width,
        depth=depth,
        heads=heads,
        mlp_ratio=4,
        image_tokens=image,
        video_tokens=video,
        audio_tokens=audio,
        audio_token_size=spec.n_mels * AUDIO_TOKEN_FRAMES,
        video_grid=spec.video_size // PATCH,
    )


def create_untrained_shard(
    out_dir: Path,
    seeds: Sequence[int] = (0, 1),
    dim: int = 256,
    *,
    spec: PreprocessSpec = DEFAULT_PREPROCESS,
    width: int = 128,
    depth: int = 2,
    heads: int = 4,
) -> Path:
    """Write randomly initialised encoders and their manifest; return the manifest path.

    The same seeds give byte-identical files on every machine (the global
    torch RNG is forked, so callers' random state is left alone).
    """
    config = config_for(spec, dim, width, depth, heads)
    models = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            models.append((seed, MultimodalEncoder(config)))
    return write_shard(
        out_dir,
        models,
        spec=spec,
        pair_delta={
            frozenset((a, b)): UNCALIBRATED_DELTA
            for a, b in itertools.combinations(list(Modality), 2)
        },
        trained=False,
        notes=UNCALIBRATED_NOTE,
        scoring=UNCALIBRATED_SCORING,
    )


def write_shard(
    out_dir: Path,
    models: Sequence[tuple[int, MultimodalEncoder]],
    *,
    spec: PreprocessSpec,
    pair_delta: Mapping[frozenset[Modality], float],
    trained: bool,
    notes: str,
    scoring: ScoringCalibration = UNCALIBRATED_SCORING,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write encoders (float16 safetensors) and a manifest pinning them; return its path.

    ``models`` pairs each encoder with the seed it was initialised from;
    ``extra`` adds informative manifest keys (training settings, corpus
    version, evaluation figures) that loading ignores.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dim = models[0][1].config.dim
    encoders: list[dict[str, Any]] = []
    files: list[dict[str, str]] = []
    for index, (seed, model) in enumerate(models):
        name = f"encoder-{index}.safetensors"
        tensors = {
            k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
        }
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        files.append({"path": name, "sha256": sha256_file(out_dir / name)})
        encoders.append({"file": name, "seed": seed, "config": dataclasses.asdict(model.config)})
    manifest: dict[str, Any] = dict(extra or {})
    manifest.update(
        {
            "format_version": FORMAT_VERSION,
            "dim": dim,
            "preprocess": dataclasses.asdict(spec),
            "encoders": encoders,
            "text_backbone": {
                "package": BACKBONE_PACKAGE,
                "file": BACKBONE_FILE,
                "sha256": sha256_file(backbone_dir() / BACKBONE_FILE),
            },
            "files": files,
            "trained": trained,
            "pair_delta": {
                pair_key(a, b): float(pair_delta[frozenset((a, b))])
                for a, b in itertools.combinations(list(Modality), 2)
            },
            "scoring": {**manifest.get("scoring", {}), **scoring.body()},
            "notes": notes,
        }
    )
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class EncoderEntry:
    """One encoder of the manifest: its verified file, kind and configuration.

    ``kind`` names the loader (``encoders.registry``); for the project's own
    ``"poc"`` encoders ``config`` is an ``EncoderConfig``'s fields.
    """

    path: Path
    kind: str
    config: dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    """A manifest whose files have all been checked against their hashes."""

    sha256: str
    dim: int
    preprocess: PreprocessSpec
    encoders: tuple[EncoderEntry, ...]
    files: dict[str, Path]
    backbone_dir: Path
    pair_delta: dict[frozenset[Modality], float]
    trained: bool
    scoring: ScoringCalibration
    genesis: Path | None
    """The genesis history (``read_genesis``), verified like every other file."""


def verify_file(path: Path, expected: str) -> None:
    """Raise ``WeightsError`` naming the file and both hashes unless they match."""
    if not path.is_file():
        raise WeightsError(f"weight file {path} is missing (expected sha256 {expected})")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise WeightsError(f"weight file {path} has sha256 {actual}, expected {expected}")


def read_manifest(manifest_path: Path, manifest_sha256: str) -> Manifest:
    """Verify the manifest and every file it names, then parse it."""
    verify_file(manifest_path, manifest_sha256)
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
        return _parse(raw, manifest_path, manifest_sha256.lower())
    except WeightsError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"manifest {manifest_path} is malformed: {exc!r}") from exc


def _parse(raw: dict[str, Any], manifest_path: Path, sha: str) -> Manifest:
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        what, remedy = _OLD_FORMATS.get(
            version if isinstance(version, int) else -1,
            ("unknown", f"write a manifest of format {FORMAT_VERSION}"),
        )
        raise WeightsError(
            f"manifest {manifest_path} has format {version} ({what}); "
            f"this node reads format {FORMAT_VERSION}: {remedy}"
        )
    base = manifest_path.parent
    hashes = {entry["path"]: entry["sha256"] for entry in raw["files"]}
    for relative, expected in hashes.items():
        target = (base / relative).resolve()
        if base.resolve() not in target.parents:
            raise WeightsError(f"manifest {manifest_path} names {relative} outside its folder")
        verify_file(target, expected)
    backbone = raw["text_backbone"]
    if backbone["package"] != BACKBONE_PACKAGE:
        raise WeightsError(f"manifest {manifest_path} wants text backbone {backbone['package']}")
    verify_file(backbone_dir() / backbone["file"], backbone["sha256"])
    dim = int(raw["dim"])
    entries = []
    for encoder in raw["encoders"]:
        if encoder["file"] not in hashes:
            raise WeightsError(f"manifest {manifest_path} does not pin {encoder['file']}")
        kind = str(encoder.get("kind", DEFAULT_KIND))
        config = dict(encoder["config"])
        if kind == DEFAULT_KIND:
            poc = EncoderConfig(**config)
            if poc.dim != dim:
                raise WeightsError(f"{encoder['file']} has dim {poc.dim}, manifest says {dim}")
        entries.append(EncoderEntry(base / encoder["file"], kind, config))
    if not entries:
        raise WeightsError(f"manifest {manifest_path} lists no encoder")
    pair_delta = {}
    for a, b in itertools.combinations(list(Modality), 2):
        delta = float(raw["pair_delta"][pair_key(a, b)])
        if not 0.0 <= delta <= 2.0:  # NaN too: every pair would fail to compare
            raise WeightsError(
                f"manifest {manifest_path} has pair_delta {pair_key(a, b)} = {delta}: "
                "a cosine distance from 0 to 2"
            )
        pair_delta[frozenset((a, b))] = delta
    return Manifest(
        sha256=sha,
        dim=dim,
        preprocess=PreprocessSpec(**raw["preprocess"]),
        encoders=tuple(entries),
        files={relative: base / relative for relative in hashes},
        backbone_dir=backbone_dir(),
        pair_delta=pair_delta,
        trained=bool(raw["trained"]),
        scoring=ScoringCalibration.from_body(raw["scoring"]),
        genesis=_genesis_path(raw, base, hashes, manifest_path),
    )


def _genesis_path(
    raw: Mapping[str, Any], base: Path, hashes: Mapping[str, str], manifest_path: Path
) -> Path | None:
    genesis = raw.get("genesis")
    if genesis is None:
        return None
    if genesis["file"] not in hashes:
        raise WeightsError(f"manifest {manifest_path} does not pin {genesis['file']}")
    return base / str(genesis["file"])


GENESIS_FILE = "genesis.safetensors"


def write_genesis(
    path: Path, modalities: Sequence[str], vectors: Any, junk: Sequence[bool]
) -> None:
    """Store a genesis history: float16 vectors, their modalities and junk flags, in order."""
    import numpy as np
    from safetensors.numpy import save_file as save_numpy

    names = [str(m) for m in Modality]
    codes = np.asarray([names.index(m) for m in modalities], dtype=np.uint8)
    half = np.ascontiguousarray(np.asarray(vectors, dtype=np.float16))
    flags = np.asarray(list(junk), dtype=np.uint8)
    if half.ndim != 2 or not len(half) == len(codes) == len(flags):
        raise ValueError(f"{len(codes)} modalities for vectors of shape {half.shape}")
    save_numpy(
        {"vectors": half, "modality": codes, "junk": flags},
        str(path),
        metadata={"modalities": ",".join(names)},
    )


@dataclass(frozen=True)
class Genesis:
    """The genesis history: what H starts with, and the known junk kept beside it."""

    modalities: list[str]
    vectors: Any  # float16 [n, dim]
    junk_modalities: list[str]
    junk_vectors: Any  # float16 [j, dim]


def read_genesis(path: Path, dim: int) -> Genesis:
    """Read a genesis history (the file was verified with the manifest)."""
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        names = (handle.metadata() or {}).get("modalities", "").split(",")
        vectors = np.asarray(handle.get_tensor("vectors"), dtype=np.float16)
        codes = np.asarray(handle.get_tensor("modality"), dtype=np.int64)
        flags = (
            np.asarray(handle.get_tensor("junk"), dtype=bool)
            if "junk" in set(handle.keys())
            else np.zeros(len(codes), dtype=bool)
        )
    if vectors.ndim != 2 or vectors.shape[1] != dim or not len(codes) == len(vectors) == len(flags):
        raise WeightsError(f"genesis history {path} has shape {vectors.shape}, expected [n, {dim}]")
    if len(codes) and (codes.min() < 0 or codes.max() >= len(names)):
        raise WeightsError(f"genesis history {path} names an unknown modality")
    labels = [names[int(c)] for c in codes]
    return Genesis(
        [m for m, j in zip(labels, flags, strict=True) if not j],
        vectors[~flags],
        [m for m, j in zip(labels, flags, strict=True) if j],
        vectors[flags],
    )
