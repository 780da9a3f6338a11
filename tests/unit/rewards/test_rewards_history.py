"""The exact history indexes and gap scores against a brute-force numpy reference.

Every index test runs on faiss's ``HistoryIndex`` (in one block, and in
blocks small enough that a search spans several) and on ``TorchHistoryIndex``
(on the CPU, with chunks and query blocks small enough that a search spans
several of each).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest

from rewards import (
    EmbeddingIndex,
    GapScore,
    History,
    HistoryIndex,
    RoundItem,
    ScoringRules,
    gap_scores,
    score_in_order,
    submission_score,
)
from rewards.history import IndexFactory
from rewards.history_torch import TorchHistoryIndex

DIM = 32

SmallTorchIndex = partial(TorchHistoryIndex, chunk_rows=300, query_block=7)
SmallBlockIndex = partial(HistoryIndex, block_rows=300)


@pytest.fixture(
    params=[HistoryIndex, SmallBlockIndex, SmallTorchIndex], ids=["faiss", "faiss-blocks", "torch"]
)
def make_index(request: pytest.FixtureRequest) -> IndexFactory:
    factory: IndexFactory = request.param
    return factory


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def brute_force(history: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k nearest rows by float64 L2 on float16 values, ties by id."""
    h = history.astype(np.float16).astype(np.float64)
    q = queries.astype(np.float16).astype(np.float64)
    d = ((q[:, None, :] - h[None, :, :]) ** 2).sum(axis=2)
    ids = np.arange(len(h))
    return np.stack([np.lexsort((ids, row))[:k] for row in d])


def reference_score(history: np.ndarray, query: np.ndarray, k: int, ratio: float) -> GapScore:
    h = history.astype(np.float16).astype(np.float64)
    q = query.astype(np.float16).astype(np.float64)
    nn = h[brute_force(history, query[None], k)[0]]
    c = nn.mean(axis=0)
    c = c / np.linalg.norm(c)  # the centre of the gap, back on the sphere
    d_nn = float(np.linalg.norm(nn - c, axis=1).mean())
    d_e = float(np.linalg.norm(q - c))
    ok = d_e <= d_nn * ratio
    return GapScore(ok, round(d_nn * 1e6) if ok else 0, d_nn, d_e)


def test_history_is_an_embedding_index(make_index: IndexFactory) -> None:
    assert isinstance(make_index(DIM), EmbeddingIndex)


def test_neighbours_match_brute_force(make_index: IndexFactory) -> None:
    rng = np.random.default_rng(1)
    history, queries = unit_rows(rng, 2000), unit_rows(rng, 50)
    index = make_index(DIM)
    index.add(history)
    assert len(index) == 2000
    got = index.neighbours(queries, 16)
    want = brute_force(history, queries, 16)
    assert got.dtype == np.int64 and got.shape == (50, 16)
    assert (np.sort(got, axis=1) == np.sort(want, axis=1)).all()


def test_vectors_are_the_float16_values_added(make_index: IndexFactory) -> None:
    rng = np.random.default_rng(2)
    history = unit_rows(rng, 10)
    index = make_index(DIM)
    index.add(history)
    got = index.vectors(np.array([3, 0, 9]))
    assert got.dtype == np.float64
    assert (got == history[[3, 0, 9]].astype(np.float16).astype(np.float64)).all()


def test_add_rejects_bad_shapes_and_non_finite_values(make_index: IndexFactory) -> None:
    index = make_index(DIM)
    with pytest.raises(ValueError):
        index.add(np.zeros((2, DIM + 1)))
    with pytest.raises(ValueError):
        index.add(np.full((1, DIM), np.nan))
    with pytest.raises(ValueError):
        index.add(np.full((1, DIM), 1e6))
    with pytest.raises(IndexError):
        index.vectors(np.array([0]))
    assert len(index) == 0


def test_neighbours_of_a_small_history_are_padded(make_index: IndexFactory) -> None:
    index = make_index(DIM)
    index.add(unit_rows(np.random.default_rng(3), 3))
    ids = index.neighbours(unit_rows(np.random.default_rng(4), 1), 5)
    assert sorted(ids[0][:3].tolist()) == [0, 1, 2] and (ids[0][3:] == -1).all()


def test_gap_scores_match_the_reference(make_index: IndexFactory) -> None:
    rng = np.random.default_rng(5)
    history = unit_rows(rng, 3000)
    index = make_index(DIM)
    index.add(history)
    queries = np.concatenate([unit_rows(rng, 20), history[:20] * 0.9 + history[20:40] * 0.1])
    for k in (1, 4, 16):
        got = gap_scores(index, queries, k=k, qualify_ratio=1.0)
        for query, score in zip(queries, got, strict=True):
            want = reference_score(history, query, k, 1.0)
            assert score.qualified == want.qualified
            assert score.score_ppm == want.score_ppm
            assert score.d_nn == pytest.approx(want.d_nn, rel=1e-12)
            assert score.d_e == pytest.approx(want.d_e, rel=1e-12, abs=1e-15)


