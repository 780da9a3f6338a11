"""End to end: the node's rate against its own encoders' raw rate, on the same items.

One command, one run. For each kind of submission (caption + image, caption
+ audio, caption + video, and single items of every modality) it:

1. renders the items with the project's world generator
   (``training.stream.WorldMaker``: PNG/JPEG, espeak-ng WAV, MP4);
2. measures the **raw** rate: the shard called directly on the decoded items
   at the node's batch policy (``encoders.batch``: the micro-batch size of
   each modality), the items taken in arrival order, in this process with
   torch's default threads and its heap kept between batches as the node's
   encoder workers keep theirs (``node.ops.threads.reuse_heap``: without it
   page faults cost the raw rate 10-20 % on this machine, and made it swing
   from run to run), the best of three passes, measured **before and after**
   the node runs: this machine's speed drifts by up to 10 % over minutes,
   and the ratio is taken against the mean of the two, with both printed;
3. starts Mosquitto and a node process (or a committee of ``--committee``
   nodes), and feeds the **same** submissions, signed by many keys, through
   the bus; the node's rate counts items from the first publish to the last
   ``accepted`` Result (everything decoded, encoded and stored), again to the
   last ``final`` Result (rounds included), and between the 10th and the 90th
   percentile of the accepted Results (the steady rate, without the start and
   the end of the burst);

and prints items/s both ways, their **ratio**, how many items the node
answered from its cache of recent embeddings instead of encoding them again
(the world repeats some captions; the raw pass encodes every item:
``--cache-items 0`` makes the node do so too), how much its caption batches
were padded against the raw pass's (the node batches captions of like length
together, ``node.pipeline.batching.companions``; the raw pass takes them in
arrival order), each stage's share of the
node's CPU time (``poc_stage_cpu_seconds_total``, decoders' processes
included; ``bus`` is the MQTT client's own work, ``loop`` the rest of the
event loop thread) and the node's peak RSS. Figures only; nothing is
asserted.

    .venv/bin/python bench/bench_e2e.py [--device cpu|cuda] [--count 240]
        [--kinds text+image,text+audio,text+video,single] [--committee 1]
        [--cache-items N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.procs import by_name, cpu_seconds, rss_kib, threads_cpu  # noqa: E402
from encoders.embedding import EncodeRequest  # noqa: E402
from encoders.media import decode_media  # noqa: E402
from encoders.modality import Modality  # noqa: E402
from encoders.shard import Shard  # noqa: E402
from node.intake.keys import load_key  # noqa: E402
from node.ops.config import DEFAULT_CONFIG, load_config  # noqa: E402
from node.ops.threads import reuse_heap  # noqa: E402
from node.pipeline.batching import BatchPolicy  # noqa: E402
from node.pipeline.prepare import media_limits  # noqa: E402
from tests.conftest import start_mosquitto, start_node  # noqa: E402
from tests.peer import Peer, ResultListener, submission_id  # noqa: E402
from training.stream import WorldMaker, WorldSubmission, concepts  # noqa: E402

PASSES = 3
"""Each raw rate is the best of this many passes (so the ratio errs against the node)."""
KINDS = ("text+image", "text+audio", "text+video", "single")
STAGES = (
    "verify",
    "intake",
    "decode",
    "encode",
    "fuse",
    "score",
    "commit",
    "publish",
    "store",
    "bus",
    "loop",
)


@dataclass
class Figures:
    kind: str
    items: int
    raw_before_s: float
    raw_after_s: float
    accepted_items_s: float
    final_items_s: float
    steady_items_s: float
    cpu: dict[str, float]
    cpu_total: float
    peak_rss_mib: float


def world(kind: str, count: int, seed: int) -> list[WorldSubmission]:
    maker = WorldMaker(seed)
    pool = concepts(novel=False) + concepts(novel=True)
    rng = random.Random(seed)
    out = []
    for index in range(count):
        concept = rng.choice(pool)
        if kind == "single":
            modality = list(Modality)[index % len(Modality)]
            out.append(maker.single("bench", concept, modality))
        else:
            media = Modality(kind.split("+")[1])
            out.append(maker.pair("bench", concept, media))
    return out


def decoded(
    shard: Shard, submissions: list[WorldSubmission]
) -> dict[Modality, list[EncodeRequest]]:
    """The submissions' items decoded, by modality, in arrival order."""
    limits = media_limits(load_config(DEFAULT_CONFIG))
    by_modality: dict[Modality, list[EncodeRequest]] = {}
    for submission in submissions:
        for item in submission.items:
            media = decode_media(item.modality, item.mime, item.data, limits, shard.preprocess)
            by_modality.setdefault(item.modality, []).append(
                EncodeRequest(item.modality, media, item.sha256)
            )
    return by_modality


