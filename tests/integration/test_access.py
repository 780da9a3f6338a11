"""Who may connect, publish and read: the shipped broker configuration, enforced.

A real Mosquitto runs ``config/mosquitto/mosquitto.conf`` with only its
site-specific values replaced (port, certificate, password, ACL and data
paths, the user it drops to) and ``config/mosquitto/acl.conf`` verbatim, over
TLS with certificates made here. Mosquitto acknowledges an unauthorised
publish (MQTT 3.1.1) and grants an unauthorised subscription, then drops
the messages: every "cannot" below is shown by a subscriber allowed to read
the topic that receives nothing, while a marker sent after the forgery does
arrive.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import ipaddress
import json
import os
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node.bus.client import tls_context
from node.errors import ConfigError
from node.ops.config import load_config
from tests.conftest import POC_NODE, ROOT, Broker, free_port, start_node, write_node_config
from tests.integration.test_bus_window import COUNT as WINDOW_COUNT
from tests.integration.test_bus_window import flood_session
from tests.peer import Peer

pytestmark = pytest.mark.integration

SHIPPED = ROOT / "config" / "mosquitto"
PREFIX = "poc/v1"
VALIDATOR = "validator-1"  # the example validator of the shipped acl.conf
VALIDATOR_OUT = "validator-1-consensus"  # its second session: what it publishes, consensus


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5)}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(
            subject_name=_name("poc test CA"),
            issuer_name=_name("poc test CA"),
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_after=now + datetime.timedelta(days=1),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder(
            subject_name=_name("127.0.0.1"),
            issuer_name=ca.subject,
            public_key=server_key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_after=now + datetime.timedelta(days=1),
            **valid,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(server_key))
    paths[2].chmod(0o600)
    return paths


def adapt(text: str, values: dict[str, str]) -> str:
    """The shipped config with the value of each named directive replaced."""
    lines, seen = [], set()
    for line in text.splitlines():
        words = line.split(maxsplit=1)
        if words and words[0] in values:
            line = f"{words[0]} {values[words[0]]}"
            seen.add(words[0])
        lines.append(line)
    assert seen == set(values), f"the shipped config lacks {sorted(set(values) - seen)}"
    return "\n".join(lines) + "\n"


@dataclass
class Secured:
    broker: Broker
    ca: Path
    passwords: dict[str, str]
    submitters: list[Peer]
    log: Path

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def client(
        self, username: str | None, password: str | None = None, *, trust: bool = True
    ) -> aiomqtt.Client:
        context = (
            ssl.create_default_context(cafile=str(self.ca))
            if trust
            else ssl.create_default_context()
        )
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            username=username,
            password=password,
            tls_context=context,
            timeout=5,
        )

    def login(self, username: str) -> aiomqtt.Client:
        return self.client(username, self.passwords[username])


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    directory = tmp_path_factory.mktemp("secured-mosquitto")
    ca, cert, key = make_pki(directory)
    submitters = [Peer() for _ in range(3)]
    passwords = {VALIDATOR: "validator secret", VALIDATOR_OUT: "outbound secret"}
    passwords.update({peer.public.hex(): f"secret {n}" for n, peer in enumerate(submitters)})
    password_file = directory / "passwd"
    for username, password in passwords.items():
        create = [] if password_file.exists() else ["-c"]
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(password_file), username, password],
            check=True,
            capture_output=True,
        )
    acl = directory / "acl.conf"
    acl.write_text((SHIPPED / "acl.conf").read_text())
    port = free_port()
    log = directory / "mosquitto.log"
    config = directory / "mosquitto.conf"
    config.write_text(
        adapt(
            (SHIPPED / "mosquitto.conf").read_text(),
            {
                "user": getpass.getuser(),
                "listener": f"{port} 127.0.0.1",
                "cafile": str(ca),
                "certfile": str(cert),
                "keyfile": str(key),
                "password_file": str(password_file),
                "acl_file": str(acl),
                "persistence_location": f"{directory}/",
                "log_dest": f"file {log}",
            },
        )
    )
    broker = Broker(port, None, config)  # type: ignore[arg-type]
    broker.start()
    try:
        yield Secured(broker, ca, passwords, submitters, log)
    finally:
        broker.stop()


def _refused(secured: Secured, username: str | None, password: str | None, **kw: bool) -> bool:
    async def attempt() -> None:
        async with secured.client(username, password, **kw):
            pass

    try:
        asyncio.run(attempt())
    except aiomqtt.MqttError:
        return True
    return False


def _plaintext_connect(port: int, username: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT without TLS; returns what the broker answers."""

    def field(text: str) -> bytes:
        data = text.encode()
        return struct.pack(">H", len(data)) + data

    body = field("MQTT") + bytes([4, 0b1100_0010]) + struct.pack(">H", 30)
    body += field("plain") + field(username) + field(password)
    packet = bytes([0x10, len(body)]) + body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(packet)
        try:
            return connection.recv(64)
        except ConnectionResetError:
            return b""


