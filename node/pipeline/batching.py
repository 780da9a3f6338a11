"""How items are grouped for the encoders: a micro-batch size and a wait per modality.

The encoders' throughput depends on the batch differently for each modality
and with the threads that run it (``bench/bench_encoders.py``): in the node's
single-threaded encoder workers text, pictures and speech are fastest in
batches of about 8 and clips of 4 (one process on two threads would want 32
or more captions). A lone item waits at most ``wait_ms`` for
company while the encoder is idle; while it is busy, items gather by
themselves and the next batch starts the moment it is free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from encoders.modality import Modality


@dataclass(frozen=True)
class Batching:
    """The micro-batch of one modality."""

    size: int
    wait_ms: int


@dataclass(frozen=True)
class BatchPolicy:
    """The micro-batch of every modality."""

    batches: Mapping[Modality, Batching]

    @classmethod
    def of(cls, encoders: Any) -> BatchPolicy:
        """From the ``encoders`` config section (``encoders.batch``)."""
        return cls(
            {
                Modality(name): Batching(section.size, section.wait_ms)
                for name, section in encoders.batch.items()
            }
        )

    def size(self, modality: Modality) -> int:
        return self.batches[modality].size

    def wait_s(self, modality: Modality) -> float:
        return self.batches[modality].wait_ms / 1000

    def without_waiting(self) -> BatchPolicy:
        """The same sizes, no wait (a replay: every item is there already)."""
        return BatchPolicy({m: Batching(b.size, 0) for m, b in self.batches.items()})

    def describe(self) -> str:
        return " ".join(
            f"{modality}:{batch.size}/{batch.wait_ms}ms" for modality, batch in self.batches.items()
        )
