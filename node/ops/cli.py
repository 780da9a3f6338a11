"""``poc-node``: the one command-line entry point.

Every subcommand has ``--help``; bad usage exits 2 with a one-line error, an
operational error (bad config, bad key, weights refused) exits 1 with one
line naming the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from node.errors import NodeError
from node.ops.gaps_cli import register as register_gaps
from training.commands import register as register_training


class _Parser(argparse.ArgumentParser):
    """argparse, with bad usage reported on one line."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="poc-node",
        description="Proof of Curiosity validator node.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    keygen = commands.add_parser("keygen", help="create an Ed25519 key file (mode 0600)")
    keygen.add_argument("--out", type=Path, required=True, help="where to write the key")

    run = commands.add_parser("run", help="run the validator daemon")
    run.add_argument("--config", type=Path, help="YAML file overriding config/default.yaml")
    run.add_argument("--bus", help="mqtt://HOST:PORT (external) or embedded://HOST:PORT")
    run.add_argument("--data-dir", type=Path, help="store and key directory")
    run.add_argument("--metrics-port", type=int, help="port of /metrics, /healthz, /readyz")
    run.add_argument("--key", type=Path, help="validator key file")
    run.add_argument("--round-seconds", type=int, help="length of a round")
    run.add_argument(
        "--committee",
        type=Path,
        help="committee file shared by every member (default: a committee of one)",
    )

    submit = commands.add_parser(
        "submit", help="sign and publish a submission, then wait for its final result"
    )
    submit.add_argument("--key", type=Path, required=True, help="submitter key file")
    _add_broker_options(submit)
    submit.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the final result (default 120); with --batch, seconds "
        "without news before giving up on what has no outcome",
    )
    submit.add_argument("--json", action="store_true", help="print results as JSON lines")
    submit.add_argument(
        "--committee",
        type=Path,
        help="committee file: only Results (and round summaries) signed by its members count "
        "(default: any validator's; each line names the one that signed it)",
    )
    submit.add_argument(
        "--batch",
        type=Path,
        metavar="FILE",
        help='JSON Lines, one submission a line: {"text": "...", "file": "a.png"} or '
        '{"files": [...]}, paths relative to FILE; resumable (see --out)',
    )
    submit.add_argument(
        "--out",
        type=Path,
        help="with --batch: the results journal, JSON Lines (default FILE's name + "
        ".results.jsonl); a second run reads it and sends only what has no outcome",
    )
    submit.add_argument(
        "--rate-per-minute",
        type=float,
        default=120.0,
        help="with --batch: submissions a minute, the node's intake.rate_limit (default 120); "
        "halved at every rate_limited answer",
    )
    submit.add_argument(
        "--burst", type=int, default=30, help="with --batch: sent at once at most (default 30)"
    )
    submit.add_argument(
        "items",
        nargs="*",
        metavar="ITEM",
        help='text:"..." or a PNG/JPEG/WAV/MP4/UTF-8 file (one or two; none with --batch)',
    )

    weights = commands.add_parser(
        "init-weights", help="write seeded, untrained encoder weights and their manifest"
    )
    weights.add_argument("--out", type=Path, required=True, help="directory for the files")
    weights.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="one seed per encoder of the shard (default 0 1)",
    )

    audit = commands.add_parser(
        "audit", help="re-verify a store's finalized rounds: certificates and recomputed records"
    )
    audit.add_argument("--data-dir", type=Path, required=True)
    audit.add_argument("--rounds", help="A..B (inclusive), A.. or ..B; all by default")
    audit.add_argument(
        "--config", type=Path, help="the node's config (weights, limits, tolerances)"
    )
    audit.add_argument(
        "--committee",
        type=Path,
        help="committee file (default: the committee recorded in the store)",
    )

    _TRAINING.update(register_training(commands))
    _COMMANDS.update(register_gaps(commands))  # gaps: a client of the node's explorer

    ledger = commands.add_parser("ledger", help="print submitters' balances from a store")
    ledger.add_argument("--data-dir", type=Path, required=True)
    ledger.add_argument("--submitter", help="one submitter's key, 64 hex characters")
    ledger.add_argument("--json", action="store_true", help="print JSON")

    balance = commands.add_parser(
        "balance",
        help="print a submitter's balance once a quorum of the committee's stake agrees on it",
    )
    balance.add_argument("--key", type=Path, required=True, help="submitter key file")
    _add_broker_options(balance)
    balance.add_argument(
        "--committee",
        type=Path,
        help="committee file whose stake must agree (default: trust the one member that "
        "answers, a committee of one)",
    )
    balance.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for a quorum (default 10)"
    )
    return parser


