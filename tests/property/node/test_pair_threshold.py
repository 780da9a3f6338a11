"""A pair at δ: what its proposer records is what every member's check accepts.

Found from the outside: a proposer decided ``pair_too_far`` on the exact
distance while its record carries the distance in ppm, and every checker
(and ``poc-node audit``) decides on that figure. A pair within half a ppm
above δ was recorded ``rejected pair_too_far`` at δ's own ppm; every other
member refused the record, and a submitter who found such a pair (a few
seconds of search) stalled a committee for good.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from encoders.embedding import ItemEmbedding
from encoders.fusion import fuse_pair
from encoders.modality import Modality
from node.ops.config import load_config
from node.rounds.records import (
    Candidate,
    RoundRules,
    Tolerances,
    compare_record,
    prepare,
    score_round,
)
from rewards.curiosity import ScoringRules
from rewards.history import History

DIM = 8
DELTA = 0.3472485470  # image-text's δ in the shipped calibration, where it was found
SCORING = load_config().scoring
RULES = RoundRules(
    ScoringRules(DIM, 1.2, dict.fromkeys(["text", "image", "audio", "video"], 1e-3)),
    SCORING.emission,
    SCORING.top_k,
)
TOLERANCES = Tolerances(0.02, 20_000, 1_000)
ALPHA = {Modality.TEXT: 0.5, Modality.IMAGE: 0.5}


def at_distance(distance: float, turn: float) -> tuple[ItemEmbedding, ItemEmbedding]:
    """Two unit vectors ``distance`` apart (up to float32), turned by ``turn`` radians."""
    angle = math.acos(1.0 - distance)
    a = np.zeros(DIM)
    a[0], a[2] = math.cos(turn), math.sin(turn)
    b = np.zeros(DIM)
    b[0], b[1], b[2] = (
        math.cos(angle) * math.cos(turn),
        math.sin(angle),
        math.cos(angle) * math.sin(turn),
    )

    def item(v: np.ndarray) -> ItemEmbedding:
        return ItemEmbedding(v.astype(np.float32), 0.1, 0.9, (0.1,), (True,))

    return item(a), item(b)


def prepared(distance: float, turn: float):
    a, b = at_distance(distance, turn)
    pair = fuse_pair(a, b, Modality.IMAGE, Modality.TEXT, ALPHA, DELTA)
    return prepare(0, [Modality.IMAGE, Modality.TEXT], [a, b], pair, [b"i" * 32, b"t" * 32])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.floats(-3e-6, 3e-6),
    st.floats(-1e-6, 1e-6),
    st.floats(0.0, 3.0),
)
@example(0.25e-6, 0.0, 0.0)  # above δ, at δ's ppm: the crafted pair
@example(0.49e-6, -0.3e-6, 1.0)
def test_a_pair_near_delta_is_recorded_as_every_member_checks_it(
    offset: float, other: float, turn: float
) -> None:
    mine = prepared(DELTA + offset, turn)
    (record,) = score_round([Candidate(b"s" * 32, b"k" * 32, mine)], History(DIM), RULES, set())
    assert (record.reason is not None) == mine.too_far
    compare_record(mine, record, lambda a, b: DELTA, TOLERANCES)  # its own check, and audit's
    # A member whose encoders put the pair a hair elsewhere (other threads, batches).
    theirs = prepared(DELTA + offset + other, turn)
    compare_record(theirs, record, lambda a, b: DELTA, TOLERANCES)
