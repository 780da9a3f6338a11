"""How a round's emission is shared among its top submissions (DESIGN.md §6)."""

from __future__ import annotations

from collections.abc import Mapping


def ranking(scores: Mapping[bytes, int]) -> list[bytes]:
    """Submission ids with a positive score, best first, ties by id ascending.

    The id tie-break is what makes the ranking identical on every validator
    whatever order the submissions arrived in.
    """
    return sorted(
        (sid for sid, score in scores.items() if score > 0), key=lambda s: (-scores[s], s)
    )


def round_payout(scores: Mapping[bytes, int], emission: int, top_k: int) -> dict[bytes, int]:
    """Share ``emission`` base units among the ``top_k`` best-scored submissions.

    ``reward_i = emission * s_i // sum(s)`` over the winners; what the floor
    divisions leave over goes to the top scorer, so the round pays out exactly
    ``emission`` whenever any score is positive (and nothing otherwise). Every
    id in ``scores`` gets an entry, 0 for those that won nothing.
    """
    if emission < 0:
        raise ValueError(f"emission must be >= 0, got {emission}")
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    for sid, score in scores.items():
        if score < 0:
            raise ValueError(f"score of {sid.hex()} is negative: {score}")
    rewards = dict.fromkeys(scores, 0)
    winners = ranking(scores)[:top_k]
    if not winners:
        return rewards
    total = sum(scores[sid] for sid in winners)
    for sid in winners:
        rewards[sid] = emission * scores[sid] // total
    rewards[winners[0]] += emission - sum(rewards.values())
    return rewards