def _add_broker_options(command: argparse.ArgumentParser) -> None:
    """How a submitter's command reaches the broker (``node.ops.submitter.Access``)."""
    command.add_argument(
        "--bus",
        default="mqtt://127.0.0.1:1883",
        help="broker URL, mqtt://HOST:PORT or mqtts://HOST:PORT for TLS "
        "(default mqtt://127.0.0.1:1883)",
    )
    command.add_argument(
        "--tls-ca",
        type=Path,
        help="CA certificate (PEM) of the broker; implies TLS (mqtts:// without it trusts "
        "the system CAs)",
    )
    command.add_argument(
        "--tls-cert", type=Path, help="client certificate (PEM), for brokers that require one"
    )
    command.add_argument("--tls-key", type=Path, help="its private key (PEM, mode 0600)")
    command.add_argument(
        "--username",
        help="broker username; default, when TLS or a password is given: the submitter's "
        "public key hex (the account the shipped ACL lets read its results and balances)",
    )
    command.add_argument(
        "--password",
        default=os.environ.get("POC_BUS_PASSWORD"),
        help="broker password (default: $POC_BUS_PASSWORD, which keeps it out of the process list)",
    )
    command.add_argument("--topic-prefix", default="poc/v1", help="topic prefix (default poc/v1)")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _keygen(args: argparse.Namespace) -> int:
    from node.intake.keys import SigningKey, write_key

    key = SigningKey.generate()
    write_key(key, args.out)
    print(key.public_hex)
    return 0


def _run(args: argparse.Namespace) -> int:
    from node.daemon import Node
    from node.ops.config import load_config
    from node.rounds.driver import EXIT_STORE_FAILED
    from node.store.sqlite import store_failed

    overrides: dict[str, Any] = {}
    if args.bus is not None:
        overrides["bus.url"] = args.bus
    if args.data_dir is not None:
        overrides["node.data_dir"] = str(args.data_dir)
    if args.metrics_port is not None:
        overrides["http.port"] = args.metrics_port
    if args.key is not None:
        overrides["node.key"] = str(args.key)
    if args.round_seconds is not None:
        overrides["rounds.round_seconds"] = args.round_seconds
    if args.committee is not None:
        overrides["node.committee"] = str(args.committee)
    config = load_config(args.config, overrides)
    _configure_logging(config.node.log_level)

    async def main() -> None:
        await Node(config).run()

    first: BaseException
    try:
        asyncio.run(main())
    except ExceptionGroup as group:
        # A store that cannot write (a full or failing disk) ends the node, as a
        # refused commit does: the same exit status for systemd and the operator.
        failed = group.subgroup(store_failed)
        if failed is None:
            raise
        # Named here whichever task met it (the intake and the preparers name their
        # stage first; the outbox publisher, the store's other callers do not).
        first = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
    except sqlite3.Error as error:
        # Met while starting, before any task runs (found from the outside: every
        # restart on a still-full disk ended in a traceback and status 1).
        if not store_failed(error):
            raise
        first = error
    else:
        return 0
    logging.getLogger("poc.node").critical(
        "event=store_failed error=%r; exiting with status %d to recover",
        first,
        EXIT_STORE_FAILED,
    )
    return EXIT_STORE_FAILED


