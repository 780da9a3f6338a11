"""The submitter's side of the protocol, for ``poc-node submit``.

Signs a Submission, subscribes to its own results topic *before* publishing
(so no Result can be missed), publishes with QoS 1 and prints every Result
about the submission until a final or rejected one arrives.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import numpy as np

from encoders.errors import EncoderError
from encoders.media import media_type_of
from encoders.modality import MEDIA_TYPES, Modality
from node.codec import CodecError
from node.errors import NodeError
from node.keys import load_key
from node.signing import MessageSigner
from node.wire import (
    SUBMISSION_DOMAIN,
    Result,
    Status,
    submission_body,
    submission_id,
    verify_result,
)


def parse_item(text: str) -> tuple[Modality, str, bytes]:
    """``text:...`` or a file path, as (modality, media type, data)."""
    if text.startswith("text:"):
        return Modality.TEXT, "text/plain", text[len("text:") :].encode("utf-8")
    path = Path(text)
    if not path.is_file():
        raise NodeError(f'{text!r} is neither text:"..." nor a readable file')
    try:
        mime = media_type_of(path)
    except EncoderError as error:
        raise NodeError(str(error)) from None
    return MEDIA_TYPES[mime], mime, path.read_bytes()


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
        "scores": None if result.scores_ppm is None else [s / 1e6 for s in result.scores_ppm],
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
        line += " scores=" + ",".join(f"{s:.4f}" for s in info["scores"])
    if info["status"] != "accepted":
        line += f" reward={info['reward']}"
    items = ", ".join(
        f"{e['modality']}{' (fused)' if e['fused'] else ''}" for e in info["embeddings"]
    )
    if items:
        line += f" embeddings=[{items}]"
    print(line, flush=True)


async def run_submit(
    key_path: Path,
    bus_url: str,
    prefix: str,
    items: list[tuple[Modality, str, bytes]],
    timeout_s: float,
    *,
    as_json: bool = False,
) -> int:
    """Publish one submission and print its Results; 0 once final, 1 if rejected."""
    if not 1 <= len(items) <= 2:
        raise NodeError("a submission has one or two items")
    key = load_key(key_path)
    signer = MessageSigner(key)
    body = submission_body(key.public_key, secrets.randbits(63), time.time_ns() // 1_000_000, items)
    raw = signer.signed_bytes(SUBMISSION_DOMAIN.decode(), body)
    identity = submission_id(raw)
    parts = urlsplit(bus_url)
    if parts.scheme not in {"mqtt", "embedded"} or not parts.hostname:
        raise NodeError(f"--bus {bus_url!r} is not mqtt://HOST:PORT")
    if not as_json:
        print(f"submission {identity.hex()} from {key.public_hex}", flush=True)
    try:
        async with aiomqtt.Client(parts.hostname, parts.port or 1883, timeout=10) as client:
            await client.subscribe(f"{prefix}/results/{key.public_hex}", qos=1)
            await client.publish(f"{prefix}/submissions", raw, qos=1)
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
