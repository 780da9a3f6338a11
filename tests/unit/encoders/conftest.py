"""One untrained shard per test session: loading MiniLM takes seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoders.shard import Shard
from encoders.weights import create_untrained_shard, sha256_file


@pytest.fixture(scope="session")
def shard_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_untrained_shard(tmp_path_factory.mktemp("weights"), seeds=(0, 1))


@pytest.fixture(scope="session")
def shard(shard_manifest: Path) -> Shard:
    return Shard.load(shard_manifest, sha256_file(shard_manifest))
