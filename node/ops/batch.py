"""``poc-node submit --batch FILE``: a dataset submitted with progress, resumable.

FILE is JSON Lines, one submission a line::

    {"text": "a red square on a white ground", "file": "pictures/red-square.png"}
    {"files": ["clips/dog.wav", "pictures/dog.jpg"]}
    {"text": "a caption alone"}

``text`` is a caption, ``file``/``files`` are paths relative to FILE's folder
(their media type comes from their content, as for ``submit FILE``); a
submission has one or two items. A line that is not such an object, names a
missing or unrecognised file or holds no or too many items is reported with
its line number and skipped.

Every line's fate is written to an output JSON Lines file (the journal): a
``sent`` record *before* its bytes are published (with the nonce and time
that rebuild exactly the same signed bytes: Ed25519 signatures are
deterministic), then every Result heard about it. A second run on the same
FILE and output reads the journal and:

- skips a line whose submission has an outcome (``final``, or ``rejected``
  for a reason that judged the data);
- for a line sent without an outcome heard, publishes the *same* bytes again
  (a validator never processes one submission twice) and reads the retained
  round summaries for submissions finalized while it was away;
- sends afresh (a new nonce) a line rejected ``rate_limited``, ``stale`` or
  ``expired``: those reasons mean the data was never judged;
- treats a line whose text changed since the journal as a new line.

Within a run, halfway through the idle timeout, the lines still without an
outcome are published once more with the same bytes (:meth:`BatchRun.ask_again`).

So nothing is sent twice once it has a result. Publishing follows a token
bucket sized like the node's ``intake.rate_limit`` (120 a minute, 30 at once
by default); every ``rate_limited`` answer halves the rate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiomqtt
from tqdm import tqdm  # type: ignore[import-untyped]

from consensus.committee import Committee
from encoders.errors import EncoderError
from encoders.media import media_type_of
from encoders.modality import MEDIA_TYPES, Modality
from node.errors import NodeError, Reason
from node.intake.codec import CodecError, unpack
from node.intake.keys import SigningKey, load_key, verify_signature
from node.intake.signing import MessageSigner
from node.intake.wire import (
    SUBMISSION_DOMAIN,
    Result,
    signing_bytes,
    submission_body,
    submission_id,
    verify_result,
)
from node.ops.submitter import Access, BusTarget, describe
from node.rounds.driver import SUMMARY_DOMAIN

RETRYABLE = frozenset({Reason.RATE_LIMITED, Reason.STALE, Reason.EXPIRED})
"""Rejections that say the data was never judged: the line is sent again, afresh."""
_KEYS = frozenset({"text", "file", "files"})


@dataclass(frozen=True)
class BatchLine:
    """One good line of the batch file; its files are read when it is sent."""

    number: int
    digest: str
    """SHA-256 of the line's text: a line edited since the journal is a new line."""
    text: str | None
    files: tuple[Path, ...]

    @property
    def key(self) -> tuple[int, str]:
        return self.number, self.digest

    def items(self) -> list[tuple[Modality, str, bytes]]:
        out: list[tuple[Modality, str, bytes]] = []
        if self.text is not None:
            out.append((Modality.TEXT, "text/plain", self.text.encode("utf-8")))
        for path in self.files:
            try:
                mime = media_type_of(path)
                out.append((MEDIA_TYPES[mime], mime, path.read_bytes()))
            except (OSError, EncoderError) as error:
                raise BadLine(f"{path}: {error}") from None
        return out


class BadLine(ValueError):
    """A batch line that names no valid submission."""


