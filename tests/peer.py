"""A peer written from DESIGN.md §3 alone: it imports nothing from the project.

It builds canonical msgpack by hand-sorting keys, signs with `cryptography`'s
Ed25519, and reads Results off the bus. Integration tests drive the node
through it exactly as a submitter in the field would.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PREFIX = "poc/v1"
REASONS = frozenset(
    {
        "malformed",
        "non_canonical",
        "wrong_topic",
        "bad_signature",
        "bad_commitment",
        "stale",
        "replay",
        "duplicate",
        "too_large",
        "unsupported_modality",
        "same_modality",
        "undecodable",
        "pair_too_far",
        "rate_limited",
        "expired",
    }
)
"""The closed set of rejection reason codes (DESIGN.md §3)."""


def canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value, key=lambda k: k.encode())}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def pack(value: Any) -> bytes:
    return msgpack.packb(canonical(value), use_bin_type=True)


@dataclass
class Peer:
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    nonce: int = field(default_factory=lambda: int.from_bytes(os.urandom(4), "big"))

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def body(
        self,
        items: list[tuple[str, str, bytes]],
        *,
        created_ms: int | None = None,
        nonce: int | None = None,
    ) -> dict[str, Any]:
        if nonce is None:
            self.nonce += 1
            nonce = self.nonce
        return {
            "v": 1,
            "submitter": self.public,
            "nonce": nonce,
            "created_ms": created_ms if created_ms is not None else time.time_ns() // 10**6,
            "items": [
                {"modality": m, "mime": mime, "data": data, "sha256": hashlib.sha256(data).digest()}
                for m, mime, data in items
            ],
        }

    def sign(self, body: dict[str, Any]) -> bytes:
        unsigned = {k: v for k, v in body.items() if k != "sig"}
        signature = self.key.sign(b"poc/v1/submission" + pack(unsigned))
        return pack({**unsigned, "sig": signature})

    def submission(self, items: list[tuple[str, str, bytes]], **kwargs: Any) -> bytes:
        return self.sign(self.body(items, **kwargs))


def submission_topic(raw: bytes) -> str:
    """The topic a submission must be published on: its submitter's own.

    Bytes that name no readable 32-byte submitter go to the all-zero key's
    topic (the node reads the submitter from the bytes, never from the topic).
    """
    submitter = bytes(32)
    try:
        message = msgpack.unpackb(raw, raw=False)
        if isinstance(message, dict) and isinstance(message.get("submitter"), bytes):
            submitter = message["submitter"]
    except Exception:  # junk, on purpose: any topic will do
        pass
    return f"{PREFIX}/submissions/{submitter.hex()}"


def submission_id(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def verify_result(raw: bytes) -> dict[str, Any]:
    """Decode a Result and check its signature; raises on a bad one."""
    message = msgpack.unpackb(raw, raw=False)
    assert pack(message) == raw, "result is not canonical"
    unsigned = {k: v for k, v in message.items() if k != "sig"}
    Ed25519PublicKey.from_public_bytes(message["validator"]).verify(
        message["sig"], b"poc/v1/result" + pack(unsigned)
    )
    assert message["reason"] is None or message["reason"] in REASONS, message["reason"]
    return message


def verify_balance(raw: bytes) -> dict[str, Any]:
    """Decode a Balance (``balances/<submitter>/<validator>``) and check its signature."""
    message = msgpack.unpackb(raw, raw=False)
    assert pack(message) == raw, "balance is not canonical"
    assert set(message) == {"v", "submitter", "round", "balance", "validator", "sig"}, message
    assert message["v"] == 1
    unsigned = {k: v for k, v in message.items() if k != "sig"}
    Ed25519PublicKey.from_public_bytes(message["validator"]).verify(
        message["sig"], b"poc/v1/balance" + pack(unsigned)
    )
    return message


class ResultListener:
    """Collects the Results published for one or more submitters."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.results: list[dict[str, Any]] = []
        self._by_submission: dict[bytes, list[dict[str, Any]]] = {}
        self._changed = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResultListener:
        self._client = aiomqtt.Client("127.0.0.1", self.port, timeout=10)
        await self._client.__aenter__()
        await self._client.subscribe(f"{PREFIX}/results/#", qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None and self._client is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            result = verify_result(bytes(message.payload))  # type: ignore[arg-type]
            submitter_hex = str(message.topic).rsplit("/", 1)[1]
            result["_topic_submitter"] = submitter_hex
            result["_received_monotonic"] = time.monotonic()
            self.results.append(result)
            self._by_submission.setdefault(result["submission_id"], []).append(result)
            self._changed.set()

    async def publish(self, raw: bytes, topic: str | None = None) -> None:
        """Publish on the submitter's own topic (``submissions/<submitter hex>``)."""
        assert self._client is not None
        await self._client.publish(topic or submission_topic(raw), raw, qos=1)

    def about(self, identity: bytes) -> list[dict[str, Any]]:
        """The Results about one submission, in arrival order (without scanning all:
        a benchmark waits on hundreds of submissions while thousands arrive)."""
        return list(self._by_submission.get(identity, ()))

    async def wait_for(
        self, identity: bytes, statuses: set[str], timeout: float = 60.0
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for result in self.about(identity):
                    if result["status"] in statuses:
                        return result
                self._changed.clear()
                await self._changed.wait()

    async def final(self, identity: bytes, timeout: float = 60.0) -> dict[str, Any]:
        return await self.wait_for(identity, {"final", "rejected"}, timeout)
