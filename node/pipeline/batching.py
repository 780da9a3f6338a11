"""How items are grouped for the encoders: a micro-batch size and a wait per modality.

The encoders' throughput depends on the batch differently for each modality
and with the threads that run it (``bench/bench_encoders.py``): in the node's
single-threaded encoder workers text, pictures and speech are fastest in
batches of about 8 and clips of 4 (one process on two threads would want 32
or more captions). A lone item waits at most ``wait_ms`` for
company while the encoder is idle; while it is busy, items gather by
themselves and the next batch starts the moment it is free.

Captions are padded to the longest of their batch, so a batch of one long
caption and seven short ones costs eight long ones: taken in arrival order,
the world's captions (4 to 12 wordpieces) computed 1.35 wordpieces for each
one they hold. Items that wait therefore batch with the ones of like length
(``companions``): the oldest always goes, so nothing waits for ever, with
those of the next ``LOOKAHEAD`` batches that pad it least.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
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


LOOKAHEAD = 4
"""Batches of waiting items a batch may choose its items from (``companions``).

The wider the choice, the less padding and the longer an odd item may wait:
simulated on the world's captions with a deep queue, arrival order computes
1.35 wordpieces for each one held, 2 batches 1.15, 4 batches 1.07, 16 batches
1.01; an item's longest wait (in items served before it) grows from 128 to
158 at 4. Every batch takes the oldest item, so one among the oldest
``LOOKAHEAD * size`` items goes within that many batches at worst."""


def companions(lengths: Sequence[int], size: int) -> list[int]:
    """Which of the waiting items (their input ``lengths``, oldest first) make the
    next batch of at most ``size``: indices, in arrival order.

    The oldest (index 0) always goes. With it go the ``size - 1`` others that
    waste the least padding (a batch computes its size times its longest length):
    ``size`` neighbours in length order, the oldest of each length, the older
    ones on a tie. Items of one length (pictures, sounds, clips) go in arrival
    order.
    """
    count = len(lengths)
    if count <= size:
        return list(range(count))
    of_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        of_length.setdefault(length, []).append(index)  # oldest first
    order = sorted(range(count), key=lambda i: (lengths[i], i))
    oldest = order.index(0)
    best: tuple[tuple[int, int], list[int]] | None = None
    for start in range(max(0, oldest - size + 1), min(oldest, count - size) + 1):
        wanted = Counter(lengths[i] for i in order[start : start + size])
        batch = sorted(i for length, n in wanted.items() for i in of_length[length][:n])
        waste = size * max(wanted) - sum(length * n for length, n in wanted.items())
        key = (waste, sum(batch))
        if best is None or key < best[0]:
            best = (key, batch)
    assert best is not None  # a window holding the oldest always exists
    return best[1]
