"""``poc-node audit``: re-verify what a node's store says was finalized.

For every stored round, in order: the quorum certificate (members'
precommit signatures, stake, one per member), the certified value (a signed
proposal whose value hashes to the certified hash, from its view's proposer
drawn from the beacon), the equivocation evidence kept, and every record
recomputed from the submission's stored bytes (decode, encode, fuse, gap
scores against the history replayed up to that round, payout) within the
consensus tolerances; then that the stored history and ledger of the round
are exactly the certified records. The first bad round is named and the
command exits non-zero. A round whose decoding was stopped here (the
decoders' time or memory limit) is tried again, then named as unchecked:
that says nothing about the round, only that this machine could not judge it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from consensus.beacon import proposer_of
from consensus.committee import Committee
from consensus.messages import Proposal
from node.daemon import committee_from_description, load_shard
from node.errors import NodeError
from node.intake.keys import SigningKey
from node.intake.signing import MessageSigner
from node.intake.wire import WireLimits
from node.ops.config import Config
from node.ops.metrics import Metrics
from node.pipeline.batching import BatchPolicy
from node.pipeline.encoding import EncoderService
from node.pipeline.prepare import Preparer, fusion_alpha, media_limits
from node.pipeline.sandbox import DecoderPool
from node.rounds.consensus_wire import (
    ConsensusWireError,
    decode_certificate,
    decode_evidence,
    decode_proposal,
)
from node.rounds.history import load_history
from node.rounds.records import (
    Mismatch,
    RoundRecord,
    RoundRules,
    Tolerances,
    Undecided,
    from_float16,
)
from node.rounds.verify import RecordVerifier
from node.store.sqlite import CommittedRound, EvidenceRow, Store
from node.store.thread import StoreThread

log = logging.getLogger("poc.audit")

UNDECIDED_TRIES = 3
"""Times a round is checked again when its decoding was stopped (a loaded machine)."""


class _StoredBeacons:
    """Epoch beacons as the audited node recorded them."""

    def __init__(self, store: StoreThread) -> None:
        self._store = store

    async def epoch_beacon(self, epoch: int) -> tuple[int, bytes]:
        beacon = await self._store.get_meta(f"epoch_beacon/{epoch}")
        if beacon is None:
            raise Mismatch(f"the beacon of epoch {epoch} is not in the store")
        return epoch, beacon


@dataclass(frozen=True)
class EvidenceFinding:
    """One kept proof of equivocation, checked again against the committee."""

    round: int
    view: int
    kind: str
    offender: str
    problem: str | None  # None: it proves equivocation


@dataclass(frozen=True)
class AuditReport:
    checked: int
    bad_round: int | None
    reason: str | None
    evidence: tuple[EvidenceFinding, ...] = ()
    undecided: bool = False
    """``bad_round`` could not be checked here (decoding stopped), not found bad."""


def _check_evidence(rows: list[EvidenceRow], committee: Committee) -> tuple[EvidenceFinding, ...]:
    crypto = MessageSigner(SigningKey.generate())  # verification only
    names = {member.public_key: member.name for member in committee.members}
    findings = []
    for row in rows:
        try:
            problem = decode_evidence(row.evidence).why_invalid(committee, crypto)
        except ConsensusWireError as error:
            problem = f"unreadable: {error}"
        findings.append(
            EvidenceFinding(
                row.round,
                row.view,
                row.kind,
                names.get(row.offender, row.offender.hex()[:16]),
                problem,
            )
        )
    return tuple(findings)


def _check_certificate(
    committed: CommittedRound,
    committee: Committee,
    crypto: MessageSigner,
    previous: CommittedRound | None,
) -> Proposal:
    try:
        certificate = decode_certificate(committed.certificate)
    except ConsensusWireError as error:
        raise Mismatch(f"certificate unreadable: {error}") from None
    if certificate.round != committed.round:
        raise Mismatch("certificate is for another round")
    why = certificate.why_invalid(committee, crypto)
    if why is not None:
        raise Mismatch(f"certificate invalid: {why}")
    if certificate.value_hash != committed.value_hash:
        raise Mismatch("certificate certifies another value")
    if committed.proposal is None:
        raise Mismatch("no signed proposal of the certified value is stored")
    signed = decode_proposal(committed.proposal)
    if (
        signed.proposal.value.digest(crypto) != certificate.value_hash
        or not signed.verify(crypto)
        or committee.member(signed.signer) is None
    ):
        raise Mismatch("stored proposal does not match its certificate or signature")
    if previous is not None and previous.round == committed.round - 1:
        proposer = proposer_of(previous.beacon_after, signed.proposal.view, committee)
        if proposer.public_key != signed.proposal.proposer:
            raise Mismatch("the proposal is not from its view's proposer")
    return signed.proposal


async def run_audit(
    config: Config, data_dir: Path, committee: Committee | None, first: int, last: int
) -> AuditReport:
    path = data_dir / "node.sqlite3"
    if not path.exists():
        raise NodeError(f"no store at {path}")
    store = StoreThread(Store(path))
    try:
        if committee is None:
            described = await store.get_meta("committee")
            if described is None:
                raise NodeError("the store names no committee; pass --committee")
            committee = committee_from_description(described)
        report = await _audit(config, store, committee, first, last)
        chosen = committee
        evidence = _check_evidence(await store.evidence(), chosen)
        return dataclasses.replace(report, evidence=evidence)
    finally:
        store.close()


async def _audit(
    config: Config, store: StoreThread, committee: Committee, first: int, last: int
) -> AuditReport:
    crypto = MessageSigner(SigningKey.generate())  # verification only
    shard = await asyncio.to_thread(load_shard, config)
    metrics = Metrics(CollectorRegistry())
    rows = await store.history_rows()
    own_rows = await store.history_rows("own_vectors")
    history = await store.call(
        lambda db: load_history(
            shard,
            db.history_chunks(shard.dim, before_round=first),
            own_chunks=db.history_chunks(shard.dim, before_round=first, table="own_vectors"),
        )
    )
    decoders = DecoderPool(
        config.decode.workers,
        config.decode.timeout_s,
        config.decode.memory_mb,
        config.decode.cpu_seconds,
    )
    encoder = EncoderService(
        shard,
        BatchPolicy.of(config.encoders).without_waiting(),
        config.encoders.queue_size,
        metrics,
    )
    preparer = Preparer(
        decoders,
        encoder,
        _StoredBeacons(store),
        media_limits(config),
        fusion_alpha(config),
        metrics,
    )

    async def no_fetch(_: list[bytes]) -> dict[bytes, bytes]:
        return {}

    verifier = RecordVerifier(
        store,
        preparer.prepare,
        no_fetch,
        shard.delta,
        history,
        RoundRules.of(config.scoring, shard.scoring),
        Tolerances.of(config.consensus),
        WireLimits(
            config.limits.message_bytes, config.limits.text_bytes, config.limits.image_bytes
        ),
        asyncio.Lock(),
        recompute_always=True,
    )
    ledger = await store.ledger_entries()
    rounds = await store.committed_rounds(first, last, 10**9)
    previous = await store.committed_round(first - 1) if first > 0 else None
    checked = 0
    runner = asyncio.create_task(encoder.run())
    try:
        for committed in rounds:
            try:
                proposal = _check_certificate(committed, committee, crypto, previous)
                records = list(proposal.records)
                for tries_left in reversed(range(UNDECIDED_TRIES)):
                    try:
                        await verifier.check(records, before_round=committed.round)
                        break
                    except Undecided as error:
                        log.warning(
                            "event=audit_undecided round=%d error=%s", committed.round, error
                        )
                        if not tries_left:
                            return AuditReport(checked, committed.round, str(error), undecided=True)
                decoded = [RoundRecord.from_bytes(raw) for raw in records]
                _check_stored(committed.round, decoded, rows, own_rows, ledger)
            except (Mismatch, ConsensusWireError) as error:
                return AuditReport(checked, committed.round, str(error))
            joined = [item for record in decoded for item in record.history_items]
            if joined:
                history.add(
                    [modality for _, modality, _ in joined],
                    np.stack([from_float16(vector) for _, _, vector in joined]),
                )
            own = [item for record in decoded for item in record.own_items]
            if own:
                history.add_own(
                    [modality for _, modality, _ in own],
                    np.stack([from_float16(vector) for _, _, vector in own]),
                )
            checked += 1
            previous = committed
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        encoder.close()
        decoders.close()
    return AuditReport(checked, None, None)


def _check_stored(
    round_number: int,
    records: list[RoundRecord],
    rows: list[tuple[int, bytes, int, str, bytes]],
    own_rows: list[tuple[int, bytes, int, str, bytes]],
    ledger: list[tuple[int, bytes, bytes, int]],
) -> None:
    expected = {
        "history": [
            (record.submission_id, index, modality, vector)
            for record in records
            for index, modality, vector in record.history_items
        ],
        "own embeddings beside the history": [
            (record.submission_id, index, modality, vector)
            for record in records
            for index, modality, vector in record.own_items
        ],
    }
    for (what, wanted), stored_rows in zip(expected.items(), (rows, own_rows), strict=True):
        stored = [
            (sid, index, modality, vector)
            for number, sid, index, modality, vector in stored_rows
            if number == round_number
        ]
        if sorted(wanted) != sorted(stored):
            raise Mismatch(f"stored {what} differs from the certified records")
    expected_ledger = sorted(
        (r.submitter, r.submission_id, r.reward) for r in records if r.reward > 0
    )
    stored_ledger = sorted(
        (submitter, sid, amount)
        for number, submitter, sid, amount in ledger
        if number == round_number
    )
    if expected_ledger != stored_ledger:
        raise Mismatch("stored ledger differs from the certified records")


def parse_range(text: str | None) -> tuple[int, int]:
    """``A..B`` (inclusive), ``A..`` or ``..B``; everything when None."""
    if text is None:
        return 0, 2**62
    start, separator, end = text.partition("..")
    try:
        if not separator:
            value = int(text)
            return value, value
        return (int(start) if start else 0, int(end) if end else 2**62)
    except ValueError:
        raise NodeError(f"--rounds {text!r} is not A..B") from None
