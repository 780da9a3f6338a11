"""Proof of Curiosity: how well an embedding fills a gap in the history (DESIGN.md §6).

For an embedding e and its k nearest neighbours nn_1..nn_k in the history H:
centroid ``C = normalize(mean(nn_i))`` (the centre of the gap, put back on
the unit sphere where every embedding lives), gap size
``d_nn = mean ||C - nn_i||``, ``d_E = ||e - C||``. The item qualifies only if
``d_E <= d_nn * ratio`` (it sits inside the gap rather than beside the
cluster), and its score is ``d_nn`` (the bigger the gap it fills, the more it
is worth). The ratio is calibrated beside the weights (``training.scoring``).

A round's items are scored one after another (``score_in_order``), each
against H plus the round's earlier non-duplicate items, so a datum sent
twice fills its gap once; an item within the near-duplicate radius of its
modality (or whose bytes were already accepted) is a duplicate and earns
nothing.

Scores feed consensus, so they must not depend on batch size, on the order in
which an index returns near-ties, nor on which index a validator runs. Hence:
queries are quantized to float16 like the history; the index only proposes
candidate ids (a few more than k); the k nearest are chosen again by exact
float64 distance with ties broken by id; and every sum runs over the chosen
neighbours in id order.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from rewards.history import History, Searchable, quantize

PPM = 1_000_000
"""Fixed-point scale of scores: parts per million."""

DEFAULT_K = 64
DEFAULT_QUALIFY_RATIO = 1.0
"""Only for callers without a calibration; the node always uses the manifest's."""


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


_UNIT_ROUNDOFF = 2.0**-24
"""float32's unit roundoff."""


Candidates = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]
"""Candidate ids and their stored values (float16, so exact in float32)."""