def test_query_at_the_centroid_of_its_neighbours_qualifies(make_index: IndexFactory) -> None:
    rng = np.random.default_rng(6)
    centre = unit_rows(rng, 1)[0]

    def on_sphere(x: np.ndarray) -> np.ndarray:
        return np.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True))

    cluster = on_sphere(centre + 0.05 * unit_rows(rng, 16))
    far = on_sphere(-centre + 0.3 * unit_rows(rng, 100))
    index = make_index(DIM)
    index.add(np.concatenate([cluster, far]))
    middle = on_sphere(cluster.astype(np.float16).astype(np.float64).mean(axis=0))
    (score,) = gap_scores(index, middle[None], k=16, qualify_ratio=1 / 3)
    assert score.qualified and score.score_ppm == round(score.d_nn * 1e6) > 0
    assert score.d_e < 0.01 * score.d_nn  # the middle of the gap: the centroid, normalized
    (outside,) = gap_scores(
        index, on_sphere(centre + 0.2 * unit_rows(rng, 1)[0])[None], k=16, qualify_ratio=1.0
    )
    assert not outside.qualified and outside.score_ppm == 0


def test_nothing_scores_while_history_is_smaller_than_k(make_index: IndexFactory) -> None:
    index = make_index(DIM)
    index.add(unit_rows(np.random.default_rng(7), 15))
    scores = gap_scores(index, unit_rows(np.random.default_rng(8), 3), k=16)
    assert all(not s.qualified and s.score_ppm == 0 for s in scores)
    assert gap_scores(index, np.empty((0, DIM)), k=4) == []


def test_duplicate_history_rows_tie_break_by_id(make_index: IndexFactory) -> None:
    row = unit_rows(np.random.default_rng(9), 1)
    index = make_index(DIM)
    index.add(np.repeat(row, 40, axis=0))
    (score,) = gap_scores(index, row, k=16)
    # float16 rows are unit only to ~1e-4: the normalized centroid sits that close
    assert score.qualified and score.d_nn == score.d_e < 1e-3 and score.score_ppm < 1_000


def test_submission_score_sums_qualified_items_and_applies_the_pair_bonus() -> None:
    a = GapScore(True, 1_000_001, 1.0, 0.1)
    b = GapScore(False, 0, 2.0, 1.9)
    c = GapScore(True, 333_333, 0.33, 0.01)
    assert submission_score([a, b, c], valid_pair=False) == 1_333_334
    assert submission_score([a, c], valid_pair=True) == 1_333_334 * 3 // 2
    assert submission_score([a], valid_pair=True, pair_bonus_ppm=1_000_000) == 1_000_001
    assert submission_score([], valid_pair=True) == 0
    with pytest.raises(ValueError):
        submission_score([a], valid_pair=True, pair_bonus_ppm=-1)


def clustered(rng: np.random.Generator, n: int, spread: float = 0.05) -> np.ndarray:
    """Tight clusters: many near-ties between the float32 distances of their members."""
    centres = unit_rows(rng, 20)
    rows = centres[rng.integers(0, 20, n)] + spread * rng.standard_normal((n, DIM))
    return np.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True))


def test_torch_index_gives_the_same_gap_scores_as_faiss() -> None:
    """Candidates may order near-ties differently; the re-ranked scores are equal."""
    rng = np.random.default_rng(10)
    history = clustered(rng, 3000)
    faiss_index, torch_index = HistoryIndex(DIM), SmallTorchIndex(DIM)
    for start in range(0, len(history), 450):
        faiss_index.add(history[start : start + 450])
        torch_index.add(history[start : start + 450])
    queries = np.concatenate([clustered(rng, 40), history[:10]])
    for k in (1, 8, 32):
        want = gap_scores(faiss_index, queries, k=k, qualify_ratio=1.0)
        assert gap_scores(torch_index, queries, k=k, qualify_ratio=1.0) == want
        singles = [gap_scores(torch_index, q[None], k=k, qualify_ratio=1.0)[0] for q in queries]
        assert singles == want  # whatever the batch


@pytest.mark.parametrize(
    "tiny_blocks",
    [partial(TorchHistoryIndex, chunk_rows=7, query_block=2), partial(HistoryIndex, block_rows=7)],
    ids=["torch", "faiss"],
)
def test_exact_ties_break_by_id_across_blocks(tiny_blocks: IndexFactory) -> None:
    """Rows whose distances are exact in float32 in any order of summation: ties by id."""
    basis = np.eye(DIM)[:4]
    order = np.random.default_rng(11).integers(0, 4, 50)
    history = basis[order]
    index = tiny_blocks(DIM)
    index.add(history)
    queries = np.concatenate([basis, 0.5 * basis[:1] + 0.5 * basis[1:2]])
    for k in (1, 5, 20, 50):
        assert (index.neighbours(queries, k) == brute_force(history, queries, k)).all()
    # e_0 is at distance 0 from its copies and 2 from the others, the smaller ids first
    copies = np.flatnonzero(order == 0)
    others = np.flatnonzero(order != 0)
    assert index.neighbours(basis[:1], 50)[0].tolist() == [*copies, *others]


