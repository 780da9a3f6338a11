"""Round scoring: from prepared submissions and a history to certified records."""

import dataclasses

import numpy as np
import pytest

from encoders.embedding import ItemEmbedding
from encoders.fusion import PairOutcome
from encoders.modality import Modality
from node.errors import Reason
from node.ops.config import load_config
from node.rounds.records import (
    Candidate,
    Mismatch,
    Prepared,
    RoundRecord,
    RoundRules,
    Tolerances,
    check_round_scores,
    from_float16,
    prepare,
    score_round,
)
from rewards.curiosity import ScoringRules
from rewards.history import History

SCORING = load_config().scoring
RADIUS = {"text": 0.001, "image": 0.001, "audio": 0.01, "video": 0.001}
RULES = RoundRules(ScoringRules(16, 1.2, RADIUS), SCORING.emission, SCORING.top_k)
TOLERANCES = Tolerances(0.02, 20_000, 1_000)


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def embedding(vector: np.ndarray) -> ItemEmbedding:
    return ItemEmbedding(unit(vector), 0.1, float(np.exp(-0.1)), (0.1, 0.1), (True, True))


def history_around(centre: np.ndarray, count: int = 32, seed: int = 0) -> History:
    rng = np.random.default_rng(seed)
    history = History(centre.shape[0])
    history.add(
        ["image"] * count,
        np.stack([unit(centre + 0.3 * rng.standard_normal(centre.shape)) for _ in range(count)]),
    )
    return history


def single(vector: np.ndarray, data: bytes, modality: Modality = Modality.IMAGE) -> Prepared:
    return prepare(0, [modality], [embedding(vector)], None, [data])


def pair(text: np.ndarray, image: np.ndarray, hashes: tuple[bytes, bytes]) -> Prepared:
    """A valid text-image pair whose 'fused' vectors are the items' own (enough for scoring)."""
    return prepare(
        0,
        [Modality.TEXT, Modality.IMAGE],
        [embedding(text), embedding(image)],
        PairOutcome(0.1, False, (unit(text), unit(image))),
        list(hashes),
    )


def candidate(number: int, prepared: Prepared, submitter: bytes = b"s" * 32) -> Candidate:
    return Candidate(bytes([number]) * 32, submitter, prepared)


def test_prepare_keeps_fused_vectors_for_a_valid_pair_and_own_ones_otherwise():
    a, b = embedding(np.ones(8)), embedding(np.arange(8.0) + 1)
    fused = (unit(np.full(8, 2.0)), unit(np.arange(8.0) + 2))
    hashes = [b"a" * 32, b"b" * 32]
    valid = prepare(
        3, [Modality.TEXT, Modality.IMAGE], [a, b], PairOutcome(0.2, False, fused), hashes
    )
    assert valid.valid_pair and all(item.fused for item in valid.items)
    assert np.allclose(from_float16(valid.items[0].vector), fused[0], atol=1e-3)
    far = prepare(3, [Modality.TEXT, Modality.IMAGE], [a, b], PairOutcome(1.5, True, None), hashes)
    assert far.too_far and not far.valid_pair and not any(i.fused for i in far.items)
    assert far.pair_distance_ppm == 1_500_000
    assert Prepared.from_bytes(far.to_bytes()) == far
    # a valid pair keeps each item's own embedding beside the fused one (near-duplicates)
    assert np.allclose(from_float16(valid.own_vectors()[1]), unit(np.arange(8.0) + 1), atol=1e-3)
    assert Prepared.from_bytes(valid.to_bytes()) == valid and not valid.stale
    assert far.own_vectors() == () and not far.stale
    older = dataclasses.replace(  # prepared by a release that kept no own embeddings
        valid, items=tuple(dataclasses.replace(i, own=None) for i in valid.items)
    )
    assert older.stale and older.own_vectors() == ()
    assert Prepared.from_bytes(older.to_bytes()) == older


def test_nothing_scores_while_the_history_is_short():
    records = score_round([candidate(1, single(np.ones(8), b"x" * 32))], History(8), RULES, set())
    assert [(r.status, r.scores_ppm, r.reward) for r in records] == [("final", (0,), 0)]


