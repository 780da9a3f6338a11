"""The operator's HTTP endpoints against malformed requests, on a real aiohttp server."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from node.ops.http import http_server
from node.ops.metrics import Metrics

MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n",
    b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /healthz HTTP/1.1\r\nHo\x01st: x\r\n\r\n",
]


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(200), 10)
    writer.close()
    return answer


async def test_malformed_requests_are_400_without_an_error_traceback_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found from the outside: each was answered 400 but logged at ERROR with a
    traceback, so anyone who reaches the port could flood the log and page."""
    caplog.set_level(logging.DEBUG)
    async with http_server("127.0.0.1", 0, Metrics(CollectorRegistry()), lambda: {}) as port:
        answers = [await _exchange(port, request) for request in MALFORMED]
        healthy = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert all(answer.split(b"\r\n")[0].split()[1] == b"400" for answer in answers), answers
    assert healthy.startswith(b"HTTP/1.1 200")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert sum("event=http_bad_request" in r.getMessage() for r in caplog.records) == len(MALFORMED)


def test_the_log_filter_turns_a_client_fault_without_a_message_into_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A filter that raised would break aiohttp's own error handling."""
    from aiohttp.http_exceptions import BadHttpMessage

    caplog.set_level(logging.DEBUG)
    server_log = logging.getLogger("aiohttp.server")
    for message in ("", "   ", "first line\nsecond"):
        try:
            raise BadHttpMessage(message)
        except BadHttpMessage:
            server_log.exception("Error handling request")
    assert [r.levelno for r in caplog.records if r.name == "aiohttp.server"] == []
    assert sum("event=http_bad_request" in r.getMessage() for r in caplog.records) == 3
