"""`kvdist bench coordination`: control-plane cost per step, kvdist against the old pattern.

Runs on every rank under a launcher (mpiexec / torchrun, or one plain process). For each
number of in-flight requests it drives the same synthetic steps
(`kvdist.bench.coordination_workload`) through two implementations, interleaved step by
step in the same process, rotating which goes first:

- **kvdist**: the real `Coordinator` (one plan broadcast + one report allgather per step)
  with a worker that reports each async save 1-3 steps late, at a different step per rank;
- **baseline**: the pickled-object pattern (`kvdist.bench.coordination_baseline`);
- **pickled_step**: the newer per-step pickled pattern (one pickled step broadcast, one
  allgather of new completions; also in `kvdist.bench.coordination_baseline`).

Only the control plane is timed (`time.perf_counter`, per rank, per step), from the same
rank-0 decisions (the scheduler's rows: `StepData`) to every rank holding the step's plan
and the consensus: for kvdist, building the step's request batches (int32 columns, new
prompts copied from the int32 arrays the engine keeps from admission), packing the
connector's save instructions (ids and hashes, as kvdist's disk connector does), encoding
the plan, the two collectives, decoding and the consensus; for the baselines, building the
step's nested dicts and lists, every object collective with its pickling, and the
completion sets. Each step starts after an untimed barrier, so generating the steps and
rank skew are not counted; what kvdist pays outside the step is recorded beside the
timings (`admission_us`: converting the step's new prompts to int32 once, on arrival),
with a second speedup that counts it. Both must agree on which saves completed at every
step; the result records whether they did.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvdist.api.types import ConnectorContext, SchedulerOutput
from kvdist.bench.coordination_baseline import (
    BaselineCoordinator,
    LocalObjectCollectives,
    MPIObjectCollectives,
    ObjectCollectives,
    PickledStepCoordinator,
    TorchObjectCollectives,
    step_metadata,
)
from kvdist.bench.coordination_report import (
    IMPLS,
    format_table,
    machine_info,
    render_markdown,
    versions,
    write_report,
)
from kvdist.bench.coordination_workload import (
    NUM_BLOCKS,
    DelayedSaveWorker,
    StepData,
    Workload,
    admit_running,
)
from kvdist.bench.ranks import run_on_every_rank
from kvdist.cli.common import CommandParser
from kvdist.connectors.tracking import pack_hashes
from kvdist.coordination.coordinator import Coordinator
from kvdist.wire.codec import Plan, decode_plan, encode_plan, pack_ids

DEFAULT_SIZES = (1, 16, 64, 256, 1024)
_PROFILE_EVERY = 4  # re-run the codec outside the timed region on every 4th timed step


# Runs on every rank and prints its own result on rank 0.
PRINTS_RESULT = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="comma-separated numbers of in-flight requests (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=200, help="timed steps per size (default: %(default)s)"
    )
    parser.add_argument(
        "--min-steps",
        type=int,
        default=50,
        help="fewest timed steps when --budget-s would allow fewer than --steps (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=30, help="untimed steps per size (default: %(default)s)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="wall-time budget for the timed steps of one size; the step count is cut "
        "(down to --min-steps) to fit, judged from the warmup (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    parser.add_argument(
        "--json", "--out", dest="json_out", default=None, help="rank 0 writes the result here"
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the codec re-timing and the tiny-collective floor measurements",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark on this rank; rank 0 prints and returns the result ({} elsewhere)."""
    sizes = _parse_sizes(args.sizes)
    if args.steps < 1 or args.min_steps < 1 or args.warmup < 0:
        raise ValueError("--steps and --min-steps must be >= 1 and --warmup >= 0")
    if not args.budget_s > 0:
        raise ValueError(f"--budget-s must be a number of seconds > 0, got {args.budget_s}")
    return run_on_every_rank(
        "cpu",
        lambda topo: _run(topo, args, sizes),
        lambda result: format_table(result["rows"]),
        args.json_out,
    )


# -- one run: every size, both implementations -------------------------------------------


@dataclass
class _Samples:
    seconds: list[float] = field(default_factory=list)
    collectives: list[int] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def add_extra(self, key: str, value: float) -> None:
        self.extra.setdefault(key, []).append(value)