def test_a_gap_filler_is_paid_the_whole_emission_and_a_far_pair_nothing():
    centre = np.ones(8)
    history = history_around(centre)
    filler = pair(centre, centre + 0.05 * np.arange(8), (b"t" * 32, b"i" * 32))
    far = prepare(
        0,
        [Modality.TEXT, Modality.AUDIO],
        [embedding(centre), embedding(-centre)],
        PairOutcome(2.0, True, None),
        [b"u" * 32, b"v" * 32],
    )
    records = score_round([candidate(2, far), candidate(1, filler)], history, RULES, set())
    assert [r.submission_id for r in records] == [b"\x01" * 32, b"\x02" * 32]
    paid, refused = records
    assert paid.status == "final" and all(s is not None and s > 0 for s in paid.scores_ppm)
    assert paid.score == sum(paid.scores_ppm) * SCORING.pair_bonus_ppm // 1_000_000
    assert paid.reward == SCORING.emission
    assert (refused.status, refused.reason, refused.reward) == ("rejected", Reason.PAIR_TOO_FAR, 0)
    assert refused.history_items == () and len(paid.history_items) == 2
    assert RoundRecord.from_bytes(paid.to_bytes()) == paid
    check_round_scores(records, history, RULES, TOLERANCES, set())


def test_records_are_identical_whatever_the_order_of_candidates():
    centre = np.ones(8)
    history = history_around(centre, seed=3)
    rng = np.random.default_rng(7)
    candidates = [
        candidate(i, single(centre + 0.2 * rng.standard_normal(8), bytes([i]) * 32))
        for i in range(12)
    ]
    forward = score_round(candidates, history, RULES, set())
    backward = score_round(candidates[::-1], history, RULES, set())
    assert [r.to_bytes() for r in forward] == [r.to_bytes() for r in backward]
    assert sum(r.reward for r in forward) == SCORING.emission


def test_twelve_near_copies_fill_their_gap_once():
    """The farmer's attack: one gap-filling datum, 12 times, from 12 keys, distinct bytes."""
    centre = np.ones(8)
    history = history_around(centre)
    rng = np.random.default_rng(5)
    filler = centre + 0.05 * np.arange(8)
    copies = [
        candidate(
            i, single(filler + 1e-3 * rng.standard_normal(8), bytes([i]) * 32), bytes([i]) * 32
        )
        for i in range(1, 13)
    ]
    records = score_round(copies, history, RULES, set())
    paid = [r for r in records if r.reward > 0]
    assert len(paid) == 1 and paid[0].submission_id == b"\x01" * 32  # the first in id order
    assert paid[0].reward == SCORING.emission
    assert all((r.status, r.reason) == ("rejected", Reason.DUPLICATE) for r in records[1:])
    check_round_scores(records, history, RULES, TOLERANCES, set())
    # and in a later round, against the history that now holds the first
    history.add(["image"], np.stack([from_float16(records[0].embeddings[0].vector)]))
    again = score_round(
        [candidate(20, single(filler + 1e-3 * rng.standard_normal(8), b"z" * 32))],
        history,
        RULES,
        set(),
    )
    assert (again[0].status, again[0].reason, again[0].reward) == (
        "rejected",
        Reason.DUPLICATE,
        0,
    )


def test_without_the_order_every_copy_would_be_paid():
    """The same copies, each alone against the history: each qualifies (the attack is real)."""
    centre = np.ones(8)
    history = history_around(centre)
    filler = centre + 0.05 * np.arange(8)
    for i in range(1, 4):
        (alone,) = score_round(
            [candidate(i, single(filler + 1e-3 * i, bytes([i]) * 32))], history, RULES, set()
        )
        assert alone.status == "final" and alone.reward == SCORING.emission


def test_a_later_item_is_scored_against_the_rounds_earlier_items():
    """Two different data of one new place: the second finds the gap partly filled."""
    centre = np.ones(8)
    history = history_around(centre)
    place = centre + 0.05 * np.arange(8)
    first = single(place, b"a" * 32)
    second = single(place + 0.2 * np.sin(np.arange(8)), b"b" * 32)
    alone = score_round([candidate(2, second)], history, RULES, set())[0]
    together = score_round([candidate(1, first), candidate(2, second)], history, RULES, set())
    assert together[1].status == "final"
    assert together[1].scores_ppm != alone.scores_ppm  # its context held the first
    check_round_scores(together, history, RULES, TOLERANCES, set())


