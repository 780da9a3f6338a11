"""Sync: fetch finalized rounds and submissions from the other members.

A member asks on ``sync/requests`` (a request signed by a committee member,
so strangers cannot make validators do work) and every member that can
answer replies on ``sync/replies/<requester hex>``. Replies prove
themselves: a round comes with its quorum certificate and a signed proposal
of the certified value, a submission as its signed bytes (its id is their
hash). The requester takes the first reply that *verifies* (an empty, junk or
lying reply is passed over while others may still come), and asks again
after the timeout. A reply holds whole rounds up to ``reply_bytes`` (at least
one), so it stays below the broker's packet limit; the requester asks for the
next page from where the last one ended. See docs/PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from consensus.committee import Committee
from consensus.messages import MAX_ROUND
from node.intake.codec import CodecError, DecodeLimits, pack, unpack
from node.intake.signing import MessageSigner
from node.intake.wire import submission_id
from node.store.thread import StoreThread

log = logging.getLogger("poc.sync")

REQUEST_DOMAIN = "poc/v1/sync-request"
ROUNDS_PER_REPLY = 32
SUBMISSIONS_PER_REQUEST = 64
MAX_WAITING = 64
_LIMITS = DecodeLimits(max_bytes=256 * 1024 * 1024, max_container_len=10_000)

Publish = Callable[[str, bytes], Awaitable[None]]
Accept = Callable[[list[Any]], bool]
"""Whether a reply's entries are usable; the first reply accepted answers the request."""


@dataclass(frozen=True)
class FetchedRound:
    round: int
    certificate: bytes  # canonical certificate body
    proposal: bytes  # a signed proposal of the certified value


