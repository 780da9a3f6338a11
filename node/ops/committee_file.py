"""The committee file shared by every member (``poc-node run --committee PATH``).

```yaml
genesis_ms: 1764201600000   # Unix ms of round 0
round_seconds: 10
epoch_rounds: 60
members:
  - {name: v1, public_key: <64 hex>, stake: 100}
```

Validated in full (every bad key reported with its path); its digest — the
consensus digest of the committee, which seeds the beacon chain — is what
operators compare to know they run the same committee.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from consensus.committee import Committee, Member
from node.errors import ConfigError


class _MemberEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64)]
    public_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    stake: Annotated[int, Field(gt=0, lt=2**63)]


class _CommitteeEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    genesis_ms: Annotated[int, Field(ge=0, lt=2**63)]
    round_seconds: Annotated[int, Field(gt=0, le=3600)]
    epoch_rounds: Annotated[int, Field(gt=0)]
    members: Annotated[list[_MemberEntry], Field(min_length=1)]

    @field_validator("members")
    @classmethod
    def _distinct(cls, members: list[_MemberEntry]) -> list[_MemberEntry]:
        keys = [member.public_key for member in members]
        names = [member.name for member in members]
        if len(set(keys)) != len(keys):
            raise ValueError("two members share a public key")
        if len(set(names)) != len(names):
            raise ValueError("two members share a name")
        return members


def load_committee(path: Path) -> Committee:
    """Read and validate a committee file."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read committee file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"committee file {path} is not valid YAML: {error}") from None
    try:
        entry = _CommitteeEntry.model_validate(document)
    except ValidationError as error:
        problems = "\n".join(
            f"  {'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
        )
        raise ConfigError(f"invalid committee file {path}:\n{problems}") from None
    return Committee(
        genesis_ms=entry.genesis_ms,
        round_seconds=entry.round_seconds,
        epoch_rounds=entry.epoch_rounds,
        members=tuple(
            Member(member.name, bytes.fromhex(member.public_key), member.stake)
            for member in entry.members
        ),
    )
