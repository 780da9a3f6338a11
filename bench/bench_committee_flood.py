"""A committee of four under a submission flood: do votes wait behind submissions?

Starts a Mosquitto and four member processes on loopback (equal stakes),
lets them finalize quiet rounds, then floods the bus with text submissions
from many keys at ``--rate`` per second (about ten times what a 2-core
machine finalizes) for ``--seconds``. For quiet rounds and flood rounds it
prints the time from a round's end to its commit on each member (from the
members' own ``poc_time_to_finality_seconds`` histograms), the views the
rounds needed, and the ratio flood/quiet. Consensus runs on its own MQTT
session, so the flood should delay intake (backlog in the broker), not the
rounds.

    .venv/bin/python bench/bench_committee_flood.py [--seconds 30] [--rate 300]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.intake.keys import SigningKey, write_key  # noqa: E402
from tests.conftest import (  # noqa: E402
    NodeProcess,
    start_mosquitto,
    start_node,
    write_node_config,
)
from tests.peer import Peer, ResultListener  # noqa: E402

ROUND_SECONDS = 2


def finality(nodes: list[NodeProcess]) -> tuple[float, float, float]:
    """(sum of seconds, count of rounds, sum of views beyond the first) over the members."""
    total = count = 0.0
    for node in nodes:
        total += node.metric("poc_time_to_finality_seconds_sum")
        count += node.metric("poc_time_to_finality_seconds_count")
    views = sum(node.metric("poc_consensus_view") for node in nodes)
    return total, count, views


def committee(directory: Path, genesis_ms: int) -> tuple[Path, list[Path]]:
    keys = []
    members = []
    for index in range(4):
        key = SigningKey.generate()
        path = directory / f"v{index}.key"
        write_key(key, path)
        keys.append(path)
        members.append({"name": f"v{index}", "public_key": key.public_hex, "stake": 1})
    document = {
        "genesis_ms": genesis_ms,
        "round_seconds": ROUND_SECONDS,
        "epoch_rounds": 60,
        "members": members,
    }
    path = directory / "committee.yaml"
    path.write_text(yaml.safe_dump(document))
    return path, keys


async def flood(port: int, seconds: float, rate: float) -> int:
    peers = [Peer() for _ in range(200)]
    sent = 0
    async with ResultListener(port) as listener:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            due = int((time.monotonic() - started) * rate)
            while sent < due:
                peer = peers[sent % len(peers)]
                raw = peer.submission([("text", "text/plain", f"flood {sent}".encode())])
                await listener.publish(raw)
                sent += 1
            await asyncio.sleep(0.01)
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rate", type=float, default=300, help="submissions per second")
    parser.add_argument("--quiet", type=float, default=20, help="seconds of quiet rounds first")
    parser.add_argument("--keep", type=Path, help="keep the members' logs and stores here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="poc-bench-committee-") as name:
        directory = args.keep or Path(name)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "broker").mkdir()
        broker = start_mosquitto(directory / "broker")
        nodes: list[NodeProcess] = []
        try:
            genesis = time.time_ns() // 10**6 + 30_000
            committee_file, keys = committee(directory, genesis)
            bus = f"mqtt://127.0.0.1:{broker.port}"

            def configure(index: int) -> Path:
                return write_node_config(
                    directory / f"c{index}" / "node.yaml",
                    node={
                        "committee": str(committee_file),
                        "key": str(keys[index]),
                        "log_level": "INFO" if args.keep else "WARNING",
                    },
                    rounds={"genesis_ms": genesis, "round_seconds": ROUND_SECONDS},
                    consensus={
                        "propose_timeout_s": 2,
                        "prevote_timeout_s": 1,
                        "precommit_timeout_s": 1,
                        "timeout_delta_s": 0.5,
                    },
                )

            # Configs (and the seeded test weights they name) are made here, once:
            # members with different weights would disagree on every embedding.
            configs = [configure(index) for index in range(4)]
            with ThreadPoolExecutor(4) as pool:
                nodes = list(
                    pool.map(
                        lambda index: start_node(directory / f"n{index}", bus, configs[index], 240),
                        range(4),
                    )
                )
            time.sleep(max(genesis / 1000 - time.time(), 0) + args.quiet)
            quiet = finality(nodes)
            print(
                f"quiet: {quiet[1]:.0f} member-rounds, "
                f"mean finality {quiet[0] / max(quiet[1], 1):.2f} s"
            )
            sent = asyncio.run(flood(broker.port, args.seconds, args.rate))
            loaded = finality(nodes)
            rounds = loaded[1] - quiet[1]
            seconds = loaded[0] - quiet[0]
            print(
                f"flood: {sent} submissions in {args.seconds:.0f} s "
                f"({sent / args.seconds:.0f}/s), {rounds:.0f} member-rounds finalized, "
                f"mean finality {seconds / max(rounds, 1):.2f} s"
            )
            quiet_mean = quiet[0] / max(quiet[1], 1)
            flood_mean = seconds / max(rounds, 1)
            print(f"finality ratio flood/quiet: {flood_mean / max(quiet_mean, 1e-9):.2f}")
            expected = args.seconds / ROUND_SECONDS * len(nodes)
            print(
                f"rounds finalized during the flood: {rounds:.0f} of ~{expected:.0f} "
                f"({rounds / expected:.0%})"
            )
            backlog = [node.metric("poc_queue_depth", 'queue="prepare"') for node in nodes]
            print(f"intake backlog at the end (per member): {backlog}")
        finally:
            for node in nodes:
                node.stop()
            broker.stop()


if __name__ == "__main__":
    main()
