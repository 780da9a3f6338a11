"""Which waiting items make the next batch (``companions``): like lengths, the oldest always."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from node.pipeline.batching import LOOKAHEAD, companions

lengths_st = st.lists(st.integers(min_value=0, max_value=64), min_size=1, max_size=48)
sizes = st.integers(min_value=1, max_value=16)


@given(lengths_st, sizes)
def test_the_oldest_always_goes_and_the_batch_is_as_full_as_it_can_be(
    lengths: list[int], size: int
) -> None:
    chosen = companions(lengths, size)
    assert chosen[0] == 0
    assert chosen == sorted(set(chosen))
    assert len(chosen) == min(size, len(lengths))
    assert all(0 <= i < len(lengths) for i in chosen)


@given(st.integers(min_value=1, max_value=48), st.integers(min_value=0, max_value=64), sizes)
def test_items_of_one_length_go_in_arrival_order(count: int, length: int, size: int) -> None:
    assert companions([length] * count, size) == list(range(min(size, count)))


@given(lengths_st, sizes)
def test_enough_items_of_the_oldest_s_length_make_a_batch_without_padding(
    lengths: list[int], size: int
) -> None:
    if lengths.count(lengths[0]) < size:
        lengths = lengths + [lengths[0]] * size  # newer items of the oldest's length
    chosen = companions(lengths, size)
    assert {lengths[i] for i in chosen} == {lengths[0]}


@given(st.lists(st.integers(min_value=1, max_value=12), min_size=40, max_size=200), sizes)
def test_no_item_waits_longer_than_the_look_ahead_once_it_is_in_it(
    stream: list[int], size: int
) -> None:
    """Items keep arriving (the queue kept ``LOOKAHEAD`` batches deep, as the encoder
    service reads it): once among the oldest ``LOOKAHEAD * size``, an item goes within
    that many batches, however its length compares with those arriving behind it."""
    window = LOOKAHEAD * size
    waiting: list[tuple[int, int]] = []  # (arrival, length)
    arrivals = iter(enumerate(stream))
    entered: dict[int, int] = {}  # arrival -> batch at which it entered the window
    for batch_number in range(10 * len(stream)):
        for arrival, length in arrivals:
            waiting.append((arrival, length))
            if len(waiting) >= window:
                break
        if not waiting:
            break
        for arrival, _ in waiting[:window]:
            entered.setdefault(arrival, batch_number)
        chosen = companions([length for _, length in waiting[:window]], size)
        for i in sorted(chosen, reverse=True):
            arrival, _ = waiting.pop(i)
            assert batch_number - entered[arrival] < window
    assert not waiting  # everything went


def test_on_a_deep_queue_of_mixed_captions_batches_pad_far_less_than_arrival_order() -> None:
    """The mechanism fires: the world's caption lengths (4 to 12 wordpieces), a queue
    kept ``LOOKAHEAD`` batches deep, batches of 8, as the node's encoder takes them."""
    rng = random.Random(7)
    pool = [4] * 17 + [5] * 79 + [6] * 240 + [7] * 160 + [8] * 139 + [9] * 52 + [12] * 21

    def computed(choose) -> tuple[int, int]:
        waiting: list[int] = []
        content = total = 0
        for _ in range(300):
            while len(waiting) < LOOKAHEAD * 8:
                waiting.append(rng.choice(pool))
            batch = choose(waiting)
            content += sum(waiting[i] for i in batch)
            total += len(batch) * max(waiting[i] for i in batch)
            for i in sorted(batch, reverse=True):
                del waiting[i]
        return content, total

    fifo_content, fifo_total = computed(lambda waiting: list(range(8)))
    like_content, like_total = computed(lambda waiting: companions(waiting, 8))
    assert fifo_total / fifo_content > 1.25  # arrival order pads a quarter or more
    assert like_total / like_content < 1.10  # like lengths: under a tenth
