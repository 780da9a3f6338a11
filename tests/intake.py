"""The node's intake on a real store, without a bus or encoders: for tests that hand
it messages directly (``receive`` verifies, checks and stores; nothing is prepared)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from node.bus.client import Topics
from node.daemon import committee_of_one
from node.intake.admission import Intake
from node.intake.keys import SigningKey
from node.intake.signing import MessageSigner
from node.ops.config import DEFAULT_CONFIG, load_config
from node.ops.metrics import Metrics
from node.rounds.chain import BeaconChain
from node.store.sqlite import Store
from node.store.thread import StoreThread


class BareIntake:
    """An :class:`Intake` on a SQLite file in ``directory``, with the default config."""

    def __init__(self, directory: Path) -> None:
        config = load_config(DEFAULT_CONFIG)
        key = SigningKey.generate()
        committee = committee_of_one(config, key)
        self.store = StoreThread(Store(directory / "node.db"))
        self.metrics = Metrics(CollectorRegistry())
        unused: Any = None  # decoding and encoding are not reached by receive()
        self.intake = Intake(
            config,
            MessageSigner(key),
            self.store,
            unused,
            unused,
            BeaconChain(committee),
            committee,
            self.metrics,
            Topics(config.bus.topic_prefix),
            lambda: None,
        )

    def internal_errors(self) -> float:
        return float(self.metrics.internal_errors.labels(stage="intake")._value.get())

    def close(self) -> None:
        self.store.close()
