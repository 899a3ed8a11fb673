"""Rank 0's map of the host pools: block hash → slot, least recently used first."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable


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

    def allocate(self, key: bytes, busy: Callable[[int], bool]) -> int | None:
        """A slot for `key` (most recently used), evicting the least recently used slot that
        is not `busy`; None if every slot is busy."""
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            victim = next((k for k, s in self._slots.items() if not busy(s)), None)
            if victim is None:
                return None
            slot = self._slots.pop(victim)
            self.evictions += 1
        self._slots[key] = slot
        return slot
