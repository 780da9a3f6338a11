"""The operator's HTTP endpoints: /metrics, /healthz, /readyz (aiohttp)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.errors import NodeError
from node.ops.metrics import Metrics

if TYPE_CHECKING:
    from node.ops.explore import ExploreSite

log = logging.getLogger("poc.http")


class _ClientFaults(logging.Filter):
    """aiohttp answers a malformed request (a bad request line, an overlong URL or
    header, a bad chunk) 400, and logs it at ERROR with a traceback: anyone who can
    reach the port could fill the log with tracebacks and page the operator. Those
    become one line at DEBUG; a handler's own error stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            lines = str(error.message or "").strip().splitlines()
            log.debug("event=http_bad_request error=%r", (lines or [type(error).__name__])[0][:200])
            return False
        return True


logging.getLogger("aiohttp.server").addFilter(_ClientFaults())


@asynccontextmanager
async def http_server(
    host: str,
    port: int,
    metrics: Metrics,
    ready: Callable[[], dict[str, bool]],
    explore: ExploreSite | None = None,
) -> AsyncIterator[int]:
    """Serve the endpoints for the duration of the context; yields the bound port.

    ``ready`` reports each readiness condition; /readyz is 200 only when all hold.
    ``explore`` adds the gap explorer's routes (``http.explore``; else they are 404).
    """

    async def metrics_page(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        conditions = ready()
        status = 200 if all(conditions.values()) else 503
        return web.json_response({"ready": status == 200, **conditions}, status=status)

    app = web.Application(client_max_size=explore.body_limit() if explore else 1024**2)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if explore is not None:
        explore.add_routes(app)
    # Request bodies are never inflated: aiohttp would do it on the event loop as the
    # bytes arrive, for any endpoint, read or not (a 2 MB gzip body of zeros, 2 GiB
    # inflated, held the loop ~0.5 s). The what-if refuses a coded body (415).
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise NodeError(
            f"cannot serve metrics and health on {host}:{port}: {error.strerror} "
            "(another process holds the port? set http.port, or --metrics-port)"
        ) from None
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    log.info("event=http_listening host=%s port=%d", host, bound)
    try:
        yield int(bound)
    finally:
        await runner.cleanup()
