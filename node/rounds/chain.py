"""The beacon chain as the node tracks it: where consensus resumes, and epoch beacons.

Rounds that no validator of a committee of one ran (the node was down) are
empty: they enter the chain as skipped rounds, so the beacon of the round the
node resumes at is a pure function of what was committed. Walking the chain
over a long gap is cheap hashing, done once: a checkpoint in the store's
metadata keeps restarts instant. The epoch beacon (the beacon of an epoch's
first round, DESIGN.md §4) seeds the differential-loss masks of every item
received in that epoch.
"""

from __future__ import annotations

import asyncio
import logging

from consensus.beacon import SKIP_HASH, genesis_beacon, next_beacon
from consensus.committee import Committee
from node.store.sqlite import Store

log = logging.getLogger("poc.chain")

_CHECKPOINT = "beacon_checkpoint"


class BeaconChain:
    """Beacons known to this node, and a wait for the ones still to come."""

    def __init__(self, committee: Committee) -> None:
        self._committee = committee
        self._epochs: dict[int, bytes] = {}
        self._changed = asyncio.Condition()

    def resume_point(self, store: Store, now_round: int) -> tuple[int, bytes]:
        """The first round to run and its beacon, walking skipped rounds up to ``now_round``.

        Runs on the store's thread (it reads and writes the checkpoint).
        """
        committed = store.last_round()
        if committed is None:
            round_number, beacon = 0, genesis_beacon(self._committee.digest())
        else:
            round_number, beacon = committed.round + 1, committed.beacon_after
        checkpoint = store.get_meta(_CHECKPOINT)
        if checkpoint is not None:
            saved_round = int.from_bytes(checkpoint[:8], "big")
            if saved_round > round_number:
                round_number, beacon = saved_round, checkpoint[8:]
        target = max(now_round, round_number)
        if target - round_number > 10_000:
            log.info("event=beacon_walk rounds=%d (once; checkpointed)", target - round_number)
        keep_from = target - 2 * self._committee.epoch_rounds
        while round_number < target:
            if round_number >= keep_from:
                self._learn(round_number, beacon)
            beacon = next_beacon(beacon, SKIP_HASH)
            round_number += 1
        store.set_meta(_CHECKPOINT, round_number.to_bytes(8, "big") + beacon)
        self._learn(round_number, beacon)
        for epoch, epoch_beacon in self._epochs.items():
            store.set_meta(f"epoch_beacon/{epoch}", epoch_beacon)
        for epoch in range(
            max(0, self._committee.epoch_of(round_number) - 1),
            self._committee.epoch_of(round_number) + 1,
        ):
            saved = store.get_meta(f"epoch_beacon/{epoch}")
            if saved is not None:
                self._epochs.setdefault(epoch, saved)
        return round_number, beacon

    def _learn(self, round_number: int, beacon: bytes) -> None:
        if round_number % self._committee.epoch_rounds == 0:
            self._epochs[round_number // self._committee.epoch_rounds] = beacon

    async def advanced(self, next_round: int, beacon: bytes) -> None:
        """Round ``next_round - 1`` was committed; ``beacon`` is the beacon of ``next_round``."""
        self._learn(next_round, beacon)
        async with self._changed:
            self._changed.notify_all()

    async def epoch_beacon(self, epoch: int) -> tuple[int, bytes]:
        """The beacon of ``epoch`` (waiting for it if it lies ahead), as (epoch, beacon).

        An epoch too old to be known any more (a submission stored before a
        long outage) is prepared with the newest known epoch instead; its record
        says which epoch it used.
        """
        async with self._changed:
            while True:
                if epoch in self._epochs:
                    return epoch, self._epochs[epoch]
                newest = max(self._epochs, default=-1)
                if newest > epoch:
                    return newest, self._epochs[newest]
                await self._changed.wait()