def test_unknown_clients_cannot_connect(secured: Secured):
    validator_password = secured.passwords[VALIDATOR]
    assert not _refused(secured, VALIDATOR, validator_password)  # the control
    assert _refused(secured, VALIDATOR, "wrong password")
    assert _refused(secured, VALIDATOR, None)
    assert _refused(secured, "somebody", "anything")
    assert _refused(secured, Peer().public.hex(), "a key nobody registered")
    assert _refused(secured, None, None)  # anonymous
    # A client that does not trust the network's CA does not complete TLS.
    assert _refused(secured, VALIDATOR, validator_password, trust=False)
    # Plain MQTT on the TLS port gets no CONNACK: the broker closes the socket.
    assert _plaintext_connect(secured.port, VALIDATOR, validator_password) == b""
    assert "not authorised" in secured.log.read_text()


async def _collect(
    client: aiomqtt.Client, until: set[bytes], timeout: float = 10.0
) -> list[tuple[str, bytes]]:
    """Messages in arrival order until every payload of ``until`` has come."""
    received: list[tuple[str, bytes]] = []
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            received.append((str(message.topic), payload))
            if until <= {p for _, p in received}:
                return received
    raise AssertionError("the connection ended")


def test_a_submitter_publishes_only_submissions_and_reads_only_its_own_results(
    secured: Secured,
):
    alice, bob = (peer.public.hex() for peer in secured.submitters[:2])
    forbidden = [
        f"{PREFIX}/consensus/votes",
        f"{PREFIX}/consensus/proposals",
        f"{PREFIX}/results/{bob}",
        f"{PREFIX}/results/{alice}",
        f"{PREFIX}/rounds/1",
        f"{PREFIX}/sync/requests",
    ]

    async def scenario() -> tuple[list, list, list, list]:
        async with (
            secured.login(alice) as a,
            secured.login(bob) as b,
            secured.login(VALIDATOR) as v,
        ):
            # The validator reads everything it may (submissions, consensus,
            # sync, rounds); Bob his results; Alice tries Bob's too.
            await v.subscribe(f"{PREFIX}/#", qos=1)
            await b.subscribe(f"{PREFIX}/results/{bob}", qos=1)
            await a.subscribe(f"{PREFIX}/results/{bob}", qos=1)
            await a.subscribe(f"{PREFIX}/results/#", qos=1)
            for topic in forbidden:
                await a.publish(topic, b"forged by alice", qos=1, retain=topic.endswith("/1"))
            # Markers, each sent after the forgeries it must not be preceded by.
            # Alice's own topic is hers; Bob's is not (one account, one key).
            await a.publish(f"{PREFIX}/submissions/{bob}", b"alice as bob", qos=1)
            await a.publish(f"{PREFIX}/submissions", b"alice on the bare topic", qos=1)
            await a.publish(f"{PREFIX}/submissions/{alice}", b"alice's submission", qos=1)
            await v.publish(f"{PREFIX}/results/{bob}", b"result for bob", qos=1)
            await v.publish(f"{PREFIX}/results/{alice}", b"result for alice", qos=1)
            await v.publish(f"{PREFIX}/consensus/votes", b"validator's vote", qos=1)
            await v.publish(f"{PREFIX}/rounds/2", b"round 2 summary", qos=1, retain=True)
            got_v, got_b, got_a = await asyncio.gather(
                _collect(v, {b"alice's submission", b"validator's vote", b"round 2 summary"}),
                _collect(b, {b"result for bob"}),
                _collect(a, {b"result for alice"}),
            )
        # A late reader of the rounds sees the validator's retained summary only.
        async with secured.login(secured.submitters[2].public.hex()) as late:
            await late.subscribe(f"{PREFIX}/rounds/#", qos=1)
            got_late = await _collect(late, {b"round 2 summary"})
            with pytest.raises(TimeoutError):
                await _collect(late, {b"forged by alice"}, timeout=0.5)
        return got_v, got_b, got_a, got_late

    got_v, got_b, got_a, got_late = asyncio.run(scenario())
    assert got_v == [
        (f"{PREFIX}/submissions/{alice}", b"alice's submission"),
        (f"{PREFIX}/consensus/votes", b"validator's vote"),
        (f"{PREFIX}/rounds/2", b"round 2 summary"),
    ]
    assert got_b == [(f"{PREFIX}/results/{bob}", b"result for bob")]
    assert got_a == [(f"{PREFIX}/results/{alice}", b"result for alice")]
    assert got_late == [(f"{PREFIX}/rounds/2", b"round 2 summary")]


