"""The history H of finalized fused embeddings and the index that searches it.

Every honest validator must hold bit-identical history, because every later
gap score is computed from it (DESIGN.md §6, §7). So the history stores the
float16 values that consensus certified, never a validator's own floats, and
the exact index (faiss ``IndexFlatL2``) is the reference that approximate
indexes are measured against.

Two exact indexes implement ``EmbeddingIndex``: ``HistoryIndex`` (faiss, on
the CPU, the default) and ``rewards.history_torch.TorchHistoryIndex`` (torch,
on the CPU or a CUDA device; its own module, so that importing the rewards
does not import torch). ``History(dim, index=...)`` takes the factory of its
per-modality indexes, e.g. ``partial(TorchHistoryIndex, device="cuda")``.
Both propose candidates only: gap scores re-rank them exactly in float64
(``rewards.curiosity``), so validators running either index agree on every
score as long as the true k nearest are among the candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from rewards.faiss_blas import faiss

BLAS_THRESHOLD = 20
"""Batches of at least this many queries go through BLAS in faiss.

faiss's default (128000) keeps ordinary batches on the slow one-query-at-a-time
path: with d = 256 a batch of 64 over 1M vectors takes 1.7 s by default and
0.39 s with this threshold (ENVIRONMENT.md, kNN; 0.27 s with the BLAS kernel
of the CPU, ``rewards.faiss_blas``). The two paths round the
float32 distances differently, which is why scores never use faiss's distances.
"""


def set_search_threads(threads: int) -> None:
    """Threads faiss may use for one search (0: one per core, faiss's default).

    A validator encodes and searches at once: searches of a round's few
    hundred items gain little from more threads, and faiss's threads wait
    for each other whenever an encoder takes their core.
    """
    if threads > 0:
        faiss.omp_set_num_threads(threads)


def quantize(vectors: npt.ArrayLike, dim: int) -> npt.NDArray[np.float16]:
    """Return ``vectors`` as a C-contiguous ``[n, dim]`` float16 array.

    Converting straight to float16 (not via float32) gives every validator the
    same values whatever dtype its encoder produced. Non-finite values, or
    values that overflow float16, are refused: one of them would poison every
    distance computed against it. An array that is already C-contiguous
    float16 is returned as it is, not copied (a history of a million rows is
    read in float16).
    """
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"expected an array of shape [n, {dim}], got {array.shape}")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"expected a numeric array, got dtype {array.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        half = np.ascontiguousarray(array.astype(np.float16, copy=False))
    if not np.isfinite(half).all():
        raise ValueError("vectors must be finite and within float16 range")
    return half


@runtime_checkable
class Searchable(Protocol):
    """What gap scoring reads from a history (an exact or approximate index, or ``History``).

    Implementations return the stored float16 values exactly, as float64, so
    that scores recomputed from the returned ids do not depend on which index
    a validator runs; only the choice of candidate ids may differ
    (approximate recall).
    """

    @property
    def dim(self) -> int:
        """Dimension of the embeddings."""
        ...

    def __len__(self) -> int:
        """Number of embeddings in the history; ids are ``0 .. len - 1``."""
        ...

    def neighbours(self, queries: npt.NDArray[Any], k: int) -> npt.NDArray[np.int64]:
        """Ids ``[n, k]`` of (about) the k nearest stored embeddings to each query."""
        ...

    def vectors(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """The stored embeddings with these ids, as float64 copies ``[len(ids), dim]``."""
        ...

    def stored(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The same values as ``vectors``, as float32 (exact: every float16 is a float32)."""
        ...


@runtime_checkable
class EmbeddingIndex(Searchable, Protocol):
    """A single-modality index: ``Searchable`` plus appending in id order."""

    def add(self, vectors: npt.NDArray[Any]) -> None:
        """Append ``[n, dim]`` embeddings, stored as float16; they get the next ``n`` ids."""
        ...


class HistoryIndex:
    """The history H: exact kNN (faiss ``IndexFlatL2``, the reference).

    Vectors are stored as the float16 values that consensus certified; faiss
    holds them as float32, which represents every float16 exactly, so
    ``vectors`` gives back exactly what was added.
    """

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self._dim = dim
        self._index = faiss.IndexFlatL2(dim)
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD

    @property
    def dim(self) -> int:
        """Dimension of the embeddings."""
        return self._dim

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, vectors: npt.NDArray[Any]) -> None:
        """Append embeddings, quantized to float16 first (see ``quantize``)."""
        half = quantize(vectors, self._dim)
        if len(half):
            self._index.add(half.astype(np.float32))

    def neighbours(self, queries: npt.NDArray[Any], k: int) -> npt.NDArray[np.int64]:
        """Ids ``[n, k]`` of the k nearest embeddings by faiss's float32 L2.

        Queries are quantized to float16 like the history. Ids equal at the
        last bits of a float32 distance may come in either order, and a batch
        may order near-ties differently from a single query: callers that need
        a deterministic answer re-rank the ids in float64 (``gap_scores`` does).
        Where the history holds fewer than ``k`` embeddings the missing ids
        are -1.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        half = quantize(queries, self._dim)
        if len(half) == 0:
            return np.empty((0, k), dtype=np.int64)
        _, ids = self._index.search(half.astype(np.float32), k)
        return np.asarray(ids, dtype=np.int64)

    def vectors(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Float64 copies of the stored embeddings, for exact recomputation."""
        return np.asarray(self.stored(ids), dtype=np.float64)

    def stored(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The stored embeddings as faiss holds them: float32, exactly the float16 values."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        if flat.size == 0:
            return np.empty((0, self._dim), dtype=np.float32)
        if flat.min() < 0 or flat.max() >= len(self):
            raise IndexError(f"ids out of range 0..{len(self) - 1}")
        return np.asarray(self._index.reconstruct_batch(flat), dtype=np.float32)


class HalfHistoryIndex(HistoryIndex):
    """``HistoryIndex`` holding float16 (faiss ``IndexScalarQuantizer``, ``QT_fp16``).

    Half the memory of the float32 flat index; distances are computed from
    the stored float16 values, which decode exactly, so the ids it finds are
    those of an exact search over them. Without BLAS it suits small batches
    of few neighbours: the near-duplicate search of pair items' own
    embeddings (``History.own``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._index = faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2
        )


IndexFactory = Callable[[int], EmbeddingIndex]
"""Makes an empty exact index of a dimension: ``HistoryIndex``, or a ``TorchHistoryIndex``."""


class _Ids:
    """A growable int64 array (amortised doubling), so that lookups stay numpy-fast."""

    def __init__(self) -> None:
        self._data = np.empty(64, dtype=np.int64)
        self._size = 0

    def extend(self, values: npt.NDArray[np.int64]) -> None:
        need = self._size + len(values)
        if need > len(self._data):
            grown = np.empty(max(need, 2 * len(self._data)), dtype=np.int64)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : need] = values
        self._size = need

    @property
    def array(self) -> npt.NDArray[np.int64]:
        return self._data[: self._size]


class History:
    """The history H with the modality of every embedding: one exact index per modality.

    Ids are global, in the order embeddings were added, whatever their
    modality; ``neighbours`` searches every modality's index and returns the
    union of their candidates, so the k nearest of H are always among them
    (each index holds its own k nearest). ``nearest_of`` searches one
    modality only: near-duplicates are judged between items of one modality
    (DESIGN.md §3), because a fused caption and the picture it was paired
    with lie closer together than two renderings of one picture.

    ``index`` makes each modality's exact index (and the known junk's):
    ``HistoryIndex`` by default, or a ``TorchHistoryIndex`` factory.
    """

    def __init__(self, dim: int, index: IndexFactory = HistoryIndex) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self._dim = dim
        self._new_index = index
        self._indexes: dict[str, EmbeddingIndex] = {}
        self._global: dict[str, _Ids] = {}
        self._modality_of = _Ids()  # position of the modality in self._names
        self._local = _Ids()
        self._names: list[str] = []
        self._junk: History | None = None
        self._own: History | None = None

    @property
    def junk(self) -> History | None:
        """Known junk beside H (the genesis history's noise): never a gap, never scored."""
        return self._junk

    def add_junk(self, modalities: Sequence[str], vectors: npt.NDArray[Any]) -> None:
        """Remember embeddings of known junk; they are not part of H (``len`` ignores them)."""
        if self._junk is None:
            self._junk = History(self._dim, self._new_index)
        self._junk.add(modalities, vectors)

    @property
    def own(self) -> History | None:
        """The own (unfused) embeddings of H's pair items, for near-duplicates only.

        A pair item is in H as its fused embedding, which its partner moves
        by more than the near-duplicate radius; its own embedding is what a
        copy of the datum lies near, whatever the copy is paired with
        (``rewards.curiosity.score_in_order``). Never a gap, never scored.
        """
        return self._own

    def add_own(self, modalities: Sequence[str], vectors: npt.NDArray[Any]) -> None:
        """Remember the own embeddings of pair items joining H (``len`` ignores them).

        Held in float16 (``HalfHistoryIndex``) where H is faiss's float32 index:
        0.5 GiB per million pair items instead of 1 GiB.
        """
        if self._own is None:
            own_index = HalfHistoryIndex if self._new_index is HistoryIndex else self._new_index
            self._own = History(self._dim, own_index)
        self._own.add(modalities, vectors)

    @property
    def dim(self) -> int:
        """Dimension of the embeddings."""
        return self._dim

    def __len__(self) -> int:
        return len(self._local.array)

    def modalities(self) -> dict[str, int]:
        """How many embeddings of each modality H holds."""
        return {name: len(index) for name, index in sorted(self._indexes.items())}

    def add(self, modalities: Sequence[str], vectors: npt.NDArray[Any]) -> None:
        """Append embeddings with their modalities; they get the next ids in order."""
        half = quantize(vectors, self._dim)
        if len(modalities) != len(half):
            raise ValueError(f"{len(modalities)} modalities for {len(half)} vectors")
        start = len(self)
        labels = np.asarray(list(modalities), dtype=object)
        codes = np.empty(len(half), dtype=np.int64)
        local = np.empty(len(half), dtype=np.int64)
        for modality in dict.fromkeys(modalities):
            rows = np.flatnonzero(labels == modality)
            index = self._indexes.get(modality)
            if index is None:
                index = self._indexes[modality] = self._new_index(self._dim)
                self._global[modality] = _Ids()
                self._names.append(modality)
            codes[rows] = self._names.index(modality)
            local[rows] = len(index) + np.arange(len(rows))
            self._global[modality].extend(start + rows)
            index.add(half if len(rows) == len(half) else half[rows])
        self._modality_of.extend(codes)
        self._local.extend(local)

    def neighbours(self, queries: npt.NDArray[Any], k: int) -> npt.NDArray[np.int64]:
        """Global ids ``[n, >= k]``: each modality's k nearest; -1 where missing."""
        return self.search(queries, k)[0]

    def search(
        self, queries: npt.NDArray[Any], k: int, own: Sequence[str] = (), nearest: int = 0
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``neighbours``, and from the same search each query's nearest of its own modality.

        Returns the global ids ``[n, >= k]`` that ``neighbours`` gives and,
        for query i of modality ``own[i]``, the ids ``[n, nearest]`` that
        ``nearest_of(own[i], ..., nearest)`` gives: the first columns of that
        modality's block, which its index returns nearest first (-1 where
        missing). One scan of every index serves both, where scoring a round
        used to scan the item's own modality a second time. Each index is
        asked for at least ``nearest``, so a small k never cuts them short.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if own and len(own) != len(queries):
            raise ValueError(f"{len(own)} modalities for {len(queries)} queries")
        half = quantize(queries, self._dim)
        parts = [np.full((len(half), 0), -1, dtype=np.int64)]
        near = np.full((len(half), nearest), -1, dtype=np.int64)
        labels = np.asarray(list(own), dtype=object)
        for modality, index in sorted(self._indexes.items()):
            local = index.neighbours(half, min(max(k, nearest), len(index)))
            table = self._global[modality].array
            block = np.where(local >= 0, table[np.maximum(local, 0)], -1)
            parts.append(block)
            if nearest and own:
                rows = np.flatnonzero(labels == modality)
                width = min(nearest, block.shape[1])
                near[rows, :width] = block[rows, :width]
        found = np.concatenate(parts, axis=1)
        if found.shape[1] < k:
            pad = np.full((len(half), k - found.shape[1]), -1, dtype=np.int64)
            found = np.concatenate([found, pad], axis=1)
        return found, near

    def vectors(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Float64 copies of the stored embeddings with these global ids."""
        return np.asarray(self.stored(ids), dtype=np.float64)

    def stored(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The stored embeddings with these global ids, as float32 (exact)."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((flat.size, self._dim), dtype=np.float32)
        if flat.size == 0:
            return out
        if flat.min() < 0 or flat.max() >= len(self):
            raise IndexError(f"ids out of range 0..{len(self) - 1}")
        codes = self._modality_of.array[flat]
        local = self._local.array[flat]
        if len(self._names) == 1:
            return self._indexes[self._names[0]].stored(local)
        for code in np.unique(codes).tolist():
            rows = np.flatnonzero(codes == code)
            out[rows] = self._indexes[self._names[code]].stored(local[rows])
        return out

    def modality_of(self, ids: npt.NDArray[np.int64]) -> list[str]:
        """The modality of each global id."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        return [self._names[code] for code in self._modality_of.array[flat].tolist()]

    def nearest_of(
        self, modality: str, queries: npt.NDArray[Any], count: int
    ) -> npt.NDArray[np.int64]:
        """Global ids ``[n, count]`` of (about) the nearest embeddings of ``modality``; -1 missing.

        Like ``HistoryIndex.neighbours``, ids near-tied in float32 may come in
        either order: callers recompute exact distances.
        """
        half = quantize(queries, self._dim)
        index = self._indexes.get(modality)
        if index is None or len(index) == 0:
            return np.full((len(half), count), -1, dtype=np.int64)
        local = index.neighbours(half, count)
        table = self._global[modality].array
        return np.where(local >= 0, table[np.maximum(local, 0)], -1)
