"""Rank 0's hold on the blocks that the loads of stopped requests may still be reading.

A request aborted while its async load is in flight (or whose load timed out) gets its
`request_finished` at once, while the ranks' reads of its records go on. Evicted then,
its blocks' files would be deleted under those reads, which fail: load failures counted,
and records reported `lost` that were fine (a block saved again meanwhile is then no hit
for a minute). So the scheduler keeps the pins of such a request's loads
(`RequestTracker.take_load_pins`) and names it in its next metadata (`"drain"`); each rank
names it in its report (`"loads_over"`) once its load of it is over, at once when it has
none, and when every rank has, the pins go. Should a report never come (a bug), they go
after the scheduler's give-up time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable

from kvdist.connectors.tracking import RequestTracker


class LoadDrains:
    def __init__(
        self,
        world_size: int,
        tracker: RequestTracker,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ranks = frozenset(range(world_size))
        self._tracker = tracker
        self._clock = clock
        # request id -> (stopped at, the keys its loads pin, ranks yet to report)
        self._waiting: dict[str, tuple[float, list[Hashable], set[int]]] = {}
        self._new: list[str] = []

    def __len__(self) -> int:
        """Stopped requests whose loads some rank has not reported over."""
        return len(self._waiting)

    def stopped(self, request_id: str) -> None:
        """`request_id` stopped (`request_finished`): what its loads pin stays pinned until
        every rank reported them over."""
        keys = self._tracker.take_load_pins(request_id)
        if not keys:
            return
        earlier = self._waiting.get(request_id)  # an id reused: wait for both loads
        if earlier is not None:
            keys = earlier[1] + keys
        self._waiting[request_id] = (self._clock(), keys, set(self._ranks))
        self._new.append(request_id)

    def take_new(self) -> list[str]:
        """The requests stopped since the last call, for the next metadata's `drain`."""
        new, self._new = self._new, []
        return new

    def over(self, rank: int, request_ids: Iterable[str]) -> None:
        """`rank` reports its loads of `request_ids` over (ids not waiting are ignored)."""
        for rid in request_ids:
            entry = self._waiting.get(rid)
            if entry is None:
                continue
            entry[2].discard(rank)
            if not entry[2]:
                del self._waiting[rid]
                self._tracker.release(entry[1])

    def expire(self, give_up_s: float) -> None:
        """Release the pins of requests stopped more than `give_up_s` ago."""
        old = self._clock() - give_up_s
        for rid, (since, keys, _) in list(self._waiting.items()):
            if since < old:
                del self._waiting[rid]
                self._tracker.release(keys)
