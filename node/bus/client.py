"""The MQTT bus: persistent sessions, QoS 1, reconnection with backoff.

A committee member runs two sessions: one for submissions, one for
consensus and sync, each with its own in-flight window and handler, so a
flood of submissions (whose handler blocks while intake is full) never
delays a vote.

Incoming messages are acknowledged (PUBACK) only after the handler returns,
that is after the submission is durably stored: paho's manual acknowledgement
is switched on, so a crash between delivery and storage leaves the message
with the broker, which delivers it again to the persistent session. The
broker's in-flight window bounds how many unacknowledged messages reach the
node, which is the back-pressure on the bus.

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
import random
import ssl
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY

from node.errors import ConfigError
from node.ops.config import BusSection
from node.ops.metrics import Metrics

log = logging.getLogger("poc.bus")

MessageHandler = Callable[[str, bytes], Awaitable[None]]


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

    def _make_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
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
        )
        client.pending_calls_threshold = self._settings.publish_window + 16
        # aiomqtt exposes no switch for manual PUBACK; paho's client under it has one.
        client._client.manual_ack_set(True)
        return client

    async def run(self, subscriptions: Sequence[str], handler: MessageHandler) -> None:
        """Stay connected, subscribed, and feed every message to ``handler``, in order."""
        delay = self._settings.reconnect_min_s
        while True:
            try:
                async with self._make_client() as client:
                    self._client = client
                    self._connections += 1
                    if self._connections > 1 and self._reports:
                        self._metrics.bus_reconnects.inc()
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
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            payload = b"" if payload is None else str(payload).encode()
                        await handler(str(message.topic), bytes(payload))
                        if message.qos > 0:
                            client._client.ack(message.mid, message.qos)
            except aiomqtt.MqttError as error:
                log.warning(
                    "event=bus_disconnected role=%s error=%r retry_in_s=%.1f",
                    self._role,
                    str(error),
                    delay,
                )
            finally:
                self._client = None
                self.connected.clear()
                if self._reports:
                    self._metrics.bus_connected.set(0)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self._settings.reconnect_max_s)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the PUBACK; raises MqttError when disconnected."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        await client.publish(
            topic, payload, qos=1, retain=retain, timeout=self._settings.connect_timeout_s
        )


class OutboxPublisher:
    """Drains the store's outbox onto the bus, at least once, in order of production."""

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

    def notify(self) -> None:
        """New entries were committed to the outbox."""
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._bus.connected.wait()
            self._wakeup.clear()
            batch = await self._fetch(0, self._window)
            if not batch:
                try:
                    async with asyncio.timeout(1.0):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
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
            if sent:
                await self._done(sent)
                self._metrics.published.inc(len(sent))
            failures = [outcome for outcome in results if isinstance(outcome, BaseException)]
            if failures:
                if any(
                    not isinstance(failure, aiomqtt.MqttError | TimeoutError)
                    for failure in failures
                ):
                    raise next(
                        f for f in failures if not isinstance(f, aiomqtt.MqttError | TimeoutError)
                    )
                log.warning(
                    "event=publish_failed count=%d error=%r", len(failures), str(failures[0])
                )
                await asyncio.sleep(0.2)
