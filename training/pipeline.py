"""``poc-node train`` and ``poc-node eval`` as plain functions over paths.

Training writes the encoders, loads them back through ``Shard.load`` (the
node's own path, float16 weights included), calibrates δ on the first half
of the held-out split, evaluates on the second half and rewrites the
manifest with δ and the figures. The weight files are not touched by that
rewrite, so their hashes stay those written first.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm  # type: ignore[import-untyped]

from encoders.media import PreprocessSpec
from encoders.modality import Modality
from encoders.shard import Shard
from encoders.text_backbone import TextBackbone, backbone_dir
from encoders.weights import (
    DEFAULT_PREPROCESS,
    UNCALIBRATED_DELTA,
    pair_key,
    sha256_file,
    write_shard,
)
from rewards.curiosity import DEFAULT_K
from training import corpus as corpus_module
from training import robustness
from training.corpus import CORPUS_VERSION, DEFAULT_SIZE, Corpus, CorpusSize
from training.evaluation import calibrate, embed_halves, evaluate
from training.scoring import calibrate_manifest
from training.text_table import build_table
from training.trainer import EpochReport, TrainSettings, train
from training.world import training_captions

TRAINED_NOTE = (
    "Trained by `poc-node train` on the generated closed world (corpus_version, "
    "corpus_seed): image, audio and video towers bound to the frozen MiniLM text tower "
    "with InfoNCE, stored as float16. pair_delta is calibrated on the first half of the "
    "held-out split; eval holds figures measured on the second half by the same run."
)

Log = Callable[[str], None]


def load_corpus(
    root: Path, seed: int, size: CorpusSize, spec: PreprocessSpec, workers: int, log: Log
) -> Corpus:
    folder = corpus_module.cache_dir(root, seed, spec)
    if corpus_module.is_cached(root, seed, spec, size):
        log(f"corpus {folder} (cached)")
        return corpus_module.load_or_generate(root, seed, spec, size)
    log(f"generating corpus {CORPUS_VERSION} seed {seed} into {folder}")
    bar = tqdm(total=1, desc="corpus", unit="item", leave=False, mininterval=1.0)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        return corpus_module.load_or_generate(
            root, seed, spec, size, workers=workers, progress=progress
        )
    finally:
        bar.close()


def _bar(epoch: int, epochs: int) -> Callable[[int], Iterator[int]]:
    def make(total: int) -> Iterator[int]:
        return iter(
            tqdm(
                range(total),
                desc=f"epoch {epoch}/{epochs}",
                unit="step",
                leave=False,
                mininterval=1.0,
            )
        )

    return make


def run_training(
    out_dir: Path,
    corpus_root: Path,
    settings: TrainSettings,
    *,
    size: CorpusSize = DEFAULT_SIZE,
    spec: PreprocessSpec = DEFAULT_PREPROCESS,
    workers: int = 2,
    threads: int = 2,
    log: Log = print,
) -> tuple[Path, dict[str, Any]]:
    """Generate (or reuse) the corpus, train, calibrate, evaluate and write the weights.

    The manifest holds nothing that varies from run to run (no timings), so
    the same seed, settings and thread count give the same manifest hash.

    Returns the manifest path and the evaluation figures.
    """
    torch.set_num_threads(threads)
    started = time.monotonic()
    corpus = load_corpus(corpus_root, settings.seed, size, spec, workers, log)
    corpus_seconds = time.monotonic() - started
    backbone = TextBackbone(backbone_dir(), spec.text_max_tokens, "cpu")
    still = build_table(backbone, corpus.still, training_captions)
    moving = build_table(backbone, corpus.moving, training_captions)
    epoch_box = [1]

    def on_epoch(report: EpochReport) -> None:
        losses = " ".join(f"{m}={v:.3f}" for m, v in report.loss.items())
        recalls = " ".join(f"{m}={v:.3f}" for m, v in report.recall.items())
        log(f"epoch {report.epoch}/{settings.epochs}  loss {losses}  held-out R@1 {recalls}")
        epoch_box[0] = report.epoch + 1

    def progress(total: int) -> Iterator[int]:
        return _bar(epoch_box[0], settings.epochs)(total)

    models = train(corpus, spec, still, moving, settings, on_epoch=on_epoch, progress=progress)
    train_seconds = time.monotonic() - started - corpus_seconds
    seeded = list(zip(settings.encoder_seeds, models, strict=True))
    uncalibrated = {
        frozenset((a, b)): UNCALIBRATED_DELTA for a in Modality for b in Modality if a is not b
    }
    manifest = write_shard(
        out_dir, seeded, spec=spec, pair_delta=uncalibrated, trained=False, notes="calibrating"
    )
    shard = Shard.load(manifest, sha256_file(manifest))
    log("calibrating δ and evaluating on the held-out split")
    halves = embed_halves(shard, corpus)
    deltas = calibrate(halves)
    figures = evaluate(halves, deltas)
    log("measuring continuity and pictures of any shape")
    figures.update(robustness.figures(shard, deltas[frozenset((Modality.TEXT, Modality.IMAGE))]))
    extra = {
        "corpus_version": CORPUS_VERSION,
        "corpus_seed": settings.seed,
        "corpus_size": dataclasses.asdict(size),
        "training": {
            **{
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(settings).items()
            },
            "threads": threads,
        },
        "eval": figures,
    }
    manifest = write_shard(
        out_dir, seeded, spec=spec, pair_delta=deltas, trained=True, notes=TRAINED_NOTE, extra=extra
    )
    log("calibrating the scoring constants and writing the genesis history")
    calibrate_manifest(manifest, k=DEFAULT_K, seed=settings.seed, log=log)
    log(
        f"wrote {manifest}: corpus {corpus_seconds:.0f} s, training {train_seconds:.0f} s, "
        f"total {time.monotonic() - started:.0f} s"
    )
    return manifest, figures


def manifest_info(manifest: Path) -> dict[str, Any]:
    """The manifest's JSON, for the informative keys loading ignores."""
    info: dict[str, Any] = json.loads(manifest.read_text(encoding="utf-8"))
    return info


def run_eval(
    manifest: Path,
    manifest_sha256: str,
    corpus_root: Path,
    *,
    seed: int,
    size: CorpusSize = DEFAULT_SIZE,
    workers: int = 2,
    trials: int = 20,
    log: Log = print,
) -> dict[str, Any]:
    """Evaluate pinned weights on the held-out split of the corpus for ``seed``, with their δ."""
    shard = Shard.load(manifest, manifest_sha256)
    corpus = load_corpus(corpus_root, seed, size, shard.preprocess, workers, log)
    halves = embed_halves(shard, corpus)
    deltas = {
        frozenset((a, b)): shard.delta(a, b) for a in Modality for b in Modality if a is not b
    }
    figures = evaluate(halves, deltas, trials=trials)
    figures.update(robustness.figures(shard, shard.delta(Modality.TEXT, Modality.IMAGE)))
    return figures


__all__ = ["manifest_info", "pair_key", "run_eval", "run_training"]
