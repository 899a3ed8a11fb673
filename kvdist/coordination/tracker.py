"""Completion gating: a transfer is done once every rank has reported it.

The tracker records *which* ranks reported each id, so a duplicate report from one rank can
never finish a request early, and each id is released exactly once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, KeysView

from kvdist.coordination.errors import ProtocolError

_RELEASED_KEPT = 4096
"""Released ids remembered, so that a late repeat of one is named as such."""


class RecentIds:
    """The last `limit` ids added, oldest first: a bounded memory of ids a check refers
    back to (released transfers, finished requests)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        if len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def discard(self, request_ids: Iterable[str]) -> None:
        """Forget `request_ids` (a set: only its few members are looked up)."""
        if not self._ids.keys().isdisjoint(request_ids):
            for rid in set(request_ids).intersection(self._ids):
                del self._ids[rid]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


class CompletionTracker:
    """Pending ids of one kind (saves or loads) and the ranks that reported each."""

    def __init__(self, world_size: int, kind: str):
        self.world_size = world_size
        self.kind = kind
        self._pending: dict[str, set[int]] = {}
        self._released = RecentIds(_RELEASED_KEPT)

    def expect(self, request_id: str) -> None:
        """`request_id` was handed to the workers; reports for it are now valid."""
        if request_id in self._pending:
            raise ProtocolError(f"{self.kind} of request {request_id!r} was started twice")
        self._pending[request_id] = set()
        self._released.discard((request_id,))

    def expect_all(self, request_ids: list[str]) -> None:
        """`expect` each of `request_ids`."""
        for rid in request_ids:
            self.expect(rid)

    def report(self, request_id: str, rank: int) -> bool:
        """Record that `rank` finished `request_id`; True when this completes it everywhere."""
        ranks = self._pending.get(request_id)
        if ranks is None:
            raise ProtocolError(
                f"rank {rank} reported {self.kind} of request {request_id!r}, "
                f"which is not pending (never started, or already released)"
            )
        ranks.add(rank)
        if len(ranks) == self.world_size:
            del self._pending[request_id]
            self._released.add(request_id)
            return True
        return False

    def was_released(self, request_id: str) -> bool:
        """Whether `request_id` completed on every rank recently (and is not pending again)."""
        return request_id in self._released and request_id not in self._pending

    def reporters(self, request_id: str) -> set[int]:
        return set(self._pending.get(request_id, ()))

    def pending_ids(self) -> KeysView[str]:
        return self._pending.keys()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)
