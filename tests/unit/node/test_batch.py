"""``submit --batch``: its lines, its journal and what a resumed run sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consensus.committee import Committee, Member
from node.errors import Reason
from node.intake.keys import SigningKey
from node.intake.signing import MessageSigner
from node.intake.wire import Result, Status
from node.ops.batch import BatchRun, Journal, TokenBucket, default_output, parse_batch
from node.rounds.driver import SUMMARY_DOMAIN
from tests.media import image_bytes, wav_bytes

VALIDATOR = SigningKey.generate()


def _batch(folder: Path, *lines: object) -> Path:
    (folder / "pics").mkdir(exist_ok=True)
    (folder / "pics" / "a.png").write_bytes(image_bytes("RGB"))
    (folder / "pics" / "b.wav").write_bytes(wav_bytes("PCM_16"))
    (folder / "pics" / "notes.txt").write_text("a text file")
    path = folder / "batch.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_lines_are_parsed_relative_to_the_file_and_bad_ones_named(tmp_path: Path):
    path = _batch(
        tmp_path,
        {"text": "a caption", "file": "pics/a.png"},
        {"files": ["pics/b.wav", "pics/a.png"]},
        "",
        "[1, 2]",
        {"text": "x", "file": "pics/none.png"},
        {"text": "x", "files": ["pics/a.png", "pics/b.wav"]},
        {"text": 3},
        {"file": "pics/notes.txt"},
        {"caption": "x"},
        "{broken",
        {},
    )
    good, bad = parse_batch(path)
    assert [(line.number, line.text, [p.name for p in line.files]) for line in good] == [
        (1, "a caption", ["a.png"]),
        (2, None, ["b.wav", "a.png"]),
    ]
    assert [n for n, _ in bad] == [4, 5, 6, 7, 8, 9, 10, 11]
    problems = dict(bad)
    assert "not a JSON object" in problems[4]
    assert "does not exist" in problems[5]
    assert "one or two items, this line has 3" in problems[6]
    assert "non-empty string" in problems[7]
    assert "is text" in problems[8]
    assert "unknown field(s) caption" in problems[9]
    assert "not JSON" in problems[10]
    assert "this line has 0" in problems[11]
    assert default_output(path) == tmp_path / "batch.results.jsonl"


def _run(
    tmp_path: Path, key: SigningKey, journal: Journal, committee: Committee | None = None
) -> BatchRun:
    lines, _ = parse_batch(tmp_path / "batch.jsonl")
    return BatchRun(key, lines, journal, TokenBucket(600, 10), committee=committee)


def _send_all(run: BatchRun, journal: Journal) -> list[bytes]:
    """Build every queued line's submission and journal it; their ids, in order."""
    ids = []
    for line, fresh in list(run.queue):
        _, record = run.build(line, fresh)
        journal.write(record)
        ids.append(bytes.fromhex(record["submission_id"]))
    return ids


def _result(identity: bytes, status: Status, reason: Reason | None = None) -> Result:
    return Result(identity, VALIDATOR.public_key, status, reason, 3 if reason is None else None)


def test_a_resumed_run_skips_outcomes_resends_the_same_bytes_and_refreshes_the_unjudged(
    tmp_path: Path,
):
    key = SigningKey.generate()
    _batch(tmp_path, {"text": "one"}, {"text": "two"}, {"text": "three"}, {"text": "four"})
    journal = Journal(tmp_path / "out.jsonl")
    first = _run(tmp_path, key, journal)
    sent = {}
    for line, fresh in list(first.queue):
        raw, record = first.build(line, fresh)
        journal.write(record)
        sent[line.number] = (raw, record)
    ids = {n: bytes.fromhex(record["submission_id"]) for n, (_, record) in sent.items()}
    first.hear_result(_result(ids[1], Status.ACCEPTED))
    first.hear_result(_result(ids[1], Status.FINAL))
    first.hear_result(_result(ids[2], Status.REJECTED, Reason.RATE_LIMITED))
    first.queue.clear()  # interrupted: line 2's fresh attempt never went out
    first.hear_result(_result(ids[4], Status.REJECTED, Reason.UNDECODABLE))
    journal.close()
    with (tmp_path / "out.jsonl").open("a") as handle:
        handle.write('{"event": "result", "line": 3, "cut by a cra')

    journal = Journal(tmp_path / "out.jsonl")
    second = _run(tmp_path, key, journal)
    assert second.skipped == 2  # line 1 final, line 4 judged undecodable
    assert second.open_lines == 2 and not second.finished()
    assert [(line.number, fresh) for line, fresh in second.queue] == [(2, True), (3, False)]
    line3 = next(line for line, _ in second.queue if line.number == 3)
    raw, record = second.build(line3, False)
    assert raw == sent[3][0]  # the same signed bytes: a validator judges them once
    assert record["fresh"] is False
    line2 = next(line for line, _ in second.queue if line.number == 2)
    assert second.build(line2, True)[1]["submission_id"] != sent[2][1]["submission_id"]


