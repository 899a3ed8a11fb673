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
    """At most `count` host buffers of up to `rows` block rows each, that loads read
    through.

    A load larger than one buffer goes through in turns, and a load finding none free
    waits in a queue (its caller's, see `DiskLoader`): no thread blocks, and however many
    loads run at once, they never hold more than `count` buffers. A buffer is allocated
    when a chunk first needs it, as large as that chunk (in powers of two of rows, up to
    `rows`), and replaced by a larger one when a later chunk needs more, so small loads
    do not map and fault in a full buffer; `reserve` allocates all of them at full size
    up front instead (pinning takes 0.2-0.3 s per 512 MB on the H200 host, which must not
    fall in a step)."""

    def __init__(self, pool: HostBufferPool, block_shape: tuple[int, ...], dtype: torch.dtype,
                 *, budget_bytes: int, block_bytes: int, count: int = 4) -> None:  # fmt: skip
        self.pool = pool
        self.count = count
        self.rows = max(1, budget_bytes // count // max(1, block_bytes))
        self._block_shape = block_shape
        self._dtype = dtype
        self._lock = threading.Lock()
        self._out = 0  # claimed
        self._held = 0  # buffers allocated and not freed, idle or in use
        self._idle: list[tuple[HostLease, list[memoryview]]] = []

    def reserve(self) -> None:
        """Allocate every buffer now, at full size."""
        with self._lock:
            n = self.count - self._held
            self._held += n
        fresh = [self._new(self.rows) for _ in range(n)]
        with self._lock:
            self._idle += fresh

    def claim(self) -> bool:
        """Claim one of the `count` buffers (False: all are in use); `acquire` then
        leases it. Cheap, so callers can claim under their own lock and allocate outside."""
        with self._lock:
            if self._out == self.count:
                return False
            self._out += 1
            return True

    def acquire(self, num_rows: int) -> tuple[HostLease, list[memoryview]]:
        """The claimed buffer, with at least `num_rows` rows (at most `rows`), and its
        rows' bytes (`byte_rows`); on an error the claim is dropped."""
        num_rows = min(num_rows, self.rows)
        with self._lock:
            fits = [b for b in self._idle if len(b[1]) >= num_rows]
            if fits:
                got = min(fits, key=lambda b: len(b[1]))
                self._idle.remove(got)
                return got
            # None fits: a new buffer, in place of an idle one when all are allocated.
            small = self._idle.pop() if self._held == self.count and self._idle else None
            self._held += small is None
        if small is not None:
            self.pool.discard(small[0])
        size = min(self.rows, 1 << (num_rows - 1).bit_length())
        try:
            return self._new(size)
        except BaseException:
            with self._lock:
                self._held -= 1
            self.give_back(None)
            raise

    def give_back(self, buffer: tuple[HostLease, list[memoryview]] | None) -> None:
        """Return a claimed buffer (None when it was never acquired)."""
        with self._lock:
            if buffer is not None:
                self._idle.append(buffer)
            self._out -= 1

    def close(self) -> None:
        """Free every buffer (all must be back)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._held -= len(idle)
        for lease, _ in idle:
            self.pool.discard(lease)

    def _new(self, num_rows: int) -> tuple[HostLease, list[memoryview]]:
        lease = self.pool.acquire((num_rows, *self._block_shape), self._dtype)
        return lease, byte_rows(lease.tensor)
