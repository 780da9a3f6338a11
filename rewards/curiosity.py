"""Proof of Curiosity: how well an embedding fills a gap in the history (DESIGN.md §6).

For an embedding e and its k nearest neighbours nn_1..nn_k in the history H:
centroid ``C = mean(nn_i)``, gap size ``d_nn = mean ||C - nn_i||``,
``d_E = ||e - C||``. The item qualifies only if ``d_E <= d_nn * ratio``
(it sits inside the gap rather than beside the cluster), and its score is
``d_nn`` (the bigger the gap it fills, the more it is worth).

Scores feed consensus, so they must not depend on batch size, on the order in
which an index returns near-ties, nor on which index a validator runs. Hence:
queries are quantized to float16 like the history; the index only proposes
candidate ids (a few more than k); the k nearest are chosen again by exact
float64 distance with ties broken by id; and every sum runs over the chosen
neighbours in id order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rewards.history import EmbeddingIndex, quantize

PPM = 1_000_000
"""Fixed-point scale of scores: parts per million."""

DEFAULT_K = 16
DEFAULT_QUALIFY_RATIO = 1 / 3


@dataclass(frozen=True)
class GapScore:
    """The gap score of one embedding.

    ``score_ppm`` is ``round(d_nn * 1e6)`` when ``qualified``, else 0; the
    floats are kept for results and metrics, never for signed messages.
    While the history holds fewer than k embeddings nothing scores and both
    distances are 0.0.
    """

    qualified: bool
    score_ppm: int
    d_nn: float
    d_e: float


NOT_SCORED = GapScore(qualified=False, score_ppm=0, d_nn=0.0, d_e=0.0)


def candidate_count(k: int, history_size: int) -> int:
    """How many candidates to ask the index for before the exact re-ranking.

    Twice k leaves room for ids whose float32 distance from faiss (or whose
    approximate rank from HNSW) is off by a few places, at a cost of k more
    vectors copied per query.
    """
    return min(history_size, 2 * k)


def _squared_distances(
    points: npt.NDArray[np.float64], query: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Row-wise squared L2 distances, summed the same way whatever the batch."""
    diff = points - query
    return np.asarray((diff * diff).sum(axis=1), dtype=np.float64)


def _score_one(
    query: npt.NDArray[np.float64],
    ids: npt.NDArray[np.int64],
    points: npt.NDArray[np.float64],
    k: int,
    qualify_ratio: float,
) -> GapScore:
    """Score one query from its candidate ids and their float64 vectors."""
    order = np.lexsort((ids, _squared_distances(points, query)))[:k]
    chosen = order[np.argsort(ids[order], kind="stable")]
    neighbours = points[chosen]
    centroid = neighbours.sum(axis=0) / k
    d_nn = float(np.sqrt(_squared_distances(neighbours, centroid)).sum() / k)
    diff = query - centroid
    d_e = float(np.sqrt((diff * diff).sum()))
    qualified = d_e <= d_nn * qualify_ratio
    return GapScore(
        qualified=qualified,
        score_ppm=round(d_nn * PPM) if qualified else 0,
        d_nn=d_nn,
        d_e=d_e,
    )


def gap_scores(
    history: EmbeddingIndex,
    queries: npt.NDArray[Any],
    k: int = DEFAULT_K,
    qualify_ratio: float = DEFAULT_QUALIFY_RATIO,
) -> list[GapScore]:
    """Gap scores of ``queries`` (``[n, dim]``) against ``history``, in query order.

    One batched index search serves all queries. Results are identical
    whether a query is scored alone or in a batch, and are recomputed in
    float64 from the float16 values that the history stores.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if not qualify_ratio >= 0:
        raise ValueError(f"qualify_ratio must be >= 0, got {qualify_ratio}")
    half = quantize(queries, history.dim)
    size = len(history)
    if size < k:
        return [NOT_SCORED] * len(half)
    if len(half) == 0:
        return []
    candidates = history.neighbours(half, candidate_count(k, size))
    scores: list[GapScore] = []
    for query, row in zip(half.astype(np.float64), candidates, strict=True):
        ids = np.unique(row[row >= 0])
        if len(ids) < k:
            raise ValueError(f"index returned {len(ids)} distinct ids, fewer than k = {k}")
        scores.append(_score_one(query, ids, history.vectors(ids), k, qualify_ratio))
    return scores


def submission_score(
    items: Sequence[GapScore], valid_pair: bool, pair_bonus_ppm: int = 1_500_000
) -> int:
    """A submission's score: its qualified items' scores, times the pair bonus.

    The bonus rewards a valid cross-modal pair (DESIGN.md §6); it is applied in
    integers and rounded down so every validator gets the same figure.
    """
    if pair_bonus_ppm < 0:
        raise ValueError(f"pair_bonus_ppm must be >= 0, got {pair_bonus_ppm}")
    total = sum(item.score_ppm for item in items if item.qualified)
    if valid_pair:
        total = total * pair_bonus_ppm // PPM
    return total
