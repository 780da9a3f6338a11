"""The history H of finalized fused embeddings and the index that searches it.

Every honest validator must hold bit-identical history, because every later
gap score is computed from it (DESIGN.md §6, §7). So the history stores the
float16 values that consensus certified, never a validator's own floats, and
the exact index (faiss's ``IndexFlatL2`` kernel) is the reference that
approximate indexes are measured against.

Two exact indexes implement ``EmbeddingIndex``: ``HistoryIndex`` (faiss's
kernel over float16 blocks, on the CPU, the default) and
``rewards.history_torch.TorchHistoryIndex`` (torch, on the CPU or a CUDA
device; its own module, so that importing the rewards does not import
torch). ``History(dim, index=...)`` takes the factory of its
per-modality indexes, e.g. ``partial(TorchHistoryIndex, device="cuda")``.
Both propose candidates only: gap scores re-rank them exactly in float64
(``rewards.curiosity``), so validators running either index agree on every
score as long as the true k nearest are among the candidates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from rewards.faiss_blas import faiss

BLOCK_ROWS = 1 << 15
"""Rows of a ``HistoryIndex`` block: 16 MiB of float16 at d = 256, widened in one 32 MiB buffer."""

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
    """The history H: exact kNN over float16 storage, searched by faiss's BLAS kernel.

    Vectors are stored as the float16 values that consensus certified, in
    blocks of ``block_rows`` rows that are filled in turn (the history grows
    without ever being copied), with each row's squared norm beside it in
    float32: 0.5 GiB per million embeddings at d = 256, half of a float32
    index. A search widens one block at a time to float32 (every float16 is a
    float32, so nothing is rounded), in one buffer shared by the process,
    ranks its rows with faiss's exact ``knn_L2sqr``, the kernel of
    ``IndexFlatL2``, and merges each block's nearest by (distance, id).
    ``vectors`` gives back exactly what was added.
    """

    def __init__(self, dim: int, *, block_rows: int = BLOCK_ROWS) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self._dim = dim
        self._block_rows = block_rows
        self._blocks: list[npt.NDArray[np.float16]] = []
        self._norms: list[npt.NDArray[np.float32]] = []
        self._size = 0
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD

    @property
    def dim(self) -> int:
        """Dimension of the embeddings."""
        return self._dim

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks allocated (the last one may be partly filled)."""
        return sum(block.nbytes for block in self._blocks) + sum(n.nbytes for n in self._norms)

    def __len__(self) -> int:
        return self._size

    def add(self, vectors: npt.NDArray[Any]) -> None:
        """Append embeddings, quantized to float16 first (see ``quantize``)."""
        half = quantize(vectors, self._dim)
        done = 0
        while done < len(half):
            block, row = divmod(self._size, self._block_rows)
            if block == len(self._blocks):
                self._blocks.append(np.empty((self._block_rows, self._dim), dtype=np.float16))
                self._norms.append(np.empty(self._block_rows, dtype=np.float32))
            count = min(self._block_rows - row, len(half) - done)
            rows = half[done : done + count]
            self._blocks[block][row : row + count] = rows
            wide = rows.astype(np.float32)
            self._norms[block][row : row + count] = np.einsum("ij,ij->i", wide, wide)
            self._size += count
            done += count

    def neighbours(self, queries: npt.NDArray[Any], k: int) -> npt.NDArray[np.int64]:
        """Ids ``[n, k]`` of the k nearest embeddings by faiss's float32 L2, ties by id.

        Queries are quantized to float16 like the history. Ids equal at the
        last bits of a float32 distance may come in either order, and a batch
        may order near-ties differently from a single query (the BLAS path
        rounds otherwise): callers that need a deterministic answer re-rank
        the ids in float64 (``gap_scores`` does). Where the history holds
        fewer than ``k`` embeddings the missing ids are -1.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        half = quantize(queries, self._dim)
        found = np.full((len(half), k), -1, dtype=np.int64)
        if len(half) == 0 or self._size == 0:
            return found
        wanted = min(k, self._size)
        wide_queries = np.ascontiguousarray(half, dtype=np.float32)
        best_distances = np.empty((len(half), 0), dtype=np.float32)
        best_ids = np.empty((len(half), 0), dtype=np.int64)
        with _scratch.lock:
            for number, block in enumerate(self._blocks):
                start = number * self._block_rows
                count = min(self._block_rows, self._size - start)
                if count <= 0:
                    break
                rows = _scratch.rows(count, self._dim)
                _widen(block[:count], rows)
                distances, ids = _knn(wide_queries, rows, self._norms[number][:count], wanted)
                best_distances = np.concatenate([best_distances, distances], axis=1)
                best_ids = np.concatenate([best_ids, np.where(ids >= 0, ids + start, -1)], axis=1)
                order = np.lexsort((best_ids, best_distances), axis=1)[:, :wanted]
                best_distances = np.take_along_axis(best_distances, order, axis=1)
                best_ids = np.take_along_axis(best_ids, order, axis=1)
        found[:, :wanted] = best_ids
        return found

    def vectors(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Float64 copies of the stored embeddings, for exact recomputation."""
        return np.asarray(self.stored(ids), dtype=np.float64)

    def stored(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The stored float16 embeddings as float32 (exact)."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((flat.size, self._dim), dtype=np.float32)
        if flat.size == 0:
            return out
        if flat.min() < 0 or flat.max() >= self._size:
            raise IndexError(f"ids out of range 0..{self._size - 1}")
        blocks, rows = np.divmod(flat, self._block_rows)
        for block in np.unique(blocks).tolist():
            chosen = np.flatnonzero(blocks == block)
            out[chosen] = self._blocks[block][rows[chosen]]
        return out


def _knn(
    queries: npt.NDArray[np.float32],
    rows: npt.NDArray[np.float32],
    norms: npt.NDArray[np.float32],
    k: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """faiss's exact ``knn_L2sqr``: the k nearest ``rows`` of each query, nearest first.

    Missing neighbours (fewer than k rows) get id -1 and an infinite distance.
    """
    distances = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    faiss.knn_L2sqr(
        faiss.swig_ptr(queries),
        faiss.swig_ptr(rows),
        rows.shape[1],
        len(queries),
        len(rows),
        k,
        faiss.swig_ptr(distances),
        faiss.swig_ptr(ids),
        faiss.swig_ptr(norms),
    )
    missing = ids < 0
    distances[missing] = np.inf
    return distances, ids


_SLICE_ELEMENTS = 32_767
"""torch converts a tensor of fewer elements than its grain size (32768) on the calling thread."""


class _Scratch:
    """One float32 buffer for widening blocks, shared by every index of the process.

    A fresh 32 MiB buffer for every search would cost its page faults every
    time, and one per searching thread would be kept by every thread of the
    node's work pool. Searches of H are serialised already (the node holds
    its history lock), so one buffer under a lock costs no waiting.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._buffer = np.empty(0, dtype=np.float32)

    def rows(self, count: int, dim: int) -> npt.NDArray[np.float32]:
        """A ``[count, dim]`` view of the buffer, grown if needed; hold ``lock`` while using it."""
        if len(self._buffer) < count * dim:
            self._buffer = np.empty(count * dim, dtype=np.float32)
        return self._buffer[: count * dim].reshape(count, dim)


_scratch = _Scratch()


def _widen(half: npt.NDArray[np.float16], out: npt.NDArray[np.float32]) -> None:
    """Copy float16 rows into float32 ``out`` (exact), with the CPU's F16C conversion.

    torch converts with the CPU's conversion instructions, ten times faster
    than numpy's cast (1M rows of 256: 0.05 s against 0.6 s); every node has
    torch for its encoders. It is imported here, so that importing the
    rewards does not import torch.

    The rows are converted in slices small enough that torch keeps them on
    the calling thread: its thread pool, woken for every block, took cores
    from the encoders and from faiss's own threads (three to five times the
    CPU of a serial copy on a busy machine).
    """
    import torch

    source, target = torch.from_numpy(half), torch.from_numpy(out)
    step = max(1, _SLICE_ELEMENTS // half.shape[1])
    for start in range(0, len(half), step):
        target[start : start + step].copy_(source[start : start + step])


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

        Held like H, in float16: 0.5 GiB per million pair items at d = 256.
        """
        if self._own is None:
            self._own = History(self._dim, self._new_index)
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
