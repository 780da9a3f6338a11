"""The encoders' exception tree.

Every failure the node must turn into a rejection carries its DESIGN §3
reason code as ``reason``, so the node maps errors to codes in one place
without string matching, and third-party decoder errors are translated here,
once, at the edge of each decoder.
"""

from __future__ import annotations


class EncoderError(Exception):
    """Root of every error raised by the encoders package."""

    reason: str = "undecodable"


class UndecodableError(EncoderError):
    """The bytes are not a valid instance of their declared media type."""

    reason = "undecodable"


class DecodingStoppedError(UndecodableError):
    """Decoding was stopped before it judged the bytes: past its time or memory
    limit, or its process died under it.

    Reported as ``undecodable`` like any undecodable item, but it depends on the
    machine and its load as much as on the bytes: another node, or this one
    later, may decode them. A committee member that meets it while verifying a
    proposal refuses the value for that view only.
    """


class MediaTooLargeError(EncoderError):
    """The media exceeds a configured limit, detected before full decoding."""

    reason = "too_large"


class UnsupportedModalityError(EncoderError):
    """No encoder of the shard reads this modality (a CLIP shard has no audio tower)."""

    reason = "unsupported_modality"


class WeightsError(EncoderError):
    """A weight file or manifest is missing, malformed or not the pinned one.

    A node must refuse to start on this error: encoding with other weights
    than the committee's would make its embeddings disagree with its peers'.
    """

    reason = "weights"


class EncodingFailedError(EncoderError):
    """Every encoder of the shard produced a non-finite embedding or loss.

    Reported as ``undecodable`` because the item, not the node, is what
    cannot be embedded; it is never expected with sane weights.
    """

    reason = "undecodable"
