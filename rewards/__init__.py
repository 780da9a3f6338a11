"""Rewards: the kNN history index, the Proof of Curiosity score and the round payout.

Pure functions over arrays and integers: no I/O, no clocks, no models.
"""

from rewards.curiosity import PPM, GapScore, gap_scores, submission_score
from rewards.history import EmbeddingIndex, HistoryIndex, quantize
from rewards.payout import ranking, round_payout

__all__ = [
    "PPM",
    "EmbeddingIndex",
    "GapScore",
    "HistoryIndex",
    "gap_scores",
    "quantize",
    "ranking",
    "round_payout",
    "submission_score",
]
