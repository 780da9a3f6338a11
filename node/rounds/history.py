"""The history H as every member holds it: the genesis history, then certified items.

The genesis history's known junk (noise of every modality) is kept beside H,
not in it: an item close to it repeats it (``rewards.curiosity``).

The genesis history ships beside the weights (pinned by the manifest); the
rest is read from the store in commit order. Both ``poc-node run`` and
``poc-node audit`` start from here, so they can only agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from encoders.shard import Shard
from encoders.weights import read_genesis
from node.rounds.records import from_float16
from rewards.history import History


def load_history(shard: Shard, items: Sequence[tuple[str, bytes]]) -> History:
    """H from the shard's genesis history and the certified ``(modality, vector)`` items."""
    history = History(shard.dim)
    if shard.genesis is not None:
        genesis = read_genesis(shard.genesis, shard.dim)
        if len(genesis.vectors):
            history.add(genesis.modalities, genesis.vectors)
        if len(genesis.junk_vectors):
            history.add_junk(genesis.junk_modalities, genesis.junk_vectors)
    if items:
        history.add(
            [modality for modality, _ in items],
            np.stack([from_float16(vector) for _, vector in items]),
        )
    return history