def raw_rate(
    shard: Shard, by_modality: dict[Modality, list[EncodeRequest]], policy: BatchPolicy
) -> float:
    """Items/s of the shard alone, on decoded items, in micro-batches of the node's sizes
    taken in arrival order: the best of ``PASSES`` passes."""
    beacon = b"bench-e2e-beacon"
    for requests in by_modality.values():  # warm-up: first calls allocate
        shard.embed(requests[: policy.size(requests[0].modality)], beacon)
    total = sum(len(r) for r in by_modality.values())
    rates = []
    for _ in range(PASSES):
        started = time.perf_counter()
        for modality, requests in by_modality.items():
            size = policy.size(modality)
            for start in range(0, len(requests), size):
                shard.embed(requests[start : start + size], beacon)
        rates.append(total / (time.perf_counter() - started))
    return max(rates)  # the best pass: anything else on the machine only slows it


def raw_padding(
    shard: Shard, by_modality: dict[Modality, list[EncodeRequest]], policy: BatchPolicy
) -> float:
    """How the raw pass's caption batches pad: wordpieces computed per wordpiece held
    (0.0 without captions)."""
    captions = [shard.input_length(r) for r in by_modality.get(Modality.TEXT, [])]
    size = policy.size(Modality.TEXT)
    batches = [captions[i : i + size] for i in range(0, len(captions), size)]
    computed = sum(len(batch) * max(batch) for batch in batches)
    return computed / sum(captions) if captions else 0.0


def samples(metrics: str, name: str, label: str) -> dict[str, float]:
    """The values of one sample of the node's ``/metrics`` text, by one label's value."""
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name and label in sample.labels
    }


def cached_items(metrics: str) -> int:
    """Items the node answered from its cache of recent embeddings (not encoded again)."""
    return int(sum(samples(metrics, "poc_encode_cached_items_total", "modality").values()))


def text_tokens(metrics: str) -> dict[str, float]:
    """Caption wordpieces the encoders read: ``content`` and ``computed`` (padded)."""
    return samples(metrics, "poc_encode_text_tokens_total", "kind")


def mean_batches(metrics: str) -> dict[str, float]:
    """Mean items per encoder micro-batch, by modality (``poc_encode_batch_items``)."""
    sums = samples(metrics, "poc_encode_batch_items_sum", "modality")
    counts = samples(metrics, "poc_encode_batch_items_count", "modality")
    return {m: sums[m] / counts[m] for m in sums if counts.get(m)}


def stage_cpu(metrics: str) -> dict[str, float]:
    """CPU seconds by stage (``poc_stage_cpu_seconds_total``)."""
    return samples(metrics, "poc_stage_cpu_seconds_total", "stage")


