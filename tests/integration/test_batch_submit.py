"""``poc-node submit --batch`` against a real node through Mosquitto, interrupted midway.

The node's rate limit is tighter than the batch's own (so ``rate_limited``
answers must slow the batch down and the refused lines be sent again); the
first run is killed once a few lines are out; the second run finishes the
job. Nothing that had a result is sent twice, every good line ends with one
outcome, and the bad lines are named by their line numbers.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from tests.conftest import POC_NODE, start_mosquitto, start_node, write_node_config
from tests.media import image_bytes

CAPTIONS = [f"a batch caption number {i}, about a {c} thing" for i, c in enumerate("abcdefgh")]


def _write_batch(folder: Path) -> tuple[Path, int, dict[int, str]]:
    """Ten good lines (eight captions, two caption + picture pairs) and four bad ones."""
    pictures = folder / "pictures"
    pictures.mkdir(parents=True)
    (pictures / "one.png").write_bytes(image_bytes("RGB", "PNG", (40, 30)))
    (pictures / "two.jpg").write_bytes(image_bytes("RGB", "JPEG", (30, 40)))
    lines = [json.dumps({"text": caption}) for caption in CAPTIONS]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"text": "a caption", "file": "pictures/missing.png"}))
    lines.append(json.dumps({"text": "a red pair", "file": "pictures/one.png"}))
    lines.append(json.dumps({"text": "", "colour": "red"}))
    lines.append(json.dumps({"text": "a blue pair", "files": ["pictures/two.jpg"]}))
    lines.append(json.dumps({"files": ["pictures/one.png", "pictures/two.jpg"], "text": "x"}))
    batch = folder / "dataset.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    bad = {3: "not JSON", 5: "does not exist", 12: "unknown field", 14: "one or two items"}
    return batch, 10, bad


def _journal(path: Path) -> list[dict]:
    records = []
    for text in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a record cut by the kill
            records.append(json.loads(text))
    return records


def test_a_batch_interrupted_midway_resumes_without_sending_twice(tmp_path: Path):
    broker = start_mosquitto(tmp_path)
    bus = f"mqtt://127.0.0.1:{broker.port}"
    config = write_node_config(
        tmp_path / "node.yaml",
        rounds={"round_seconds": 1},
        intake={"rate_limit": {"per_minute": 90, "burst": 3}},
    )
    node = start_node(tmp_path / "node", bus, config)
    batch, good, bad = _write_batch(tmp_path / "data")
    journal = tmp_path / "data" / "dataset.results.jsonl"
    key = tmp_path / "submitter.key"
    subprocess.run([str(POC_NODE), "keygen", "--out", str(key)], check=True, capture_output=True)
    command = [
        str(POC_NODE),
        "submit",
        "--key",
        str(key),
        "--bus",
        bus,
        "--batch",
        str(batch),
        "--rate-per-minute",
        "600",
        "--burst",
        "6",
        "--timeout",
        "30",
    ]
    try:
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and first.poll() is None:
            sent = (
                [r for r in _journal(journal) if r["event"] == "sent"] if journal.exists() else []
            )
            if len(sent) >= 4:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be interrupted"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        interrupted = _journal(journal)
        in_doubt = {
            r["submission_id"]
            for r in interrupted
            if r["event"] == "sent"
            and not any(
                o["event"] == "result"
                and o["submission_id"] == r["submission_id"]
                and o["status"] in {"final", "rejected"}
                for o in interrupted
            )
        }

        second = subprocess.run(command, capture_output=True, text=True, timeout=240)
        assert second.returncode == 1, second.stderr  # 1: the bad lines were skipped
        for number, problem in bad.items():
            assert f"dataset.jsonl:{number}: skipped:" in second.stderr
            assert problem in second.stderr, second.stderr
        assert "0 without an outcome" in second.stdout, second.stdout + second.stderr

        records = _journal(journal)
        by_line: dict[int, list[dict]] = defaultdict(list)
        for record in records:
            if record["event"] in {"sent", "result"}:
                by_line[record["line"]].append(record)
        assert len(by_line) == good
        rate_limited = 0
        for number, history in by_line.items():
            outcome = None
            for record in history:
                if record["event"] == "sent":
                    assert outcome is None, f"line {number} was sent again after {outcome}"
                elif record["status"] in {"final", "rejected"} and not record.get("repeat"):
                    if record["reason"] in {"rate_limited", "stale", "expired"}:
                        rate_limited += record["reason"] == "rate_limited"
                    else:
                        outcome = record
            assert outcome is not None, f"line {number} has no outcome: {history}"
            assert outcome["reason"] != "duplicate", f"line {number} was judged twice"
        assert rate_limited > 0, "the node's rate limit never answered: the test proves nothing"

        # The lines left in doubt by the kill were published again with the same bytes.
        resent = {
            r["submission_id"]
            for r in records[len(interrupted) :]
            if r["event"] == "sent" and not r["fresh"]
        }
        assert in_doubt <= resent | {
            r["submission_id"]
            for r in records[len(interrupted) :]
            if r["event"] == "result" and r.get("source") == "round_summary"
        }

        # The validator judged each good line once.
        assert node.stop() == 0, node.log_text()[-3000:]
        db = sqlite3.connect(node.data_dir / "node.sqlite3")
        finals = db.execute("SELECT COUNT(*) FROM submissions WHERE state = 'final'").fetchone()[0]
        db.close()
        judged = sum(
            1
            for history in by_line.values()
            if any(
                r["event"] == "result" and r["status"] == "final" and not r.get("repeat")
                for r in history
            )
        )
        assert finals == judged > 0

        # A third run finds nothing to do and sends nothing.
        third = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert f"{good} submissions ({good} already have an outcome)" in third.stderr
        assert len(_journal(journal)) == len(records) + len(bad)  # only the bad lines again
    finally:
        node.stop(signal.SIGKILL)
        broker.stop()


def test_a_batch_that_loses_the_broker_says_so_and_resumes_when_it_is_back(tmp_path: Path):
    broker = start_mosquitto(tmp_path)
    bus = f"mqtt://127.0.0.1:{broker.port}"
    node = start_node(
        tmp_path / "node",
        bus,
        write_node_config(tmp_path / "node.yaml", rounds={"round_seconds": 1}),
    )
    folder = tmp_path / "data"
    folder.mkdir()
    batch = folder / "captions.jsonl"
    batch.write_text("".join(json.dumps({"text": c}) + "\n" for c in CAPTIONS[:6]))
    journal = folder / "captions.results.jsonl"
    key = tmp_path / "submitter.key"
    subprocess.run([str(POC_NODE), "keygen", "--out", str(key)], check=True, capture_output=True)
    command = [str(POC_NODE), "submit", "--key", str(key), "--bus", bus, "--batch", str(batch)]
    command += ["--rate-per-minute", "60", "--burst", "1", "--timeout", "30"]
    try:
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and sum(r["event"] == "sent" for r in _journal(journal)) >= 2:
                break
            time.sleep(0.05)
        broker.stop()  # the broker goes away in the middle of the batch
        out, err = first.communicate(timeout=60)
        assert first.returncode == 1, out + err
        assert "lost the broker" in err, err
        assert "run the same command again to resume" in out, out

        broker.start()  # persistence on: the node's session and what it was sent survive
        second = subprocess.run(command, capture_output=True, text=True, timeout=180)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "0 without an outcome" in second.stdout
        outcomes = [
            r
            for r in _journal(journal)
            if r["event"] == "result"
            and r["status"] in {"final", "rejected"}
            and not r.get("repeat")
        ]
        assert sorted(r["line"] for r in outcomes if r["status"] == "final") == list(range(1, 7))
        assert not [r for r in outcomes if r["reason"] == "duplicate"]
    finally:
        node.stop(signal.SIGKILL)
        broker.stop()


def test_with_a_committee_submit_believes_only_its_members(tmp_path: Path):
    """Found by a black-box audit: anyone who could publish on ``results/<key>`` made
    ``poc-node submit`` print a ``final`` Result with any reward, and exit 0. With
    ``--committee`` a Result signed by a key outside it is ignored; without, each line
    names the validator that signed it."""
    import asyncio

    import aiomqtt
    import yaml

    from node.intake.keys import SigningKey, write_key
    from node.intake.signing import MessageSigner
    from node.intake.wire import RESULT_DOMAIN, Result, Status
    from tests.peer import submission_id

    broker = start_mosquitto(tmp_path)
    member, forger, submitter = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    write_key(submitter, tmp_path / "me.key")
    committee = tmp_path / "committee.yaml"
    committee.write_text(
        yaml.safe_dump(
            {
                "genesis_ms": 0,
                "round_seconds": 2,
                "epoch_rounds": 20,
                "members": [{"name": "v0", "public_key": member.public_hex, "stake": 100}],
            }
        )
    )

    async def forge_answers(ready: asyncio.Event, stop: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe("poc/v1/submissions/+", qos=1)
            ready.set()
            async with asyncio.timeout(30):
                async for message in client.messages:
                    identity = submission_id(bytes(message.payload))  # type: ignore[arg-type]
                    forged = Result(
                        identity, forger.public_key, Status.FINAL, round=7, reward=10**12
                    )
                    raw = MessageSigner(forger).signed_bytes(RESULT_DOMAIN.decode(), forged.body())
                    await client.publish(f"poc/v1/results/{submitter.public_hex}", raw, qos=1)
                    if stop.is_set():
                        return

    async def submit(*extra: str) -> subprocess.CompletedProcess[bytes]:
        ready, stop = asyncio.Event(), asyncio.Event()
        forging = asyncio.create_task(forge_answers(ready, stop))
        await ready.wait()
        stop.set()
        process = await asyncio.create_subprocess_exec(
            str(POC_NODE), "submit", "--key", str(tmp_path / "me.key"),
            "--bus", f"mqtt://127.0.0.1:{broker.port}", "--timeout", "5", *extra,
            "text:a caption nobody judges",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        await forging
        return subprocess.CompletedProcess([], process.returncode or 0, out, err)

    try:
        trusting = asyncio.run(submit())
        careful = asyncio.run(submit("--committee", str(committee)))
    finally:
        broker.stop()
    assert trusting.returncode == 0  # nothing to check it against: but it says who signed
    assert f"validator={forger.public_hex[:16]}" in trusting.stdout.decode()
    assert careful.returncode == 1, careful.stdout + careful.stderr
    assert b"final" not in careful.stdout.splitlines()[-1]
    assert f"ignoring a Result signed by {forger.public_hex}".encode() in careful.stderr
    assert b"no final result within 5 s" in careful.stderr
