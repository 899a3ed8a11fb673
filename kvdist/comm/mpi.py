"""Control-plane communicator over MPI (mpi4py), buffer-based and nonblocking.

Only mpi4py's buffer methods (capitalised: `Ibcast`, `Iallgather`, ...) are used: the
lowercase ones pickle. Each collective is posted nonblocking and polled against a
deadline, so a rank that never arrives produces `CollectiveTimeout` instead of a hang.

How to wait: MPI progresses a nonblocking collective only while some rank calls `Test`,
so a rank asleep delays every peer that needs its next message. Polling therefore first
yields instead of sleeping (`Test`, then `sched_yield`, for up to `_YIELD_SPIN_S`): on an
idle core that answers in microseconds, and on an oversubscribed node it hands the core
to the rank being waited for. Only then does it sleep, with backoff, so a long wait (a
peer loading a model) costs no CPU. Measured with 4 ranks on 2 cores: with a 50 us spin
and then sleeps, ranks fell asleep in turn and a tiny allgather took 2 to 5 ms; with the
5 ms yield window it takes ~0.1 ms, as a blocking MPI_Allgather does.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from mpi4py import MPI

from kvdist.comm.mpi_start import remove_mpich_segments
from kvdist.comm.slotted import (
    DEFAULT_MAX_SLOT_BYTES,
    DEFAULT_SLOT_BYTES,
    Call,
    SlottedCommunicator,
)

_YIELD_SPIN_S = 5e-3
_FIRST_SLEEP_S = 20e-6
_MAX_SLEEP_S = 1e-3
_yield = getattr(os, "sched_yield", lambda: None)
_ROLL_CALL_TAG = 0x6B76


class MPICommunicator(SlottedCommunicator):
    """Collectives over a private duplicate of `mpi_comm` (kvdist never mixes with user traffic)."""

    name = "mpi"

    def __init__(
        self,
        mpi_comm: MPI.Comm,
        *,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        max_slot_bytes: int = DEFAULT_MAX_SLOT_BYTES,
    ):
        self._comm = mpi_comm.Dup()
        # Roll calls run on their own communicator so a stray message can never match a
        # collective's internal traffic or a user's point-to-point receive.
        self._roll = mpi_comm.Dup()
        super().__init__(
            rank=self._comm.Get_rank(),
            world_size=self._comm.Get_size(),
            slot_bytes=slot_bytes,
            max_slot_bytes=max_slot_bytes,
        )

    def _start_bcast(self, buf: memoryview, root: int) -> Any:
        return self._comm.Ibcast([buf, MPI.BYTE], root=root), buf

    def _start_allgather(self, send: memoryview, recv: memoryview) -> Any:
        return self._comm.Iallgather([send, MPI.BYTE], [recv, MPI.BYTE]), send, recv

    def _start_barrier(self) -> Any:
        return (self._comm.Ibarrier(),)

    def _allgather_rest(self, rest: memoryview, counts: list[int], call: Call) -> list[memoryview]:
        # MPI moves uneven blocks natively, so only the bytes that exist cross the wire.
        displs = [sum(counts[:i]) for i in range(len(counts))]
        recv = memoryview(bytearray(sum(counts)))
        req = self._comm.Iallgatherv([rest, MPI.BYTE], [recv, (counts, displs), MPI.BYTE])
        self._complete((req, rest, recv), call, len(rest))
        return [recv[d : d + c] for d, c in zip(displs, counts)]

    def _wait(self, handle: Any, deadline: float) -> bool:
        req = handle[0]
        if req.Test():
            return True
        spin_end = min(deadline, time.monotonic() + _YIELD_SPIN_S)
        while time.monotonic() < spin_end:
            if req.Test():
                return True
            _yield()
        pause = _FIRST_SLEEP_S
        while not req.Test():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(1.5 * pause, _MAX_SLEEP_S)
        return True

    def _roll_call(self, seq: int, window_s: float) -> list[int] | None:
        # Every rank that timed out tells every other rank which collective it is stuck
        # at; a rank stuck at the same or a later collective did arrive at ours.
        note = bytearray(seq.to_bytes(8, "little"))
        sends = [
            self._roll.Isend([note, MPI.BYTE], dest=r, tag=_ROLL_CALL_TAG)
            for r in range(self.world_size)
            if r != self.rank
        ]
        # Never waited on: a rank that is gone will not receive, and the job is ending.
        self._stranded += [note, sends]
        present = {self.rank}
        heard = bytearray(8)
        status = MPI.Status()
        end = time.monotonic() + window_s
        while len(present) < self.world_size and time.monotonic() < end:
            if self._roll.Iprobe(MPI.ANY_SOURCE, _ROLL_CALL_TAG, status):
                source = status.Get_source()
                self._roll.Recv([heard, MPI.BYTE], source, _ROLL_CALL_TAG)
                if int.from_bytes(heard, "little") >= seq:
                    present.add(source)
            else:
                time.sleep(1e-3)
        return [r for r in range(self.world_size) if r not in present]

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        remove_mpich_segments()
        MPI.COMM_WORLD.Abort(code)
        # MPI_Abort is not meant to return, but MPICH's at times does: this process ends
        # here, or its caller would go on to report the error (again) and unwind.
        os._exit(code)

    def close(self) -> None:
        # A communicator with a collective still posted cannot be freed safely.
        if self._broken is not None or MPI.Is_finalized():
            return
        for comm in (self._comm, self._roll):
            if comm != MPI.COMM_NULL:
                comm.Free()
