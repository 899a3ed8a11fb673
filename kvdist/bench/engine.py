"""`kvdist bench engine`: the engine's per-step overhead outside the model forward.

Runs N concurrent requests through `kvdist.LLM` (optionally with a connector) and reports,
per step, total time, model time (forward + logits, without connector hooks, with the wait
for the device on a GPU) and the rest (scheduling, plan broadcast, report exchange, hook
dispatch, sampling), from `llm.stats`; `control_ms_mean` is the plan broadcast and report
exchange alone. `--eager` turns the decode graphs off (the comparison on a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from typing import Any

from kvdist.cli.common import add_connector_args, command_errors, connector_config, count_arg

# Runs on every rank and prints its own result on rank 0.
PRINTS_RESULT = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=count_arg(1), default=64, help="concurrent requests")
    p.add_argument("--prompt-len", type=count_arg(1), default=96)
    p.add_argument("--max-tokens", type=count_arg(1), default=32)
    add_connector_args(p)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument(
        "--eager", action="store_true", help="no CUDA graphs for decode steps (the baseline)"
    )
    p.add_argument("--out", default=None, help="write the JSON result here (rank 0)")


def warmed_up_prompts(llm, requests: int, prompt_len: int, params) -> list[list[int]]:
    """`requests` random prompts of `prompt_len` tokens, after one `generate` of as many
    other prompts of that shape: the measured run then finds its kernels chosen and its
    decode graphs captured, and no prefix-cache hit from the warm-up."""
    rng = random.Random(0)
    vocab = llm.model_config.vocab_size

    def random_prompts() -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(requests)]

    llm.generate(random_prompts(), params)
    return random_prompts()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvdist.bench.cli import check_output_path
    from kvdist.comm import init_distributed
    from kvdist.engine.llm import LLM
    from kvdist.engine.sampling import SamplingParams
    from kvdist.engine.stats import percentile

    topo = init_distributed(device=args.device)
    with command_errors(topo.comm, "bench engine"):
        if args.out and topo.rank == 0:  # the rank that writes it; a failure ends them all
            check_output_path(args.out, "--out")
        llm = LLM(
            args.model,
            connector=connector_config(args.connector, args.connector_kwargs),
            topology=topo,
            num_blocks=args.num_blocks,
            max_num_seqs=max(256, args.requests),
            cuda_graphs=not args.eager,
        )
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        prompts = warmed_up_prompts(llm, args.requests, args.prompt_len, params)
        before = dict(llm.stats)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        failed = [o for o in outs if o.finish_reason == "error"]
        if failed:
            raise ValueError(f"{len(failed)} requests failed, e.g.: {failed[0].error}")
        st = llm.stats
        steps = st["engine_steps"] - before["engine_steps"]
        # The timed call's steps only: the engine's recent window holds the warmup's too.
        timed_overheads = list(llm._engine_stats.recent_overhead)[-steps:]
        step_s = st["step_seconds"] - before["step_seconds"]
        model_s = st["model_seconds"] - before["model_seconds"]
        result = {
            "bench": "engine",
            "model": args.model,
            "ranks": topo.world_size,
            "launcher": topo.env.launcher,
            "device": str(topo.device),
            "requests": args.requests,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "connector": args.connector,
            "cuda_graphs": llm.graphs is not None,
            "steps": steps,
            "cuda_graph_steps": st["cuda_graph_steps"] - before["cuda_graph_steps"],
            # In the timed call only (the warmup captures most of them).
            "cuda_graphs_captured": st.get("cuda_graphs_captured", 0)
            - before.get("cuda_graphs_captured", 0),
            "cuda_graph_capture_s": st.get("cuda_graph_capture_seconds", 0.0)
            - before.get("cuda_graph_capture_seconds", 0.0),
            "wall_s": wall,
            "step_ms_mean": step_s / steps * 1e3,
            "model_ms_mean": model_s / steps * 1e3,
            "overhead_ms_mean": (step_s - model_s) / steps * 1e3,
            "control_ms_mean": (st["control_seconds"] - before["control_seconds"]) / steps * 1e3,
            "overhead_fraction": (step_s - model_s) / step_s,
            "overhead_median_us": percentile(timed_overheads, 50) * 1e6,
            "overhead_p99_us": percentile(timed_overheads, 99) * 1e6,
            # The engine keeps the last 4096 steps: past that, the percentiles cover those.
            "overhead_percentile_steps": len(timed_overheads),
            "control_collectives_max_per_step": st["max_collectives_per_step"],
            # Generated, not asked for: a context too short for max_tokens ends them early.
            "tokens_per_s": sum(len(o.output_token_ids) for o in outs) / wall,
            "date": time.strftime("%Y-%m-%d"),
            "host": platform.node(),
        }
        llm.shutdown()
        if topo.rank == 0:
            print(json.dumps(result, indent=2))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=2)
    topo.close()
    return result