def test_a_reused_caption_pays_for_the_new_picture_alone():
    """Duplicates are judged per item: a caption accepted before, with a new picture."""
    centre = np.ones(8)
    history = history_around(centre)
    caption = b"c" * 32
    new = pair(centre + 0.05 * np.arange(8), centre - 0.05 * np.arange(8), (caption, b"p" * 32))
    fresh = pair(centre + 0.05 * np.arange(8), centre - 0.05 * np.arange(8), (b"d" * 32, b"q" * 32))
    [reused] = score_round([candidate(1, new)], history, RULES, {caption})
    [both_new] = score_round([candidate(1, fresh)], history, RULES, set())
    assert reused.status == "final" and reused.scores_ppm is not None
    assert reused.scores_ppm[0] is None and reused.scores_ppm[1]  # the caption earns nothing
    assert reused.score == reused.scores_ppm[1]  # no pair bonus
    assert both_new.score > reused.score
    assert [index for index, _, _ in reused.history_items] == [1]  # the caption stays out of H
    assert reused.accepted_hashes == (caption, b"p" * 32)
    check_round_scores([reused], history, RULES, TOLERANCES, {caption})
    with pytest.raises(Mismatch):  # a member that does not know the caption disagrees
        check_round_scores([reused], history, RULES, TOLERANCES, set())


def test_a_pair_of_two_repeated_items_and_a_repeated_single_are_rejected_duplicate():
    centre = np.ones(8)
    history = history_around(centre)
    old = (b"c" * 32, b"p" * 32)
    repeated = pair(centre, centre + 0.01, old)
    lone = single(centre + 0.05, old[1])
    records = score_round([candidate(1, repeated), candidate(2, lone)], history, RULES, set(old))
    assert [(r.status, r.reason, r.reward) for r in records] == [
        ("rejected", Reason.DUPLICATE, 0),
        ("rejected", Reason.DUPLICATE, 0),
    ]
    assert all(r.history_items == () and r.accepted_hashes == () for r in records)
    check_round_scores(records, history, RULES, TOLERANCES, set(old))


def test_bytes_repeated_within_a_round_count_once():
    centre = np.ones(8)
    history = history_around(centre)
    a = single(centre + 0.05 * np.arange(8), b"same" * 8)
    b = single(centre - 0.05 * np.arange(8), b"same" * 8)  # other vector: a lying proposer?
    records = score_round([candidate(1, a), candidate(2, b)], history, RULES, set())
    assert records[0].status == "final"
    assert (records[1].status, records[1].reason) == ("rejected", Reason.DUPLICATE)


def test_near_duplicates_are_judged_within_one_modality():
    """A fused caption lies near its picture; that makes neither a duplicate of the other."""
    centre = np.ones(8)
    history = history_around(centre)  # images only
    place = centre + 0.05 * np.arange(8)
    history.add(["text"], np.stack([unit(place)]))
    [caption_twin] = score_round(
        [candidate(1, single(place, b"i" * 32, Modality.IMAGE))], history, RULES, set()
    )
    assert caption_twin.status == "final"  # an image where only a caption was
    [text_twin] = score_round(
        [candidate(2, single(place, b"t" * 32, Modality.TEXT))], history, RULES, set()
    )
    assert (text_twin.status, text_twin.reason) == ("rejected", Reason.DUPLICATE)


def test_a_proposer_cannot_hide_a_duplicate_or_invent_one():
    centre = np.ones(8)
    history = history_around(centre)
    filler = centre + 0.05 * np.arange(8)
    copies = [candidate(i, single(filler + 1e-4 * i, bytes([i]) * 32)) for i in (1, 2)]
    records = score_round(copies, history, RULES, set())
    hidden = dataclasses.replace(
        records[1], status="final", reason=None, scores_ppm=records[0].scores_ppm
    )
    with pytest.raises(Mismatch):
        check_round_scores([records[0], hidden], history, RULES, TOLERANCES, set())
    invented = dataclasses.replace(
        records[0], status="rejected", reason=Reason.DUPLICATE, scores_ppm=None, score=0, reward=0
    )
    with pytest.raises(Mismatch):
        check_round_scores([invented, records[1]], history, RULES, TOLERANCES, set())


def test_round_rules_take_the_calibration_unless_the_configuration_overrides_it():
    from encoders.weights import ScoringCalibration

    calibration = ScoringCalibration(0.78, dict.fromkeys(Modality, 0.005), {Modality.IMAGE: 0.18})
    rules = RoundRules.of(SCORING, calibration)
    assert rules.scoring.qualify_ratio == 0.78
    assert rules.scoring.duplicate_radius == dict.fromkeys(RADIUS, 0.005)
    assert rules.scoring.junk_radius == {"image": 0.18}
    assert (rules.emission, rules.top_k, rules.scoring.k) == (
        SCORING.emission,
        SCORING.top_k,
        SCORING.k,
    )
    overridden = RoundRules.of(
        SCORING.model_copy(update={"qualify_ratio": 2.0, "duplicate_radius": RADIUS}), calibration
    )
    assert overridden.scoring.qualify_ratio == 2.0
    assert overridden.scoring.duplicate_radius == RADIUS