async def feed(
    port: int, submissions: list[WorldSubmission], submitters: int, validator: bytes | None
) -> tuple[float, float, float, list[str], tuple[float, float]]:
    """Publish every submission (signed by ``submitters`` keys).

    Returns the seconds from the first publish to the last ``accepted`` and to
    the last ``final`` Result, the steady accepted rate (submissions/s between
    the 10th and the 90th percentile of accepted Results), the reasons of
    the rejected ones, and where the time outside the steady rate went: the
    seconds from the first publish to the first ``accepted`` Result, and from
    the last publish to the last ``accepted`` one.
    """
    peers = [Peer() for _ in range(submitters)]
    raws = [
        peers[i % submitters].submission(
            [(str(item.modality), item.mime, item.data) for item in submission.items]
        )
        for i, submission in enumerate(submissions)
    ]
    ids = [submission_id(raw) for raw in raws]
    async with ResultListener(port) as listener:
        started = time.monotonic()
        for raw in raws:
            await listener.publish(raw)
        published = time.monotonic()
        for identity in ids:
            await listener.final(identity, 900)
        if validator is not None:  # wait for the measured member's own Results

            def decided() -> set[bytes]:
                return {
                    r["submission_id"]
                    for r in listener.results
                    if r["validator"] == validator and r["status"] in ("final", "rejected")
                }

            async with asyncio.timeout(900):
                while decided() < set(ids):  # noqa: ASYNC110 - the listener fills the list
                    await asyncio.sleep(0.1)
        accepted: dict[bytes, float] = {}
        final: dict[bytes, float] = {}
        reasons = []
        for result in listener.results:  # each stamped on arrival
            if validator is not None and result["validator"] != validator:
                continue
            at = result["_received_monotonic"]
            if result["status"] == "accepted":
                accepted.setdefault(result["submission_id"], at)
            elif result["status"] == "final":
                final.setdefault(result["submission_id"], at)
            else:
                reasons.append(str(result["reason"]))
        times = sorted(accepted.values())
        low, high = times[len(times) // 10], times[(len(times) * 9) // 10]
        steady = (len(times) * 8 // 10) / (high - low) if high > low else float("nan")
        edges = (times[0] - started, max(times) - published)
        return max(times) - started, max(final.values()) - started, steady, reasons, edges


def committee_files(directory: Path, count: int) -> tuple[Path, list[Path]]:
    """``count`` validator keys and a committee file naming them (rounds of 2 s)."""
    import yaml

    from node.intake.keys import SigningKey, write_key

    keys = []
    for index in range(count):
        path = directory / f"v{index}.key"
        write_key(SigningKey.generate(), path)
        keys.append(path)
    document = {
        "genesis_ms": time.time_ns() // 10**6 - 60_000,
        "round_seconds": 2,
        "epoch_rounds": 60,
        "members": [
            {"name": f"v{i}", "public_key": load_key(path).public_hex, "stake": 100}
            for i, path in enumerate(keys)
        ],
    }
    committee = directory / "committee.yaml"
    committee.write_text(yaml.safe_dump(document))
    return committee, keys


def node_config(
    directory: Path,
    args: argparse.Namespace,
    committee: Path | None = None,
    key: Path | None = None,
) -> Path:
    import yaml

    member = {} if committee is None else {"committee": str(committee), "key": str(key)}
    config = {
        "node": {"log_level": "WARNING", **member},
        "rounds": {"genesis_ms": time.time_ns() // 10**6 - 60_000, "round_seconds": 1},
        "intake": {"rate_limit": {"per_minute": 100_000, "burst": 10_000}},
        "encoders": {
            "device": args.device,
            **({} if args.workers is None else {"workers": args.workers}),
            **({} if args.cache_items is None else {"cache_items": args.cache_items}),
        },
    }
    if committee is not None:
        del config["rounds"]  # the committee file's
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_kind(
    kind: str, shard: Shard, policy: BatchPolicy, args: argparse.Namespace, seed: int
) -> Figures:
    submissions = world(kind, args.count, seed)
    items = sum(len(s.items) for s in submissions)
    requests = decoded(shard, submissions)
    raw_before = raw_rate(shard, requests, policy)
    padding = raw_padding(shard, requests, policy)
    directory = Path(tempfile.mkdtemp(prefix=f"poc-e2e-{kind.replace('+', '-')}-"))
    broker = start_mosquitto(directory)
    bus = f"mqtt://127.0.0.1:{broker.port}"
    others = []
    if args.committee == 1:
        node = start_node(directory / "node", bus, node_config(directory, args))
        validator = None
    else:  # every member prepares every submission; the first one is measured
        committee, keys = committee_files(directory, args.committee)
        with ThreadPoolExecutor(len(keys)) as pool:
            started = [
                pool.submit(
                    start_node,
                    directory / f"n{i}",
                    bus,
                    node_config(directory / f"c{i}", args, committee, key),
                    300,
                )
                for i, key in enumerate(keys)
            ]
            node, *others = [future.result() for future in started]
        validator = load_key(keys[0]).public_key
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(node.process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        broker_before, harness_before = cpu_seconds(broker.process.pid), time.process_time()
        cpu_before = cpu_seconds(node.process.pid)
        threads_before = threads_cpu(node.process.pid)
        children_before = by_name(node.process.pid, "cpu", root=False)
        metrics_before = node.metrics()
        stages_before = stage_cpu(metrics_before)
        accepted_s, final_s, steady, reasons, edges = asyncio.run(
            feed(broker.port, submissions, args.submitters, validator)
        )
        after = node.metrics()
        stages_after = stage_cpu(after)
        batches = mean_batches(after)
        cached = cached_items(after) - cached_items(metrics_before)
        tokens_before, tokens_after = text_tokens(metrics_before), text_tokens(after)
        tokens = {k: v - tokens_before.get(k, 0.0) for k, v in tokens_after.items()}
        threads_after = threads_cpu(node.process.pid)
        children_after = by_name(node.process.pid, "cpu", root=False)
        cpu_total = cpu_seconds(node.process.pid) - cpu_before
        broker_cpu = cpu_seconds(broker.process.pid) - broker_before
        harness_cpu = time.process_time() - harness_before
    finally:
        done.set()
        sampler.join()
        for member in (node, *others):
            member.stop()
        broker.stop()
    print(
        f"  ({kind}: mean encoder batch "
        + ", ".join(f"{m} {b:.1f}" for m, b in sorted(batches.items()))
        + f"; {cached} items not encoded again (cache)"
        + (
            f"; captions padded to {tokens['computed'] / tokens['content']:.2f}"
            f" wordpieces computed per wordpiece held (the raw pass: {padding:.2f})"
            if tokens.get("content")
            else ""
        )
        + f"; first accepted {edges[0]:.2f} s after the first publish, last {edges[1]:.2f} s"
        " after the last publish"
        + f"; outside the node: submitters {harness_cpu:.1f}, Mosquitto {broker_cpu:.1f} CPU s"
        + "; node CPU s by thread "
        + ", ".join(
            f"{name} {seconds - threads_before.get(name, 0.0):.2f}"
            for name, seconds in sorted(threads_after.items())
        )
        + ")"
    )
    if reasons:
        print(f"  ({kind}: {len(reasons)} of {len(submissions)} rejected: {sorted(reasons)})")
    stages = {s: stages_after.get(s, 0.0) - stages_before.get(s, 0.0) for s in stages_after}
    # "bus" is the MQTT client's own work, measured where it runs (reading,
    # writing, publishing, acknowledging). "loop" is the rest of the event loop
    # thread: asyncio itself, the coroutines that carry a submission from stage to
    # stage and hand work to threads and processes, and the round driver. The
    # stages measured on the loop thread (the bus, fusing, committing, decoding
    # text, handing items to decoder processes, signing Results) are taken out of it.
    loop = threads_after.get("loop", 0.0) - threads_before.get("loop", 0.0)
    on_loop = ("bus", "fuse", "commit", "decode_text", "decode_submit", "sign")
    stages["loop"] = loop - sum(stages.get(s, 0.0) for s in on_loop)
    stages["commit"] = stages.get("commit", 0.0) + stages.pop("commit_write", 0.0)
    stages["publish"] = stages.get("publish", 0.0) + stages.pop("sign", 0.0)
    # Decoding and encoding cost everything their processes spend (calls, copies),
    # not only what they report.
    children = {k: v - children_before.get(k, 0.0) for k, v in children_after.items()}
    stages["decode"] = (
        stages.pop("decode_text", 0.0)
        + stages.pop("decode_submit", 0.0)
        + children.get("poc-decoder", 0.0)
    )
    if "poc-encoder" in children:  # the encoders run in worker processes
        stages["encode"] = children["poc-encoder"]
    per_submission = items / len(submissions)
    raw_after = raw_rate(shard, requests, policy)  # the node and Mosquitto have stopped
    return Figures(
        kind,
        items,
        raw_before,
        raw_after,
        items / accepted_s,
        items / final_s,
        steady * per_submission,
        stages,
        cpu_total,
        peak / 1024,
    )


def kinds(text: str) -> list[str]:
    """``--kinds``: a comma-separated list of KINDS, checked before anything runs."""
    chosen = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in chosen if kind not in KINDS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown kind {', '.join(unknown) or '(none)'}; choose from {', '.join(KINDS)}"
        )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--count", type=int, default=240, help="submissions per kind")
    parser.add_argument("--kinds", type=kinds, default=list(KINDS), help=", ".join(KINDS))
    parser.add_argument(
        "--committee", type=int, default=1, help="members (each prepares every submission)"
    )
    parser.add_argument("--submitters", type=int, default=48, help="keys signing the stream")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--workers", type=int, default=None, help="the node's encoders.workers (default: config)"
    )
    parser.add_argument(
        "--cache-items",
        type=int,
        default=None,
        help="the node's encoders.cache_items (default: config; 0 encodes every item again)",
    )
    args = parser.parse_args()

    reuse_heap()  # before the first large allocation, as an encoder worker does
    config = load_config(DEFAULT_CONFIG)
    policy = BatchPolicy.of(config.encoders)
    shard = Shard.load(
        config.encoders.manifest, config.encoders.manifest_sha256, device=args.device
    )
    print(f"weights {shard.weights_id[:16]}  device {args.device}  cores {os.cpu_count()}")
    print(f"batch policy {policy.describe()}")
    rows = []
    for offset, kind in enumerate(args.kinds):
        figures = run_kind(kind, shard, policy, args, args.seed + offset)
        rows.append(figures)
        raw = (figures.raw_before_s + figures.raw_after_s) / 2
        print(
            f"{kind:<11} {figures.items:>5} items  raw {raw:7.1f}/s "
            f"({figures.raw_before_s:.1f} before, {figures.raw_after_s:.1f} after)  "
            f"node {figures.accepted_items_s:7.1f}/s accepted "
            f"(ratio {figures.accepted_items_s / raw:4.2f}), "
            f"{figures.final_items_s:7.1f}/s final "
            f"(ratio {figures.final_items_s / raw:4.2f}), "
            f"{figures.steady_items_s:7.1f}/s steady "
            f"(ratio {figures.steady_items_s / raw:4.2f})  "
            f"peak RSS {figures.peak_rss_mib:6.0f} MiB",
            flush=True,
        )
    print()
    print("share of the node's CPU time per stage (decoder processes included)")
    print(f"{'kind':<11}" + "".join(f"{s:>9}" for s in (*STAGES, "other")) + f"{'cpu s':>9}")
    for figures in rows:
        shares = [figures.cpu.get(s, 0.0) / figures.cpu_total for s in STAGES]
        other = 1 - sum(shares)
        print(
            f"{figures.kind:<11}"
            + "".join(f"{share:>9.1%}" for share in (*shares, other))
            + f"{figures.cpu_total:>9.1f}"
        )


if __name__ == "__main__":
    main()
