"""Who gets paid: an honest crowd and a farmer on a fresh node, through the bus.

Starts Mosquitto and a fresh node on the shipped (trained) weights, then
publishes, round after round, a mixed stream of the project's closed world
(``training.stream``) from many keys:

- honest contributors: captioned pictures, speech and clips, and single
  items, of known concepts ("seen") and of colour-shape combinations the
  history never held ("novel");
- a farmer, from several keys: near-copies of one gap-filling picture
  (a few pixels changed, re-saved), noise (random pixels, tones, tokens,
  flicker), and re-encodings of what honest contributors sent before.

It prints per round the items paid, the honest and the farmer's share of the
emission and the qualification rate of genuine new items, then the totals
against the targets of issue #11: every round with at least ten genuine new
items pays someone; novel combinations (the first three submissions of each)
earn more per item than repeats of known concepts; the farmer's copies are
paid at most once; noise and re-encodings earn nothing; the honest share is
at least 90 %.

    .venv/bin/python bench/bench_rewards.py [--rounds 12] [--per-round 24] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoders.modality import Modality  # noqa: E402
from tests.conftest import start_mosquitto, start_node, write_node_config  # noqa: E402
from tests.peer import Peer, ResultListener, submission_id  # noqa: E402
from training.stream import MEDIA, WorldMaker, WorldSubmission, concepts  # noqa: E402

ROUND_SECONDS = 4
NEW_WHILE = 3
"""A novel combination's first submissions are new data; later ones repeat it."""
HONEST_KEYS = 24
FARMER_KEYS = 6


@dataclass(frozen=True)
class Sent:
    who: str  # "honest" or "farmer"
    kind: str  # seen, novel, copy, noise, reencoding
    items: int
    modalities: str


def honest_submission(maker: WorldMaker) -> WorldSubmission:
    rng = maker.rng
    novel = rng.random() < 0.3
    concept = rng.choice(concepts(novel=novel))
    kind = "novel" if novel else "seen"
    if rng.random() < 0.15:
        return maker.single(kind, concept, rng.choice((Modality.IMAGE, Modality.TEXT)))
    media = rng.choices(MEDIA, weights=(6, 2, 2))[0]
    return maker.pair(kind, concept, media)


def farmer_submissions(
    maker: WorldMaker, original: WorldSubmission, honest_sent: list[WorldSubmission], count: int
) -> list[WorldSubmission]:
    rng = maker.rng
    out = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.35:  # a near-copy of the one gap-filling picture
            image = maker.reencode(original.items[1])
            caption = maker.reencode(original.items[0])
            out.append(WorldSubmission("copy", (caption, image)))
        elif roll < 0.7:
            out.append(maker.noise(rng.choice(list(Modality))))
        elif honest_sent:
            victim = rng.choice(honest_sent)
            out.append(
                WorldSubmission("reencoding", tuple(maker.reencode(i) for i in victim.items))
            )
    return out


def wire_items(submission: WorldSubmission) -> list[tuple[str, str, bytes]]:
    return [(str(item.modality), item.mime, item.data) for item in submission.items]


async def run(args: argparse.Namespace, port: int) -> int:
    maker = WorldMaker(args.seed)
    honest_peers = [Peer() for _ in range(HONEST_KEYS)]
    farmer_peers = [Peer() for _ in range(FARMER_KEYS)]
    novel = concepts(novel=True)
    original = maker.pair("copy", random.Random(args.seed).choice(novel), Modality.IMAGE)
    sent: dict[bytes, Sent] = {}
    honest_sent: list[WorldSubmission] = []
    combinations: dict[tuple[str, str], int] = defaultdict(int)
    rng = random.Random(args.seed + 1)
    async with ResultListener(port) as listener:
        for number in range(args.rounds):
            farmer_count = args.per_round // 4
            batch: list[tuple[str, WorldSubmission]] = [
                ("honest", honest_submission(maker)) for _ in range(args.per_round - farmer_count)
            ]
            batch += [
                ("farmer", s)
                for s in farmer_submissions(maker, original, honest_sent, farmer_count)
            ]
            if number == 0:
                batch.append(("farmer", original))  # the gap-filling picture itself, once
            rng.shuffle(batch)
            for who, submission in batch:
                peer = rng.choice(honest_peers if who == "honest" else farmer_peers)
                raw = peer.submission(wire_items(submission))
                kind = submission.kind
                concept = submission.items[0].concept
                if kind == "novel" and concept is not None:
                    combinations[(concept.colour, concept.shape)] += 1
                    if combinations[(concept.colour, concept.shape)] > NEW_WHILE:
                        kind = "novel-again"  # by now a repeat of a known combination
                sent[submission_id(raw)] = Sent(
                    who,
                    kind,
                    len(submission.items),
                    "+".join(str(item.modality) for item in submission.items),
                )
                await listener.publish(raw)
            honest_sent += [s for who, s in batch if who == "honest"]
            await asyncio.sleep(ROUND_SECONDS)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = {r["submission_id"] for r in listener.results if r["status"] != "accepted"}
            if all(identity in done for identity in sent):
                break
            await asyncio.sleep(1)
        return report(sent, listener.results)


