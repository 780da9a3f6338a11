"""The history H of finalized fused embeddings and the index that searches it.

Every honest validator must hold bit-identical history, because every later
gap score is computed from it (DESIGN.md §6, §7). So the history stores the
float16 values that consensus certified, never a validator's own floats, and
the exact index (faiss ``IndexFlatL2``) is the reference that approximate
indexes are measured against.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import faiss
import numpy as np
import numpy.typing as npt

BLAS_THRESHOLD = 20
"""Batches of at least this many queries go through BLAS in faiss.

faiss's default (128000) keeps ordinary batches on the slow one-query-at-a-time
path: with d = 256 a batch of 64 over 1M vectors takes 1.7 s by default and
0.39 s with this threshold (ENVIRONMENT.md, kNN). The two paths round the
float32 distances differently, which is why scores never use faiss's distances.
"""


def quantize(vectors: npt.ArrayLike, dim: int) -> npt.NDArray[np.float16]:
    """Return ``vectors`` as a C-contiguous ``[n, dim]`` float16 array.

    Converting straight to float16 (not via float32) gives every validator the
    same values whatever dtype its encoder produced. Non-finite values, or
    values that overflow float16, are refused: one of them would poison every
    distance computed against it.
    """
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"expected an array of shape [n, {dim}], got {array.shape}")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"expected a numeric array, got dtype {array.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        half = np.ascontiguousarray(array.astype(np.float16))
    if not np.isfinite(half).all():
        raise ValueError("vectors must be finite and within float16 range")
    return half


@runtime_checkable
class EmbeddingIndex(Protocol):
    """What gap scoring needs from a history index (exact or approximate).

    Implementations must store the float16 values given to ``add`` exactly and
    return them from ``vectors`` as float64, so that scores recomputed from the
    returned ids do not depend on which index a validator runs; only the choice
    of candidate ids may differ (approximate recall).
    """

    @property
    def dim(self) -> int:
        """Dimension of the embeddings."""
        ...

    def __len__(self) -> int:
        """Number of embeddings in the history; ids are ``0 .. len - 1``."""
        ...

    def add(self, vectors: npt.NDArray[Any]) -> None:
        """Append ``[n, dim]`` embeddings; they get the next ``n`` ids in order."""
        ...

    def neighbours(self, queries: npt.NDArray[Any], k: int) -> npt.NDArray[np.int64]:
        """Ids ``[n, k]`` of (about) the k nearest stored embeddings to each query."""
        ...

    def vectors(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """The stored embeddings with these ids, as float64 copies ``[len(ids), dim]``."""
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
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        if flat.size == 0:
            return np.empty((0, self._dim), dtype=np.float64)
        if flat.min() < 0 or flat.max() >= len(self):
            raise IndexError(f"ids out of range 0..{len(self) - 1}")
        stored = self._index.reconstruct_batch(flat)
        return np.asarray(stored, dtype=np.float64)