def _run(topo, args, sizes: list[int]) -> dict[str, Any]:
    oc = _object_collectives(topo)
    try:
        floor_before = _floor(topo, oc) if args.profile else None
        local: dict[str, dict[str, Any]] = {}
        for n in sizes:
            local.update(_run_size(topo, oc, n, args))
        floor_after = _floor(topo, oc) if args.profile else None
    finally:
        oc.close()
    # Each rank's median and checks: a row's checks hold only where they held on every rank.
    medians = {
        k: [v["median_us"], v["completions_agree"], v["plans_received_intact"]]
        for k, v in local.items()
    }
    everyone = [
        json.loads(b)
        for b in topo.comm.allgather_bytes(
            json.dumps(medians).encode(), timeout_s=topo.env.timeout_s, what="bench medians"
        )
    ]
    if topo.rank != 0:
        return {}
    launcher = "mpirun" if topo.env.launcher in ("mpich", "openmpi", "slurm") else topo.env.launcher
    rows = []
    for n in sizes:
        base = local[f"{n}/baseline"]["median_us"]
        pickled_step = local[f"{n}/pickled_step"]["median_us"]
        for impl in IMPLS:
            r = local[f"{n}/{impl}"]
            row = {
                "launcher": launcher,
                "comm": topo.comm.name if impl == "kvdist" else _transport(topo),
                "ranks": topo.world_size,
                "in_flight": n,
                "impl": impl,
                **{k: v for k, v in r.items() if k != "profile"},
                "completions_agree": all(m[f"{n}/{impl}"][1] for m in everyone),
                "plans_received_intact": all(m[f"{n}/{impl}"][2] for m in everyone),
                "max_rank_median_us": max(m[f"{n}/{impl}"][0] for m in everyone),
                "speedup": base / r["median_us"] if impl == "kvdist" else None,
                "speedup_vs_pickled_step": pickled_step / r["median_us"]
                if impl == "kvdist"
                else None,
                # Counting, too, what kvdist's engine pays once per request on arrival:
                # the step's new prompts converted to int32.
                "speedup_with_admission": base / r["profile"]["with_admission_us"]
                if impl == "kvdist"
                else None,
            }
            rows.append(row)
    return {
        "benchmark": "coordination",
        "launcher": launcher,
        "ranks": topo.world_size,
        "rows": rows,
        "profile": {
            "per_size": {k: v["profile"] for k, v in local.items()},
            "tiny_collectives_before": floor_before,
            "tiny_collectives_after": floor_after,
            "slot_bytes_after": getattr(topo.comm, "slot_bytes", None),
        },
        "settings": {
            "sizes": sizes,
            "steps": args.steps,
            "min_steps": args.min_steps,
            "warmup": args.warmup,
            "budget_s": args.budget_s,
            "seed": args.seed,
        },
        "machine": machine_info(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def _run_size(topo, oc: ObjectCollectives, n: int, args) -> dict[str, dict[str, Any]]:
    rank, timeout = topo.rank, topo.env.timeout_s
    wl = Workload(n, args.seed)
    ctx = _context(topo)
    kv_worker = DelayedSaveWorker(ctx)
    workers = {impl: DelayedSaveWorker(ctx) for impl in IMPLS[1:]}
    coord = Coordinator(topo.comm, kv_worker, timeout_s=timeout, num_blocks=NUM_BLOCKS)
    admit_running(coord, wl, rank)
    baselines: dict[str, BaselineCoordinator | PickledStepCoordinator] = {
        "baseline": BaselineCoordinator(oc, workers["baseline"]),
        "pickled_step": PickledStepCoordinator(oc, workers["pickled_step"], topo.world_size),
    }
    samples = {impl: _Samples() for impl in IMPLS}
    line_up = _line_up(topo, oc)
    disagreements = 0
    plan_mismatches = 0  # steps whose plan a rank received other than rank 0 built it
    steps = args.steps
    i = 0
    t_warm = time.perf_counter()
    while i < args.warmup + steps:
        if i == args.warmup:
            steps = _decide_steps(topo, args, (time.perf_counter() - t_warm) / max(1, args.warmup))
        timed = i >= args.warmup
        data = wl.next_step()
        plan: Plan | None = None
        done: dict[str, set[str]] = {}
        for worker in (kv_worker, *workers.values()):
            worker.prepare(data)
        first = i % len(IMPLS)
        for impl in IMPLS[first:] + IMPLS[:first]:
            line_up()  # untimed
            s = samples[impl]
            if impl == "kvdist":
                t0 = time.perf_counter()
                build_s = meta_s = 0.0
                if rank == 0:
                    # The step as the engine builds it (its request batches), and the
                    # connector's save instructions packed: timed, as the baseline's
                    # nested dicts and their pickling are.
                    plan = _plan(data)
                    t1 = time.perf_counter()
                    plan.connector_meta = _kv_meta(data)
                    build_s, meta_s = t1 - t0, time.perf_counter() - t1
                got = coord.publish_plan(plan)
                consensus = coord.exchange_reports(got)
                dt = time.perf_counter() - t0
                done[impl] = set(consensus.saves_done)
                if i % _PROFILE_EVERY == 0:  # untimed: every rank rebuilds rank 0's plan
                    plan_mismatches += not _plan_received(got, data)
                if timed:
                    s.collectives.append(coord.stats.step_collectives[-1])
                    s.bytes_sent.append(coord.stats.step_bytes[-1])
                    s.add_extra("comm_us", coord.stats.step_seconds[-1] * 1e6)
                    s.add_extra("admission_us", data.admission_s * 1e6)
                    s.add_extra("build_plan_us", build_s * 1e6)
                    s.add_extra("connector_meta_us", meta_s * 1e6)
                    s.add_extra("with_admission_us", (dt + data.admission_s) * 1e6)
                    if (
                        plan is not None
                        and args.profile
                        and (i - args.warmup) % _PROFILE_EVERY == 0
                    ):
                        _profile_codec(plan, s)
            else:
                oc.calls = 0
                t0 = time.perf_counter()
                meta = step_metadata(data) if rank == 0 else None
                build_s = time.perf_counter() - t0
                done[impl] = baselines[impl].step(data, meta)
                dt = time.perf_counter() - t0
                sent, pickle_s = oc.take_sent_bytes()
                if timed:
                    s.collectives.append(oc.calls)
                    s.bytes_sent.append(sent)
                    s.add_extra("build_meta_us", build_s * 1e6)
                    s.add_extra("pickle_us", pickle_s * 1e6)
            if timed:
                s.seconds.append(dt)
        disagreements += not done["kvdist"] == done["baseline"] == done["pickled_step"]
        i += 1
    return {
        f"{n}/{impl}": _summarise(samples[impl], disagreements, plan_mismatches) for impl in IMPLS
    }


def _line_up(topo, oc: ObjectCollectives):
    """The barrier before each timed step, the same for both sides: one that busy-waits,
    so the ranks leave it close together. kvdist's shared-memory barrier releases every
    rank with one counter store (a few µs apart); an MPI barrier lets them leave tens of
    µs apart, which the first collective after it would then count; the object pattern's
    barrier otherwise (gloo's, or MPI's when there is no shared memory)."""
    if topo.comm.name == "shm":
        timeout = topo.env.timeout_s
        return lambda: topo.comm.barrier(timeout_s=timeout, what="bench line-up")
    return oc.barrier


def _decide_steps(topo, args, warm_step_s: float) -> int:
    """Rank 0 decides from the warmup's pace; every rank runs the same count."""
    steps = None
    if topo.rank == 0:
        fit = int(args.budget_s / warm_step_s) if warm_step_s > 0 else args.steps
        steps = str(max(min(args.min_steps, args.steps), min(args.steps, fit))).encode()
    got = topo.comm.broadcast_bytes(steps, timeout_s=topo.env.timeout_s, what="bench step count")
    return int(got)


def _plan(data: StepData) -> Plan:
    """The step as kvdist's scheduler builds it: the rows' fields gathered and added to the
    two request batches at once (`RequestBatch.add_rows`), new prompts copied from the
    int32 arrays held since arrival."""
    so = SchedulerOutput(step=data.step, finished_req_ids=data.finished)
    new = data.new
    so.new_requests.add_rows(
        [r.request_id for r in new],
        data.new_token_arrays,
        [r.new_block_ids for r in new],
        [r.computed_position for r in new],
        [r.num_scheduled_tokens for r in new],
    )
    so.cached_requests.extend(data.cached)
    return Plan(step=data.step, scheduler_output=so, saving_req_ids=list(data.finished))


def _kv_meta(data: StepData) -> dict[str, Any]:
    """The save instructions in the disk connector's wire form: ids and hashes packed."""
    return {
        "save": [
            [j.request_id, pack_ids(j.block_ids), pack_hashes(j.block_hashes)]
            for j in data.save_jobs
        ],
        "load": [],
    }


def _profile_codec(plan: Plan, s: _Samples) -> None:
    t0 = time.perf_counter()
    payload = encode_plan(plan)
    t1 = time.perf_counter()
    decode_plan(payload)
    t2 = time.perf_counter()
    s.add_extra("encode_plan_us", (t1 - t0) * 1e6)
    s.add_extra("decode_plan_us", (t2 - t1) * 1e6)
    s.add_extra("plan_bytes", len(payload))


def _plan_received(got: Plan, data: StepData) -> bool:
    """Whether the plan a rank received is the one rank 0 built from `data`: every request
    row, the finished and saving ids and the connector metadata (every rank generates the
    same steps, so each can build it again)."""
    want = _plan(data)
    so, wso = got.scheduler_output, want.scheduler_output
    return (
        so.new_requests == wso.new_requests
        and so.cached_requests == wso.cached_requests
        and so.finished_req_ids == wso.finished_req_ids
        and got.saving_req_ids == want.saving_req_ids
        and got.connector_meta == _kv_meta(data)
    )


def _summarise(s: _Samples, disagreements: int, plan_mismatches: int) -> dict[str, Any]:
    us = np.asarray(s.seconds) * 1e6
    return {
        "steps": len(us),
        "median_us": float(np.median(us)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "collectives_per_step": int(max(s.collectives)),
        "collectives_per_step_mean": float(np.mean(s.collectives)),
        "bytes_per_step": float(np.mean(s.bytes_sent)),
        "completions_agree": disagreements == 0,
        "plans_received_intact": plan_mismatches == 0,
        "profile": {k: float(np.median(v)) for k, v in s.extra.items()},
    }


def _floor(topo, oc: ObjectCollectives, iters: int = 200) -> dict[str, float]:
    """Median µs of one tiny broadcast + one tiny allgather, kvdist comm vs object pattern."""
    timeout = topo.env.timeout_s
    tiny = b"x" * 64
    out: dict[str, list[float]] = {"kvdist_comm_us": [], "object_pattern_us": []}
    for _ in range(iters):
        oc.barrier()
        t0 = time.perf_counter()
        topo.comm.broadcast_bytes(tiny if topo.rank == 0 else None, timeout_s=timeout, what="floor")
        topo.comm.allgather_bytes(tiny, timeout_s=timeout, what="floor")
        t1 = time.perf_counter()
        oc.barrier()
        t2 = time.perf_counter()
        oc.bcast(("cmpl-00000001", True) if topo.rank == 0 else None)
        oc.allgather(["cmpl-00000001"])
        t3 = time.perf_counter()
        oc.sent.clear()
        out["kvdist_comm_us"].append((t1 - t0) * 1e6)
        out["object_pattern_us"].append((t3 - t2) * 1e6)
    return {k: float(np.median(v)) for k, v in out.items()}


def _transport(topo) -> str:
    """The launcher's transport (mpi, torch, local), under kvdist's shared memory if any:
    the one the baseline runs on."""
    return getattr(topo.comm, "base", topo.comm).name


def _object_collectives(topo) -> ObjectCollectives:
    transport = _transport(topo)
    if transport == "mpi":
        from mpi4py import MPI

        return MPIObjectCollectives(MPI.COMM_WORLD)
    if transport == "torch":
        import torch.distributed as dist

        return TorchObjectCollectives(dist.new_group(backend="gloo"), topo.rank, topo.world_size)
    return LocalObjectCollectives()


def _context(topo) -> ConnectorContext:
    import torch

    return ConnectorContext(
        rank=topo.rank,
        world_size=topo.world_size,
        num_layers=32,
        block_size=16,
        num_kv_heads=8,
        kv_head_start=0,
        kv_head_end=8,
        head_dim=128,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        model_namespace="bench-coordination",
    )


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--sizes needs at least one size, all >= 1, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    """`python -m kvdist.bench.coordination [options]` on every rank, or
    `python -m kvdist.bench.coordination report PART.json... --json OUT --md OUT`, or
    `python -m kvdist.bench.coordination render MERGED.json OUT.md`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["render"]:
        # Re-render the markdown of a merged result: render MERGED.json OUT.md
        with open(argv[1]) as f:
            merged = json.load(f)
        with open(argv[2], "w") as f:
            f.write(render_markdown(merged))
        return 0
    if argv[:1] == ["report"]:
        p = CommandParser(prog="kvdist-bench-coordination report")
        p.add_argument("parts", nargs="+")
        p.add_argument("--json", required=True)
        p.add_argument("--md", required=True)
        p.add_argument("--command", default=None)
        a = p.parse_args(argv[1:])
        parts = []
        for path in a.parts:
            with open(path) as f:
                parts.append(json.load(f))
        merged = write_report(parts, a.json, a.md, a.command)
        print(format_table(merged["rows"]))
        return 0
    p = CommandParser(prog="kvdist bench coordination", description=__doc__.split("\n")[0])
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
