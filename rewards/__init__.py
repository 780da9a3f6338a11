"""Rewards: the kNN history, the Proof of Curiosity score and the round payout.

Pure functions over arrays and integers: no I/O, no clocks, no models.
"""

from rewards.curiosity import (
    PPM,
    GapScore,
    ItemVerdict,
    RoundItem,
    ScoringRules,
    gap_scores,
    score_in_order,
    submission_score,
)
from rewards.history import EmbeddingIndex, History, HistoryIndex, quantize
from rewards.payout import ranking, round_payout

__all__ = [
    "PPM",
    "EmbeddingIndex",
    "GapScore",
    "History",
    "HistoryIndex",
    "ItemVerdict",
    "RoundItem",
    "ScoringRules",
    "gap_scores",
    "quantize",
    "ranking",
    "round_payout",
    "score_in_order",
    "submission_score",
]
