"""Where an engine step's time goes: torch-profiler tables of a short `kvdist.LLM` run.

    python benchmarks/profile_step.py --device cuda --model llama3-8b [--connector cpu]
    launch/mpirun.sh -n 2 python benchmarks/profile_step.py ...   (profiles every rank;
                                                                    rank 0 writes the files)

Warms up, then profiles one `generate` of `--requests` prompts: prefill steps first, then
decodes. Writes, under `--out`, `profile.txt` (the top operators by self CPU time and by
self device time, with call counts) and `profile.json` (steps, wall time, operator and
kernel-launch counts per step, the engine's own step statistics). A diagnostic, not a
benchmark with a baseline: it says which calls a step is made of, for deciding what to
change.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvdist.bench.engine import warmed_up_prompts
from kvdist.cli.common import add_connector_args, connector_config
from kvdist.comm import abort_on_error, init_distributed
from kvdist.engine.llm import LLM
from kvdist.engine.sampling import SamplingParams

_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaMemcpyAsync")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    add_connector_args(p)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rows", type=int, default=30, help="operators per table")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--out", default="profile_step")
    args = p.parse_args()

    topo = init_distributed(device=args.device)
    with abort_on_error(topo.comm):
        llm = LLM(
            args.model,
            connector=connector_config(args.connector, args.connector_kwargs),
            topology=topo,
            dtype=args.dtype,
            cuda_graphs=not args.eager,
        )
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        prompts = warmed_up_prompts(llm, args.requests, args.prompt_len, params)
        before = dict(llm.stats)
        cuda = topo.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        after = dict(llm.stats)
        llm.shutdown()
        if topo.rank != 0:
            return
        steps = after["engine_steps"] - before["engine_steps"]
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        launches = sum(e.count for e in events if e.key in _LAUNCHES)
        device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
        tables = [
            f"# {args.model}, {topo.world_size} rank(s), {topo.device}, connector "
            f"{args.connector}, {args.requests} x {args.prompt_len} prompt tokens, "
            f"{args.max_tokens} new; {steps} steps in {wall:.3f} s",
            "## by self CPU time",
            events.table(sort_by="self_cpu_time_total", row_limit=args.rows),
        ]
        if cuda:
            tables += [
                "## by self device time",
                events.table(sort_by=device_key, row_limit=args.rows),
            ]
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write("\n\n".join(tables) + "\n")
        summary = {
            "model": args.model,
            "ranks": topo.world_size,
            "device": str(topo.device),
            "connector": args.connector,
            "cuda_graphs": llm.graphs is not None,
            "requests": args.requests,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "steps": steps,
            "wall_s": wall,
            "step_ms_mean": wall / steps * 1e3 if steps else 0.0,
            "aten_ops_per_step": ops / steps if steps else 0.0,
            "launches_per_step": launches / steps if steps else 0.0,
            "engine_stats": {
                k: after[k] - before[k]
                for k in (
                    "step_seconds",
                    "model_seconds",
                    "hook_seconds",
                    "control_seconds",
                    "cuda_graph_steps",
                )
                if k in after
            },
        }
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
