"""How fast could a Python control plane be? kvdist's step against a stripped-down "floor"
step and the baseline, on the same steps, in one run (a diagnostic, not a benchmark of
record).

The floor step does only what any implementation of this protocol has to, with none of
kvdist's checks, objects or bookkeeping: rank 0 packs a minimal msgpack header (step, the
new requests' ids, counts, finished and saving ids, the connector metadata) and writes it
and the int32 columns straight into its shared-memory slot; the other ranks read them out
with one copy; requests the ranks already know travel as int handles, not id strings
(their mapping is built outside the timed step); each rank's report is `[rank, saved ids]`;
the consensus is a dict of rank sets. It is a lower bound for kvdist's design, not a
usable implementation: bad bytes, unknown ids and errors on one rank go unchecked.

Before each implementation's step every rank runs the same untimed churn, so each starts
equally cold (what precedes a step changes its time by up to 2x: `workload` generates a
step of a second workload, `numpy` sweeps 16 MiB, `none` runs them back to back), and the
order of the three rotates. Needs the shared-memory communicator (ranks on one host):

    launch/mpirun.sh -n 2 python benchmarks/coordination_floor.py --in-flight 256
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from array import array

import msgpack
import numpy as np

from kvdist.api.step import RequestBatch
from kvdist.bench import coordination as bench
from kvdist.bench.coordination_baseline import BaselineCoordinator, step_metadata
from kvdist.bench.coordination_workload import (
    NUM_BLOCKS,
    DelayedSaveWorker,
    StepData,
    Workload,
    admit_running,
)
from kvdist.comm.setup import init_distributed
from kvdist.comm.shm import SharedMemoryCommunicator
from kvdist.coordination.coordinator import Coordinator
from kvdist.wire.codec import Plan

_SIZES = struct.Struct("<II")  # floor plan: total bytes, header bytes
IMPLS = ("kvdist", "floor", "baseline")


class FloorStep:
    """The least work per step (see the module docstring); uses the shared-memory
    communicator's slots directly."""

    def __init__(self, comm: SharedMemoryCommunicator, worker: DelayedSaveWorker):
        self.comm = comm
        self.worker = worker
        self.pending: dict[str, set[int]] = {}
        self.reported: set[str] = set()
        self.names: dict[int, str] = {}

    def step(self, plan: Plan | None, handles: tuple[array, array] | None) -> list[str]:
        """One step; rank 0 passes the plan and its requests' handles (new, cached)."""
        c, rank = self.comm, self.comm.rank
        call = c._begin("floor plan", 60.0)
        s, mem = call.seq, c._map
        if plan is not None and handles is not None:
            so = plan.scheduler_output
            new, cached = so.new_requests, so.cached_requests
            header = msgpack.packb(
                [
                    plan.step,
                    "\0".join(new.request_ids),
                    len(new),
                    len(cached),
                    so.finished_req_ids,
                    plan.saving_req_ids,
                    plan.connector_meta,
                ]
            )
            if min(c._done) < s - 2:
                c._await(c._done, s - 2, call)
            off = c._slot(s, 0)
            at = off + _SIZES.size + len(header)
            mem[off + _SIZES.size : at] = header
            for col in (handles[0], *new.columns(), handles[1], *cached.columns()):
                end = at + 4 * len(col)
                mem[at:end] = col
                at = end
            _SIZES.pack_into(mem, off, at - off, len(header))
            c._arrived[0] = s
            finished, saving, meta = so.finished_req_ids, plan.saving_req_ids, plan.connector_meta
        else:
            c._arrived[rank] = s
            if c._arrived[0] < s:
                c._await(c._arrived[0:1], s, call, ranks=[0])
            off = c._slot(s, 0)
            total, header_len = _SIZES.unpack_from(mem, off)
            start = off + _SIZES.size
            _, joined, num_new, num_cached, finished, saving, meta = msgpack.unpackb(
                c._buf[start : start + header_len]
            )
            ints = array("i")
            ints.frombytes(c._buf[start + header_len : off + total])
            unsigned = memoryview(ints).cast("B").cast("I")
            ids = joined.split("\0") if num_new else []
            _, end = RequestBatch.take_columns(ids, ints, num_new, unsigned)
            # The cached batch's rows are named by handle (the array stands in for ids).
            cached_handles = ints[end : end + num_cached]
            RequestBatch.take_columns(cached_handles, ints, end + num_cached, unsigned)  # type: ignore[arg-type]
            self.names.update(zip(ints[:num_new], ids))
        c._done[rank] = s
        c._end(call)
        for rid in saving:
            self.pending[rid] = set()
        self.worker.bind_connector_meta(meta)
        saved, _ = self.worker.get_finished(set(finished), set())
        mine = sorted(r for r in saved if r in self.pending and r not in self.reported)
        self.reported.update(mine)
        done = []
        reports = c.allgather_bytes(msgpack.packb([rank, mine]), timeout_s=60.0, what="floor")
        for r, payload in enumerate(reports):
            who, ids = (rank, mine) if r == rank else msgpack.unpackb(payload)
            for rid in ids:
                ranks = self.pending[rid]
                ranks.add(who)
                if len(ranks) == c.world_size:
                    del self.pending[rid]
                    self.reported.discard(rid)
                    done.append(rid)
        return done