def test_a_balance_is_read_only_by_its_submitter_and_written_only_by_validators(
    secured: Secured,
):
    alice, bob = (peer.public.hex() for peer in secured.submitters[:2])
    member = "ab" * 32  # the signing validator's key, as the topic names it

    async def scenario() -> tuple[list, list, list]:
        async with (
            secured.login(alice) as a,
            secured.login(bob) as b,
            secured.login(VALIDATOR) as v,
        ):
            await b.subscribe(f"{PREFIX}/balances/{bob}/+", qos=1)
            # Alice tries to read Bob's balance, and everyone's.
            await a.subscribe(f"{PREFIX}/balances/{bob}/+", qos=1)
            await a.subscribe(f"{PREFIX}/balances/#", qos=1)
            # Alice forges balances, for Bob and for herself, as a validator would.
            for forged in (f"{PREFIX}/balances/{bob}/{member}", f"{PREFIX}/balances/{alice}/x"):
                await a.publish(forged, b"forged by alice", qos=1, retain=True)
            await v.publish(f"{PREFIX}/balances/{bob}/{member}", b"bob's", qos=1, retain=True)
            await v.publish(f"{PREFIX}/balances/{alice}/{member}", b"alice's", qos=1, retain=True)
            got_b, got_a = await asyncio.gather(_collect(b, {b"bob's"}), _collect(a, {b"alice's"}))
        # What a reader finds later is what the broker retained: the validator's only.
        async with secured.login(bob) as late:
            await late.subscribe(f"{PREFIX}/balances/{bob}/+", qos=1)
            got_late = await _collect(late, {b"bob's"})
            with pytest.raises(TimeoutError):
                await _collect(late, {b"forged by alice"}, timeout=0.5)
        return got_b, got_a, got_late

    got_b, got_a, got_late = asyncio.run(scenario())
    assert got_b == [(f"{PREFIX}/balances/{bob}/{member}", b"bob's")]
    assert got_a == [(f"{PREFIX}/balances/{alice}/{member}", b"alice's")]
    assert got_late == got_b