def _submit(args: argparse.Namespace) -> int:
    from node.ops.committee_file import load_committee
    from node.ops.submitter import Access, BusTarget, parse_item, run_submit

    access = Access(args.tls_ca, args.tls_cert, args.tls_key, args.username, args.password)
    committee = None if args.committee is None else load_committee(args.committee)
    if args.batch is not None:
        from node.ops.batch import run_batch

        if args.items:
            raise NodeError("give either ITEMs or --batch FILE, not both")
        return asyncio.run(
            run_batch(
                args.key,
                BusTarget(args.bus, args.topic_prefix),
                args.batch,
                args.out,
                per_minute=args.rate_per_minute,
                burst=args.burst,
                idle_timeout_s=args.timeout,
                access=access,
                committee=committee,
            )
        )
    if not args.items:
        raise NodeError("give one or two ITEMs, or --batch FILE")
    items = [parse_item(text) for text in args.items]
    return asyncio.run(
        run_submit(
            args.key,
            args.bus,
            args.topic_prefix,
            items,
            args.timeout,
            as_json=args.json,
            access=access,
            committee=committee,
        )
    )


def _init_weights(args: argparse.Namespace) -> int:
    from encoders.weights import create_untrained_shard, sha256_file

    manifest = create_untrained_shard(args.out, seeds=tuple(args.seeds))
    print(f"{manifest}\nmanifest_sha256: {sha256_file(manifest)}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from node.ops.audit import UNDECIDED_TRIES, parse_range, run_audit
    from node.ops.committee_file import load_committee
    from node.ops.config import load_config

    first, last = parse_range(args.rounds)
    config = load_config(args.config)
    _configure_logging("WARNING")
    committee = None if args.committee is None else load_committee(args.committee)
    report = asyncio.run(run_audit(config, args.data_dir, committee, first, last))
    for found in report.evidence:
        verdict = "proves equivocation" if found.problem is None else f"INVALID: {found.problem}"
        print(
            f"evidence: {found.offender} signed two {found.kind}s in round {found.round} "
            f"view {found.view}: {verdict}"
        )
    if any(found.problem is not None for found in report.evidence):
        print("kept evidence does not verify")
        return 1
    if report.undecided:
        print(
            f"round {report.bad_round}: could not be checked here, its decoding was stopped "
            f"{UNDECIDED_TRIES} times ({report.reason}); raise decode.timeout_s or "
            f"decode.memory_mb, or audit on a quieter machine "
            f"({report.checked} rounds before it verified)"
        )
        return 2
    if report.bad_round is not None:
        print(
            f"round {report.bad_round}: {report.reason} "
            f"({report.checked} rounds before it verified)"
        )
        return 1
    print(f"{report.checked} rounds verified")
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from node.store.sqlite import Store

    path = args.data_dir / "node.sqlite3"
    if not path.exists():
        raise NodeError(f"no store at {path}")
    submitter = None
    if args.submitter is not None:
        try:
            submitter = bytes.fromhex(args.submitter)
        except ValueError:
            raise NodeError("--submitter must be 64 hex characters") from None
        if len(submitter) != 32:
            raise NodeError("--submitter must be 64 hex characters")
    store = Store(path)
    try:
        balances = store.balances(submitter)
    finally:
        store.close()
    if args.json:
        print(json.dumps({key.hex(): amount for key, amount in balances.items()}, indent=2))
    else:
        for key, amount in balances.items():
            print(f"{key.hex()}  {amount}")
        if not balances:
            print("no ledger entries")
    return 0


def _balance(args: argparse.Namespace) -> int:
    from node.ops.balance import run_balance
    from node.ops.committee_file import load_committee
    from node.ops.submitter import Access

    committee = None if args.committee is None else load_committee(args.committee)
    access = Access(args.tls_ca, args.tls_cert, args.tls_key, args.username, args.password)
    return asyncio.run(
        run_balance(args.key, args.bus, args.topic_prefix, committee, args.timeout, access=access)
    )


_TRAINING: dict[str, Callable[[argparse.Namespace], int]] = {}
"""``train``, ``eval`` and ``embed``, which live in the ``training`` package."""

_COMMANDS = {
    "keygen": _keygen,
    "run": _run,
    "submit": _submit,
    "init-weights": _init_weights,
    "ledger": _ledger,
    "audit": _audit,
    "balance": _balance,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return {**_COMMANDS, **_TRAINING}[args.command](args)
    except NodeError as error:
        print(f"poc-node {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
