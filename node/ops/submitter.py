"""The submitter's side of the protocol, for ``poc-node submit``.

Signs a Submission, subscribes to its own results topic *before* publishing
(so no Result can be missed), publishes with QoS 1 and prints every Result
about the submission until a final or rejected one arrives.

Against a secured broker (``config/mosquitto/``) it connects over TLS and
logs in: the username defaults to the submitter's public key in hex, which is
what the broker's ACL lets read ``results/<that key>``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import numpy as np

from consensus.committee import Committee
from encoders.errors import EncoderError
from encoders.media import read_item
from encoders.modality import Modality
from node.bus.client import tls_context
from node.errors import NodeError
from node.intake.codec import CodecError
from node.intake.keys import SigningKey, load_key
from node.intake.signing import MessageSigner
from node.intake.wire import (
    SUBMISSION_DOMAIN,
    Result,
    Status,
    submission_body,
    submission_id,
    verify_result,
)


def parse_item(text: str) -> tuple[Modality, str, bytes]:
    """``text:...`` or a file path, as (modality, media type, data)."""
    try:
        return read_item(text)
    except EncoderError as error:
        raise NodeError(str(error)) from None


@dataclass(frozen=True)
class Access:
    """How ``submit`` reaches a secured broker; all optional."""

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str | None = None
    password: str | None = None

    def wants_tls(self, scheme: str) -> bool:
        return scheme == "mqtts" or self.tls_ca is not None or self.tls_cert is not None

    def wants_login(self, scheme: str) -> bool:
        return self.wants_tls(scheme) or self.username is not None or self.password is not None


@dataclass(frozen=True)
class BusTarget:
    """The broker a submitter speaks to, and the network's topic prefix."""

    url: str
    prefix: str = "poc/v1"

    def topic(self, kind: str, suffix: str) -> str:
        return f"{self.prefix}/{kind}/{suffix}"

    def client(self, key: SigningKey, access: Access) -> aiomqtt.Client:
        """An MQTT client for ``url``; with TLS or credentials requested (``access``,
        or an ``mqtts://`` URL) the username defaults to the key's public hex."""
        parts = urlsplit(self.url)
        if parts.scheme not in {"mqtt", "mqtts", "embedded"} or not parts.hostname:
            raise NodeError(f"--bus {self.url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
        tls = (
            tls_context(
                access.tls_ca,
                access.tls_cert,
                access.tls_key,
                ("--tls-ca", "--tls-cert", "--tls-key"),
            )
            if access.wants_tls(parts.scheme)
            else None
        )
        username = (access.username or key.public_hex) if access.wants_login(parts.scheme) else None
        return aiomqtt.Client(
            parts.hostname,
            parts.port or (8883 if parts.scheme == "mqtts" else 1883),
            username=username,
            password=access.password,
            tls_context=tls,
            timeout=10,
        )


def describe(result: Result) -> dict[str, Any]:
    """A Result as plain JSON-able values."""
    norms = [
        round(float(np.linalg.norm(np.frombuffer(e.vector, dtype="<f2").astype(np.float64))), 4)
        for e in result.embeddings
    ]
    return {
        "submission_id": result.submission_id.hex(),
        "validator": result.validator.hex(),
        "status": str(result.status),
        "reason": None if result.reason is None else str(result.reason),
        "round": result.round,
        "embeddings": [
            {"modality": str(e.modality), "fused": e.fused, "dim": len(e.vector) // 2, "norm": norm}
            for e, norm in zip(result.embeddings, norms, strict=True)
        ],
        "pair_distance": None
        if result.pair_distance_ppm is None
        else result.pair_distance_ppm / 1e6,
        "scores": None
        if result.scores_ppm is None
        else [None if s is None else s / 1e6 for s in result.scores_ppm],
        "reward": result.reward,
    }


def _print(result: Result, as_json: bool) -> None:
    info = describe(result)
    if as_json:
        print(json.dumps(info), flush=True)
        return
    line = f"{info['status']:<8}"
    if info["reason"]:
        line += f" reason={info['reason']}"
    if info["round"] is not None:
        line += f" round={info['round']}"
    if info["pair_distance"] is not None:
        line += f" pair_distance={info['pair_distance']:.4f}"
    if info["scores"] is not None:
        line += " scores=" + ",".join("-" if s is None else f"{s:.4f}" for s in info["scores"])
    if info["status"] != "accepted":
        line += f" reward={info['reward']}"
    items = ", ".join(
        f"{e['modality']}{' (fused)' if e['fused'] else ''}" for e in info["embeddings"]
    )
    if items:
        line += f" embeddings=[{items}]"
    line += f" validator={info['validator'][:16]}"
    print(line, flush=True)


async def run_submit(
    key_path: Path,
    bus_url: str,
    prefix: str,
    items: list[tuple[Modality, str, bytes]],
    timeout_s: float,
    *,
    as_json: bool = False,
    access: Access | None = None,
    committee: Committee | None = None,
) -> int:
    """Publish one submission and print its Results; 0 once final, 1 if rejected.

    With ``committee``, a Result signed by a key outside it is ignored (and
    said so on stderr); without, any validator's Result counts, and each
    line names the validator that signed it.
    """
    if not 1 <= len(items) <= 2:
        raise NodeError("a submission has one or two items")
    target = BusTarget(bus_url, prefix)
    key = load_key(key_path)
    client = target.client(key, access or Access())  # checks the URL before anything is signed
    signer = MessageSigner(key)
    body = submission_body(key.public_key, secrets.randbits(63), time.time_ns() // 1_000_000, items)
    raw = signer.signed_bytes(SUBMISSION_DOMAIN.decode(), body)
    identity = submission_id(raw)
    if not as_json:
        print(f"submission {identity.hex()} from {key.public_hex}", flush=True)
    try:
        async with client:
            await client.subscribe(target.topic("results", key.public_hex), qos=1)
            await client.publish(target.topic("submissions", key.public_hex), raw, qos=1)
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        continue
                    try:
                        result = verify_result(bytes(payload))
                    except (CodecError, KeyError, ValueError, TypeError):
                        print(
                            "ignoring a message that is not a valid signed Result", file=sys.stderr
                        )
                        continue
                    if result.submission_id != identity:
                        continue
                    if committee is not None and committee.member(result.validator) is None:
                        print(
                            f"ignoring a Result signed by {result.validator.hex()}, "
                            "not a member of the committee",
                            file=sys.stderr,
                        )
                        continue
                    _print(result, as_json)
                    if result.status is Status.FINAL:
                        return 0
                    if result.status is Status.REJECTED:
                        return 1
    except TimeoutError:
        raise NodeError(f"no final result within {timeout_s:g} s") from None
    except aiomqtt.MqttError as error:
        raise NodeError(f"cannot reach the broker at {bus_url}: {error}") from None
    raise NodeError("the broker closed the connection before a final result")
