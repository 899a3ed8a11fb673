"""Reusable host staging buffers (page-locked when the KV cache lives on a GPU).

Pinning memory costs a system call and page-table work per allocation (milliseconds for
tens of MB), and only pinned memory lets a device copy run asynchronously at full PCIe
bandwidth. So buffers are allocated once, leased for one transfer, and returned; the pool
grows (rounding sizes up to a power of two so that leases of similar size share buffers)
and never shrinks on its own (`trim` frees idle buffers).

A pool made with `shared=True` allocates its buffers as shared memory (`SharedBuffer`) that
another process can map, pinned by registering them with CUDA.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

_MIN_BYTES = 1 << 20
_buffer_ids = itertools.count()
_pin_warned = False


class SharedBuffer:
    """Host memory another process can map: a memfd (anonymous, in no filesystem, freed once
    no process holds it) mapped here as `tensor`; `fd` is what to pass to the other process.
    Pinned (registered with CUDA) when asked and CUDA allows it.

    CUDA must forget a registered range before it is unmapped, or a later mapping at the
    same addresses cannot be registered (and fails kernels after it): `close()`, or the
    finalizer when the buffer is collected, unregisters while it still holds the mapping."""

    def __init__(self, size: int, *, pin: bool) -> None:
        self.buf_id = next(_buffer_ids)
        self.size = size
        fd = os.memfd_create(f"kvdist-staging-{self.buf_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.tensor = torch.frombuffer(mm, dtype=torch.uint8)
        ptr = self.tensor.data_ptr() if pin and _register(self.tensor) else None
        self.pinned = ptr is not None
        # Holds the mapping (and the descriptor) until it has unregistered it.
        self._finalizer = weakref.finalize(self, _release, mm, ptr, fd)

    def close(self) -> None:
        """Unpin and close the descriptor (idempotent); the memory goes with the last view
        of it, unpinned."""
        self._finalizer()
        self.pinned = False
        self.fd = -1


def _release(mm: mmap.mmap, ptr: int | None, fd: int) -> None:
    if ptr is not None:
        # At interpreter exit CUDA may already be torn down; the process's memory goes anyway.
        with contextlib.suppress(Exception):
            torch.cuda.cudart().cudaHostUnregister(ptr)
    os.close(fd)
    del mm  # the mapping itself goes once no tensor views it


def _consume_cuda_error() -> None:
    """Take the failed call's error off this thread's CUDA runtime state: torch's bindings
    have no `cudaGetLastError`, and left there, the next kernel launch would report it as
    its own. A kernel launch checks (and so clears) it."""
    with contextlib.suppress(RuntimeError):
        torch.zeros(1, device="cuda")


def _register(t: torch.Tensor) -> bool:
    """Page-lock `t`'s memory for CUDA; False (and one warning) if CUDA refuses."""
    global _pin_warned
    cudart = torch.cuda.cudart()
    rc = int(cudart.cudaHostRegister(t.data_ptr(), t.numel(), 0))
    if rc == 0:
        return True
    _consume_cuda_error()
    if not _pin_warned:
        _pin_warned = True
        log.warning(
            "cudaHostRegister of a %d-byte shared staging buffer failed (error %d); copies "
            "through it run unpinned (slower)",
            t.numel(), rc,
        )  # fmt: skip
    return False


class HostLease:
    """One leased host buffer, viewed as `tensor`; `release()` gives it back (idempotent).
    `shared`: the shared memory under it (its row 0 is the buffer's first byte), or None."""

    def __init__(
        self,
        pool: HostBufferPool,
        raw: torch.Tensor,
        tensor: torch.Tensor,
        shared: SharedBuffer | None = None,
    ) -> None:
        self._pool = pool
        self._raw: torch.Tensor | None = raw
        self.tensor = tensor
        self.shared = shared

    def release(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            self._pool._give_back(raw)


class HostBufferPool:
    """Leases host tensors of any shape and dtype from a set of reusable byte buffers.

    Thread-safe: IO threads release the leases they finished with. `shared`: buffers are
    `SharedBuffer`s; `on_free(buf_id)` is called for each one `trim` frees. `round_up`:
    sizes go up to a power of two (leases of varying size then share buffers); False for a
    pool whose leases all have one size, which then allocates exactly that.
    """

    def __init__(self, *, pin: bool, shared: bool = False, round_up: bool = True) -> None:
        self.pin = pin
        self.shared = shared
        self.round_up = round_up
        self.on_free: Callable[[int], None] | None = None
        self._shared: dict[int, SharedBuffer] = {}  # by data_ptr
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
        view = raw[:nbytes].view(dtype).view(tuple(shape))
        return HostLease(self, raw, view, self._shared.get(raw.data_ptr()))

    def reserve(self, nbytes: int, count: int) -> None:
        """Allocate `count` idle buffers that each hold `nbytes` now, so that the first
        leases of up to that size do not pay for it (allocating and pinning 512 MB took
        0.2-0.3 s on the H200 host, on the thread that asked, in the middle of a step)."""
        fresh = [self._new(self._size_for(nbytes)) for _ in range(count)]
        with self._lock:
            self._free.extend(fresh)

    def shared_buffers(self) -> list[SharedBuffer]:
        """The pool's shared buffers (to map elsewhere ahead of their first use)."""
        with self._lock:
            return list(self._shared.values())

    def trim(self) -> None:
        """Free every idle buffer."""
        with self._lock:
            idle, self._free = self._free, []
        for raw in idle:
            self._free_raw(raw)

    def discard(self, lease: HostLease) -> None:
        """Free `lease`'s buffer now, instead of keeping it for reuse (idempotent)."""
        raw, lease._raw = lease._raw, None
        if raw is not None:
            self._free_raw(raw)

    def _free_raw(self, raw: torch.Tensor) -> None:
        with self._lock:
            buf = self._shared.pop(raw.data_ptr(), None)
            self.allocated_bytes -= raw.numel()
        if buf is not None:
            buf.close()
            if self.on_free is not None:
                self.on_free(buf.buf_id)

    def _take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                # By index: list.remove would compare tensors with ==, elementwise.
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        # Allocate outside the lock: pinning a large buffer can take milliseconds.
        return self._new(self._size_for(nbytes))

    def _size_for(self, nbytes: int) -> int:
        if not self.round_up:
            return max(1, nbytes)
        return max(_MIN_BYTES, 1 << (max(1, nbytes) - 1).bit_length())

    def _new(self, size: int) -> torch.Tensor:
        with self._lock:
            self.allocated_bytes += size
            self.allocations += 1
        if not self.shared:
            return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        buf = SharedBuffer(size, pin=self.pin)
        with self._lock:
            self._shared[buf.tensor.data_ptr()] = buf
        return buf.tensor

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
