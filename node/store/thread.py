"""The store confined to one thread, with typed async methods for coroutines.

SQLite calls (and their ``fsync``) never run on the event loop: each method
runs the store's method of the same name on the store's own thread and
returns its result. ``call`` runs a function of the store on that thread for
the rare compound step that must see no other call in between (the beacon
chain's resume point reads and writes its checkpoint).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from node.ops.threads import name_thread, thread_cpu_timed
from node.store.sqlite import (
    Admission,
    CommittedRound,
    EvidenceRow,
    Finalization,
    OutboxEntry,
    Outgoing,
    State,
    Store,
    StoredSubmission,
    Waiting,
)

T = TypeVar("T")


class StoreThread:
    """The store, confined to one thread; coroutines await its typed methods."""

    def __init__(self, store: Store, on_cpu: Callable[[str, float], None] | None = None) -> None:
        """``on_cpu(method name, seconds)`` hears each call's CPU time (on the store's thread)."""
        self.store = store
        self._on_cpu = on_cpu
        self._thread = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="store",
            initializer=name_thread,
            initargs=("poc-store",),
        )

    async def _run(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(method, *args, **kwargs)
        if self._on_cpu is not None:
            on_cpu, name = self._on_cpu, getattr(method, "__name__", "call")
            call = functools.partial(thread_cpu_timed, lambda s: on_cpu(name, s), call)
        return await loop.run_in_executor(self._thread, call)

    async def call(self, step: Callable[[Store], T]) -> T:
        """Run ``step`` on the store's thread (a compound step, seen whole)."""
        return await self._run(step, self.store)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.store.close()

    # -- meta -----------------------------------------------------------------

    async def get_meta(self, key: str) -> bytes | None:
        return await self._run(self.store.get_meta, key)

    async def set_meta(self, key: str, value: bytes) -> None:
        await self._run(self.store.set_meta, key, value)

    # -- intake ---------------------------------------------------------------

    async def admit(
        self,
        submission_id: bytes,
        submitter: bytes,
        nonce: int,
        created_ms: int,
        item_hashes: Sequence[bytes],
        raw: bytes,
        now_ms: int,
        intake_round: int,
        window_ms: int,
    ) -> Admission:
        return await self._run(
            self.store.admit,
            submission_id,
            submitter,
            nonce,
            created_ms,
            item_hashes,
            raw,
            now_ms,
            intake_round,
            window_ms,
        )

    async def reject(
        self,
        submission_id: bytes,
        submitter: bytes,
        reason: str,
        now_ms: int,
        outgoing: Outgoing,
        *,
        nonce: tuple[int, int] | None = None,
    ) -> bool:
        return await self._run(
            self.store.reject, submission_id, submitter, reason, now_ms, outgoing, nonce=nonce
        )

    async def accept(self, submission_id: bytes, prepared: bytes, outgoing: Outgoing) -> bool:
        return await self._run(self.store.accept, submission_id, prepared, outgoing)

    async def submissions_in(self, state: State) -> list[StoredSubmission]:
        return await self._run(self.store.submissions_in, state)

    async def waiting(self, limit: int, min_intake_round: int | None = None) -> list[Waiting]:
        return await self._run(self.store.waiting, limit, min_intake_round)

    async def expiring(self, before_round: int) -> list[tuple[bytes, bytes]]:
        return await self._run(self.store.expiring, before_round)

    async def raw_submission(self, submission_id: bytes) -> bytes | None:
        return await self._run(self.store.raw_submission, submission_id)

    async def keep_fetched(self, submission_id: bytes, raw: bytes, round_number: int) -> None:
        await self._run(self.store.keep_fetched, submission_id, raw, round_number)

    async def prepared_of(
        self, submission_id: bytes
    ) -> tuple[State, str | None, bytes, bytes | None] | None:
        return await self._run(self.store.prepared_of, submission_id)

    async def replayed(self, submitter: bytes, nonce: int) -> bool:
        return await self._run(self.store.replayed, submitter, nonce)

    # -- rounds ---------------------------------------------------------------

    async def record_signed(self, round_number: int, view: int, kind: str, message: bytes) -> bytes:
        return await self._run(self.store.record_signed, round_number, view, kind, message)

    async def signed_since(self, round_number: int) -> list[bytes]:
        return await self._run(self.store.signed_since, round_number)

    async def committed_round(self, round_number: int) -> CommittedRound | None:
        return await self._run(self.store.committed_round, round_number)

    async def committed_rounds(self, first: int, last: int, limit: int) -> list[CommittedRound]:
        return await self._run(self.store.committed_rounds, first, last, limit)

    async def missing_raw(self, submission_ids: Iterable[bytes]) -> list[bytes]:
        return await self._run(self.store.missing_raw, list(submission_ids))

    async def keep_raw(self, submission_id: bytes, raw: bytes) -> bool:
        return await self._run(self.store.keep_raw, submission_id, raw)

    async def rejection_of(self, submission_id: bytes) -> tuple[bytes, str, int | None] | None:
        return await self._run(self.store.rejection_of, submission_id)

    async def enqueue(self, outgoing: list[Outgoing]) -> None:
        await self._run(self.store.enqueue, outgoing)

    async def decided_states(self, submission_ids: Iterable[bytes]) -> dict[bytes, State]:
        return await self._run(self.store.decided_states, list(submission_ids))

    async def commit_round(
        self,
        committed: CommittedRound,
        outcomes: Iterable[Finalization],
        outgoing: Iterable[Outgoing],
        now_ms: int,
        *,
        prune_signed_before: int | None = None,
        epoch_beacon: tuple[int, bytes] | None = None,
        balance_messages: Callable[[Mapping[bytes, int]], Iterable[Outgoing]] | None = None,
    ) -> bool:
        """``balance_messages`` runs on the store's thread, inside the transaction."""
        return await self._run(
            self.store.commit_round,
            committed,
            list(outcomes),
            list(outgoing),
            now_ms,
            prune_signed_before=prune_signed_before,
            epoch_beacon=epoch_beacon,
            balance_messages=balance_messages,
        )

    async def record_evidence(
        self, round_number: int, view: int, kind: str, offender: bytes, evidence: bytes, now_ms: int
    ) -> bool:
        return await self._run(
            self.store.record_evidence, round_number, view, kind, offender, evidence, now_ms
        )

    async def evidence(self) -> list[EvidenceRow]:
        return await self._run(self.store.evidence)

    async def history_rows(
        self, table: str = "history"
    ) -> list[tuple[int, bytes, int, str, bytes]]:
        return await self._run(self.store.history_rows, table)

    async def accepted_hashes(
        self, hashes: list[bytes], before_round: int | None = None
    ) -> set[bytes]:
        return await self._run(self.store.accepted_hashes, hashes, before_round)

    async def ledger_entries(self) -> list[tuple[int, bytes, bytes, int]]:
        return await self._run(self.store.ledger_entries)

    # -- outbox ---------------------------------------------------------------

    async def outbox(self, after: int, limit: int) -> list[OutboxEntry]:
        return await self._run(self.store.outbox, after, limit)

    async def outbox_size(self) -> int:
        return await self._run(self.store.outbox_size)

    async def published(self, seqs: Sequence[int]) -> None:
        await self._run(self.store.published, seqs)