def _shortlist(
    query: npt.NDArray[np.float64], parts: Sequence[Candidates], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Of a query's candidates, those that may be among its k nearest, as float64.

    The candidates come in parts (H's, the round's earlier items), so that
    none is copied before it is kept. Their squared distances
    ``|p|^2 - 2 p.q + |q|^2`` in float32 (one BLAS call per part) err by at
    most ``e = 2 (d + 3) u (max |p|^2 + |q|^2)`` for dimension d and unit
    roundoff u. Every candidate whose exact distance is within the k nearest
    (ties included) lies within ``2e`` of the k-th smallest float32 distance;
    keeping those within ``16e`` of it leaves the exact float64 re-ranking
    that follows (``_neighbourhood``) the very k nearest it would find among
    all candidates, at a fraction of the cost: the candidates of every
    modality's index (hundreds) shrink to about k.
    """
    parts = [(ids, points) for ids, points in parts if len(ids)]
    if sum(len(ids) for ids, _ in parts) <= k:
        return _joined(parts)
    near = query.astype(np.float32)
    own = float(near @ near)
    norms = [np.einsum("ij,ij->i", points, points) for _, points in parts]
    distances = [
        n - 2 * (points @ near) + np.float32(own)
        for n, (_, points) in zip(norms, parts, strict=True)
    ]
    kth = float(np.partition(np.concatenate(distances), k - 1)[k - 1])
    largest = max(float(n.max()) for n in norms)
    error = 2 * (parts[0][1].shape[1] + 3) * _UNIT_ROUNDOFF * (largest + own)
    limit = kth + 16 * error
    return _joined(
        [
            (ids[d <= limit], points[d <= limit])
            for (ids, points), d in zip(parts, distances, strict=True)
        ]
    )


def _joined(parts: Sequence[Candidates]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The parts' ids and values together, the values as float64."""
    if not parts:
        raise ValueError("no candidates")
    return (
        np.concatenate([ids for ids, _ in parts]),
        np.concatenate([points for _, points in parts]).astype(np.float64),
    )


def _neighbourhood(
    query: npt.NDArray[np.float64],
    ids: npt.NDArray[np.int64],
    points: npt.NDArray[np.float64],
    k: int,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """The rows of ``points`` of the query's k nearest (in id order) and their centroid.

    The k nearest by exact float64 distance, ties broken by id; the centroid
    is their mean put back on the unit sphere.
    """
    order = np.lexsort((ids, _squared_distances(points, query)))[:k]
    chosen = order[np.argsort(ids[order], kind="stable")]
    mean = points[chosen].sum(axis=0) / k
    norm = float(np.sqrt((mean * mean).sum()))
    centroid = mean / norm if norm > 0 else mean
    return chosen, centroid


def _score_one(
    query: npt.NDArray[np.float64],
    ids: npt.NDArray[np.int64],
    points: npt.NDArray[np.float64],
    k: int,
    qualify_ratio: float,
) -> GapScore:
    """Score one query from its candidate ids and their float64 vectors."""
    chosen, centroid = _neighbourhood(query, ids, points, k)
    neighbours = points[chosen]
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
    history: Searchable,
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
    return [
        _score_one(query, ids, points, k, qualify_ratio)
        for query, ids, points in _candidates(history, half, k)
    ]


def _candidates(
    history: Searchable, half: npt.NDArray[np.float16], k: int
) -> Iterator[tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """Each query (as float64), its distinct candidate ids and their float64 vectors."""
    candidates = history.neighbours(half, candidate_count(k, len(history)))
    for query, row in zip(half.astype(np.float64), candidates, strict=True):
        ids = np.unique(row[row >= 0])
        if len(ids) < k:
            raise ValueError(f"index returned {len(ids)} distinct ids, fewer than k = {k}")
        yield query, *_shortlist(query, [(ids, history.stored(ids))], k)


@dataclass(frozen=True)
class Neighbourhood:
    """The k nearest of a query that its gap score is computed from."""

    ids: npt.NDArray[np.int64]
    """History ids of the k nearest, nearest first (ties by id)."""
    distances: npt.NDArray[np.float64]
    """Their exact L2 distances to the (float16-quantized) query."""
    centroid: npt.NDArray[np.float64]
    """The centre of the gap: the normalized mean of the k nearest."""


def neighbourhoods(
    history: Searchable, queries: npt.NDArray[Any], k: int = DEFAULT_K
) -> list[Neighbourhood]:
    """The neighbourhoods ``gap_scores`` judges ``queries`` by (the same search and re-ranking).

    Empty while the history holds fewer than k embeddings.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    half = quantize(queries, history.dim)
    size = len(history)
    if size < k or len(half) == 0:
        return []
    found: list[Neighbourhood] = []
    for query, ids, points in _candidates(history, half, k):
        chosen, centroid = _neighbourhood(query, ids, points, k)
        distances = np.sqrt(_squared_distances(points[chosen], query))
        nearest_first = np.lexsort((ids[chosen], distances))
        found.append(Neighbourhood(ids[chosen][nearest_first], distances[nearest_first], centroid))
    return found


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


@dataclass(frozen=True)
class ScoringRules:
    """What decides a round's scores, identical on every member of a committee.

    ``qualify_ratio`` and ``duplicate_radius`` (cosine distance, per
    modality name) are calibrated beside the weights; the others come from
    the configuration.
    """

    k: int = DEFAULT_K
    qualify_ratio: float = DEFAULT_QUALIFY_RATIO
    duplicate_radius: Mapping[str, float] = field(default_factory=dict)
    pair_bonus_ppm: int = 1_500_000
    junk_radius: Mapping[str, float] = field(default_factory=dict)
    """Per modality: an item this close (cosine) to known junk repeats it."""

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")
        if not self.qualify_ratio >= 0:
            raise ValueError(f"qualify_ratio must be >= 0, got {self.qualify_ratio}")
        for name, radii in (("duplicate", self.duplicate_radius), ("junk", self.junk_radius)):
            for modality, radius in radii.items():
                if not 0 <= radius < 2:
                    raise ValueError(f"{name} radius of {modality} must be in [0, 2), got {radius}")
        if self.pair_bonus_ppm < 0:
            raise ValueError(f"pair_bonus_ppm must be >= 0, got {self.pair_bonus_ppm}")


@dataclass(frozen=True)
class RoundItem:
    """One item of a round's submission, as scoring sees it."""

    modality: str
    vector: npt.NDArray[Any]
    byte_duplicate: bool = False
    """Its bytes were accepted before (an earlier round, or an earlier item of this one)."""
    own: npt.NDArray[Any] | None = None
    """A fused pair item's own embedding (``vector`` is the fused one); None otherwise."""


@dataclass(frozen=True)
class ItemVerdict:
    """A duplicate item earns nothing and joins nothing; any other has a gap score."""

    duplicate: bool
    gap: GapScore
    nearest: float
    """Cosine distance to the nearest item of its modality in the context (2.0 if none)."""
    junk: float = 2.0
    """Cosine distance to the nearest known junk of its modality (2.0 if none)."""


def cosine_distances(
    points: npt.NDArray[np.float64], query: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Row-wise ``1 - cos`` in float64, summed the same way whatever the batch."""
    dots = (points * query).sum(axis=1)
    norms = np.sqrt((points * points).sum(axis=1)) * float(np.sqrt((query * query).sum()))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return np.asarray(1.0 - cos, dtype=np.float64)


NEAREST_CANDIDATES = 4
"""Candidates asked of a modality's index before the exact cosine check."""


CHUNK = 64
"""Items whose history rows are fetched together while a round is scored (bounds the memory)."""


def score_in_order(
    history: History, submissions: Sequence[Sequence[RoundItem]], rules: ScoringRules
) -> list[list[ItemVerdict]]:
    """Score a round's submissions in the given order (DESIGN.md §3, §6).

    Each submission's items are judged against the context: H plus the
    non-duplicate items of the submissions before it. An item is a duplicate
    when its bytes were accepted before, when it lies within the
    near-duplicate radius of its modality of a context item of the same
    modality, or when it lies within the junk radius of its modality of the
    known junk beside H (``History.junk``). Near-duplicates are judged on the
    embeddings as scored (fused for a pair) and also on the items' own
    embeddings (``RoundItem.own``, ``History.own``): fusion moves an item
    by more than the radius, so a copy of a datum paid in a pair, sent
    alone or beside another partner, is near its own embedding only
    (docs/DESIGN-NOTES.md, *Scoring*). Otherwise an item gets the gap score
    against the context (nothing scores while the context holds fewer than k
    embeddings). The two items of one submission share one context. History
    searches are batched; the kNN is exact over H and the round's earlier
    items together, with ties broken by id (H's ids, then the round's items
    in order).

    One search of H serves both the gap candidates and the near-duplicate
    candidates (``History.search``), and the stored rows of every CHUNK items'
    candidates are fetched at once: per item, only its own arithmetic is left.
    """
    k = rules.k
    flat = [item for items in submissions for item in items]
    if not flat:
        return [[] for _ in submissions]
    queries = quantize(np.stack([np.asarray(item.vector) for item in flat]), history.dim)
    exact = queries.astype(np.float64)
    size = len(history)
    modalities = [item.modality for item in flat]
    gap_candidates, near = history.search(
        queries, max(candidate_count(k, size), 1), modalities, NEAREST_CANDIDATES
    )
    junk_distance = _nearest_distances(
        history.junk, modalities, queries, exact, set(rules.junk_radius)
    )
    own_queries = quantize(
        np.stack([np.asarray(item.vector if item.own is None else item.own) for item in flat]),
        history.dim,
    )
    own_exact = own_queries.astype(np.float64)
    paired = [item.own is not None for item in flat]
    # An item's own embedding against H's own embeddings of pair items, and (where it
    # differs from the scored one) against H itself, whose single items are their own.
    own_distance = np.minimum(
        _nearest_distances(history.own, modalities, own_queries, own_exact),
        _nearest_distances(history, modalities, own_queries, own_exact, only=paired),
    )
    rows = _HistoryRows(history, gap_candidates if size else None, near)

    context = _Context(exact.shape)  # the round's non-duplicate items so far, in order
    verdicts: list[list[ItemVerdict]] = []
    position = 0
    for items in submissions:
        own: list[ItemVerdict] = []
        for item in items:
            query = exact[position]
            pool = np.concatenate([rows.near(position), context.of(item.modality)])
            nearest = float(cosine_distances(pool, query).min()) if len(pool) else 2.0
            own_pool = np.concatenate([context.of(item.modality), context.own_of(item.modality)])
            if len(own_pool):
                own_near = float(cosine_distances(own_pool, own_exact[position]).min())
                nearest = min(nearest, own_near)
            nearest = min(nearest, float(own_distance[position]))
            radius = rules.duplicate_radius.get(item.modality, 0.0)
            to_junk = float(junk_distance[position])
            if (
                item.byte_duplicate
                or nearest <= radius
                or to_junk <= rules.junk_radius.get(item.modality, -1.0)
            ):
                own.append(ItemVerdict(True, NOT_SCORED, nearest, to_junk))
            elif size + len(context) < k:
                own.append(ItemVerdict(False, NOT_SCORED, nearest, to_junk))
            else:
                ids, points = _shortlist(query, [rows.gap(position), context.candidates(size)], k)
                own.append(
                    ItemVerdict(
                        False,
                        _score_one(query, ids, points, k, rules.qualify_ratio),
                        nearest,
                        to_junk,
                    )
                )
            position += 1
        start = position - len(items)
        for offset, verdict in enumerate(own):
            if not verdict.duplicate:
                context.add(items[offset].modality, exact[start + offset])
                if items[offset].own is not None:
                    context.add_own(items[offset].modality, own_exact[start + offset])
        verdicts.append(own)
    return verdicts


def _nearest_distances(
    index: History | None,
    modalities: Sequence[str],
    queries: npt.NDArray[np.float16],
    exact: npt.NDArray[np.float64],
    wanted: Collection[str] | None = None,
    only: Sequence[bool] | None = None,
) -> npt.NDArray[np.float64]:
    """Per query: cosine distance to the nearest embedding of its modality in ``index``.

    2.0 where there is none, where ``index`` is None, for modalities not in
    ``wanted`` (every one when None) and for queries that ``only`` leaves out.
    """
    distances = np.full(len(queries), 2.0)
    if index is None:
        return distances
    by_modality: dict[str, list[int]] = {}
    for position, modality in enumerate(modalities):
        if only is None or only[position]:
            by_modality.setdefault(modality, []).append(position)
    for modality, positions in by_modality.items():
        if wanted is not None and modality not in wanted:
            continue
        found = index.nearest_of(modality, queries[positions], NEAREST_CANDIDATES)
        for position, row in zip(positions, found, strict=True):
            if (row >= 0).any():
                points = index.vectors(row[row >= 0])
                distances[position] = float(cosine_distances(points, exact[position]).min())
    return distances


class _HistoryRows:
    """The stored rows of the round's candidates from H, fetched CHUNK items at a time.

    Per item, the gap candidates are its distinct ids in increasing order (as
    ``np.unique`` gives them) and the near-duplicate candidates its own
    modality's nearest, in the order the search found them.
    """

    def __init__(
        self,
        history: History,
        gap_candidates: npt.NDArray[np.int64] | None,
        near: npt.NDArray[np.int64],
    ) -> None:
        self._history = history
        self._gap = gap_candidates
        self._near = near
        self._chunk = -1
        self._ids = np.empty(0, dtype=np.int64)
        self._stored = np.empty((0, history.dim), dtype=np.float32)
        self._sorted = np.empty((0, 0), dtype=np.int64)
        self._keep = np.empty((0, 0), dtype=bool)

    def _load(self, position: int) -> int:
        """Fetch the chunk of ``position``; returns the position's row within it."""
        chunk, offset = divmod(position, CHUNK)
        if chunk != self._chunk:
            span = slice(chunk * CHUNK, (chunk + 1) * CHUNK)
            wanted = [self._near[span].reshape(-1)]
            if self._gap is not None:
                ordered = np.sort(self._gap[span], axis=1)
                repeated = np.zeros(ordered.shape, dtype=bool)
                repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
                self._sorted, self._keep = ordered, (ordered >= 0) & ~repeated
                wanted.append(ordered.reshape(-1))
            ids = np.unique(np.concatenate(wanted))
            self._ids = ids[ids >= 0]
            self._stored = self._history.stored(self._ids)
            self._chunk = chunk
        return offset

    def near(self, position: int) -> npt.NDArray[np.float64]:
        """The item's near-duplicate candidates from H, as float64."""
        self._load(position)
        row = self._near[position]
        row = row[row >= 0]
        return np.asarray(self._stored[np.searchsorted(self._ids, row)], dtype=np.float64)

    def gap(self, position: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The item's distinct gap candidates from H (increasing ids) and their stored rows."""
        if self._gap is None:
            return np.empty(0, dtype=np.int64), self._stored[:0]
        offset = self._load(position)
        found = self._sorted[offset][self._keep[offset]]
        return found, self._stored[np.searchsorted(self._ids, found)]


class _ByModality:
    """Float64 rows per modality, appended in place (room for every item of the round)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._capacity = shape
        self._rows: dict[str, npt.NDArray[np.float64]] = {}
        self._count: dict[str, int] = {}

    def of(self, modality: str) -> npt.NDArray[np.float64]:
        rows = self._rows.get(modality)
        if rows is None:
            return np.empty((0, self._capacity[1]), dtype=np.float64)
        return rows[: self._count[modality]]

    def add(self, modality: str, row: npt.NDArray[np.float64]) -> None:
        if modality not in self._rows:
            self._rows[modality] = np.empty(self._capacity, dtype=np.float64)
            self._count[modality] = 0
        self._rows[modality][self._count[modality]] = row
        self._count[modality] += 1


class _Context:
    """The round's non-duplicate items so far: ids after H's, in the order they joined.

    Kept in place, as float32 (exactly their float16 values) for the gap
    search and as float64 per modality for the near-duplicate check (the
    scored embeddings, and apart the own embeddings of pair items), so that
    no item copies the whole context.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._rows32 = np.empty(shape, dtype=np.float32)
        self._size = 0
        self._scored = _ByModality(shape)
        self._own = _ByModality(shape)

    def __len__(self) -> int:
        return self._size

    def candidates(self, first_id: int) -> Candidates:
        """Their ids (``first_id`` onwards) and stored values, for the gap search."""
        return first_id + np.arange(self._size, dtype=np.int64), self._rows32[: self._size]

    def of(self, modality: str) -> npt.NDArray[np.float64]:
        """The scored rows of one modality (float64)."""
        return self._scored.of(modality)

    def add(self, modality: str, row: npt.NDArray[np.float64]) -> None:
        self._rows32[self._size] = row
        self._size += 1
        self._scored.add(modality, row)

    def own_of(self, modality: str) -> npt.NDArray[np.float64]:
        """The own embeddings of the modality's pair items so far (float64)."""
        return self._own.of(modality)

    def add_own(self, modality: str, row: npt.NDArray[np.float64]) -> None:
        self._own.add(modality, row)
