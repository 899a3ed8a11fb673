"""Ranks as threads of one process: a communicator for tests and dry runs.

`InProcessGroup(n).communicators()` gives n communicators whose collectives meet through a
barrier; each thread drives one rank. Same semantics and errors as the real backends.
"""

from __future__ import annotations

import threading
import time

from kvdist.comm.base import CollectiveTimeout, Communicator


class InProcessGroup:
    def __init__(self, world_size: int):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: list[bytes | None] = [None] * world_size
        self._arrived: dict[int, set[int]] = {}
        self._lock = threading.Lock()

    def communicators(self) -> list[InProcessCommunicator]:
        return [InProcessCommunicator(self, r) for r in range(self.world_size)]


class InProcessCommunicator(Communicator):
    name = "inprocess"

    def __init__(self, group: InProcessGroup, rank: int):
        super().__init__()
        self.group = group
        self.rank = rank
        self.world_size = group.world_size
        self._seq = 0

    def _meet(self, timeout_s: float, what: str) -> None:
        g = self.group
        with g._lock:
            g._arrived.setdefault(self._seq, set()).add(self.rank)
        try:
            g._barrier.wait(timeout_s)
        except threading.BrokenBarrierError:
            with g._lock:
                arrived = g._arrived.get(self._seq, set())
            missing = sorted(set(range(self.world_size)) - arrived)
            raise CollectiveTimeout(what, timeout_s, self.rank, missing) from None

    def _collective(self, data: bytes | None, timeout_s: float, what: str) -> list[bytes | None]:
        t0 = time.perf_counter()
        self._seq += 1
        self.group._slots[self.rank] = data
        self._meet(timeout_s, what)
        result = list(self.group._slots)
        self._seq += 1
        self._meet(timeout_s, what)  # nobody overwrites a slot before everyone has read it
        st = self.stats
        st.collectives += 1
        st.seconds += time.perf_counter() - t0
        st.bytes_sent += len(data or b"")
        return result

    def broadcast_bytes(
        self, data: bytes | None, *, root: int = 0, timeout_s: float, what: str
    ) -> bytes:
        if self.rank == root and data is None:
            raise ValueError("the root of a broadcast must pass bytes")
        payload = self._collective(data if self.rank == root else None, timeout_s, what)[root]
        assert payload is not None
        return bytes(payload)

    def allgather_bytes(self, data: bytes, *, timeout_s: float, what: str) -> list[bytes]:
        return [bytes(p or b"") for p in self._collective(bytes(data), timeout_s, what)]

    def barrier(self, *, timeout_s: float, what: str) -> None:
        self._collective(b"", timeout_s, what)

    def abort(self, code: int = 1) -> None:
        self.group._barrier.abort()