def test_faiss_index_fills_blocks_in_turn_and_keeps_every_value() -> None:
    rng = np.random.default_rng(13)
    rows = unit_rows(rng, 1500)
    index = HistoryIndex(DIM, block_rows=64)
    for row in rows[:100]:
        index.add(row[None])
    read_only = rows[100:].astype(np.float16)
    read_only.flags.writeable = False
    index.add(read_only)  # a chunk read from the store is a read-only view
    assert len(index) == 1500 and index.nbytes == 24 * 64 * (DIM * 2 + 4)  # ceil(1500 / 64)
    assert (index.vectors(np.arange(1500)) == rows.astype(np.float16).astype(np.float64)).all()
    assert (index.neighbours(rows[[0, 63, 64, 1499]], 1)[:, 0] == [0, 63, 64, 1499]).all()
    assert index.neighbours(np.empty((0, DIM)), 3).shape == (0, 3)
    assert (HistoryIndex(DIM).neighbours(rows[:2], 3) == -1).all()
    with pytest.raises(ValueError):
        HistoryIndex(DIM, block_rows=0)


def test_searches_from_many_threads_share_the_widening_buffer_safely() -> None:
    """Indexes of different sizes and dimensions, searched at once: each answer as alone."""
    rng = np.random.default_rng(14)
    indexes = [HistoryIndex(dim, block_rows=50) for dim in (DIM, DIM, 2 * DIM, 8)]
    queries = []
    for number, index in enumerate(indexes):
        index.add(unit_rows(rng, 400 + 100 * number, index.dim))
        queries.append(unit_rows(rng, 25, index.dim))
    alone = [index.neighbours(q, 8) for index, q in zip(indexes, queries, strict=True)]
    with ThreadPoolExecutor(len(indexes)) as pool:
        for _ in range(20):
            answers = pool.map(lambda index, q: index.neighbours(q, 8), indexes, queries)
            assert all((got == want).all() for got, want in zip(answers, alone, strict=True))


def test_torch_index_grows_by_doubling_and_keeps_every_value() -> None:
    rng = np.random.default_rng(12)
    rows = unit_rows(rng, 1500)
    index = TorchHistoryIndex(DIM, chunk_rows=64)
    for row in rows:
        index.add(row[None])
    assert len(index) == 1500 and index.nbytes == 2048 * (DIM * 2 + 4)
    assert (index.vectors(np.arange(1500)) == rows.astype(np.float16).astype(np.float64)).all()
    sized = TorchHistoryIndex(DIM, capacity=1500)
    sized.add(rows)
    assert sized.nbytes == 1500 * (DIM * 2 + 4)
    assert (sized.neighbours(rows[:5], 1)[:, 0] == np.arange(5)).all()
    read_only = rows.astype(np.float16)
    read_only.flags.writeable = False
    sized.add(read_only)  # a chunk read from the store is a read-only view
    assert len(sized) == 3000 and index.neighbours(np.empty((0, DIM)), 3).shape == (0, 3)
    assert (TorchHistoryIndex(DIM).neighbours(rows[:2], 3) == -1).all()
    with pytest.raises(ValueError):
        TorchHistoryIndex(DIM, chunk_rows=0)


def test_a_history_on_torch_indexes_scores_a_round_as_on_faiss() -> None:
    rng = np.random.default_rng(13)
    modalities = ("text", "image", "audio", "video")
    labels = [modalities[int(i)] for i in rng.integers(0, 4, 2000)]
    vectors, junk = clustered(rng, 2000), clustered(rng, 30)
    made: list[TorchHistoryIndex] = []

    def torch_index(dim: int) -> TorchHistoryIndex:
        made.append(SmallTorchIndex(dim))
        return made[-1]

    on_faiss, on_torch = History(DIM), History(DIM, index=torch_index)
    for history in (on_faiss, on_torch):
        history.add(labels, vectors)
        history.add_junk(["image"] * 30, junk)
    assert len(made) == 5  # one per modality, and the junk's image index
    rules = ScoringRules(
        k=16,
        qualify_ratio=1.2,
        duplicate_radius=dict.fromkeys(modalities, 1e-3),
        junk_radius={"image": 0.01},
    )
    items = clustered(rng, 64)
    submissions = [
        [RoundItem(modalities[i % 4], items[i]), RoundItem(modalities[(i + 1) % 4], items[i + 1])]
        for i in range(0, 64, 2)
    ]
    submissions.append([RoundItem("image", junk[0])])
    want = score_in_order(on_faiss, submissions, rules)
    assert score_in_order(on_torch, submissions, rules) == want
    assert want[-1][0].duplicate  # known junk
    assert on_torch.modality_of(np.arange(5)) == labels[:5]
