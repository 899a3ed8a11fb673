"""Control-plane communicator over a torch.distributed gloo group.

A gloo group carries the control messages as uint8 CPU tensors, so it can live beside the
NCCL group that carries tensor-parallel all-reduces without queueing behind them. Each
collective is posted with `async_op=True` and waited with the time left to its deadline.
Roll calls on timeout go through the rendezvous store (a TCPStore, reachable while the
collective itself is stuck): each rank that timed out writes the sequence number it is
stuck at under `kvdist/rollcall/<rank>`, then reads the others' entries.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kvdist.comm.mpi_start import remove_mpich_segments
from kvdist.comm.slotted import DEFAULT_MAX_SLOT_BYTES, DEFAULT_SLOT_BYTES, SlottedCommunicator


def _tensor(buf: memoryview) -> torch.Tensor:
    # Shares memory with the slot: no copy in or out.
    return torch.frombuffer(buf, dtype=torch.uint8)


class TorchCommunicator(SlottedCommunicator):
    """Collectives over `group` (a gloo process group); `store` enables roll calls."""

    name = "torch"

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        store: dist.Store | None = None,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        max_slot_bytes: int = DEFAULT_MAX_SLOT_BYTES,
    ):
        self._group = group
        self._store = dist.PrefixStore("kvdist/rollcall", store) if store is not None else None
        super().__init__(
            rank=group.rank(),
            world_size=group.size(),
            slot_bytes=slot_bytes,
            max_slot_bytes=max_slot_bytes,
        )

    def _start_bcast(self, buf: memoryview, root: int) -> Any:
        # torch names the root by its global rank; the group may be a subgroup.
        src = dist.get_global_rank(self._group, root)
        return dist.broadcast(_tensor(buf), src, group=self._group, async_op=True)

    def _start_allgather(self, send: memoryview, recv: memoryview) -> Any:
        # gloo needs equal blocks; the default second round of SlottedCommunicator pads.
        outs = list(_tensor(recv).view(self.world_size, -1).unbind(0))
        return dist.all_gather(outs, _tensor(send), group=self._group, async_op=True)

    def _start_barrier(self) -> Any:
        return dist.barrier(group=self._group, async_op=True)

    def _wait(self, handle: Any, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return handle.is_completed()
        try:
            # timedelta(0) would mean "no timeout" to torch, hence the floor.
            handle.wait(timeout=timedelta(seconds=max(left, 1e-3)))
        except RuntimeError:
            # gloo reports its own deadline (or ours) with a RuntimeError; anything raised
            # before the deadline is a real failure, such as a peer that closed its socket.
            if time.monotonic() >= deadline - 1e-3:
                return False
            raise
        return True

    def _roll_call(self, seq: int, window_s: float) -> list[int] | None:
        store = self._store
        if store is None:
            return None

        def arrived(r: int) -> bool:
            # Stuck at our collective or a later one: it did arrive at ours.
            return store.check([str(r)]) and int(store.get(str(r))) >= seq

        try:
            store.set(str(self.rank), str(seq))
            present = {self.rank}
            end = time.monotonic() + window_s
            while len(present) < self.world_size and time.monotonic() < end:
                present |= {r for r in range(self.world_size) if r not in present and arrived(r)}
                time.sleep(0.01)
        except Exception:
            # The store lives on rank 0 (or the torchrun agent); if it is gone, nobody can
            # be asked.
            return None
        return [r for r in range(self.world_size) if r not in present]

    def abort(self, code: int = 1) -> None:
        # torchrun notices a worker that exited and tears the others down.
        sys.stdout.flush()
        sys.stderr.flush()
        # Under mpiexec with KVDIST_COMM=torch, MPI started (for the rendezvous) and its
        # segments are removed at MPI_Finalize, which this exit skips.
        remove_mpich_segments()
        os._exit(code)

    def close(self) -> None:
        # The group belongs to whoever created it (init_distributed destroys it); dropping
        # the reference lets it be freed before interpreter shutdown.
        self._store = None
        self._group = None  # type: ignore[assignment]
