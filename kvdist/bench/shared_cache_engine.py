"""One engine of `kvdist bench shared-cache` (started by it, one per engine, on its ranks).

Runs `kvdist.LLM` with the `disk` connector on the shared directory, serving prompts drawn
from the benchmark's pool (the same on every engine: `prompt_pool`) in batches until its
time is up, then prints one JSON line on rank 0: its namespace (for the chain analysis),
the prompts served and what each generated (and how many answers differed from the
first one to a prompt), the tokens loaded from the cache, and the
connector's stats.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from kvdist.cli.common import json_object_arg


def prompt_pool(prefixes: int, per_prefix: int, prefix_len: int, seed: int) -> list[list[int]]:
    """`prefixes` shared prefixes of `prefix_len` tokens, each followed by `per_prefix`
    user turns of 8 to 40 tokens: requests that share blocks, as an engine's do."""
    rng = random.Random(seed)
    pool = []
    for _ in range(prefixes):
        prefix = [rng.randrange(1, 250) for _ in range(prefix_len)]
        for _ in range(per_prefix):
            pool.append(prefix + [rng.randrange(1, 250) for _ in range(rng.randrange(8, 41))])
    return pool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache-dir", required=True)
    p.add_argument(
        "--settings", type=json_object_arg("--settings"), default={}, help="disk settings (JSON)"
    )
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None, help="the engine's (default: its own choice)")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--pool", type=json_object_arg("--pool"), required=True, help="prompt_pool's arguments"
    )
    p.add_argument("--seed", type=int, required=True, help="this engine's draws from the pool")
    p.add_argument(
        "--own", default="0/1", help="i/n: this engine is the i-th of n, owning prefixes i, i+n..."
    )
    p.add_argument("--affinity", type=float, default=0.0, help="share of draws from its own")
    p.add_argument("--duration-s", type=float, required=True)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)

    from kvdist import LLM, SamplingParams

    pool = prompt_pool(**args.pool)
    rng = random.Random(args.seed)
    # Sessions sticky to engines: most draws from this engine's own prefixes.
    i, n = (int(x) for x in args.own.split("/"))
    per = args.pool["per_prefix"]
    own = [j for j in range(len(pool)) if (j // per) % n == i]

    def draw(rng: random.Random) -> int:
        if own and rng.random() < args.affinity:
            return rng.choice(own)
        return rng.randrange(len(pool))

    llm = LLM(
        args.model,
        connector={"name": "disk", "kwargs": {"path": args.cache_dir, **args.settings}},
        device=args.device,
        dtype=args.dtype,
    )
    comm = llm.topology.comm
    served = errors = loaded = differing = 0
    outputs: dict[int, list[int]] = {}  # greedy: the same on every engine
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    deadline = time.monotonic() + args.duration_s
    while True:
        # Rank 0 decides (its clock, its draws); the other ranks follow.
        picks = None
        if llm.rank == 0 and time.monotonic() < deadline:
            picks = [draw(rng) for _ in range(args.batch)]
        picks = json.loads(comm.broadcast_bytes(
            json.dumps(picks).encode() if llm.rank == 0 else None, timeout_s=60, what="batch"
        ))  # fmt: skip
        if picks is None:
            break
        batch = [pool[i] for i in picks]
        outs = llm.generate(batch, params)
        served += len(outs)
        errors += sum(o.finish_reason == "error" for o in outs)
        loaded += sum(o.num_external_tokens for o in outs)
        for i, out in zip(picks, outs, strict=True):
            # Whether computed or loaded, a prompt's greedy answer is the same every time.
            differing += outputs.setdefault(i, out.output_token_ids) != out.output_token_ids
    stats = llm.stats
    llm.shutdown()
    if llm.rank == 0:
        print(
            json.dumps(
                {
                    "namespace": llm.namespace,
                    "ranks": llm.world_size,
                    "served": served,
                    "errors": errors,
                    "tokens_loaded": loaded,
                    "answers_differing": differing,
                    "outputs": outputs,
                    "stats": stats,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
