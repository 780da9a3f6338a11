from pathlib import Path

import pytest

from node.errors import ConfigError
from node.ops.committee_file import load_committee
from node.ops.config import DEFAULT_CONFIG

EXAMPLE = DEFAULT_CONFIG.parent / "committee.example.yaml"


def test_the_example_committee_loads():
    committee = load_committee(EXAMPLE)
    assert len(committee.members) == 4 and committee.total_stake == 400
    assert committee.round_seconds == 10 and len(committee.digest()) == 32


def test_every_problem_is_reported_with_its_path(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "genesis_ms: -1\nround_seconds: 10\nepoch_rounds: 0\nextra: 1\nmembers:\n"
        "  - {name: a, public_key: 'zz', stake: 0}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_committee(path)
    message = str(caught.value)
    for fragment in (
        "genesis_ms",
        "epoch_rounds",
        "extra",
        "members.0.public_key",
        "members.0.stake",
    ):
        assert fragment in message


def test_duplicate_members_are_refused(tmp_path: Path):
    key = "ab" * 32
    path = tmp_path / "c.yaml"
    path.write_text(
        f"genesis_ms: 0\nround_seconds: 10\nepoch_rounds: 6\nmembers:\n"
        f"  - {{name: a, public_key: '{key}', stake: 1}}\n"
        f"  - {{name: b, public_key: '{key}', stake: 1}}\n"
    )
    with pytest.raises(ConfigError, match="share a public key"):
        load_committee(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_committee(tmp_path / "missing.yaml")
