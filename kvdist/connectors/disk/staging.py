"""A step's blocks in a host staging buffer: their rows as bytes, cut into IO tasks."""

from __future__ import annotations

import torch

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
