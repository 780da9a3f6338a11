"""An exact history index in torch, on the CPU or a CUDA device (DESIGN.md §6, §7).

``TorchHistoryIndex`` implements ``EmbeddingIndex`` like ``HistoryIndex``
and proposes the same candidates, so ``History(dim, index=partial(
TorchHistoryIndex, device="cuda"))`` scores exactly as the faiss index does:
gap scores re-rank the candidates in float64 from the stored float16 values
(``rewards.curiosity``). It lives in its own module so that importing the
rewards does not import torch.

Why it answers as the reference does:

- The history is stored as the float16 values that consensus certified, in
  one tensor on the device that grows by doubling (a million ``add`` calls
  copy the history about twenty times, not a million; ``capacity``
  preallocates), with each row's squared norm beside it in float32.
  ``vectors`` returns the float16 values exactly, as float64.
- Rows are ranked by ``|x|^2 - 2 q.x`` in float32 on the device: the
  squared distance less ``|q|^2``, which is the same for every row of a
  query (faiss's BLAS path expands the distance the same way). Queries are
  quantized to float16 first, so every input of the product is a float16
  value, exact in float32 and in TF32 too: allowing TF32 matrix products
  loses no input bit.
- The history is scanned in chunks of at most ``chunk_rows`` rows and the
  queries in blocks of at most ``query_block``, so a search holds at most
  one ``[query_block, chunk_rows]`` block of distances (and one float32 copy
  of a chunk), whatever the size of the history: a 100M history never
  becomes a ``[queries, N]`` matrix.
- Each chunk's k nearest are chosen by the key (distance, id), then merged
  with the running k nearest by the same key: equal float32 distances go to
  the smaller id, whatever the chunking. (``topk`` on the distances finds
  them unless the k-th and the next distance of a chunk are equal, which
  the search detects and then ranks that block's rows by key.) Like faiss, the float32 value of a
  distance may still differ in its last bits between batch shapes (matrix
  products block their sums differently), so near-ties may come in another
  order; the exact re-ranking makes that harmless.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from rewards.history import quantize

CHUNK_ROWS = 1 << 16
"""Rows of the history per distance block: 64 MiB of float32 at d = 256."""

QUERY_BLOCK = 64
"""Queries per distance block: with ``CHUNK_ROWS``, 16 MiB of distances and 32 MiB of keys."""

_MAX_ROWS = 1 << 32
"""Ids live in the low 32 bits of a search key."""


def _sortable(distances: torch.Tensor) -> torch.Tensor:
    """Int64 keys ordered like the float32 ``distances`` (negative ones too), times 2^32."""
    bits = distances.contiguous().view(torch.int32)
    flipped = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return flipped.to(torch.int64) << 32


class TorchHistoryIndex:
    """The history H: exact kNN over float16 storage, in torch on ``device``.

    ``chunk_rows`` and ``query_block`` bound the memory of one search (see
    the module docstring); they change speed, never which ids are nearest
    (up to float32 near-ties). Growing holds the old and the new storage at
    once: pass ``capacity`` when the size of the history is known.
    """

    def __init__(
        self,
        dim: int,
        device: str | torch.device = "cpu",
        *,
        capacity: int = 0,
        chunk_rows: int = CHUNK_ROWS,
        query_block: int = QUERY_BLOCK,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if capacity < 0 or chunk_rows <= 0 or query_block <= 0:
            raise ValueError(
                f"capacity must be >= 0, chunk_rows and query_block positive, "
                f"got {capacity}, {chunk_rows}, {query_block}"
            )
        self._dim = dim
        self._device = torch.device(device)
        self._chunk_rows = chunk_rows
        self._query_block = query_block
        self._size = 0
        self._stored = torch.empty((capacity, dim), dtype=torch.float16, device=self._device)
        self._norms = torch.empty(capacity, dtype=torch.float32, device=self._device)

    @property
    def dim(self) -> int:
        """Dimension of the embeddings."""
        return self._dim

    @property
    def device(self) -> torch.device:
        """Where the history is stored and searched."""
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (the capacity, not only the rows in use)."""
        return self._stored.numel() * 2 + self._norms.numel() * 4

    def __len__(self) -> int:
        return self._size

    def add(self, vectors: npt.NDArray[Any]) -> None:
        """Append embeddings, quantized to float16 first (see ``quantize``)."""
        half = quantize(vectors, self._dim)
        count = len(half)
        if count == 0:
            return
        need = self._size + count
        if need > _MAX_ROWS:
            raise ValueError(f"a TorchHistoryIndex holds at most {_MAX_ROWS} embeddings")
        if need > len(self._stored):
            self._grow(max(need, 2 * len(self._stored), 1024))
        rows = torch.from_numpy(half if half.flags.writeable else half.copy())
        self._stored[self._size : need].copy_(rows)
        for start in range(self._size, need, self._chunk_rows):
            stop = min(start + self._chunk_rows, need)
            wide = self._stored[start:stop].float()
            self._norms[start:stop] = (wide * wide).sum(dim=1)
        self._size = need

    def _grow(self, capacity: int) -> None:
        stored = torch.empty((capacity, self._dim), dtype=torch.float16, device=self._device)
        norms = torch.empty(capacity, dtype=torch.float32, device=self._device)
        stored[: self._size] = self._stored[: self._size]
        norms[: self._size] = self._norms[: self._size]
        self._stored, self._norms = stored, norms

    def neighbours(self, queries: npt.NDArray[Any], k: int) -> npt.NDArray[np.int64]:
        """Ids ``[n, k]`` of the k nearest embeddings by float32 L2, ties by id.

        Queries are quantized to float16 like the history. Where the history
        holds fewer than ``k`` embeddings the missing ids are -1.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        half = quantize(queries, self._dim)
        found = np.full((len(half), k), -1, dtype=np.int64)
        if len(half) == 0 or self._size == 0:
            return found
        wanted = min(k, self._size)
        wide = torch.from_numpy(half.astype(np.float32)).to(self._device)
        with torch.inference_mode():
            for start in range(0, len(half), self._query_block):
                block = wide[start : start + self._query_block]
                keys, tied = self._nearest_keys(block, wanted, exact_ties=False)
                if bool(tied):
                    keys, _ = self._nearest_keys(block, wanted, exact_ties=True)
                ids = (keys & 0xFFFFFFFF).cpu().numpy()
                found[start : start + len(block), :wanted] = ids
        return found

    def _nearest_keys(
        self, queries: torch.Tensor, wanted: int, *, exact_ties: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted keys ``[q, wanted]`` of the nearest rows (distance bits, then id), and a flag.

        Without ``exact_ties`` each chunk keeps the ``wanted`` smallest
        distances that ``topk`` picks, which are the right rows unless the
        next smallest distance equals the last one kept: then the flag (a
        device tensor, read once by the caller) says to search again with
        ``exact_ties``, which ranks every row of a chunk by its key.
        """
        rows = min(self._chunk_rows, self._size)
        wide = torch.empty((rows, self._dim), dtype=torch.float32, device=self._device)
        scratch = torch.empty(len(queries) * rows, dtype=torch.float32, device=self._device)
        tied = torch.zeros((), dtype=torch.bool, device=self._device)
        best: torch.Tensor | None = None
        for start in range(0, self._size, rows):
            stop = min(start + rows, self._size)
            count = stop - start
            chunk = wide[:count]
            chunk.copy_(self._stored[start:stop])
            distances = scratch[: len(queries) * count].view(len(queries), count)
            torch.addmm(self._norms[start:stop], queries, chunk.T, alpha=-2.0, out=distances)
            if exact_ties or count <= wanted:
                ids = torch.arange(start, stop, dtype=torch.int64, device=self._device)
                keys = _sortable(distances) + ids
                nearest = keys.topk(min(wanted, count), largest=False, sorted=False).values
            else:
                values, ids = distances.topk(wanted + 1, dim=1, largest=False)
                tied |= (values[:, wanted] == values[:, wanted - 1]).any()
                nearest = _sortable(values[:, :wanted]) + ids[:, :wanted] + start
            if best is not None:
                nearest = torch.cat([best, nearest], dim=1)
                nearest = nearest.topk(min(wanted, nearest.shape[1]), largest=False).values
            best = nearest
        assert best is not None
        return best.sort(dim=1).values, tied

    def vectors(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Float64 copies of the stored float16 embeddings, for exact recomputation."""
        return np.asarray(self.stored(ids), dtype=np.float64)

    def stored(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The stored float16 embeddings as float32 (exact)."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        if flat.size == 0:
            return np.empty((0, self._dim), dtype=np.float32)
        if flat.min() < 0 or flat.max() >= self._size:
            raise IndexError(f"ids out of range 0..{self._size - 1}")
        chosen = self._stored[torch.from_numpy(flat).to(self._device)]
        return np.asarray(chosen.cpu().numpy(), dtype=np.float32)
