"""The communicator of a single process (world size 1).

Collectives return their input. They still count in `stats`, one collective per call as
the multi-rank communicators count them in the common case, so per-step counters read the
same at every world size.
"""

from __future__ import annotations

import sys

from kvdist.comm.base import Communicator


class LocalCommunicator(Communicator):
    """World size 1: every collective is the identity."""

    name = "local"

    def __init__(self) -> None:
        super().__init__()
        self.rank = 0
        self.world_size = 1

    def broadcast_bytes(
        self, data: bytes | None, *, root: int = 0, timeout_s: float, what: str
    ) -> bytes:
        self._check_root(data, root, what)
        return self._count(bytes(self._payload(data, "broadcast_bytes", what)))

    def allgather_bytes(self, data: bytes, *, timeout_s: float, what: str) -> list[bytes]:
        return [self._count(bytes(self._payload(data, "allgather_bytes", what)))]

    def barrier(self, *, timeout_s: float, what: str) -> None:
        self.stats.collectives += 1

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(code)

    def _count(self, data: bytes) -> bytes:
        self.stats.collectives += 1
        self.stats.bytes_sent += len(data)
        return data