def _parse_line(number: int, text: str, folder: Path) -> BatchLine:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadLine(f"not JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(entry, dict):
        raise BadLine("not a JSON object")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise BadLine(f"unknown field(s) {', '.join(unknown)}; expected text, file or files")
    caption = entry.get("text")
    if caption is not None and (not isinstance(caption, str) or not caption):
        raise BadLine("text must be a non-empty string")
    names: list[Any] = []
    if "file" in entry:
        names.append(entry["file"])
    if "files" in entry:
        if not isinstance(entry["files"], list):
            raise BadLine("files must be a list of paths")
        names.extend(entry["files"])
    files = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise BadLine("a file must be a non-empty path")
        path = folder / name
        if not path.is_file():
            raise BadLine(f"file {name!r} does not exist (paths are relative to the batch file)")
        try:
            mime = media_type_of(path)
        except (OSError, EncoderError) as error:
            raise BadLine(f"file {name!r}: {error}") from None
        if MEDIA_TYPES[mime] is Modality.TEXT:
            raise BadLine(f"file {name!r} is text: put captions in the text field")
        files.append(path)
    count = (caption is not None) + len(files)
    if not 1 <= count <= 2:
        raise BadLine(f"a submission has one or two items, this line has {count}")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return BatchLine(number, digest, caption, tuple(files))


def parse_batch(path: Path) -> tuple[list[BatchLine], list[tuple[int, str]]]:
    """Good lines, and (line number, problem) for the others; blank lines are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise NodeError(f"cannot read batch file {path}: {error}") from None
    good: list[BatchLine] = []
    bad: list[tuple[int, str]] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            good.append(_parse_line(number, text, path.parent))
        except BadLine as error:
            bad.append((number, str(error)))
    return good, bad


@dataclass
class LineState:
    """What the journal says about one line."""

    sent: dict[str, Any] | None = None
    """The last ``sent`` record: submission id, nonce and time of the bytes published."""
    outcome: dict[str, Any] | None = None
    """The terminal Result (or round record) about ``sent``, if one was heard."""
    accepted: bool = False
    attempts: int = 0

    @property
    def done(self) -> bool:
        return self.outcome is not None and not _retryable(self.outcome)

    @property
    def in_doubt(self) -> bool:
        """Published, and nothing terminal heard about those bytes."""
        return self.sent is not None and self.outcome is None


def _retryable(outcome: dict[str, Any]) -> bool:
    return outcome["status"] == "rejected" and outcome.get("reason") in RETRYABLE


class Journal:
    """The output JSON Lines file: appended, flushed and synced record by record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.states: dict[tuple[int, str], LineState] = {}
        self._ids: dict[str, tuple[int, str]] = {}
        if path.exists():
            self._replay()
        self._handle: TextIO = path.open("a", encoding="utf-8")

    def _replay(self) -> None:
        with self.path.open(encoding="utf-8") as handle:
            for text in handle:
                try:
                    record = json.loads(text)
                    self._apply(record)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a record cut by an interruption: the line is judged by the rest

    def _apply(self, record: dict[str, Any]) -> None:
        if record.get("event") not in {"sent", "result"}:
            return
        key = (int(record["line"]), str(record["line_sha256"]))
        state = self.states.setdefault(key, LineState())
        if record["event"] == "sent":
            if state.sent is None or state.sent["submission_id"] != record["submission_id"]:
                state.outcome = None  # a new attempt; the same bytes again keep what was heard
                state.accepted = False
                state.attempts += 1
            state.sent = record
            self._ids[record["submission_id"]] = key
            return
        if state.sent is None or record["submission_id"] != state.sent["submission_id"]:
            return  # about an earlier attempt of the line
        if record["status"] == "accepted":
            state.accepted = True
        elif state.outcome is None:
            state.outcome = record

    def line_of(self, identity: str) -> tuple[int, str] | None:
        return self._ids.get(identity)

    def state(self, line: BatchLine) -> LineState:
        return self.states.get(line.key, LineState())

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._apply(record)

    def close(self) -> None:
        self._handle.close()


class TokenBucket:
    """The client's side of the node's per-submitter rate limit."""

    def __init__(self, per_minute: float, burst: int) -> None:
        if per_minute <= 0 or burst < 1:
            raise NodeError("--rate-per-minute must be above 0 and --burst at least 1")
        self.per_minute = float(per_minute)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._slowed = float("-inf")

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_minute / 60)
        self._last = now

    def wait_s(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) * 60 / self.per_minute

    def take(self) -> None:
        self._refill()
        self._tokens -= 1

    def slow_down(self) -> None:
        """A ``rate_limited`` answer: half the rate, and no tokens until it refills.

        Answers to one burst arrive together: the rate halves at most once per
        interval between two sends at the current rate.
        """
        now = time.monotonic()
        if now - self._slowed >= 60 / self.per_minute:
            self.per_minute = max(1.0, self.per_minute / 2)
            self._slowed = now
        self._refill()
        self._tokens = min(self._tokens, 0.0)


