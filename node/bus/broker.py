"""The embedded MQTT broker of the default setup (amqtt, in the node's process).

It binds the loopback address it is given, never 0.0.0.0 (amqtt's default),
and runs without the $SYS and packet-logging plugins. It speaks MQTT 3.1.1
only; deployments that need v5, shared subscriptions or ACLs use Mosquitto.

Until the node has subscribed to the submissions, the broker admits only the
node's own sessions (``EmbeddedBroker.open``): it holds no session for the
node across the node's restarts (it is in memory, and restarts with it), so
a submission published before that subscription was acknowledged to its
sender and delivered to no one. A submitter refused at connect knows to
retry; one silently dropped does not.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

log = logging.getLogger("poc.broker")


@dataclass
class _Gate:
    first: frozenset[str]
    """Client ids admitted before the gate opens: the node's own sessions."""
    open: bool = False
    refused: int = 0


_GATES: dict[str, _Gate] = {}
_NAMES = itertools.count()


class NodeFirst(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt authentication: only the node's own sessions until its gate opens."""

    async def authenticate(self, *, session: Session) -> bool:
        gate = _GATES[self.context.config.gate]
        if gate.open or session.client_id in gate.first:
            return True
        gate.refused += 1
        log.info("event=broker_not_open_yet client_id=%s", session.client_id)
        return False

    @dataclass
    class Config:
        gate: str = field(default="")


class EmbeddedBroker:
    """The running broker, and the switch that admits every client."""

    def __init__(self, broker: Broker, gate: _Gate) -> None:
        self.broker = broker
        self._gate = gate

    def open(self) -> None:
        """Admit every client from now on (the node has subscribed)."""
        if not self._gate.open:
            self._gate.open = True
            log.info("event=embedded_broker_open refused_before=%d", self._gate.refused)


@asynccontextmanager
async def embedded_broker(
    host: str, port: int, first: Collection[str] = ()
) -> AsyncIterator[EmbeddedBroker]:
    """Run an amqtt broker on ``host:port`` for the duration of the context.

    Only the client ids in ``first`` may connect until ``open`` is called;
    with none given, it is open from the start.
    """
    name = f"gate-{next(_NAMES)}"
    gate = _GATES[name] = _Gate(frozenset(first), open=not first)
    config = {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 1024}
        },
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            f"{__name__}.NodeFirst": {"gate": name},
        },
    }
    for logger in ("amqtt", "transitions"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    broker = Broker(config)
    try:
        await broker.start()
        log.info("event=embedded_broker_started host=%s port=%d", host, port)
        try:
            yield EmbeddedBroker(broker, gate)
        finally:
            await broker.shutdown()
            log.info("event=embedded_broker_stopped")
    finally:
        del _GATES[name]
