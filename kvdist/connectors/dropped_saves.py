"""Saves of a step whose `wait_for_save` never came: dropped, never made late.

An engine calls `wait_for_save` in every step that did not fail, and leaves it out in a
step that failed on this rank (its forward raised partway, or a connector hook failed
and the forward ran on KV that never loaded). A worker learns of it only when the next
step's metadata is bound, or at `shutdown`; by then the step's blocks may hold anything,
and saving them would put KV no forward finished into the cache, where a persistent
cache would serve it to every later engine as a hit. So the built-in workers drop such
saves and make sure nothing reads them as stored: the disk connector reports the blocks
not stored (with this rank's record missing, the block is incomplete: a miss, whatever
the other ranks wrote); the cpu connector reports their slots, which rank 0 unmaps, and
fails a load from one planned before rank 0 learnt (the engine computes those blocks
again) until a save fills it.
"""

from __future__ import annotations

import logging

from kvdist.connectors.settings import Counters

log = logging.getLogger(__name__)


class DroppedSaves:
    """Counts a worker's dropped saves (`stats['saves_dropped']`, always present) and
    logs the first."""

    def __init__(self, connector: str, rank: int, counters: Counters) -> None:
        self.connector = connector
        self.rank = rank
        self._counters = counters
        self._counters.add(saves_dropped=0)
        self._logged = False

    def note(self, num_blocks: int, when: str) -> None:
        """`num_blocks` saves of the last step dropped; `when`: what found them."""
        self._counters.add(saves_dropped=num_blocks)
        if self._logged:
            return
        self._logged = True
        log.warning(
            "%s connector (rank %d): %s, the last step's wait_for_save had not been called: "
            "its %d block save(s) are dropped, since the step may have failed with its "
            "blocks half written (later drops are only counted in stats['saves_dropped'])",
            self.connector, self.rank, when, num_blocks,
        )  # fmt: skip