@dataclass
class Tally:
    """Counts for the progress bar and the summary."""

    sent: int = 0
    accepted: int = 0
    final: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    retried: int = 0

    def describe(self) -> str:
        parts = [f"sent {self.sent}", f"accepted {self.accepted}", f"final {self.final}"]
        if self.rejected:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items()))
            parts.append(f"rejected {sum(self.rejected.values())} ({reasons})")
        if self.retried:
            parts.append(f"resent {self.retried}")
        return ", ".join(parts)


def default_output(batch: Path) -> Path:
    """``data.jsonl`` -> ``data.results.jsonl`` beside it."""
    return batch.with_name(f"{batch.stem}.results.jsonl")


def _summary_records(raw: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (submission id hex, record) pairs of a RoundSummary whose signature verifies."""
    try:
        message = unpack(raw)
    except CodecError:
        return
    if not isinstance(message, dict):
        return
    sig, validator = message.get("sig"), message.get("validator")
    if not isinstance(sig, bytes) or not isinstance(validator, bytes):
        return
    if not verify_signature(validator, signing_bytes(SUMMARY_DOMAIN.encode(), message), sig):
        return
    for record in message.get("records") or []:
        if isinstance(record, dict) and isinstance(record.get("submission_id"), bytes):
            yield (
                record["submission_id"].hex(),
                {
                    "status": record.get("status"),
                    "reason": record.get("reason"),
                    "round": message.get("round"),
                    "reward": record.get("reward"),
                    "validator": validator.hex(),
                    "source": "round_summary",
                },
            )


class BatchRun:
    """One run of the batch: sends what needs sending, records what it hears."""

    def __init__(
        self,
        key: SigningKey,
        lines: list[BatchLine],
        journal: Journal,
        bucket: TokenBucket,
        *,
        max_attempts: int = 4,
        committee: Committee | None = None,
    ) -> None:
        self._key = key
        self._committee = committee
        self._signer = MessageSigner(key)
        self._journal = journal
        self._bucket = bucket
        self._max_attempts = max_attempts
        self.lines = {line.key: line for line in lines}
        self.tally = Tally()
        self.bad: list[tuple[int, str]] = []
        self.queue: deque[tuple[BatchLine, bool]] = deque()
        """(line, fresh): fresh lines get a new nonce; the others their journaled bytes again."""
        self.skipped = 0
        self._open: set[tuple[int, str]] = set()
        """Lines still without an outcome: kept as outcomes arrive, not recounted per message."""
        self._changed = asyncio.Event()
        self._asked_again = False
        for line in lines:
            state = journal.state(line)
            if state.done:
                self.skipped += 1
                self._count_outcome(state.outcome or {})
            else:
                self._open.add(line.key)
                # In doubt: the same bytes again (a validator that has them ignores
                # them; one that lost them judges them). Otherwise a fresh nonce.
                self.queue.append((line, not state.in_doubt))

    @property
    def open_lines(self) -> int:
        return len(self._open)

    def _count_outcome(self, outcome: dict[str, Any]) -> None:
        if outcome.get("status") == "final":
            self.tally.final += 1
        else:
            self.tally.rejected[str(outcome.get("reason"))] += 1

    def build(self, line: BatchLine, fresh: bool) -> tuple[bytes, dict[str, Any]]:
        """The signed bytes of a line: a new nonce, or the journaled one again."""
        state = self._journal.state(line)
        if fresh or state.sent is None:
            nonce, created_ms = secrets.randbits(63), time.time_ns() // 1_000_000
        else:
            nonce, created_ms = int(state.sent["nonce"]), int(state.sent["created_ms"])
        body = submission_body(self._key.public_key, nonce, created_ms, line.items())
        raw = self._signer.signed_bytes(SUBMISSION_DOMAIN.decode(), body)
        record = {
            "event": "sent",
            "line": line.number,
            "line_sha256": line.digest,
            "submission_id": submission_id(raw).hex(),
            "nonce": nonce,
            "created_ms": created_ms,
            "fresh": fresh or state.sent is None,
        }
        return raw, record

    def _trusted(self, validator: bytes) -> bool:
        """Whether an answer signed by ``validator`` counts: any, or a committee member."""
        return self._committee is None or self._committee.member(validator) is not None

    def hear_result(self, result: Result) -> None:
        if not self._trusted(result.validator):
            return
        identity = result.submission_id.hex()
        self._hear(identity, describe(result))

    def hear_summary(self, raw: bytes) -> None:
        for identity, record in _summary_records(raw):
            if not self._trusted(bytes.fromhex(record["validator"])):
                continue
            key = self._journal.line_of(identity)
            if key is None:
                continue
            if self._journal.states[key].outcome is None:  # _hear checks it is the last attempt
                self._hear(identity, record)

    def _hear(self, identity: str, info: dict[str, Any]) -> None:
        key = self._journal.line_of(identity)
        if key is None or key not in self.lines:
            return
        line = self.lines[key]
        state = self._journal.state(line)
        if state.sent is None or state.sent["submission_id"] != identity:
            return  # about an attempt already superseded
        status = info["status"]
        terminal = status in {"final", "rejected"}
        if (terminal and state.outcome is not None) or (status == "accepted" and state.accepted):
            self._journal.write(self._record(line, identity, info, duplicate=True))
            return  # another member's Result about the same outcome: recorded, not counted
        self._journal.write(self._record(line, identity, info))
        if status == "accepted":
            self.tally.accepted += 1
        elif terminal:
            if _retryable(info):
                self.tally.rejected[str(info["reason"])] += 1
                if info["reason"] == Reason.RATE_LIMITED:
                    self._bucket.slow_down()
                if state.attempts < self._max_attempts:
                    self.tally.retried += 1
                    self.queue.append((line, True))
            else:
                self._count_outcome(info)
                self._open.discard(key)
        self._changed.set()

    @staticmethod
    def _record(
        line: BatchLine, identity: str, info: dict[str, Any], *, duplicate: bool = False
    ) -> dict[str, Any]:
        record = {
            "event": "result",
            "line": line.number,
            "line_sha256": line.digest,
            **info,
            "submission_id": identity,
        }
        if duplicate:
            record["repeat"] = True
        return record

    def finished(self) -> bool:
        return not self.queue and self.open_lines == 0

    async def send_all(self, publish: Any) -> None:
        """Publish queued lines within the token bucket; returns when the queue stays empty."""
        while True:
            if not self.queue:
                self._changed.clear()
                if self.finished():
                    return
                await self._changed.wait()
                continue
            delay = self._bucket.wait_s()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            line, fresh = self.queue.popleft()
            if not fresh and self._journal.state(line).outcome is not None:
                continue  # heard about (a round summary) while waiting its turn
            try:
                raw, record = self.build(line, fresh)
            except BadLine as error:  # a file that vanished or changed type since parsing
                self.bad.append((line.number, str(error)))
                del self.lines[line.key]
                self._open.discard(line.key)
                self._changed.set()
                continue
            self._bucket.take()
            self._journal.write(record)  # before the bytes leave: a crash here resends them
            await publish(raw)
            self.tally.sent += 1
            self._changed.set()

    def ask_again(self) -> int:
        """Send once more the same bytes of every line still without an outcome.

        A validator answers a submission it knows again, but only within the
        submitter's rate: an answer to a resend that met the rate limit (a line
        in doubt after an interruption, resent in a burst) never comes. Returns
        how many lines were queued.
        """
        self._asked_again = True
        queued = {line.key for line, _ in self.queue}
        again = [self.lines[key] for key in sorted(self._open - queued) if key in self.lines]
        self.queue.extend((line, False) for line in again)
        if again:
            self._changed.set()
        return len(again)

    async def wait_idle(self, idle_s: float) -> None:
        """Returns when every line has an outcome, or nothing was heard for ``idle_s``.

        Halfway, lines still without an outcome are asked about once more
        (:meth:`ask_again`).
        """
        while not self.finished():
            self._changed.clear()
            try:
                # Not wait_for: on Python 3.11 it can lose a cancellation (Ctrl-C)
                # that arrives with the event (python/cpython#86296).
                async with asyncio.timeout(idle_s if self._asked_again else idle_s / 2):
                    await self._changed.wait()
            except TimeoutError:
                if self._asked_again or not self.ask_again():
                    return


async def _until_idle_or_lost(
    run: BatchRun, idle_s: float, listener: asyncio.Task[None], sending: Any
) -> None:
    """Wait until every line has an outcome or nothing is heard for ``idle_s``;
    a connection lost on the way is raised (``aiomqtt.MqttError``)."""
    sender = asyncio.create_task(sending)
    idle = asyncio.create_task(run.wait_idle(idle_s))
    pending: set[asyncio.Task[Any]] = {listener, sender, idle}
    try:
        while not idle.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {idle}:
                error = task.exception()
                if error is not None:
                    raise error
                if task is listener:
                    raise aiomqtt.MqttError("the broker closed the connection")
    finally:
        for task in (listener, sender, idle):
            task.cancel()
        await asyncio.gather(listener, sender, idle, return_exceptions=True)


async def run_batch(
    key_path: Path,
    target: BusTarget,
    batch: Path,
    output: Path | None,
    *,
    per_minute: float,
    burst: int,
    idle_timeout_s: float,
    access: Access | None = None,
    committee: Committee | None = None,
) -> int:
    """Submit every line of ``batch``; 0 when each good line has an outcome and none was bad.

    With ``committee``, only Results and round summaries signed by its
    members count.
    """
    lines, bad = parse_batch(batch)
    output = output or default_output(batch)
    for number, problem in bad:
        print(f"{batch}:{number}: skipped: {problem}", file=sys.stderr, flush=True)
    key = load_key(key_path)
    journal = Journal(output)
    run = BatchRun(key, lines, journal, TokenBucket(per_minute, burst), committee=committee)
    for number, problem in bad:
        journal.write({"event": "bad_line", "line": number, "error": problem})
    print(
        f"batch {batch}: {len(lines)} submissions ({run.skipped} already have an outcome), "
        f"{len(bad)} bad lines; results in {output}",
        file=sys.stderr,
        flush=True,
    )
    progress = tqdm(
        total=len(lines),
        initial=run.skipped,
        unit="sub",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),  # logs get the summary line, not a bar
    )
    connected = False
    try:
        async with target.client(key, access or Access()) as client:
            await client.subscribe(target.topic("results", key.public_hex), qos=1)
            if any(journal.state(line).in_doubt for line in lines):
                await client.subscribe(target.topic("rounds", "#"), qos=1)

            async def listen() -> None:
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        continue
                    if message.topic.matches(target.topic("rounds", "#")):
                        run.hear_summary(bytes(payload))
                    else:
                        try:
                            run.hear_result(verify_result(bytes(payload)))
                        except (CodecError, KeyError, ValueError, TypeError):
                            continue
                    done = len(run.lines) - run.open_lines
                    progress.update(done - progress.n)
                    progress.set_postfix_str(run.tally.describe(), refresh=True)

            async def publish(raw: bytes) -> None:
                await client.publish(target.topic("submissions", key.public_hex), raw, qos=1)
                progress.set_postfix_str(run.tally.describe(), refresh=True)

            connected = True
            await _until_idle_or_lost(
                run, idle_timeout_s, asyncio.create_task(listen()), run.send_all(publish)
            )
    except aiomqtt.MqttError as error:
        if not connected:
            raise NodeError(f"cannot reach the broker at {target.url}: {error}") from None
        print(f"lost the broker at {target.url}: {error}", file=sys.stderr, flush=True)
    finally:
        progress.close()
        journal.close()
    for number, problem in run.bad:
        print(f"{batch}:{number}: skipped: {problem}", file=sys.stderr)
    waiting = run.open_lines
    print(
        f"done: {run.tally.describe()}; {waiting} without an outcome"
        + (" (run the same command again to resume)" if waiting else ""),
        flush=True,
    )
    return 0 if waiting == 0 and not bad and not run.bad else 1
