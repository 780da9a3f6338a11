"""Signed messages: canonical msgpack bodies under a domain, Ed25519 signatures.

This is the node's implementation of :class:`consensus.crypto.Crypto` and the
one place that turns a body into signed bytes for the bus.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from node.intake.codec import pack
from node.intake.keys import SigningKey, verify_signature
from node.intake.wire import signing_bytes


def _message(domain: str, body: Mapping[str, object]) -> bytes:
    return signing_bytes(domain.encode(), body)


class MessageSigner:
    """Signs and checks bodies for one validator key."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key

    def digest(self, domain: str, body: Mapping[str, object]) -> bytes:
        return hashlib.sha256(_message(domain, body)).digest()

    def sign(self, domain: str, body: Mapping[str, object]) -> bytes:
        return self.key.sign(_message(domain, body))

    def verify(
        self, public_key: bytes, domain: str, body: Mapping[str, object], signature: bytes
    ) -> bool:
        return verify_signature(public_key, _message(domain, body), signature)

    def signed_bytes(self, domain: str, body: Mapping[str, Any]) -> bytes:
        """The canonical bytes of ``body`` with its ``sig`` field added."""
        return pack({**body, "sig": self.sign(domain, body)})
