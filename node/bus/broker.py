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

It serves one validator and its submitters, who are not authenticated: as
the shipped Mosquitto ACL does with accounts (``config/mosquitto/acl.conf``),
a client other than the node may only publish submissions and only subscribe
to results, round summaries and balances (``_Broker``). Anyone else reading
the submissions could copy a datum and sign it first, and anyone else
publishing results or balances could answer a submitter falsely. Only the
node's messages are retained, so no client can make the node's process hold
messages it sent once. A connection must say CONNECT within
``CONNECT_TIMEOUT_S``, and one that fails while it does gives its slot back
(``_Broker``): idle sockets or 1,100 CONNECTs reset at once held every one
of the broker's 1,024 slots, for good in the second case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.errors import NoDataError
from amqtt.session import Session

log = logging.getLogger("poc.broker")


MAX_CONNECTIONS = 1024
"""Clients the embedded broker holds at once."""

CONNECT_TIMEOUT_S = 10.0
"""A connection that has not said CONNECT by then is closed (amqtt waits for ever)."""


@dataclass
class _Gate:
    first: frozenset[str]
    """The node's own sessions' client ids: admitted before the gate opens."""
    prefix: str = "poc/v1"
    """The topic prefix of the node's protocol."""
    open: bool = False
    refused: int = 0

    def is_node(self, client_id: str | None) -> bool:
        """Whether the rules below spare this client: the node's, or every one without a node."""
        return not self.first or client_id in self.first

    def _kind(self, topic: str) -> tuple[str, str] | None:
        """``(kind, rest)`` of a topic or filter under the prefix, or None outside it."""
        if not topic.startswith(self.prefix + "/"):
            return None
        kind, _, rest = topic.removeprefix(self.prefix + "/").partition("/")
        return kind, rest

    def published(self, client_id: str | None, topic: str) -> bool:
        """Whether this client may publish on ``topic``: the node anything, others submissions."""
        parts = self._kind(topic)
        return self.is_node(client_id) or (
            parts is not None and parts[0] == "submissions" and "/" not in parts[1]
        )

    def subscribable(self, client_id: str | None, topic_filter: str) -> bool:
        """Whether this client may subscribe ``topic_filter``: to results, rounds or balances.

        The prefix and the kind must be spelled out, so that no wildcard
        (``#``, ``poc/#``, ``poc/v1/+/…``) can match a submission.
        """
        parts = self._kind(topic_filter)
        return self.is_node(client_id) or (
            parts is not None and parts[0] in ("results", "rounds", "balances")
        )


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker, with the node's topic rules, a deadline for CONNECT and slots given back.

    The rules are checked where amqtt subscribes and broadcasts: with a topic
    plugin (amqtt 0.12.1's own hook) a flood of 200 QoS 1 messages delivered
    103 and stalled.

    amqtt holds a connection slot while it waits, for ever, for a CONNECT,
    and keeps it for good when closing a reset connection raises ``OSError``.
    Both now end as a failed connection (``NoDataError``), after which amqtt
    gives the slot back. Only the node's own messages are retained, and a
    client is sent those its own subscriptions match, not everyone's.
    """

    def __init__(self, config: dict[str, Any], gate: _Gate) -> None:
        super().__init__(config)
        self._gate = gate

    async def _authenticate(self, session: Session, *args: Any) -> bool:
        """Only the node's own sessions until the gate opens; then amqtt's anonymous plugin."""
        gate = self._gate
        if not (gate.open or session.client_id in gate.first):
            gate.refused += 1
            log.info("event=broker_not_open_yet client_id=%s", session.client_id)
            return False
        admitted: bool = await super()._authenticate(session, *args)
        return admitted

    async def _initialize_client_session(self, reader: Any, writer: Any, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(
                super()._initialize_client_session(reader, writer, *args), CONNECT_TIMEOUT_S
            )
        except (TimeoutError, OSError) as exc:
            with contextlib.suppress(Exception):
                await writer.close()
            raise NoDataError(f"no valid CONNECT: {exc!r}") from exc

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        if not self._gate.subscribable(session.client_id, subscription[0]):
            log.info(
                "event=broker_refused_subscription client_id=%s filter=%s",
                session.client_id,
                subscription[0],
            )
            return 0x80  # the SUBACK's failure code
        granted: int = await super().add_subscription(subscription, session)
        return granted

    async def _broadcast_message(
        self, session: Session | None, topic: str | None, *args: Any, **kw: Any
    ) -> None:
        client_id = None if session is None else session.client_id
        if session is not None and not self._gate.published(client_id, topic or ""):
            log.info("event=broker_refused_publish client_id=%s topic=%s", client_id, topic)
            return
        await super()._broadcast_message(session, topic, *args, **kw)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt 0.12.1 calls this, as a client connects, for every filter anyone has
        # subscribed, so a client got retained round summaries and balances it never
        # asked for (and the node's submissions session got round summaries): only
        # the client's own subscriptions, as MQTT says.
        mine = self._subscriptions.get(subscription[0], ())
        if any(subscriber.client_id == session.client_id for subscriber, _ in mine):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def retain_message(self, source_session: Session | None, *args: Any, **kw: Any) -> None:
        if source_session is None or self._gate.is_node(source_session.client_id):
            await super().retain_message(source_session, *args, **kw)


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
    host: str, port: int, first: Collection[str] = (), prefix: str = "poc/v1"
) -> AsyncIterator[EmbeddedBroker]:
    """Run an amqtt broker on ``host:port`` for the duration of the context.

    Only the client ids in ``first`` may connect until ``open`` is called;
    with none given, it is open from the start and to every topic. Clients
    other than those may publish only on ``prefix``'s submissions topics and
    subscribe only to its results, round summaries and balances.
    """
    gate = _Gate(frozenset(first), prefix, open=not first)
    config = {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": MAX_CONNECTIONS}
        },
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }
    for logger in ("amqtt", "transitions"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    broker = _Broker(config, gate)
    await broker.start()
    log.info("event=embedded_broker_started host=%s port=%d", host, port)
    try:
        yield EmbeddedBroker(broker, gate)
    finally:
        await broker.shutdown()
        log.info("event=embedded_broker_stopped")
