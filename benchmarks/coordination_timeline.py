"""Where one control-plane step spends its time, on every rank (a diagnostic, not a
benchmark of record).

Drives the coordination benchmark's synthetic steps (`kvdist.bench.coordination_workload`)
through the real `Coordinator` under a launcher, with the codec, the collectives and the
report collection wrapped in timers, and prints the median step (by rank 0's total) as a
timeline: each phase's start and end on each rank, in µs from rank 0's start of the step.
`time.perf_counter` is CLOCK_MONOTONIC on Linux, one clock for every process of a host, so
the ranks' timelines line up (one host only). The wrappers add ~1 µs per call.

    launch/mpirun.sh -n 2 python benchmarks/coordination_timeline.py --in-flight 256
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from kvdist.bench import coordination as bench
from kvdist.bench.coordination_workload import (
    NUM_BLOCKS,
    DelayedSaveWorker,
    Workload,
    admit_running,
)
from kvdist.comm.setup import init_distributed
from kvdist.coordination import coordinator as coordination

Event = tuple[str, float, float]


def _timed(owner: Any, name: str, events: list[Event]) -> None:
    """Replace `owner.name` by a wrapper that appends `(name, start, end)` to `events`."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            events.append((name, t0, time.perf_counter()))

    setattr(owner, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--in-flight", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=50)
    args = p.parse_args()
    topo = init_distributed(device="cpu")
    comm, timeout = topo.comm, topo.env.timeout_s
    events: list[Event] = []
    for name in ("encode_plan", "decode_plan", "encode_report", "decode_report"):
        _timed(coordination, name, events)  # as the coordinator module imported them
    for name in ("broadcast_bytes", "allgather_bytes"):
        _timed(comm, name, events)
    workload = Workload(args.in_flight, seed=0)
    worker = DelayedSaveWorker(bench._context(topo))
    coord = coordination.Coordinator(comm, worker, timeout_s=timeout, num_blocks=NUM_BLOCKS)
    admit_running(coord, workload, topo.rank)
    _timed(coord, "_collect", events)
    steps: list[tuple[float, float, list[Event]]] = []
    for i in range(args.warmup + args.steps):
        data = workload.next_step()
        plan = None
        if topo.rank == 0:
            plan = bench._plan(data)
            plan.connector_meta = bench._kv_meta(data)
        worker.prepare(data)
        comm.barrier(timeout_s=timeout, what="timeline line-up")
        events.clear()
        t0 = time.perf_counter()
        coord.exchange_reports(coord.publish_plan(plan))
        if i >= args.warmup:
            steps.append((t0, time.perf_counter(), list(events)))
    everyone = [
        json.loads(b)
        for b in comm.allgather_bytes(json.dumps(steps).encode(), timeout_s=timeout, what="x")
    ]
    if topo.rank == 0:
        totals = [end - start for start, end, _ in everyone[0]]
        k = int(np.argsort(totals)[len(totals) // 2])
        origin = everyone[0][k][0]
        print(f"{args.in_flight} in flight: median step on rank 0 {totals[k] * 1e6:.1f} µs")
        for rank, rank_steps in enumerate(everyone):
            start, end, evs = rank_steps[k]
            us = lambda t: (t - origin) * 1e6  # noqa: E731
            print(f"rank {rank}: {us(start):7.1f} -> {us(end):7.1f}")
            for name, a, b in sorted(evs, key=lambda e: e[1]):
                print(f"  {name:16s} {us(a):7.1f} -> {us(b):7.1f}  ({(b - a) * 1e6:5.1f})")
    topo.close()


if __name__ == "__main__":
    main()
