"""Overload: measure the sustainable rate, then flood at ten times it.

Starts a Mosquitto and a node process (committee of one) on loopback,
measures how many submissions per second the node finalizes, floods it at
``--factor`` times that rate for ``--seconds`` from many submitters (plus
one submitter far over its own rate), and prints: peak RSS of the node and
its decoder processes and its RSS over time (flat after warm-up: the queues
are bounded), finalized rounds during the flood, what was shed and how, and
how long the node took to drain the backlog and answer again.

    .venv/bin/python bench/bench_overload.py [--seconds 60] [--factor 10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.procs import by_name, rss_kib  # noqa: E402
from tests.conftest import start_mosquitto, start_node, write_node_config  # noqa: E402
from tests.media import noise_png  # noqa: E402
from tests.peer import Peer, ResultListener, submission_id  # noqa: E402


async def measure_rate(port: int, count: int) -> float:
    peers = [Peer() for _ in range(count)]
    raws = [
        peer.submission([("text", "text/plain", f"calibration {i}".encode())])
        for i, peer in enumerate(peers)
    ]
    async with ResultListener(port) as listener:
        started = time.monotonic()
        for raw in raws:
            await listener.publish(raw)
        for raw in raws:
            await listener.wait_for(submission_id(raw), {"accepted", "rejected"}, 300)
        return count / (time.monotonic() - started)


async def flood(
    port: int, rate: float, seconds: float, stats: dict[str, int], pictures: list[bytes]
) -> list[bytes]:
    """Every tenth submission from one greedy key; every fourth a caption and a picture."""
    greedy = Peer()
    sent: list[bytes] = []
    async with ResultListener(port) as listener:
        started = time.monotonic()
        index = 0
        while time.monotonic() - started < seconds:
            if index % 10 == 0:
                raw = greedy.submission([("text", "text/plain", f"greedy {index}".encode())])
            elif pictures and index % 4 == 1:
                picture = pictures[index % len(pictures)]
                raw = Peer().submission(
                    [
                        ("text", "text/plain", f"flood picture {index}".encode()),
                        ("image", "image/png", picture),
                    ]
                )
            else:
                raw = Peer().submission([("text", "text/plain", f"flood {index}".encode())])
            await listener.publish(raw)
            sent.append(raw)
            index += 1
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        stats["published"] = index
        await asyncio.sleep(2)
        reasons: dict[str, int] = {}
        for result in listener.results:
            key = result["reason"] or result["status"]
            reasons[key] = reasons.get(key, 0) + 1
        stats.update({f"result:{k}": v for k, v in reasons.items()})
    return sent


def print_series(series: list[tuple[float, int, float, dict[str, float]]], seconds: float) -> None:
    """RSS over time, and whether it stays flat once the queues are full (after warm-up)."""
    print("RSS over time (node, decoder and encoder processes; prepare queue depth)")
    step = max(1, len(series) // 20)
    for at, kib, queued, names in series[::step]:
        parts = "  ".join(f"{n} {v / 1024:.0f}" for n, v in sorted(names.items()))
        print(f"  t={at:6.1f} s  RSS {kib / 1024:8.1f} MiB  queued {queued:6.0f}  ({parts})")
    # Warm-up ends when the preparation queue first fills: from then on the
    # node holds all it ever will, and its RSS should stay flat.
    full = max((queued for _, _, queued, _ in series), default=0) * 0.9
    start = next((i for i, (_, _, queued, _) in enumerate(series) if queued >= full), None)
    if start is None or full <= 0:
        return
    warm = series[start:]
    while len(warm) > 1 and warm[-1][2] < full:  # the drain at the end
        warm = warm[:-1]
    if len(warm) < 2:
        return
    kib = [k for _, k, _, _ in warm]
    print(
        f"queue full from t={warm[0][0]:.0f} s to t={warm[-1][0]:.0f} s: RSS "
        f"{min(kib) / 1024:.0f} .. {max(kib) / 1024:.0f} MiB, first {kib[0] / 1024:.0f}, "
        f"last {kib[-1] / 1024:.0f} (growth {(kib[-1] - kib[0]) / 1024:+.0f} MiB)"
    )
    for process in sorted(warm[0][3]):
        values = [names.get(process, 0) / 1024 for _, _, _, names in warm]
        print(f"  {process:<12} {min(values):7.0f} .. {max(values):7.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--calibration", type=int, default=60)
    parser.add_argument(
        "--picture-kib", type=int, default=256, help="size of the flood's pictures (0: none)"
    )
    parser.add_argument(
        "--no-receive-window",
        action="store_true",
        help="turn the node's bus.receive_window off (to see what it bounds)",
    )
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="poc-overload-"))
    broker = start_mosquitto(directory)
    config = write_node_config(
        directory / "node.yaml",
        rounds={"round_seconds": 2},
        node={"log_level": "WARNING"},
        encoders={"workers": None},  # the shipped default (tests encode in the node)
        bus={"receive_window": 10**9, "receive_window_mb": 10**9} if args.no_receive_window else {},
    )
    node = start_node(directory / "node", f"mqtt://127.0.0.1:{broker.port}", config)
    try:
        rate = asyncio.run(measure_rate(broker.port, args.calibration))
        print(f"sustainable rate        {rate:8.1f} submissions/s (text, verified and encoded)")
        flood_rate = rate * args.factor
        pictures = (
            [
                noise_png(max(8, int((args.picture_kib * 1024 / 3) ** 0.5)), seed)
                for seed in range(32)
            ]
            if args.picture_kib
            else []
        )
        print(f"flood rate              {flood_rate:8.1f} submissions/s for {args.seconds:g} s")
        peak = rss_kib(node.process.pid)
        baseline = peak
        stats: dict[str, int] = {}
        finalized_before = node.metric("poc_finalized_round")
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            last = 0.0
            while not done.is_set():
                rss = rss_kib(node.process.pid)
                peak = max(peak, rss)
                now = time.monotonic() - flood_start
                if now - last >= 1.0:
                    last = now
                    try:
                        queued = node.metric("poc_queue_depth", 'queue="prepare"')
                    except OSError:
                        queued = float("nan")
                    series.append((now, rss, queued, by_name(node.process.pid, "rss")))
                time.sleep(0.25)

        series: list[tuple[float, int, float, dict[str, float]]] = []  # (s, KiB, queue, by name)
        flood_start = time.monotonic()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            asyncio.run(flood(broker.port, flood_rate, args.seconds, stats, pictures))
            finalized_during = node.metric("poc_finalized_round") - finalized_before
            flood_end = time.monotonic()
            probe = Peer().submission([("text", "text/plain", b"are you still there?")])

            async def answered() -> None:
                async with ResultListener(broker.port) as listener:
                    await listener.publish(probe)
                    await listener.final(submission_id(probe), 3600)

            asyncio.run(answered())
            recovery = time.monotonic() - flood_end
        finally:
            done.set()
            sampler.join()
        print(f"node RSS before flood   {baseline / 1024:8.1f} MiB (node and decoder processes)")
        print(f"node RSS peak           {peak / 1024:8.1f} MiB  ratio {peak / baseline:.2f}")
        print(f"rounds finalized        {finalized_during:8.0f} during the flood")
        print_series(series, args.seconds)
        print(f"published               {stats.get('published', 0):8d}")
        for key in sorted(k for k in stats if k.startswith("result:")):
            print(f"  {key[7:]:<22}{stats[key]:8d} results seen during the flood")
        print(f"recovery                {recovery:8.1f} s from the flood's end to a new final")
        session = 'session="submissions"'
        deferred = node.metric("poc_bus_deferred_total", f'qos="1",{session}')
        redeliveries = node.metric("poc_bus_window_reconnects_total", session)
        print(
            f"deferred deliveries     {deferred:8.0f} past the receive window, in "
            f"{redeliveries:.0f} reconnects (a message deferred again counts again)"
        )
        depth = node.metric("poc_queue_depth", 'queue="prepare"')
        print(f"queue depth now         {depth:8.0f}")
    finally:
        node.stop()
        broker.stop()


if __name__ == "__main__":
    main()
