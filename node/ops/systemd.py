"""systemd's readiness protocol (``Type=notify``), without a library.

systemd passes a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an
abstract name starting with ``@``); a service writes ``READY=1`` there once
it serves, ``STOPPING=1`` when it begins to stop, and ``STATUS=...`` lines
for ``systemctl status``. Without the variable (not under systemd) every call
does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("poc.systemd")


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines to systemd; True if a manager was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as error:
        log.warning("event=sd_notify_failed socket=%r error=%r", address, str(error))
        return False
    return True
