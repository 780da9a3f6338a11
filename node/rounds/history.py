"""The history H as every member holds it: the genesis history, then certified items.

The genesis history's known junk (noise of every modality) is kept beside H,
not in it: an item close to it repeats it (``rewards.curiosity``).

The genesis history ships beside the weights (pinned by the manifest); the
rest is read from the store in commit order. Both ``poc-node run`` and
``poc-node audit`` start from here, so they can only agree.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy.typing as npt

from encoders.shard import Shard
from encoders.weights import read_genesis
from node.errors import NodeError
from node.ops.threads import trim_heap
from rewards.history import History, HistoryIndex, IndexFactory


def history_index(device: str, index: str) -> IndexFactory:
    """The exact index of ``scoring.device`` and ``scoring.index`` (auto: faiss on CPU)."""
    if index == "faiss" or (index == "auto" and device == "cpu"):
        return HistoryIndex
    import torch

    from rewards.history_torch import TorchHistoryIndex

    if device == "cuda" and not torch.cuda.is_available():
        raise NodeError("scoring.device is cuda, but torch sees no CUDA device here")
    return functools.partial(TorchHistoryIndex, device=device)


def load_history(
    shard: Shard,
    chunks: Iterable[tuple[Sequence[str], npt.NDArray[Any]]],
    index: IndexFactory = HistoryIndex,
    own_chunks: Iterable[tuple[Sequence[str], npt.NDArray[Any]]] = (),
) -> History:
    """H from the shard's genesis history and the certified items, in chunks.

    ``chunks`` are ``(modalities, float16 [n, dim])`` in commit order, as
    ``Store.history_chunks`` reads them; each is added before the next is
    read, so loading a history of a million items holds the index and one
    chunk, not a second copy of the history. ``index`` makes each modality's
    exact index (:func:`history_index`). ``own_chunks`` are the own
    embeddings of H's pair items, kept beside it for near-duplicates
    (``History.own``), read the same way.
    """
    history = History(shard.dim, index)
    if shard.genesis is not None:
        genesis = read_genesis(shard.genesis, shard.dim)
        if len(genesis.vectors):
            history.add(genesis.modalities, genesis.vectors)
        if len(genesis.junk_vectors):
            history.add_junk(genesis.junk_modalities, genesis.junk_vectors)
    for modalities, vectors in chunks:
        history.add(modalities, vectors)
    for modalities, vectors in own_chunks:
        history.add_own(modalities, vectors)
    # The chunks' rows were many small objects: glibc keeps their freed heap
    # (about 150 MiB after a million rows) unless asked to give it back.
    trim_heap()
    return history
