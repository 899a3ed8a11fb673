"""Host staging for the disk connector: blocks' rows as bytes, cut into IO tasks, and the
fixed set of buffers loads read through."""

from __future__ import annotations

import threading

import torch

from kvdist.kv.pinned import HostBufferPool, HostLease

# Blocks per IO task: about this many bytes. Each task costs a queue handoff (and each
# handoff takes the GIL from the engine's thread); a larger task would keep a queued read
# waiting longer behind a write.
TASK_BYTES = 4 << 20


def byte_rows(t: torch.Tensor) -> list[memoryview]:
    """The bytes of each row of a contiguous host tensor, as memoryviews (made once, on the
    engine's thread, so the IO threads slice no tensors: every torch call lets go of the
    GIL and takes it back, and each time the engine's thread may wait for it)."""
    flat = t.view(torch.uint8).numpy().reshape(-1).data
    n = t.shape[0]
    size = flat.nbytes // n if n else 0
    return [flat[i * size : (i + 1) * size] for i in range(n)]


def task_ranges(n: int, block_bytes: int) -> list[tuple[int, int]]:
    """`[lo, hi)` row ranges of about `TASK_BYTES` each covering `n` blocks."""
    per = max(1, TASK_BYTES // max(1, block_bytes))
    return [(lo, min(lo + per, n)) for lo in range(0, n, per)]


class LoadBuffers:
    """`count` host buffers of `rows` block rows each, that loads read through.

    A load larger than one buffer goes through in turns, and a load finding none free
    waits in a queue (its caller's, see `DiskLoader`): no thread blocks, and however many
    loads run at once, they never allocate more than `count` buffers. Each is allocated on
    first use, or up front by `reserve` (pinning takes 0.2-0.3 s per 512 MB on the H200
    host, which must not fall in a step)."""

    def __init__(self, pool: HostBufferPool, block_shape: tuple[int, ...], dtype: torch.dtype,
                 *, budget_bytes: int, block_bytes: int, count: int = 4) -> None:  # fmt: skip
        self.pool = pool
        self.count = count
        self.rows = max(1, budget_bytes // count // max(1, block_bytes))
        self._shape = (self.rows, *block_shape)
        self._dtype = dtype
        self._lock = threading.Lock()
        self._out = 0
        self._rows: dict[int, list[memoryview]] = {}  # by buffer address

    def reserve(self) -> None:
        self.pool.reserve(self.rows * _row_bytes(self._shape, self._dtype), self.count)

    def claim(self) -> bool:
        """Claim one of the `count` buffers (False: all are in use); `acquire` then
        leases it. Cheap, so callers can claim under their own lock and allocate outside."""
        with self._lock:
            if self._out == self.count:
                return False
            self._out += 1
            return True

    def acquire(self) -> tuple[HostLease, list[memoryview]]:
        """The claimed buffer (allocated on first use) and its rows' bytes (`byte_rows`,
        made once per buffer); on an error the claim is dropped."""
        try:
            lease = self.pool.acquire(self._shape, self._dtype)
        except BaseException:
            self.give_back(None)
            raise
        key = lease.tensor.data_ptr()
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = byte_rows(lease.tensor)
        return lease, rows

    def close(self) -> None:
        """Free every buffer (all must be back); the row views go first, since they
        would keep the memory mapped."""
        self._rows.clear()
        self.pool.trim()

    def give_back(self, lease: HostLease | None) -> None:
        """Return a claimed buffer (`lease`, or None when it was never leased)."""
        if lease is not None:
            lease.release()
        with self._lock:
            self._out -= 1


def _row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape[1:]:
        n *= d
    return n
