"""Rank 0's map of the host pools: block hash → slot, least recently used first (within a
request's blocks used together, the last first: see `touch_chain`)."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable


class SlotMap:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slots: OrderedDict[bytes, int] = OrderedDict()
        # Lowest free slot first: consecutive slots make longer runs for the host copies.
        self._free = list(range(num_slots))
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, key: bytes) -> int | None:
        return self._slots.get(key)

    def touch(self, key: bytes) -> None:
        self._slots.move_to_end(key)

    def touch_chain(self, keys: list[bytes]) -> None:
        """Mark consecutive blocks of one request used, the first most recently: a block
        is only of use with every block before it, so the tail is evicted first (evicting
        the first would leave the rest unreachable, still taking room)."""
        for key in reversed(keys):
            if key in self._slots:
                self._slots.move_to_end(key)

    def allocate(
        self, key: bytes, busy: Callable[[int], bool], keep: Callable[[bytes], bool] | None = None
    ) -> int | None:
        """A slot for `key` (most recently used), evicting the least recently used slot that
        is not `busy` and whose key is not to `keep`; None if there is none."""
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            victim = next(
                (k for k, s in self._slots.items() if not busy(s) and not (keep and keep(k))),
                None,
            )
            if victim is None:
                return None
            slot = self._slots.pop(victim)
            self.evictions += 1
        self._slots[key] = slot
        return slot

    def forget_slots(self, slots: Iterable[int]) -> int:
        """Unmap the blocks held in `slots`, whose contents are not what the map says (a
        worker dropped the save that was to fill them), and free the slots: the blocks
        miss, and are saved again when next computed. Returns how many were unmapped."""
        wanted = set(slots)
        keys = [k for k, s in self._slots.items() if s in wanted]
        for key in keys:
            heapq.heappush(self._free, self._slots.pop(key))
        return len(keys)