def report(sent: dict[bytes, Sent], results: list[dict[str, object]]) -> int:
    final: dict[bytes, dict[str, object]] = {}
    for result in results:
        if result["status"] in ("final", "rejected"):
            final[result["submission_id"]] = result  # type: ignore[index]
    rounds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_kind: dict[str, list[float]] = defaultdict(list)
    item_scores: dict[str, list[float]] = defaultdict(list)
    reasons: dict[str, int] = defaultdict(int)
    for identity, what in sent.items():
        result = final.get(identity)
        if result is None:
            reasons["(no result)"] += 1
            continue
        if result["status"] == "rejected":
            reasons[f"{what.who}/{what.kind}: {result['reason']}"] += 1
        number = result["round"]
        reward = int(result["reward"])  # type: ignore[call-overload]
        scores = result["scores_ppm"] or []  # type: ignore[assignment]
        row = rounds[int(number)] if number is not None else rounds[-1]  # type: ignore[call-overload]
        row[what.who] += reward
        row["paid_items"] += what.items if reward else 0
        if what.who == "honest" and result["status"] == "final":
            fresh = [s for s in scores if s is not None]  # type: ignore[union-attr]
            row["genuine_items"] += len(fresh)
            row["qualified"] += sum(1 for s in fresh if s > 0)
        per_kind[f"{what.who}/{what.kind}"].append(reward / what.items)
        if result["status"] == "final":
            item_scores[f"{what.who}/{what.kind}"].extend(
                (s or 0) / 1e6
                for s in scores  # type: ignore[union-attr]
            )
        per_kind[f"{what.who}/{what.kind}/{what.modalities}"].append(reward / what.items)
    print(
        f"{'round':>5} {'paid items':>10} {'honest':>7} {'farmer':>7} {'new items':>9} "
        f"{'qualified':>9}"
    )
    paying_failures = 0
    for number in sorted(k for k in rounds if k >= 0):
        row = rounds[number]
        emission = row["honest"] + row["farmer"]
        share = (row["honest"] / emission) if emission else float("nan")
        qualified = (row["qualified"] / row["genuine_items"]) if row["genuine_items"] else 0.0
        print(
            f"{number:>5} {int(row['paid_items']):>10} {share:>7.2f} "
            f"{(1 - share) if emission else float('nan'):>7.2f} {int(row['genuine_items']):>9} "
            f"{qualified:>9.2f}"
        )
        if row["genuine_items"] >= 10 and emission == 0:
            paying_failures += 1
    honest = sum(r["honest"] for r in rounds.values())
    farmer = sum(r["farmer"] for r in rounds.values())
    print("\nmean reward per item by kind (and mean gap score of its final items):")
    for kind, values in sorted(per_kind.items()):
        scored = item_scores.get(kind, [])
        mean_score = f"{sum(scored) / len(scored):.3f}" if scored else "-"
        print(
            f"  {kind:<28} {len(values):>4} submissions  {sum(values) / len(values):>10.0f}"
            f"  score {mean_score}"
        )
    print("\nfarmer submissions paid:")
    for identity, what in sent.items():
        result = final.get(identity)
        if what.who == "farmer" and result is not None and result["reward"]:
            print(
                f"  {what.kind:<11} {what.modalities:<11} scores={result['scores_ppm']} "
                f"reward={result['reward']} round={result['round']}"
            )
    print("\nrejections:")
    for reason, count in sorted(reasons.items()):
        print(f"  {reason:<40} {count}")
    honest_share = honest / (honest + farmer) if honest + farmer else 0.0
    copies_paid = sum(
        1
        for identity, what in sent.items()
        if what.kind == "copy" and int(final.get(identity, {}).get("reward", 0) or 0) > 0
    )
    junk_paid = sum(
        int(final.get(identity, {}).get("reward", 0) or 0)
        for identity, what in sent.items()
        if what.kind in ("noise", "reencoding")
    )
    novel = per_kind.get("honest/novel", [0.0])
    seen = per_kind.get("honest/seen", [0.0])
    targets = {
        "every round with >= 10 genuine new items pays someone": paying_failures == 0,
        f"novel combinations (first {NEW_WHILE} of each) earn more per item than known concepts": (
            sum(novel) / len(novel) > sum(seen) / len(seen)
        ),
        f"the farmer's copies are paid at most once (paid: {copies_paid})": copies_paid <= 1,
        f"noise and re-encodings earn nothing (earned: {junk_paid})": junk_paid == 0,
        f"honest share >= 90 % (measured {100 * honest_share:.1f} %)": honest_share >= 0.9,
    }
    print(
        f"\nemission paid: honest {honest:.0f}, farmer {farmer:.0f}; "
        f"honest/farmer ratio {honest / farmer if farmer else float('inf'):.1f}"
    )
    for target, met in targets.items():
        print(f"  [{'met' if met else 'MISSED'}] {target}")
    return 0 if all(targets.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="rounds of submissions (default 12)")
    parser.add_argument("--per-round", type=int, default=24, help="submissions per round")
    parser.add_argument("--seed", type=int, default=7, help="world seed (default 7)")
    parser.add_argument(
        "--qualify-ratio", type=float, help="override the calibrated scoring.qualify_ratio"
    )
    args = parser.parse_args()
    shipped = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())["encoders"]
    with tempfile.TemporaryDirectory(prefix="poc-bench-rewards-") as tmp:
        directory = Path(tmp)
        broker = start_mosquitto(directory)
        config = write_node_config(
            directory / "node.yaml",
            rounds={
                "round_seconds": ROUND_SECONDS,
                "genesis_ms": time.time_ns() // 10**6 - ROUND_SECONDS * 1000,
            },
            encoders={
                "manifest": str(ROOT / "weights" / "default" / "manifest.json"),
                "manifest_sha256": shipped["manifest_sha256"],
            },
            scoring={"qualify_ratio": args.qualify_ratio},
        )
        node = start_node(directory / "node", f"mqtt://127.0.0.1:{broker.port}", config)
        try:
            return asyncio.run(run(args, broker.port))
        finally:
            node.stop()
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