def test_the_node_serves_a_submitter_over_tls_with_passwords(secured: Secured, tmp_path: Path):
    submitter = secured.submitters[2]
    key_file = tmp_path / "submitter.key"
    key_file.write_bytes(
        submitter.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    config = write_node_config(
        tmp_path / "node.yaml",
        bus={
            "tls_ca": str(secured.ca),
            "username": VALIDATOR,
            "password": secured.passwords[VALIDATOR],
            "consensus_username": VALIDATOR_OUT,
            "consensus_password": secured.passwords[VALIDATOR_OUT],
        },
    )
    node = start_node(tmp_path / "node", secured.url, config)
    try:
        assert f"tls=True username={VALIDATOR}" in node.log_text()
        submit = subprocess.run(
            [
                str(POC_NODE),
                "submit",
                "--key",
                str(key_file),
                "--bus",
                secured.url,
                "--tls-ca",
                str(secured.ca),
                "--json",
                "--timeout",
                "60",
                "text:a green triangle over TLS",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            env={**os.environ, "POC_BUS_PASSWORD": secured.passwords[submitter.public.hex()]},
            cwd=ROOT,
        )
        assert submit.returncode == 0, submit.stderr
        results = [json.loads(line) for line in submit.stdout.splitlines()]
        assert [r["status"] for r in results] == ["accepted", "final"]
        assert isinstance(results[-1]["round"], int)
        assert node.metric("poc_results_total", 'status="final"') == 1
    finally:
        assert node.stop() == 0, node.log_text()


def test_tls_settings_that_cannot_work_are_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"bus.tls_ca: cannot read TLS CA file .*missing.crt"):
        tls_context(tmp_path / "missing.crt", None, None)
    not_pem = tmp_path / "not-a-certificate.crt"
    not_pem.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"bus.tls_ca: TLS CA file .* no usable PEM"):
        tls_context(not_pem, None, None)

    ca, cert, key = make_pki(tmp_path)
    assert tls_context(ca, cert, key).minimum_version == ssl.TLSVersion.TLSv1_2
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"--tls-key: TLS key file .* has mode 0644"):
        tls_context(ca, cert, key, ("--tls-ca", "--tls-cert", "--tls-key"))
    key.chmod(0o600)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(_pem_key(ec.generate_private_key(ec.SECP256R1())))
    other_key.chmod(0o600)
    with pytest.raises(ConfigError, match="not a matching PEM certificate and private key"):
        tls_context(ca, cert, other_key)

    path = tmp_path / "node.yaml"
    path.write_text(
        "bus:\n  url: embedded://127.0.0.1:1883\n  tls_ca: /x/ca.crt\n"
        "  tls_cert: /x/client.crt\n  password: secret\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "bus.tls_ca: Value error, the embedded broker speaks no TLS" in message
    assert "bus.tls_key: Value error, bus.tls_cert and bus.tls_key must be given" in message
    assert "bus.password: Value error, is set but bus.username is not" in message

    path.write_text("bus:\n  url: mqtts://broker.example\n")
    bus = load_config(path).bus
    assert bus.tls and bus.port == 8883 and not bus.embedded
    path.write_text(f"bus:\n  url: mqtt://broker.example:1884\n  tls_ca: {ca}\n")
    bus = load_config(path).bus
    assert bus.tls and bus.port == 1884
    assert not load_config().bus.tls


def test_the_receive_window_defers_and_recovers_under_the_shipped_acl(secured: Secured):
    """Deferral past the receive window through TLS, passwords and the shipped ACL.

    The handler awaits PUBACKs on its own session (a validator's Results), so
    the session must read on and defer; its barrier (an UNSUBSCRIBE of a filter
    no ACL line names) and its reconnects must still work for a validator
    account, and nothing a submitter sent may be lost, reordered or repeated.
    """
    alice = secured.submitters[0].public.hex()
    run = asyncio.run(
        flood_session(
            secured.port,
            echo_every=10,
            name="acl",
            settings={
                "bus.url": secured.url,
                "bus.tls_ca": str(secured.ca),
                "bus.username": VALIDATOR,
                "bus.password": secured.passwords[VALIDATOR],
            },
            publisher=lambda: secured.login(alice),
            topic=f"{PREFIX}/submissions/{alice}",
            echo_topic=f"{PREFIX}/results/{alice}",
        )
    )
    assert run.deferred > 0 and run.redeliveries > 0  # the window fired and recovered
    assert run.echoed == WINDOW_COUNT // 10
    assert run.seen == list(range(WINDOW_COUNT))
