"""The MQTT bus: persistent sessions, QoS 1, reconnection with backoff.

Every node runs two sessions. The submissions session only receives; the
other publishes everything the node publishes (the outbox, consensus) and,
in a committee, receives consensus and sync. Each has its own handler, so a
flood of submissions (whose handler blocks while intake is full) never
delays a vote, and the submissions session never awaits an answer of the
broker, which is what lets it stop reading (below).

Incoming messages are acknowledged (PUBACK) only after the handler returns,
that is after the submission is durably stored: paho's manual acknowledgement
is switched on, so a crash between delivery and storage leaves the message
with the broker, which delivers it again to the persistent session.

The broker's in-flight window is not what bounds the node's memory: Mosquitto
2.0.11 (Debian's) lets a whole window more through on every PUBACK, a window
of 1,000 messages of 8 MiB would be 8 GB even where it holds, and QoS 0 has
no window at all. Each session therefore holds at most ``bus.receive_window``
delivered, unhandled messages (and ``receive_window_mb`` of payload), in
:class:`_WindowedClient`:

- at the window it stops reading its socket, so TCP pushes back and the
  backlog stays in the broker, and resumes at half the window; only while
  nothing on the connection awaits an answer, which a paused connection
  could not read;
- a QoS 1 delivery that arrives past the window all the same is left
  unacknowledged and unqueued: the broker keeps it in flight and sends it
  again when the session reconnects (MQTT 3.1.1 §4.4). From the first
  deferred message on, every later one is deferred too, so that order is
  kept; once everything held is handled and acknowledged, :meth:`Bus.run`
  reconnects at once and the broker delivers the deferred messages again,
  in order. A QoS 0 delivery past the window is dropped (at most once is
  all QoS 0 promises).

The embedded broker (amqtt) forgets a delivery left unacknowledged for 5 s
and sends nothing again on a reconnect, so with it the window is off: it
runs in the node's process anyway, and what it holds is the node's memory
either way.

Outgoing messages come from the store's outbox; :class:`OutboxPublisher`
publishes them with a bounded window of concurrent QoS 1 publishes and
deletes each only after its PUBACK.

With ``bus.tls_ca`` set or an ``mqtts://`` URL the connection is TLS (server
certificate and host name verified, TLS 1.2 at least), optionally with a client
certificate; :func:`tls_context` builds the context once, at start, and names
the file and the key of anything it cannot use.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY, MQTT_ERR_SUCCESS, MQTTMessage

from node.errors import ConfigError
from node.ops.config import BusSection
from node.ops.metrics import Metrics
from node.ops.threads import CoroutineCpu

log = logging.getLogger("poc.bus")

T = TypeVar("T")

MessageHandler = Callable[[str, bytes], Awaitable[None]]

# Never subscribed: unsubscribing it changes nothing and is answered in order.
_BARRIER_TOPIC = "poc-node/barrier"


@dataclass(frozen=True)
class Topics:
    """The topics of DESIGN.md §3 under a prefix."""

    prefix: str

    @property
    def submissions(self) -> str:
        """The filter validators subscribe: every submitter's own topic."""
        return f"{self.prefix}/submissions/+"

    def submission(self, submitter: bytes) -> str:
        """Where ``submitter`` publishes (its key as lowercase hex); the broker's ACL binds it."""
        return f"{self.prefix}/submissions/{submitter.hex()}"

    def results(self, submitter: bytes) -> str:
        return f"{self.prefix}/results/{submitter.hex()}"

    def round(self, number: int) -> str:
        return f"{self.prefix}/rounds/{number}"

    def balance(self, submitter: bytes, validator: bytes) -> str:
        """One member's retained Balance of ``submitter`` (one retained message per topic)."""
        return f"{self.prefix}/balances/{submitter.hex()}/{validator.hex()}"

    def balances(self, submitter: bytes) -> str:
        """The filter a submitter reads every member's Balance of it with."""
        return f"{self.prefix}/balances/{submitter.hex()}/+"


