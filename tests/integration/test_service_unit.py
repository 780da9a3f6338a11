"""The shipped systemd unit, and the node's side of ``Type=notify``."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import POC_NODE, ROOT, start_mosquitto, start_node

UNIT = ROOT / "config" / "systemd" / "poc-node.service"


def _installed_copy(tmp_path: Path) -> Path:
    """The unit as installed here: its ExecStart must name an executable that exists."""
    text = UNIT.read_text()
    assert "ExecStart=/opt/poc-node/.venv/bin/poc-node run" in text
    unit = tmp_path / "poc-node.service"
    unit.write_text(text.replace("/opt/poc-node/.venv/bin/poc-node", str(POC_NODE)))
    return unit


def test_the_unit_verifies_and_is_sandboxed(tmp_path: Path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    unit = _installed_copy(tmp_path)
    verify = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # systemd's own score of the sandboxing: 0 (locked down) .. 10 (exposed); 4.0 at most.
    security = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=40", str(unit)],
        capture_output=True,
        text=True,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    for key, value in {
        "Type": "notify",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/poc-node",
        "Restart": "on-failure",
        "StateDirectory": "poc-node",
    }.items():
        assert settings.get(key) == value, f"{key}={settings.get(key)}, wanted {value}"


def test_the_node_tells_systemd_when_it_is_ready_and_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    address = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(address))
    listener.settimeout(120)
    broker = start_mosquitto(tmp_path)  # before: Mosquitto speaks the protocol too
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))  # what systemd passes a Type=notify unit
    node = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{broker.port}")
    try:
        ready = listener.recv(4096).decode()
        assert "READY=1" in ready.splitlines(), ready
        assert node.metric("poc_ready") == 1.0
        assert node.stop() == 0, node.log_text()[-2000:]
        stopping = listener.recv(4096).decode()
        assert "STOPPING=1" in stopping.splitlines(), stopping
    finally:
        node.stop()
        broker.stop()
        listener.close()