def test_a_line_edited_since_the_journal_is_a_new_line(tmp_path: Path):
    key = SigningKey.generate()
    _batch(tmp_path, {"text": "one"})
    journal = Journal(tmp_path / "out.jsonl")
    run = _run(tmp_path, key, journal)
    line, fresh = run.queue[0]
    _, record = run.build(line, fresh)
    journal.write(record)
    run.hear_result(_result(bytes.fromhex(record["submission_id"]), Status.FINAL))
    journal.close()
    _batch(tmp_path, {"text": "one, corrected"})
    again = _run(tmp_path, key, Journal(tmp_path / "out.jsonl"))
    assert again.skipped == 0 and len(again.queue) == 1


def _summary(signer: SigningKey, round_number: int, records: list[dict]) -> bytes:
    body = {"v": 1, "round": round_number, "validator": signer.public_key, "records": records}
    return MessageSigner(signer).signed_bytes(SUMMARY_DOMAIN, body)


def test_round_summaries_settle_lines_in_doubt_and_forgeries_do_not(tmp_path: Path):
    key = SigningKey.generate()
    _batch(tmp_path, {"text": "one"}, {"text": "two"})
    journal = Journal(tmp_path / "out.jsonl")
    run = _run(tmp_path, key, journal)
    ids = _send_all(run, journal)
    record = {"submitter": key.public_key, "status": "final", "reason": None, "reward": 40}
    forged = bytearray(_summary(VALIDATOR, 9, [{**record, "submission_id": ids[1]}]))
    forged[-1] ^= 1
    run.hear_summary(bytes(forged))
    run.hear_summary(_summary(VALIDATOR, 9, [{**record, "submission_id": ids[0]}]))
    states = [journal.state(line) for line in run.lines.values()]
    assert states[0].done and states[0].outcome is not None
    assert states[0].outcome["source"] == "round_summary" and states[0].outcome["reward"] == 40
    assert not states[1].done
    assert run.tally.final == 1


def test_with_a_committee_only_its_members_answers_settle_a_line(tmp_path: Path):
    key, outsider = SigningKey.generate(), SigningKey.generate()
    _batch(tmp_path, {"text": "one"}, {"text": "two"})
    journal = Journal(tmp_path / "out.jsonl")
    committee = Committee(0, 2, 20, (Member("v0", VALIDATOR.public_key, 100),))
    run = _run(tmp_path, key, journal, committee)
    ids = _send_all(run, journal)
    record = {"submitter": key.public_key, "status": "final", "reason": None, "reward": 40}
    run.hear_summary(_summary(outsider, 9, [{**record, "submission_id": ids[0]}]))
    run.hear_result(Result(ids[1], outsider.public_key, Status.FINAL, None, 3))
    assert not any(journal.state(line).done for line in run.lines.values())
    run.hear_summary(_summary(VALIDATOR, 9, [{**record, "submission_id": ids[0]}]))
    run.hear_result(_result(ids[1], Status.FINAL))
    assert all(journal.state(line).done for line in run.lines.values())
    assert run.tally.final == 2


def test_another_members_result_is_recorded_not_counted_and_a_stale_attempt_ignored(
    tmp_path: Path,
):
    key = SigningKey.generate()
    _batch(tmp_path, {"text": "one"})
    journal = Journal(tmp_path / "out.jsonl")
    run = _run(tmp_path, key, journal)
    line, _ = run.queue.popleft()
    _, first = run.build(line, True)
    journal.write(first)
    run.hear_result(_result(bytes.fromhex(first["submission_id"]), Status.REJECTED, Reason.STALE))
    assert [fresh for _, fresh in run.queue] == [True]
    line, _ = run.queue.popleft()
    _, second = run.build(line, True)
    journal.write(second)
    run.hear_result(_result(bytes.fromhex(first["submission_id"]), Status.FINAL))  # superseded
    assert not journal.state(line).done
    identity = bytes.fromhex(second["submission_id"])
    run.hear_result(_result(identity, Status.FINAL))
    run.hear_result(_result(identity, Status.FINAL))  # a second member's Result
    assert run.tally.final == 1
    repeats = [json.loads(t) for t in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r.get("repeat", False) for r in repeats if r["event"] == "result"] == [
        False,
        False,
        True,
    ]
    assert run.finished()


def test_the_bucket_halves_once_per_burst_of_rate_limited_answers():
    bucket = TokenBucket(120, 3)
    for _ in range(3):
        assert bucket.wait_s() == 0
        bucket.take()
    assert bucket.wait_s() > 0
    for _ in range(5):  # one burst's answers arrive together
        bucket.slow_down()
    assert bucket.per_minute == 60
    assert bucket.wait_s() == pytest.approx(1.0, abs=0.05)
    with pytest.raises(Exception, match="rate-per-minute"):
        TokenBucket(0, 1)
