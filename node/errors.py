"""One exception tree for the node, and the closed set of rejection reasons.

Every rejection carries a :class:`Reason` from DESIGN.md §3; the same code is
published in the Result, logged, and counted in metrics.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Rejection reason codes of wire protocol v1 (a closed set)."""

    MALFORMED = "malformed"
    NON_CANONICAL = "non_canonical"
    WRONG_TOPIC = "wrong_topic"
    BAD_SIGNATURE = "bad_signature"
    BAD_COMMITMENT = "bad_commitment"
    STALE = "stale"
    REPLAY = "replay"
    DUPLICATE = "duplicate"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MODALITY = "unsupported_modality"
    SAME_MODALITY = "same_modality"
    UNDECODABLE = "undecodable"
    PAIR_TOO_FAR = "pair_too_far"
    RATE_LIMITED = "rate_limited"
    EXPIRED = "expired"


class NodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration is invalid; the message lists every bad key with its path."""


class KeyFileError(NodeError):
    """A key file is missing, malformed or readable by others."""


class Rejected(NodeError):
    """A submission is refused with a reason code.

    ``submitter`` is the claimed submitter key when the bytes name one, so the
    rejection can be published to that submitter's results topic. ``signed``:
    the bytes carry that key's valid signature; a rejection raised before it
    was checked names a key anyone can write.
    """

    def __init__(
        self, reason: Reason, detail: str, submitter: bytes | None = None, *, signed: bool = False
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.submitter = submitter
        self.signed = signed


class EncoderUnavailable(NodeError):
    """The encoders could not encode a batch: their worker processes or replicas died
    on it or did not answer. Not the items' fault: their submissions are prepared
    again, never rejected for it at once."""
