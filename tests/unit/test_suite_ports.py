"""The suite's listening ports stay out of the ephemeral range outgoing connections use."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.conftest import _PORTS, free_port


def test_free_ports_come_from_below_the_ephemeral_range_and_are_not_repeated():
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(20000 <= port < ephemeral for port in ports)


def test_a_port_something_listens_on_is_skipped():
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port + 1))
        listener.listen()
        following = free_port()
    assert following != port + 1
    if port + 2 < _PORTS.stop:  # (else the turn wrapped to the slice's start)
        assert following == port + 2
