"""Multi-rank checks of kvdist.comm, started by tests/test_comm.py and tests/test_launchers.py.

Usage (under mpiexec, torchrun or a kvdist launch script): comm_worker.py SCENARIO
  collectives  broadcast/allgather of empty, small and large payloads, slot growth;
               rank 0 prints one JSON line with every rank's observations
  shm          the same kinds of payloads through the shared-memory communicator: at
               and past its slot, back-to-back broadcasts from changing roots, and long
               alternating runs that reuse both halves of the segment
  tp           an all-reduce over the tensor-parallel group; rank 0 prints one JSON line
  timeout      the last rank sleeps past KVDIST_TIMEOUT_S before an allgather; the others
               must raise CollectiveTimeout and abort the job
  raise        rank 1 raises before an allgather; abort_on_error must end every rank
  mismatch     rank 0 broadcasts where the other ranks gather, then rank 0 waits at a
               barrier; the others must raise CollectiveMismatch and end the job
  unclosed     hundreds of TP all-reduces, then return at once without closing the
               topology: the process group must be torn down before the interpreter
               is, or gloo can abort the process at exit
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from kvdist.comm import Topology, abort_on_error, init_distributed
from kvdist.comm.shm import HEADER as SLOT_HEADER
from kvdist.comm.slotted import HEADER, SHRINK_WINDOW

MIB = 1 << 20


def payload(tag: str, rank: int, size: int) -> bytes:
    return random.Random(f"{tag}/{rank}").randbytes(size)


class Cases:
    """Runs named collectives on `comm` and keeps one record per case: whether every rank
    got exactly the bytes sent, and how many collectives `counted` (the communicator
    itself, or the one it wraps) made for it, under the key `calls_key`."""

    def __init__(self, topo: Topology, counted: Any, calls_key: str, slots: bool) -> None:
        self.comm, self.counted, self.calls_key, self.slots = topo.comm, counted, calls_key, slots
        self.rank, self.n, self.timeout = topo.rank, topo.world_size, topo.env.timeout_s
        self.records: list[dict] = []

    def bcast(self, case: str, size: int, root: int) -> None:
        want = payload(case, root, size)
        before = self.counted.stats.collectives
        got = self.comm.broadcast_bytes(
            want if self.rank == root else None, root=root, timeout_s=self.timeout, what=case
        )
        self._record(case, got == want, len(got), before)

    def allgather(self, case: str, sizes: list[int]) -> None:
        before = self.counted.stats.collectives
        mine = payload(case, self.rank, sizes[self.rank])
        got = self.comm.allgather_bytes(mine, timeout_s=self.timeout, what=case)
        want = [payload(case, r, sizes[r]) for r in range(self.n)]
        self._record(case, got == want, sum(map(len, got)), before)

    def barrier(self) -> None:
        before = self.counted.stats.collectives
        self.comm.barrier(timeout_s=self.timeout, what="barrier")
        self._record("barrier", True, 0, before)

    def _record(self, case: str, ok: bool, nbytes: int, before: int) -> None:
        rec = {"case": case, "ok": ok, "bytes": nbytes}
        rec[self.calls_key] = self.counted.stats.collectives - before
        if self.slots:
            rec["slots"] = list(self.comm.slot_bytes)
        self.records.append(rec)


def collectives(topo: Topology) -> list[dict]:
    """Runs every case in a fixed order (slot growth depends on it); one record per case."""
    n = topo.world_size
    head = topo.comm.slot_bytes[0] - HEADER  # the initial broadcast slot's payload room
    c = Cases(topo, topo.comm, "calls", slots=True)
    c.bcast("bcast empty", 0, 0)
    c.bcast("bcast small", 100, 0)
    c.bcast("bcast small from last", 100, n - 1)
    c.bcast("bcast fills slot", head, 0)
    c.bcast("bcast one past slot", head + 1, n - 1)  # grows the slot to 8 KiB
    c.bcast("bcast 1MiB first", MIB, 0)  # 2 collectives, grows the slot to 2 MiB
    c.bcast("bcast 1MiB again", MIB, n - 1)  # fits now: 1 collective
    c.allgather("allgather empty", [0] * n)
    c.allgather("allgather small", [10 * r for r in range(n)])
    c.allgather("allgather one large", [0] * (n - 1) + [MIB])  # 2 collectives, slot -> 2 MiB
    c.allgather("allgather 1MiB again", [MIB - r for r in range(n)])  # fits now: 1 collective
    c.allgather("allgather 3MiB first", [3 * MIB] * n)  # 2 collectives, slot -> 4 MiB (cap)
    c.allgather("allgather 3MiB again", [3 * MIB - r for r in range(n)])
    c.allgather("allgather past cap", [5 * MIB if r == 0 else 1 for r in range(n)])
    for i in range(SHRINK_WINDOW):  # a big slot that small payloads no longer need shrinks
        c.allgather(f"allgather small {i}", [r + 1 for r in range(n)])
    c.barrier()
    return c.records


def shm_collectives(topo: Topology) -> list[dict]:
    """One record per case: whether every rank got exactly the bytes sent, and how many
    calls the wrapped communicator had to make (payloads past the slot go through it)."""
    n = topo.world_size
    head = topo.comm.slot_bytes - SLOT_HEADER
    c = Cases(topo, topo.comm.base, "base_calls", slots=False)
    c.bcast("bcast empty", 0, 0)
    c.bcast("bcast small from last", 100, n - 1)
    c.bcast("bcast fills slot", head, 0)
    c.bcast("bcast one past slot", head + 1, n - 1)
    c.bcast("bcast 3MiB", 3 * MIB, 0)
    c.allgather("allgather empty", [0] * n)
    c.allgather("allgather fills slot", [head - r for r in range(n)])
    c.allgather("allgather one past slot", [0] * (n - 1) + [head + 1])
    for i in range(200):  # both halves of the segment, reused many times, roots changing
        c.bcast(f"bcast run {i}", 1 + (i * 7919) % 5000, i % n)
        if i % 3 == 0:
            c.allgather(f"allgather run {i}", [(i + r) % 700 for r in range(n)])
    c.barrier()
    return c.records


def all_reduce_sum(t: Topology) -> float:
    """Sum of rank + 1 over the TP group."""
    x = torch.tensor([float(t.rank + 1)], device=t.device)
    dist.all_reduce(x, group=t.tp_group)
    return x.item()


def tp(topo: Topology) -> tuple[dict, Topology]:
    """All-reduce over the TP group; init_distributed refuses a second live topology, and
    works again once the first is closed."""

    result = {
        "sum": all_reduce_sum(topo),
        "tp_backend": topo.tp_backend,
        "launcher": topo.env.launcher,
    }
    try:
        init_distributed(device="cpu")
        result["second_init"] = "accepted"
    except RuntimeError as e:
        result["second_init"] = str(e)
    topo.close()
    again = init_distributed(device="cpu")
    result["sum_after_reinit"] = all_reduce_sum(again)
    return result, again


def main() -> None:
    scenario = sys.argv[1]
    topo = init_distributed(device="cpu")
    timeout = topo.env.timeout_s
    with abort_on_error(topo.comm):
        if scenario == "timeout":
            if topo.rank == topo.world_size - 1:
                time.sleep(60)  # outlives the deadline; the job must be aborted before this ends
            topo.comm.allgather_bytes(b"here", timeout_s=timeout, what="timeout probe")
            result: object = "no timeout"
        elif scenario == "raise":
            if topo.rank == 1:
                # What the abort must not leave behind (MPICH's node-local segments).
                with open("/proc/self/maps") as f:
                    shm = sorted({ln.split()[-1] for ln in f if "/dev/shm/mpich_shm_" in ln})
                print(f"mapped segments: {shm}", flush=True)
                raise ValueError("deliberate failure on rank 1")
            topo.comm.allgather_bytes(b"here", timeout_s=timeout, what="waiting for rank 1")
            result = "rank 1 did not fail"
        elif scenario == "mismatch":
            if topo.rank == 0:
                topo.comm.broadcast_bytes(b"plan", timeout_s=timeout, what="plan here")
            else:
                topo.comm.allgather_bytes(b"report", timeout_s=timeout, what="report there")
            topo.comm.barrier(timeout_s=timeout, what="after the mismatch")
            result = "no mismatch found"
        elif scenario == "collectives":
            result = collectives(topo)
        elif scenario == "shm":
            result = shm_collectives(topo)
        elif scenario == "tp":
            result, topo = tp(topo)
        elif scenario == "unclosed":
            # Gather first, then end right after the last all-reduce (that is the race).
            _gather(topo, "all-reduces follow")
            for i in range(300):
                x = torch.full((64,), float(i))
                dist.all_reduce(x, group=topo.tp_group)
            return
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
    with abort_on_error(topo.comm):
        _gather(topo, result)
    topo.close()


def _gather(topo: Topology, result: object) -> None:
    """Rank 0 prints every rank's result as one JSON line."""
    mine = json.dumps({"rank": topo.rank, "result": result}).encode()
    gathered = topo.comm.allgather_bytes(mine, timeout_s=topo.env.timeout_s, what="results")
    if topo.rank == 0:
        ranks = [json.loads(g) for g in gathered]
        print(
            json.dumps({"world_size": topo.world_size, "comm": topo.comm.name, "ranks": ranks}),
            flush=True,
        )


if __name__ == "__main__":
    main()
