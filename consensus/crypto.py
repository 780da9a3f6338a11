"""What consensus needs from cryptography, implemented by the node.

The node owns the canonical encoding (msgpack, DESIGN.md §3) and the Ed25519
key, so consensus sees only this interface: it builds message bodies and asks
for digests, signatures and checks, and never learns about bytes on a wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Crypto(Protocol):
    """Domain-separated hashing and signing over canonical message bodies."""

    def digest(self, domain: str, body: Mapping[str, object]) -> bytes:
        """32-byte hash of ``domain ‖ canonical(body)``; a proposal's identity."""
        ...

    def sign(self, domain: str, body: Mapping[str, object]) -> bytes:
        """This validator's 64-byte signature over ``domain ‖ canonical(body)``."""
        ...

    def verify(
        self, public_key: bytes, domain: str, body: Mapping[str, object], signature: bytes
    ) -> bool:
        """Whether ``signature`` is ``public_key``'s over ``domain ‖ canonical(body)``."""
        ...
