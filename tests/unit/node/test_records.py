"""Round scoring: from prepared submissions and a history to certified records."""

import numpy as np

from encoders.embedding import ItemEmbedding
from encoders.fusion import PairOutcome
from encoders.modality import Modality
from node.errors import Reason
from node.ops.config import load_config
from node.rounds.records import Candidate, Prepared, RoundRecord, from_float16, prepare, score_round
from rewards.history import HistoryIndex

SCORING = load_config().scoring


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def embedding(vector: np.ndarray) -> ItemEmbedding:
    return ItemEmbedding(unit(vector), 0.1, float(np.exp(-0.1)), (0.1, 0.1), (True, True))


def history_around(centre: np.ndarray, count: int = 32, seed: int = 0) -> HistoryIndex:
    rng = np.random.default_rng(seed)
    index = HistoryIndex(centre.shape[0])
    index.add(
        np.stack([unit(centre + 0.3 * rng.standard_normal(centre.shape)) for _ in range(count)])
    )
    return index


def test_prepare_keeps_fused_vectors_for_a_valid_pair_and_own_ones_otherwise():
    a, b = embedding(np.ones(8)), embedding(np.arange(8.0) + 1)
    fused = (unit(np.full(8, 2.0)), unit(np.arange(8.0) + 2))
    valid = prepare(3, [Modality.TEXT, Modality.IMAGE], [a, b], PairOutcome(0.2, False, fused))
    assert valid.valid_pair and all(item.fused for item in valid.items)
    assert np.allclose(from_float16(valid.items[0].vector), fused[0], atol=1e-3)
    far = prepare(3, [Modality.TEXT, Modality.IMAGE], [a, b], PairOutcome(1.5, True, None))
    assert far.too_far and not far.valid_pair and not any(i.fused for i in far.items)
    assert far.pair_distance_ppm == 1_500_000
    assert Prepared.from_bytes(far.to_bytes()) == far


def test_nothing_scores_while_the_history_is_short():
    prepared = prepare(0, [Modality.TEXT], [embedding(np.ones(8))], None)
    records = score_round([Candidate(b"a" * 32, b"s" * 32, prepared)], HistoryIndex(8), SCORING)
    assert [(r.status, r.scores_ppm, r.reward) for r in records] == [("final", (0,), 0)]


def test_a_gap_filler_is_paid_the_whole_emission_and_a_far_pair_nothing():
    centre = np.ones(8)
    history = history_around(centre)
    filler = prepare(
        0,
        [Modality.TEXT, Modality.IMAGE],
        [embedding(centre), embedding(centre)],
        PairOutcome(0.0, False, (unit(centre), unit(centre))),
    )
    far = prepare(
        0,
        [Modality.TEXT, Modality.AUDIO],
        [embedding(centre), embedding(-centre)],
        PairOutcome(2.0, True, None),
    )
    records = score_round(
        [Candidate(b"b" * 32, b"s" * 32, far), Candidate(b"a" * 32, b"t" * 32, filler)],
        history,
        SCORING,
    )
    assert [r.submission_id for r in records] == [b"a" * 32, b"b" * 32]
    paid, refused = records
    assert paid.status == "final" and all(s > 0 for s in paid.scores_ppm)
    assert paid.score == sum(paid.scores_ppm) * SCORING.pair_bonus_ppm // 1_000_000
    assert paid.reward == SCORING.emission
    assert (refused.status, refused.reason, refused.reward) == ("rejected", Reason.PAIR_TOO_FAR, 0)
    assert refused.history_vectors == () and len(paid.history_vectors) == 2
    assert RoundRecord.from_bytes(paid.to_bytes()) == paid


def test_records_are_identical_whatever_the_order_of_candidates():
    centre = np.ones(8)
    history = history_around(centre, seed=3)
    rng = np.random.default_rng(7)
    candidates = [
        Candidate(
            bytes([i]) * 32,
            b"s" * 32,
            prepare(0, [Modality.IMAGE], [embedding(centre + 0.2 * rng.standard_normal(8))], None),
        )
        for i in range(12)
    ]
    forward = score_round(candidates, history, SCORING)
    backward = score_round(candidates[::-1], history, SCORING)
    assert [r.to_bytes() for r in forward] == [r.to_bytes() for r in backward]
    assert sum(r.reward for r in forward) in (0, SCORING.emission)