class Handles:
    """Rank 0's request handles, kept as an engine would keep a slot per request (outside
    the timed step): the new and cached requests' handles of each step."""

    def __init__(self, running: list[str], capacity: int):
        self.of = {rid: i for i, rid in enumerate(running)}
        self.free = list(range(capacity - 1, len(running) - 1, -1))

    def step(self, data: StepData) -> tuple[array, array]:
        for rid in data.finished:
            self.free.append(self.of.pop(rid))
        new = array("i")
        for r in data.new:
            self.of[r.request_id] = h = self.free.pop()
            new.append(h)
        return new, array("i", [self.of[r.request_id] for r in data.cached])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--in-flight", type=int, default=256)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--churn", choices=("workload", "numpy", "none"), default="workload")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    topo = init_distributed(device="cpu")
    comm, rank, timeout = topo.comm, topo.rank, topo.env.timeout_s
    if not isinstance(comm, SharedMemoryCommunicator):
        raise SystemExit("coordination_floor needs the shared-memory communicator (one host)")
    oc = bench._object_collectives(topo)
    ctx = bench._context(topo)
    workload = Workload(args.in_flight, seed=0)
    other = Workload(args.in_flight, seed=1)
    sweep = np.zeros(16 << 20, dtype=np.uint8)
    churn = {
        "workload": other.next_step,
        "numpy": lambda: sweep.__iadd__(1),
        "none": lambda: None,
    }[args.churn]
    workers = {impl: DelayedSaveWorker(ctx) for impl in IMPLS}
    kvdist = Coordinator(comm, workers["kvdist"], timeout_s=timeout, num_blocks=NUM_BLOCKS)
    admit_running(kvdist, workload, comm.rank)
    floor = FloorStep(comm, workers["floor"])
    baseline = BaselineCoordinator(oc, workers["baseline"])
    handles = Handles(list(workload.running), capacity=1 << 16)
    seconds: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for i in range(args.warmup + args.steps):
        data = workload.next_step()
        step_handles = handles.step(data)
        plan = meta = None
        if rank == 0:
            plan = bench._plan(data)
            plan.connector_meta = bench._kv_meta(data)
            meta = step_metadata(data)
        for w in workers.values():
            w.prepare(data)
        done = {}
        for impl in IMPLS[i % 3 :] + IMPLS[: i % 3]:
            churn()
            comm.barrier(timeout_s=timeout, what="floor line-up")
            t0 = time.perf_counter()
            if impl == "kvdist":
                done[impl] = set(kvdist.exchange_reports(kvdist.publish_plan(plan)).saves_done)
            elif impl == "floor":
                done[impl] = set(floor.step(plan, step_handles if rank == 0 else None))
            else:
                done[impl] = baseline.step(data, meta)
            if i >= args.warmup:
                seconds[impl].append(time.perf_counter() - t0)
        oc.sent.clear()  # what the object pattern sent: counted by the main benchmark only
        if not done["kvdist"] == done["floor"] == done["baseline"]:
            raise AssertionError(f"step {i}: the implementations disagree on completed saves")
    oc.close()
    topo.close()
    if rank != 0:
        return
    median = {impl: float(np.median(v)) * 1e6 for impl, v in seconds.items()}
    result = {
        "in_flight": args.in_flight,
        "ranks": topo.world_size,
        "churn": args.churn,
        "steps": args.steps,
        "median_us": median,
        "speedup_kvdist": median["baseline"] / median["kvdist"],
        "speedup_floor": median["baseline"] / median["floor"],
    }
    print(
        f"{args.in_flight} in flight, {topo.world_size} ranks, churn {args.churn}: median µs "
        + ", ".join(f"{k} {v:.0f}" for k, v in median.items())
        + f"; speedup kvdist {result['speedup_kvdist']:.1f}x, floor {result['speedup_floor']:.1f}x",
        flush=True,
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
