"""Sync: fetch finalized rounds and submissions from the other members.

A member asks on ``sync/requests`` (a request signed by a committee member,
so strangers cannot make validators do work) and every member that can
answer replies on ``sync/replies/<requester hex>``. Replies prove
themselves: a round comes with its quorum certificate and the proposal it
certified, a submission as its signed bytes (its id is their hash), and the
requester verifies everything before using it. See docs/PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from consensus.committee import Committee
from node.intake.codec import CodecError, DecodeLimits, pack, unpack
from node.intake.signing import MessageSigner
from node.store.sqlite import StoreCall
from node.intake.wire import submission_id

log = logging.getLogger("poc.sync")

REQUEST_DOMAIN = "poc/v1/sync-request"
ROUNDS_PER_REPLY = 32
SUBMISSIONS_PER_REQUEST = 64
_LIMITS = DecodeLimits(max_bytes=256 * 1024 * 1024, max_container_len=10_000)

Publish = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True)
class FetchedRound:
    round: int
    certificate: bytes  # canonical certificate body
    proposal: bytes | None  # signed proposal bytes; None for a skipped round


class SyncService:
    """Asks peers for what this node lacks, and answers what peers ask."""

    def __init__(
        self,
        signer: MessageSigner,
        committee: Committee,
        prefix: str,
        store: StoreCall,
        publish: Publish,
    ) -> None:
        self._signer = signer
        self._committee = committee
        self._prefix = prefix
        self._store = store
        self._publish = publish
        self._waiting: dict[bytes, asyncio.Future[list[Any]]] = {}

    @property
    def request_topic(self) -> str:
        return f"{self._prefix}/sync/requests"

    @property
    def reply_topic(self) -> str:
        return f"{self._prefix}/sync/replies/{self._signer.key.public_hex}"

    # -- asking ---------------------------------------------------------------

    async def _ask(self, body: dict[str, Any], timeout_s: float) -> list[Any]:
        request_id = secrets.token_bytes(16)
        body = {"v": 1, "requester": self._signer.key.public_key, "request_id": request_id, **body}
        raw = self._signer.signed_bytes(REQUEST_DOMAIN, body)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._publish(self.request_topic, raw)
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._waiting.pop(request_id, None)

    async def fetch_rounds(self, first: int, timeout_s: float) -> list[FetchedRound]:
        """Finalized rounds from ``first`` on (up to a batch), as the first peer sends them."""
        try:
            entries = await self._ask({"kind": "rounds", "first": first}, timeout_s)
        except TimeoutError:
            return []
        rounds = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("round"), int):
                continue
            proposal = entry.get("proposal")
            rounds.append(
                FetchedRound(
                    entry["round"],
                    pack(entry.get("certificate")),
                    proposal if isinstance(proposal, bytes) else None,
                )
            )
        return rounds

    async def fetch_submissions(self, ids: list[bytes], timeout_s: float) -> dict[bytes, bytes]:
        """Signed submission bytes by id; only bytes whose hash is the id are kept."""
        if not ids:
            return {}
        try:
            entries = await self._ask(
                {"kind": "submissions", "ids": ids[:SUBMISSIONS_PER_REQUEST]}, timeout_s
            )
        except TimeoutError:
            return {}
        wanted = set(ids)
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
        future = self._waiting.get(reply.get("request_id", b""))
        entries = reply.get("entries")
        if future is not None and not future.done() and isinstance(entries, list):
            future.set_result(entries)

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
        if kind == "rounds" and isinstance(request.get("first"), int):
            first = request["first"]
            rounds = await self._store(
                lambda store: store.committed_rounds(
                    first, first + ROUNDS_PER_REPLY - 1, ROUNDS_PER_REPLY
                )
            )
            entries: list[Any] = [
                {"round": r.round, "certificate": unpack(r.certificate), "proposal": r.proposal}
                for r in rounds
            ]
            if not entries:
                return
        elif kind == "submissions" and isinstance(request.get("ids"), list):
            ids = [i for i in request["ids"][:SUBMISSIONS_PER_REQUEST] if isinstance(i, bytes)]
            found = await self._store(
                lambda store: [store.raw_submission(identity) for identity in ids]
            )
            entries = [raw for raw in found if raw is not None]
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
