"""Shared fixtures: a real Mosquitto on a free loopback port, node processes."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, settings

# `make test` runs three test files at once on two cores (pytest-xdist): an example
# that takes longer than usual is the machine's load, not a failure. Tests never
# assert timings, and hypothesis's deadline is one.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

ROOT = Path(__file__).resolve().parents[1]
POC_NODE = Path(sys.executable).parent / "poc-node"


def _port_slice() -> range:
    """This pytest process's own ports, below the kernel's ephemeral range.

    A port from ``bind(("127.0.0.1", 0))`` comes from the ephemeral range, which
    every outgoing connection of the suite (MQTT clients, HTTP probes) draws its
    source port from too: one of them could take it before the broker or node
    that was told to listen there binds it. Below that range only listeners
    bind, and above Ray's worker ports (10002-19999 by default). Each xdist
    worker (``gw0``, ``gw1``, ...) gets a slice of its own.
    """
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low, high = 20000, max(ephemeral, 20000 + 1024)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    width = (high - low) // max(workers, 1)
    return range(low + index * width, low + (index + 1) * width)


_PORTS = _port_slice()
_next_port = [_PORTS.start + os.getpid() % len(_PORTS)]


def free_port() -> int:
    """A loopback port nothing listens on, taken in turn from this process's slice
    (so a port just handed out is not handed out again soon)."""
    for _ in range(len(_PORTS)):
        port = _next_port[0]
        _next_port[0] = _PORTS.start + (port + 1 - _PORTS.start) % len(_PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_PORTS.start}-{_PORTS.stop - 1}")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if found is None:
        pytest.fail("mosquitto is not installed: run the tests with `make test`")
    return found


class PortTaken(RuntimeError):
    """A broker or node exited at start: its port was taken meanwhile."""


@dataclass
class Broker:
    port: int
    process: subprocess.Popen[bytes]
    config: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # Exited: it could not bind (another broker answering there is not this one).
            if self.process.poll() is not None:
                raise PortTaken(f"mosquitto exited: port {self.port} is taken")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    time.sleep(0.05)  # a failed bind exits at once: make sure it did not
                    if self.process.poll() is None:
                        return
            time.sleep(0.05)
        raise TimeoutError(f"mosquitto does not listen on 127.0.0.1:{self.port}")


def start_mosquitto(directory: Path) -> Broker:
    # Test files run in parallel (pytest-xdist): another broker may take the port
    # between free_port() and Mosquitto's bind, and then this one exits. Try another.
    for _ in range(3):
        port = free_port()
        config = directory / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # The defaults silently drop QoS 1 messages for a subscriber that
            # falls behind (see ENVIRONMENT.md): raise them.
            "max_queued_messages 100000\n"
            "max_inflight_messages 1000\n"
            "message_size_limit 0\n"
            "persistence true\n"
            f"persistence_location {directory}/\n"
            # Started as root, Mosquitto drops to user `mosquitto`, which could not
            # write its persistence file here: stay the user who runs the tests.
            f"user {getpass.getuser()}\n"
        )
        broker = Broker(port, None, config)  # type: ignore[arg-type]
        try:
            broker.start()
        except PortTaken:
            continue
        return broker
    raise RuntimeError("mosquitto found no free port in three tries")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@dataclass
class NodeProcess:
    process: subprocess.Popen[bytes]
    data_dir: Path
    metrics_port: int
    log: Path

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return r.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.metrics().splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


_TEST_WEIGHTS: dict[str, str] = {}


def session_weights() -> dict[str, str]:
    """Seeded, untrained weights made once per test session.

    Their δ never disqualifies a pair, so protocol tests do not depend on what
    the shipped (trained) weights think of synthetic test media.
    """
    if not _TEST_WEIGHTS:
        from encoders.weights import create_untrained_shard, sha256_file

        directory = Path(tempfile.mkdtemp(prefix="poc-test-weights-"))
        manifest = create_untrained_shard(directory / "weights", seeds=(0, 1))
        _TEST_WEIGHTS.update(manifest=str(manifest), manifest_sha256=sha256_file(manifest))
    return dict(_TEST_WEIGHTS)


def write_node_config(path: Path, **sections: dict[str, object]) -> Path:
    """A node config for tests: untrained weights, rounds start now and last two seconds."""
    base: dict[str, dict[str, object]] = {
        "rounds": {"genesis_ms": (time.time_ns() // 10**6) - 60_000, "round_seconds": 2},
        "node": {"log_level": "INFO"},
        # The node's own thread encodes: worker processes (the CPU default) would
        # load torch twice more for every node a test starts. They have their own
        # tests (tests/integration/test_encoder_workers.py).
        "encoders": {**session_weights(), "workers": 0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(base))
    return path


def start_node(
    directory: Path, bus: str, config: Path | None = None, ready_timeout: float = 120
) -> NodeProcess:
    directory.mkdir(parents=True, exist_ok=True)
    config = config or write_node_config(directory / "node.yaml")
    for _ in range(3):
        try:
            return _start_node_once(directory, bus, config, ready_timeout)
        except PortTaken:  # another test file took the metrics port meanwhile
            continue
    raise RuntimeError("the node found no free metrics port in three tries")


def run_command(config: Path, data_dir: Path, bus: str, metrics_port: int = 0) -> list[str]:
    """``poc-node run`` with a config, a data dir, a bus and a metrics port (0: none)."""
    return [
        str(POC_NODE),
        "run",
        "--config",
        str(config),
        "--bus",
        bus,
        "--data-dir",
        str(data_dir),
        "--metrics-port",
        str(metrics_port),
    ]


def _start_node_once(directory: Path, bus: str, config: Path, ready_timeout: float) -> NodeProcess:
    metrics_port = free_port()
    log = directory / "node.log"
    offset = log.stat().st_size if log.exists() else 0  # a restart appends to the log
    level = (yaml.safe_load(config.read_text()) or {}).get("node", {}).get("log_level", "INFO")
    says_where_it_listens = level in ("DEBUG", "INFO")

    def this_run() -> str:
        with log.open("rb") as lines:
            lines.seek(offset)
            return lines.read().decode(errors="replace")

    process = subprocess.Popen(
        run_command(config, directory / "data", bus, metrics_port),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    node = NodeProcess(process, directory / "data", metrics_port, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if "cannot serve metrics and health" in this_run():
                raise PortTaken(f"port {metrics_port} was taken")
            raise RuntimeError(f"node exited with {process.returncode}:\n{node.log_text()}")
        # Until it says it listens, what answers on the port may be another test's node.
        if says_where_it_listens and "event=http_listening" not in this_run():
            time.sleep(0.2)
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2):
                return node
        except OSError:
            time.sleep(0.2)
    node.stop(signal.SIGKILL)
    raise TimeoutError(f"node not ready in {ready_timeout} s:\n{node.log_text()}")
