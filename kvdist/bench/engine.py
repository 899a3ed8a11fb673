"""`kvdist bench engine`: the engine's per-step overhead outside the model forward.

Runs N concurrent requests through `kvdist.LLM` (optionally with a connector) and reports,
per step, total time, model time (forward + logits, without connector hooks) and the rest
(scheduling, plan broadcast, report exchange, hook dispatch, sampling), from `llm.stats`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from typing import Any

# Runs on every rank and prints its own result on rank 0.
PRINTS_RESULT = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=64, help="concurrent requests")
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--connector", default=None, help="e.g. cpu (default: none)")
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--out", default=None, help="write the JSON result here (rank 0)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvdist.comm import abort_on_error, init_distributed
    from kvdist.engine.llm import LLM
    from kvdist.engine.sampling import SamplingParams

    topo = init_distributed(device=args.device)
    with abort_on_error(topo.comm):
        llm = LLM(
            args.model,
            connector=args.connector,
            topology=topo,
            num_blocks=args.num_blocks,
            max_num_seqs=max(256, args.requests),
        )
        rng = random.Random(0)
        vocab = llm.model_config.vocab_size
        prompts = [
            [rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)
        ]
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm up
        before = dict(llm.stats)
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        st = llm.stats
        steps = st["engine_steps"] - before["engine_steps"]
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
            "steps": steps,
            "wall_s": wall,
            "step_ms_mean": step_s / steps * 1e3,
            "model_ms_mean": model_s / steps * 1e3,
            "overhead_ms_mean": (step_s - model_s) / steps * 1e3,
            "overhead_fraction": (step_s - model_s) / step_s,
            "overhead_median_us": st["overhead_median_us"],
            "overhead_p99_us": st["overhead_p99_us"],
            "control_collectives_max_per_step": st["max_collectives_per_step"],
            "tokens_per_s": args.requests * args.max_tokens / wall,
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
