"""The embedded MQTT broker of the default setup (amqtt, in the node's process).

It binds the loopback address it is given, never 0.0.0.0 (amqtt's default),
and runs without the $SYS and packet-logging plugins. It speaks MQTT 3.1.1
only; deployments that need v5, shared subscriptions or ACLs use Mosquitto.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from amqtt.broker import Broker

log = logging.getLogger("poc.broker")


@asynccontextmanager
async def embedded_broker(host: str, port: int) -> AsyncIterator[Broker]:
    """Run an amqtt broker on ``host:port`` for the duration of the context."""
    config = {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 1024}
        },
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    broker = Broker(config)
    await broker.start()
    log.info("event=embedded_broker_started host=%s port=%d", host, port)
    try:
        yield broker
    finally:
        await broker.shutdown()
        log.info("event=embedded_broker_stopped")
