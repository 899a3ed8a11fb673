"""Reusable host staging buffers (page-locked when the KV cache lives on a GPU).

Pinning memory costs a system call and page-table work per allocation (milliseconds for
tens of MB), and only pinned memory lets a device copy run asynchronously at full PCIe
bandwidth. So buffers are allocated once, leased for one transfer, and returned; the pool
grows (rounding sizes up to a power of two so that leases of similar size share buffers)
and never shrinks on its own (`trim` frees idle buffers).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

_MIN_BYTES = 1 << 20


class HostLease:
    """One leased host buffer, viewed as `tensor`; `release()` gives it back (idempotent)."""

    def __init__(self, pool: HostBufferPool, raw: torch.Tensor, tensor: torch.Tensor) -> None:
        self._pool = pool
        self._raw: torch.Tensor | None = raw
        self.tensor = tensor

    def release(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            self._pool._give_back(raw)


class HostBufferPool:
    """Leases host tensors of any shape and dtype from a set of reusable byte buffers.

    Thread-safe: IO threads release the leases they finished with.
    """

    def __init__(self, *, pin: bool) -> None:
        self.pin = pin
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocated_bytes = 0
        self.allocations = 0

    def acquire(self, shape: Sequence[int], dtype: torch.dtype) -> HostLease:
        """A host tensor of `shape` and `dtype` (contents undefined) backed by a pooled buffer."""
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        raw = self._take(max(1, nbytes))
        return HostLease(self, raw, raw[:nbytes].view(dtype).view(tuple(shape)))

    def trim(self) -> None:
        """Free every idle buffer."""
        with self._lock:
            for raw in self._free:
                self.allocated_bytes -= raw.numel()
            self._free.clear()

    def _take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                # By index: list.remove would compare tensors with ==, elementwise.
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            size = max(_MIN_BYTES, 1 << (nbytes - 1).bit_length())
            self.allocated_bytes += size
            self.allocations += 1
        # Allocate outside the lock: pinning a large buffer can take milliseconds.
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)

    def _give_back(self, raw: torch.Tensor) -> None:
        with self._lock:
            self._free.append(raw)


class IdUploader:
    """Uploads small int64 index arrays to one GPU through a few reused pinned buffers.

    `tensor.pin_memory()` per upload cost 150-200 µs on the H200 host (measured there;
    `benchmarks/transfer_probe.py` repeats it), a large share of what a save spends before its first
    byte moves. A buffer is reused only once the copy that read it has completed (one
    event per buffer); otherwise another is allocated. Thread-safe.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._free: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._lock = threading.Lock()

    def upload(self, ids: Sequence[int] | np.ndarray) -> torch.Tensor:
        """`ids` as an int64 tensor on the device, copied on the current stream."""
        n = len(ids)
        buf = self._take(n)
        buf.numpy()[:n] = ids
        out = buf[:n].to(self.device, non_blocking=True)
        read = torch.cuda.Event()
        read.record(torch.cuda.current_stream(self.device))
        with self._lock:
            self._free.append((buf, read))
        return out

    def _take(self, n: int) -> torch.Tensor:
        with self._lock:
            for i, (buf, read) in enumerate(self._free):
                if buf.numel() >= n and (read is None or read.query()):
                    del self._free[i]
                    return buf
        size = max(4096, 1 << (max(n, 1) - 1).bit_length())
        return torch.empty(size, dtype=torch.long, pin_memory=True)