def tls_context(
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    names: tuple[str, str, str] = ("bus.tls_ca", "bus.tls_cert", "bus.tls_key"),
) -> ssl.SSLContext:
    """A client TLS context: trust ``ca`` (the system CAs without it), present ``cert``.

    ``names`` are how the three settings are called where they came from
    (config keys or command-line flags), for the error messages. A client key
    readable by group or others is refused, as the node's own key is.
    """
    ca_name, cert_name, key_name = names
    if (cert is None) != (key is None):
        raise ConfigError(f"{cert_name} and {key_name} must be given together")
    try:
        if ca is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        else:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except OSError as error:
        if isinstance(error, ssl.SSLError):
            raise ConfigError(
                f"{ca_name}: TLS CA file {ca} holds no usable PEM certificate ({error.reason})"
            ) from None
        raise ConfigError(f"{ca_name}: cannot read TLS CA file {ca}: {error.strerror}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        try:
            mode = key.stat().st_mode
        except OSError as error:
            raise ConfigError(
                f"{key_name}: cannot read TLS key file {key}: {error.strerror}"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{key_name}: TLS key file {key} has mode {stat.S_IMODE(mode):04o}; it must be "
                f"readable by its owner only (chmod 600 {key})"
            )
        for path, name, what in ((cert, cert_name, "certificate"), (key, key_name, "key")):
            try:
                path.read_bytes()
            except OSError as error:
                raise ConfigError(
                    f"{name}: cannot read TLS {what} file {path}: {error.strerror}"
                ) from None
        try:
            context.load_cert_chain(str(cert), str(key))
        except ssl.SSLError as error:
            raise ConfigError(
                f"{cert_name}, {key_name}: TLS certificate {cert} and key {key} are not a "
                f"matching PEM certificate and private key ({error.reason})"
            ) from None
    return context


class _WindowedClient(aiomqtt.Client):
    """An aiomqtt client that holds at most a window of unhandled deliveries.

    paho calls :meth:`_on_message` on the event loop for every PUBLISH it
    reads; the consumer calls :meth:`handled` once a message is handled and
    acknowledged. Two things keep the window:

    - **pausing**: once the window is full, the socket's reader leaves the
      event loop, TCP pushes back on the broker, and reading resumes at half
      the window. Only while nothing on this connection awaits an answer (a
      PUBACK of our own publish, a SUBACK, an UNSUBACK, a PINGRESP): a paused
      connection reads none of them, and a handler that awaits one would
      wait forever.
    - **deferring**, whenever a message arrives past the window all the same:
      it is neither queued nor acknowledged (see the module's docstring).
    """

    def __init__(
        self,
        *args: Any,
        window: int,
        window_bytes: int,
        on_defer: Callable[[int], None],
        on_pause: Callable[[], None],
        on_cpu: Callable[[float], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._window = window
        self._window_bytes = window_bytes
        self._on_defer = on_defer
        self._on_pause = on_pause
        self.on_cpu = on_cpu
        self.held = 0
        self.held_bytes = 0
        self.deferring = False
        self._awaiting = 0  # our requests on this connection still waiting for their answer
        self._fd = -1
        self._paused = False
        self.session_present = False

    def _on_connect(self, client: Any, userdata: Any, flags: Any, *args: Any) -> None:
        self.session_present = bool(flags.session_present)
        super()._on_connect(client, userdata, flags, *args)

    # -- the window ----------------------------------------------------------

    def _on_message(self, client: Any, userdata: Any, message: MQTTMessage) -> None:
        size = len(message.payload)
        # The same test as the pause below: a message is taken while the window
        # is not full, so the bytes may pass it by one message at most.
        full = self.held >= self._window or self.held_bytes >= self._window_bytes
        if self.deferring or full:
            if message.qos > 0:
                self.deferring = True  # no PUBACK: the broker sends it again after a reconnect
            self._on_defer(message.qos)
            return
        self.held += 1
        self.held_bytes += size
        super()._on_message(client, userdata, message)
        self._steer()

    def handled(self, size: int) -> None:
        self.held -= 1
        self.held_bytes -= size
        self._steer()

    # -- pausing the reader ----------------------------------------------------

    def _steer(self) -> None:
        """Pause or resume reading, as the window and the awaited answers say."""
        if self._fd < 0:
            return
        answer_due = self._awaiting > 0 or self._client._ping_t > 0
        if self._paused:
            drained = self.held <= self._window // 2 and self.held_bytes <= self._window_bytes // 2
            if answer_due or (drained and not self.deferring):
                self._paused = False
                self._loop.add_reader(self._fd, self._read)
                self._loop.call_soon(self._read)  # TLS may hold decoded bytes already
        elif not answer_due and (
            self.deferring or self.held >= self._window or self.held_bytes >= self._window_bytes
        ):
            self._paused = True
            self._loop.remove_reader(self._fd)
            self._on_pause()

    def _read(self) -> None:
        """aiomqtt's own reader: read, and a failure ends the connection."""
        if self._paused or self._fd < 0:
            return
        started = time.thread_time()
        try:
            while True:
                self._client.loop_read()
                pending = getattr(self._client._sock, "pending", None)  # TLS: decoded bytes
                if self._paused or pending is None or pending() == 0:
                    break
        except Exception as error:  # the connection broke: aiomqtt's run loop raises it
            if not self._disconnected.done():
                self._disconnected.set_exception(error)
        finally:
            self.on_cpu(time.thread_time() - started)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        """aiomqtt's own writer, with the CPU time it costs counted."""

        def write() -> None:
            started = time.thread_time()
            try:
                client.loop_write()
            except Exception as error:  # the connection broke, as in aiomqtt's writer
                if not self._disconnected.done():
                    self._disconnected.set_exception(error)
            finally:
                self.on_cpu(time.thread_time() - started)

        # paho may call this from the thread that connected: hand it to the loop.
        self._loop.call_soon_threadsafe(self._loop.add_writer, sock.fileno(), write)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        super()._on_socket_open(client, userdata, sock)
        self._fd = sock.fileno()  # where aiomqtt registers its reader
        # Then ours replaces it (same reading, its CPU time counted): handed to the
        # loop after aiomqtt's registration, as paho may call this from another thread.
        self._loop.call_soon_threadsafe(self._loop.add_reader, self._fd, self._read)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        self._fd = -1
        self._paused = False
        super()._on_socket_close(client, userdata, sock)

    async def _misc_loop(self) -> None:
        """aiomqtt's keepalive loop, which sends no PINGREQ while messages are held.

        The PINGRESP comes after whatever the broker has sent before it, which
        under a flood is its backlog: paho would read on past the window to
        find it. While messages are held the session acknowledges them, and
        those PUBACKs are what the broker's keepalive needs; once none is held
        (and the backlog is read) paho's pings resume and find a dead
        connection as before. A handler stuck for longer than the keepalive
        gets the session closed by the broker, which delivers what it held
        again.
        """
        while self._paused or self.held > 0 or self._client.loop_misc() == MQTT_ERR_SUCCESS:
            self._steer()
            await asyncio.sleep(1)

    async def _answered(self, request: Awaitable[T]) -> T:
        self._awaiting += 1
        self._steer()
        try:
            return await request
        finally:
            self._awaiting -= 1
            self._steer()

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        await self._answered(CoroutineCpu(super().publish(*args, **kwargs), self.on_cpu))

    async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        return await self._answered(super().subscribe(*args, **kwargs))

    async def unsubscribe(self, *args: Any, **kwargs: Any) -> None:
        await self._answered(super().unsubscribe(*args, **kwargs))

    async def resubscribe(self, topic: str) -> None:
        """Subscribe again without reading on for the SUBACK.

        The broker sends a session's backlog before the SUBACK: waiting for it
        would mean reading the whole backlog past the window. The SUBACK is
        read whenever reading reaches it.
        """
        await super().subscribe(topic, qos=1, timeout=math.inf)


class Bus:
    """A reconnecting aiomqtt client whose session survives restarts."""

    def __init__(
        self, settings: BusSection, client_id: str, metrics: Metrics, *, role: str = "submissions"
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._metrics = metrics
        self._role = role
        self._reports = role == "submissions"  # the bus gauges describe the submissions session
        consensus = role == "consensus" and settings.consensus_username is not None
        self._username = settings.consensus_username if consensus else settings.username
        self._password = settings.consensus_password if consensus else settings.password
        self._tls = (
            tls_context(settings.tls_ca, settings.tls_cert, settings.tls_key)
            if settings.tls
            else None
        )
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self._connections = 0

    @property
    def client_id(self) -> str:
        return self._client_id

    def _deferred(self, qos: int) -> None:
        self._metrics.bus_deferred.labels(session=self._role, qos=str(qos)).inc()

    def _make_client(self) -> _WindowedClient:
        client = _WindowedClient(
            hostname=self._settings.host,
            port=self._settings.port,
            identifier=self._client_id,
            username=self._username,
            password=self._password,
            tls_context=self._tls,
            clean_session=False,
            clean_start=MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=self._settings.keepalive_s,
            timeout=self._settings.connect_timeout_s,
            max_inflight_messages=self._settings.max_inflight,
            max_queued_outgoing_messages=0,
            # amqtt forgets a delivery unacknowledged for 5 s and sends nothing again
            # on a reconnect: deferring would lose it, so the window is off there.
            window=sys.maxsize if self._settings.embedded else self._settings.receive_window,
            window_bytes=sys.maxsize
            if self._settings.embedded
            else self._settings.receive_window_mb * 2**20,
            on_defer=self._deferred,
            on_pause=self._metrics.bus_pauses.labels(session=self._role).inc,
            on_cpu=self._metrics.stage_cpu.labels(stage="bus").inc,
        )
        client.pending_calls_threshold = self._settings.publish_window + 16
        # aiomqtt exposes no switch for manual PUBACK; paho's client under it has one.
        client._client.manual_ack_set(True)
        return client

    async def run(self, subscriptions: Sequence[str], handler: MessageHandler) -> None:
        """Stay connected, subscribed, and feed every message to ``handler``, in order."""
        delay = self._settings.reconnect_min_s
        held = self._metrics.bus_held.labels(session=self._role)
        redeliver = False
        while True:
            renewal: asyncio.Task[None] | None = None
            try:
                async with self._make_client() as client:
                    self._client = client
                    self._connections += 1
                    if redeliver:
                        self._metrics.bus_window_reconnects.labels(session=self._role).inc()
                    elif self._connections > 1 and self._reports:
                        self._metrics.bus_reconnects.inc()
                    redeliver = False
                    if client.session_present:
                        # The broker kept the session, its subscriptions and backlog:
                        # renew them (the list may have changed) without waiting.
                        renewal = asyncio.create_task(self._renew(client, subscriptions))
                    else:
                        for topic in subscriptions:
                            await client.subscribe(topic, qos=1)
                    self.connected.set()
                    if self._reports:
                        self._metrics.bus_connected.set(1)
                    log.info(
                        "event=bus_connected role=%s host=%s port=%d client_id=%s tls=%s "
                        "username=%s",
                        self._role,
                        self._settings.host,
                        self._settings.port,
                        self._client_id,
                        self._tls is not None,
                        self._username,
                    )
                    delay = self._settings.reconnect_min_s
                    async for message in client.messages:
                        held.set(client.held)
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            payload = b"" if payload is None else str(payload).encode()
                        await handler(str(message.topic), bytes(payload))
                        started = time.thread_time()
                        if message.qos > 0:
                            client._client.ack(message.mid, message.qos)
                        client.handled(len(payload))
                        client.on_cpu(time.thread_time() - started)
                        del message, payload  # not kept (up to 8 MiB) while the bus is quiet
                        if client.deferring and client.held == 0:
                            # Everything held is handled: reconnect for the deferred ones.
                            await self._barrier(client)
                            redeliver = True
                            log.info(
                                "event=bus_redeliver role=%s reason=receive_window_full",
                                self._role,
                            )
                            break
            except aiomqtt.MqttError as error:
                log.warning(
                    "event=bus_disconnected role=%s error=%r retry_in_s=%.1f",
                    self._role,
                    str(error),
                    delay,
                )
            finally:
                if renewal is not None:
                    renewal.cancel()
                self._client = None
                held.set(0)
                self.connected.clear()
                if self._reports:
                    self._metrics.bus_connected.set(0)
            if redeliver:
                continue
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self._settings.reconnect_max_s)

    async def _renew(self, client: _WindowedClient, subscriptions: Sequence[str]) -> None:
        try:
            for topic in subscriptions:
                await client.resubscribe(topic)
        except aiomqtt.MqttError as error:
            log.info("event=bus_resubscribe_failed role=%s error=%r", self._role, str(error))

    async def _barrier(self, client: aiomqtt.Client) -> None:
        """Wait until the broker has counted every PUBACK sent so far.

        Closing a socket with unread data in it resets the connection, and the
        broker may drop what it had not read yet: the last PUBACKs, whose
        messages it would then deliver twice. A broker handles a session's
        packets in order, so the answer to an UNSUBSCRIBE (of a filter never
        subscribed: nothing changes) comes after them.
        """
        try:
            await client.unsubscribe(_BARRIER_TOPIC, timeout=self._settings.connect_timeout_s)
        except aiomqtt.MqttError as error:
            log.info("event=bus_barrier_failed role=%s error=%r", self._role, str(error))

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the PUBACK; raises MqttError when disconnected."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        await client.publish(
            topic, payload, qos=1, retain=retain, timeout=self._settings.connect_timeout_s
        )


_QUIET_S = 0.2
"""The outbox publisher deletes what it sent once nothing new came for this long."""
_PUBLISH_FAILURES = (aiomqtt.MqttError, TimeoutError)
"""What a publish raises when the broker is away: retried, never fatal."""


class OutboxPublisher:
    """Drains the store's outbox onto the bus, at least once, in order of production.

    Entries are deleted from the outbox once their PUBACK arrived, in batches:
    when ``window`` of them are waiting to be deleted, or when nothing new came
    for ``_QUIET_S`` (so a drain finds the outbox empty), not once per batch
    sent. Each deletion is a trip to the store's thread and back on the event
    loop (and a write there); a steady stream of Results is sent a few at a
    time. Meanwhile the publisher
    reads only entries past the last one it sent. After a failed publish it
    deletes what it sent and reads the outbox from its start again; after a
    crash, entries sent but not yet deleted are sent again (at least once,
    the same bytes).
    """

    def __init__(
        self,
        bus: Bus,
        fetch: Callable[[int, int], Awaitable[list[tuple[int, str, bytes, bool]]]],
        done: Callable[[list[int]], Awaitable[None]],
        window: int,
        metrics: Metrics,
    ) -> None:
        self._bus = bus
        self._fetch = fetch
        self._done = done
        self._window = window
        self._metrics = metrics
        self._wakeup = asyncio.Event()
        self._sent: list[int] = []
        """Entries published and acknowledged, not yet deleted from the outbox."""

    def notify(self) -> None:
        """New entries were committed to the outbox."""
        self._wakeup.set()

    async def _forget_sent(self) -> None:
        if self._sent:
            await self._done(self._sent)
            self._sent = []

    async def run(self) -> None:
        after = 0  # the last entry sent; entries are read past it
        while True:
            await self._bus.connected.wait()
            self._wakeup.clear()
            batch = await self._fetch(after, self._window)
            if not batch:
                try:
                    async with asyncio.timeout(_QUIET_S if self._sent else 1.0):
                        await self._wakeup.wait()
                except TimeoutError:
                    await self._forget_sent()
                continue
            results = await asyncio.gather(
                *(
                    self._bus.publish(topic, payload, retain=retain)
                    for _, topic, payload, retain in batch
                ),
                return_exceptions=True,
            )
            sent = [
                entry[0]
                for entry, outcome in zip(batch, results, strict=True)
                if not isinstance(outcome, BaseException)
            ]
            self._sent += sent
            self._metrics.published.inc(len(sent))
            failures = [outcome for outcome in results if isinstance(outcome, BaseException)]
            if not failures:
                after = batch[-1][0]
                if len(self._sent) >= self._window:
                    await self._forget_sent()
                continue
            await self._forget_sent()
            after = 0  # every entry not acknowledged is sent again, in order
            unexpected = [f for f in failures if not isinstance(f, _PUBLISH_FAILURES)]
            if unexpected:
                raise unexpected[0]
            log.warning("event=publish_failed count=%d error=%r", len(failures), str(failures[0]))
            await asyncio.sleep(0.2)
