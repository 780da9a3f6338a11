"""The ``train``, ``eval``, ``embed`` and calibration subcommands of ``poc-node``.

``register`` adds them to the CLI's subparsers and returns their handlers;
the node wires them in. Handlers print one line to stderr and return 1 on
an operational error (weights refused, corpus or item unusable); they never
import ``node``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from encoders.errors import EncoderError
from rewards.curiosity import DEFAULT_K

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = ROOT / "weights" / "default" / "manifest.json"
DEFAULT_CORPUS = Path("var") / "corpus"

Handler = Callable[[argparse.Namespace], int]


def _fail(command: str, message: str) -> int:
    print(f"poc-node {command}: error: {message}", file=sys.stderr)
    return 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def register(commands: argparse._SubParsersAction) -> dict[str, Handler]:  # type: ignore[type-arg]
    """Add ``train``, ``eval`` and ``embed`` to ``commands``; return name → handler."""
    train = commands.add_parser(
        "train", help="generate the corpus, train the shard, calibrate δ, evaluate, write weights"
    )
    train.add_argument("--out", type=Path, required=True, help="directory for weights and manifest")
    train.add_argument("--seed", type=int, default=0, help="corpus and training seed (default 0)")
    train.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="corpus cache directory (default var/corpus)",
    )
    train.add_argument("--epochs", type=_positive, help="override the number of epochs")
    train.add_argument("--threads", type=_positive, default=2, help="torch threads (default 2)")
    train.add_argument("--workers", type=_positive, default=2, help="corpus processes (default 2)")

    evaluate = commands.add_parser(
        "eval", help="recall, pair acceptance and fusion on the held-out split"
    )
    _weights_options(evaluate)
    evaluate.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="corpus cache directory (default var/corpus)",
    )
    evaluate.add_argument(
        "--seed", type=int, help="corpus seed (default: the manifest's corpus_seed, else 0)"
    )
    evaluate.add_argument(
        "--trials", type=_positive, default=20, help="galleries drawn per figure (default 20)"
    )
    evaluate.add_argument(
        "--workers", type=_positive, default=2, help="corpus processes (default 2)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON")

    calibrate = commands.add_parser(
        "calibrate",
        help="calibrate qualify_ratio and the near-duplicate radii; write them and the genesis "
        "history beside the weights",
    )
    calibrate.add_argument(
        "--weights",
        type=Path,
        default=DEFAULT_MANIFEST,
        help="manifest to calibrate in place (default weights/default/manifest.json)",
    )
    calibrate.add_argument(
        "--k",
        type=_positive,
        default=DEFAULT_K,
        help=f"scoring.k the ratio is calibrated for (default {DEFAULT_K})",
    )
    calibrate.add_argument("--seed", type=int, default=0, help="world seed (default 0)")

    pairs = commands.add_parser(
        "calibrate-pairs",
        help="measure δ on your own matched (and mismatched) caption pairs and write it into "
        "the manifest",
    )
    pairs.add_argument("--weights", type=Path, required=True, help="manifest to calibrate in place")
    pairs.add_argument(
        "--manifest-sha256", help="expected SHA-256 of the manifest (default: the file's own hash)"
    )
    pairs.add_argument(
        "--pairs",
        type=Path,
        required=True,
        help='JSON Lines: {"text": ..., "file": ...} per matched pair, "match": false for a '
        "mismatched one; paths relative to the file",
    )
    pairs.add_argument(
        "--quantile",
        type=float,
        help="set δ to this quantile of the matched distances instead of the best separation "
        "of matched and mismatched pairs",
    )

    clip = commands.add_parser(
        "init-hf-clip",
        help="write a manifest pinning a Hugging Face CLIP checkpoint folder (kind hf_clip)",
    )
    clip.add_argument(
        "--dir",
        type=Path,
        required=True,
        help="folder that holds the checkpoint in a subfolder; the manifest is written here",
    )
    clip.add_argument(
        "--clip", default="clip", help="the checkpoint's subfolder of --dir (default clip)"
    )

    embed = commands.add_parser("embed", help="print an item's embedding as JSON")
    _weights_options(embed)
    embed.add_argument(
        "--beacon",
        default="",
        help="epoch beacon as hex, which seeds the differential-loss masks (default empty)",
    )
    embed.add_argument("item", metavar="ITEM", help='text:"..." or a PNG/JPEG/WAV/MP4/UTF-8 file')
    return {
        "train": _train,
        "eval": _eval,
        "embed": _embed,
        "calibrate": _calibrate,
        "calibrate-pairs": _calibrate_pairs,
        "init-hf-clip": _init_hf_clip,
    }


def _weights_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        type=Path,
        default=DEFAULT_MANIFEST,
        help="manifest (default weights/default/manifest.json)",
    )
    parser.add_argument(
        "--manifest-sha256", help="expected SHA-256 of the manifest (default: the file's own hash)"
    )


def _pinned(args: argparse.Namespace) -> tuple[Path, str]:
    from encoders.weights import sha256_file

    manifest: Path = args.weights
    if not manifest.is_file():
        raise FileNotFoundError(f"no manifest at {manifest}")
    return manifest, args.manifest_sha256 or sha256_file(manifest)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from training.pipeline import run_training
    from training.speech import SpeechError
    from training.trainer import TrainSettings

    settings = TrainSettings(seed=args.seed)
    if args.epochs is not None:
        settings = dataclasses.replace(settings, epochs=args.epochs)
    try:
        manifest, _ = run_training(
            args.out, args.corpus, settings, workers=args.workers, threads=args.threads, log=_log
        )
    except (SpeechError, EncoderError, OSError) as error:
        return _fail("train", str(error))
    from encoders.weights import sha256_file

    print(f"{manifest}\nmanifest_sha256: {sha256_file(manifest)}")
    return 0


def _log(line: str) -> None:
    print(line, flush=True)


def _eval(args: argparse.Namespace) -> int:
    from encoders.modality import Modality
    from encoders.shard import Shard
    from training.evaluation import format_report
    from training.pipeline import manifest_info, run_eval
    from training.scoring import format_report as format_scoring
    from training.scoring import report as scoring_report
    from training.speech import SpeechError

    try:
        manifest, sha = _pinned(args)
        seed = (
            args.seed
            if args.seed is not None
            else int(manifest_info(manifest).get("corpus_seed", 0))
        )
        figures = run_eval(
            manifest,
            sha,
            args.corpus,
            seed=seed,
            workers=args.workers,
            trials=args.trials,
            log=lambda line: print(line, file=sys.stderr),
        )
        shard = Shard.load(manifest, sha)
        scoring = scoring_report(
            shard,
            dict.fromkeys(Modality, 0.75),
            shard.scoring,
            k=_LEGACY_K if shard.scoring.k is None else shard.scoring.k,
            seed=seed + 1,
            log=lambda line: print(line, file=sys.stderr),
        )
    except (SpeechError, EncoderError, OSError, ValueError) as error:
        return _fail("eval", str(error))
    figures["scoring"] = scoring
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(format_report(figures))
        print(format_scoring(shard.scoring, scoring))
    return 0


_LEGACY_K = 32
"""The k of manifests that predate recording it (``ScoringCalibration.k``)."""


def _calibrate(args: argparse.Namespace) -> int:
    from training.scoring import calibrate_manifest, format_report
    from training.speech import SpeechError

    try:
        calibration, figures, sha = calibrate_manifest(
            args.weights, k=args.k, seed=args.seed, log=lambda line: print(line, file=sys.stderr)
        )
    except (SpeechError, EncoderError, OSError, ValueError) as error:
        return _fail("calibrate", str(error))
    print(format_report(calibration, figures))
    print(f"wrote {args.weights} (sha256 {sha}); pin it as encoders.manifest_sha256")
    return 0


def _calibrate_pairs(args: argparse.Namespace) -> int:
    from training.pairs import calibrate_pairs, format_report

    try:
        if not args.weights.is_file():
            raise FileNotFoundError(f"no manifest at {args.weights}")
        figures, sha = calibrate_pairs(
            args.weights,
            args.pairs,
            manifest_sha256=args.manifest_sha256,
            quantile=args.quantile,
            log=lambda line: print(line, file=sys.stderr),
        )
    except (EncoderError, OSError, ValueError) as error:
        return _fail("calibrate-pairs", str(error))
    print(format_report(figures))
    print(f"wrote {args.weights} (sha256 {sha}); pin it as encoders.manifest_sha256")
    return 0


def _init_hf_clip(args: argparse.Namespace) -> int:
    from encoders.adapters.hf_clip import write_manifest
    from encoders.weights import sha256_file

    try:
        manifest = write_manifest(args.dir, args.clip)
    except (EncoderError, OSError, ValueError, KeyError) as error:
        return _fail("init-hf-clip", str(error))
    print(f"{manifest}\nmanifest_sha256: {sha256_file(manifest)}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    import hashlib

    from encoders.embedding import EncodeRequest
    from encoders.media import MediaLimits, decode_media, read_item
    from encoders.shard import Shard

    try:
        beacon = bytes.fromhex(args.beacon)
    except ValueError:
        return _fail("embed", "--beacon must be hex")
    try:
        modality, mime, data = read_item(args.item)
        manifest, sha = _pinned(args)
        shard = Shard.load(manifest, sha)
        media = decode_media(modality, mime, data, MediaLimits(), shard.preprocess)
        request = EncodeRequest(modality, media, hashlib.sha256(data).digest())
        [embedding] = shard.embed([request], beacon)
    except (EncoderError, OSError, ValueError) as error:
        return _fail("embed", str(error))
    out: dict[str, Any] = {
        "modality": str(modality),
        "mime": mime,
        "sha256": hashlib.sha256(data).hexdigest(),
        "weights": shard.weights_id,
        "dim": int(embedding.vector.shape[0]),
        "diff_loss": embedding.diff_loss,
        "quality": embedding.quality,
        "encoder_losses": list(embedding.encoder_losses),
        "used": list(embedding.used),
        "vector": [float(v) for v in embedding.vector],
    }
    print(json.dumps(out))
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run these subcommands without the node's CLI (``python -m training.commands``)."""
    parser = _Parser(prog="poc-node")
    handlers = register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