class SyncService:
    """Asks peers for what this node lacks, and answers what peers ask."""

    def __init__(
        self,
        signer: MessageSigner,
        committee: Committee,
        prefix: str,
        store: StoreThread,
        publish: Publish,
        reply_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._signer = signer
        self._committee = committee
        self._prefix = prefix
        self._store = store
        self._publish = publish
        self._reply_bytes = reply_bytes
        self._waiting: dict[bytes, tuple[asyncio.Future[list[Any]], Accept]] = {}
        self.refused_replies = 0

    @property
    def request_topic(self) -> str:
        return f"{self._prefix}/sync/requests"

    @property
    def reply_topic(self) -> str:
        return f"{self._prefix}/sync/replies/{self._signer.key.public_hex}"

    # -- asking ---------------------------------------------------------------

    async def _ask(self, body: dict[str, Any], timeout_s: float, accept: Accept) -> list[Any]:
        request_id = secrets.token_bytes(16)
        body = {"v": 1, "requester": self._signer.key.public_key, "request_id": request_id, **body}
        raw = self._signer.signed_bytes(REQUEST_DOMAIN, body)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        while len(self._waiting) >= MAX_WAITING:  # bounded: the oldest request gives up
            oldest = next(iter(self._waiting))
            old_future, _ = self._waiting.pop(oldest)
            if not old_future.done():
                old_future.set_exception(TimeoutError("too many sync requests waiting"))
        self._waiting[request_id] = (future, accept)
        try:
            await self._publish(self.request_topic, raw)
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._waiting.pop(request_id, None)

    async def fetch_rounds(
        self, first: int, timeout_s: float, valid: Callable[[FetchedRound], bool]
    ) -> list[FetchedRound]:
        """Finalized rounds from ``first`` on, from the first reply whose first round is valid.

        ``valid`` checks one fetched round (its certificate and proposal); a
        reply whose first entry is not round ``first`` or fails it is passed
        over. Later entries are returned as sent: the caller applies them in
        order and stops at the first that does not verify.
        """

        def accept(entries: list[Any]) -> bool:
            rounds = _rounds_of(entries)
            return bool(rounds) and rounds[0].round == first and valid(rounds[0])

        try:
            entries = await self._ask({"kind": "rounds", "first": first}, timeout_s, accept)
        except TimeoutError:
            return []
        return _rounds_of(entries)

    async def fetch_submissions(self, ids: list[bytes], timeout_s: float) -> dict[bytes, bytes]:
        """Signed submission bytes by id; only bytes whose hash is the id are kept."""
        if not ids:
            return {}
        wanted = set(ids)

        def accept(entries: list[Any]) -> bool:
            return any(isinstance(raw, bytes) and submission_id(raw) in wanted for raw in entries)

        try:
            entries = await self._ask(
                {"kind": "submissions", "ids": ids[:SUBMISSIONS_PER_REQUEST]}, timeout_s, accept
            )
        except TimeoutError:
            return {}
        return {
            submission_id(raw): raw
            for raw in entries
            if isinstance(raw, bytes) and submission_id(raw) in wanted
        }

    async def on_reply(self, payload: bytes) -> None:
        try:
            reply = unpack(payload, _LIMITS)
        except CodecError:
            log.warning("event=sync_bad_reply bytes=%d", len(payload))
            return
        if not isinstance(reply, dict):
            return
        request_id = reply.get("request_id")
        entries = reply.get("entries")
        if not isinstance(request_id, bytes) or not isinstance(entries, list):
            return  # (a list or map as request_id is unhashable: it once ended the node)
        waiting = self._waiting.get(request_id)
        if waiting is None:
            return
        future, accept = waiting
        if future.done():
            return
        if accept(entries):
            future.set_result(entries)
        else:
            self.refused_replies += 1
            log.warning(
                "event=sync_reply_refused responder=%s entries=%d",
                _hex(reply.get("responder")),
                len(entries),
            )

    # -- answering ------------------------------------------------------------

    async def on_request(self, payload: bytes) -> None:
        try:
            request = unpack(payload, _LIMITS)
        except CodecError:
            return
        if not isinstance(request, dict):
            return
        requester = request.get("requester")
        signature = request.get("sig")
        if (
            not isinstance(requester, bytes)
            or requester == self._signer.key.public_key
            or self._committee.member(requester) is None
            or not isinstance(signature, bytes)
            or not self._signer.verify(requester, REQUEST_DOMAIN, request, signature)
        ):
            return
        kind = request.get("kind")
        first = request.get("first")
        if kind == "rounds" and isinstance(first, int) and 0 <= first <= MAX_ROUND:
            last = min(first + ROUNDS_PER_REPLY - 1, MAX_ROUND)  # (SQLite's signed 64 bits)
            rounds = await self._store.committed_rounds(first, last, ROUNDS_PER_REPLY)
            entries: list[Any] = []
            size = 0
            for r in rounds:
                entry = {
                    "round": r.round,
                    "certificate": unpack(r.certificate),
                    "proposal": r.proposal,
                }
                size += len(r.certificate) + len(r.proposal or b"") + 64
                if entries and size > self._reply_bytes:
                    break
                entries.append(entry)
            if not entries:
                return
        elif kind == "submissions" and isinstance(request.get("ids"), list):
            ids = [i for i in request["ids"][:SUBMISSIONS_PER_REQUEST] if isinstance(i, bytes)]
            found = [await self._store.raw_submission(identity) for identity in ids]
            entries = []
            size = 0
            for raw in found:
                if raw is None:
                    continue
                size += len(raw) + 16
                if entries and size > self._reply_bytes:
                    break
                entries.append(raw)
            if not entries:
                return
        else:
            return
        reply = pack(
            {
                "v": 1,
                "request_id": request.get("request_id", b""),
                "responder": self._signer.key.public_key,
                "entries": entries,
            }
        )
        await self._publish(f"{self._prefix}/sync/replies/{requester.hex()}", reply)


def _rounds_of(entries: list[Any]) -> list[FetchedRound]:
    rounds = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("round"), int):
            break
        proposal = entry.get("proposal")
        certificate = entry.get("certificate")
        if not isinstance(certificate, dict) or not isinstance(proposal, bytes):
            break
        rounds.append(FetchedRound(entry["round"], pack(certificate), proposal))
    return rounds


def _hex(value: object) -> str:
    return value.hex()[:16] if isinstance(value, bytes) else "unknown"
