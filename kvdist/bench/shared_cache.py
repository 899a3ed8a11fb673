"""`kvdist bench shared-cache`: several engines on one disk cache directory, and how well
its `capacity_bytes` holds while they all save, load and evict.

Starts one engine per entry of `--engines` (its rank count; more than one runs under
`launch/mpirun.sh`), each a `kvdist.LLM` with the `disk` connector on the same directory,
the same `capacity_bytes` and `rescan_s`, serving batches drawn from one pool of prompts
that share prefixes (`shared_cache_engine`), for `--duration-s`. Meanwhile this process
samples the bytes of records in the directory every `--sample-s`. Reported:

- the directory's size over the capacity from the first time it reached the capacity on:
  min, p10, median, p90, max, and the share of samples over it; and at the end;
- blocks no lookup can reach at the end (on disk, but some earlier block of every prompt
  they belong to is not), as a share of the capacity;
- the tokens the engines loaded from the cache, the prompts served, and the answers that
  differ from the prompt's first (on any engine; greedy, so none should: a load that
  served wrong KV would show here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvdist.bench.shared_cache_engine import prompt_pool
from kvdist.cli.common import count_arg, count_list_arg, number_arg
from kvdist.connectors.disk.record import SUFFIX
from kvdist.connectors.disk.store import block_dir, list_records, namespace_id
from kvdist.connectors.settings import parse_bytes

STARTUP_S = 180.0
"""What an engine may take to start and to shut down, on top of `--duration-s`."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engines",
        type=count_list_arg(1),
        default=[1, 1, 2],
        help="ranks of each engine, comma-separated (default: 1,1,2)",
    )
    p.add_argument("--capacity", default="1M", help="capacity_bytes of every engine (units ok)")
    p.add_argument("--rescan-s", type=_seconds, default=0.2, help="rescan_s of every engine")
    p.add_argument("--duration-s", type=_seconds, default=30.0, help="how long each engine serves")
    p.add_argument("--sample-s", type=_seconds, default=0.1, help="between directory samples")
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu", help="every engine's device (cpu, cuda)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="every engine's; in float32 a prompt's answer does not depend on what it is "
        "batched with, so any answer that differs is a wrong load (bf16 answers of the "
        "random-weight presets flip with the batch)",
    )
    p.add_argument("--prefixes", type=count_arg(1), default=8, help="shared prefixes in the pool")
    p.add_argument("--per-prefix", type=count_arg(1), default=8, help="prompts per prefix")
    p.add_argument("--prefix-len", type=count_arg(1), default=64, help="tokens of each prefix")
    p.add_argument("--batch", type=count_arg(1), default=4, help="prompts per generate call")
    p.add_argument(
        "--affinity",
        type=_share,
        default=0.0,
        help="share of each engine's prompts drawn from prefixes of its own (sticky "
        "sessions; the prefixes are dealt round robin), the rest from the whole pool",
    )
    p.add_argument("--dir", default=None, help="the cache directory (default: a new temp dir)")


_seconds = number_arg("seconds", lambda v: 0 < v < float("inf"), "a positive number of seconds")
_share = number_arg("a share from 0 to 1", lambda v: 0 <= v <= 1, "from 0 to 1")


def run(args: argparse.Namespace) -> dict[str, Any]:
    ranks = list(args.engines)
    capacity = parse_bytes(args.capacity)
    if capacity < 1:
        raise ValueError(f"--capacity {args.capacity!r}: must be at least one byte")
    pool_args = {
        "prefixes": args.prefixes,
        "per_prefix": args.per_prefix,
        "prefix_len": args.prefix_len,
        "seed": 1,
    }
    cache_dir = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="kvdist-shared-cache-"))
    if os.path.exists(args.model):  # a checkpoint directory: the engines run elsewhere
        args.model = os.path.abspath(args.model)
    settings = {"capacity_bytes": capacity, "rescan_s": args.rescan_s}
    procs = [_start_engine(n, i, cache_dir, settings, pool_args, args) for i, n in enumerate(ranks)]
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    deadline = t0 + args.duration_s + STARTUP_S
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"engines still running {deadline - t0:.0f} s after the start")
            samples.append((time.monotonic() - t0, _record_bytes(cache_dir)))
            time.sleep(args.sample_s)
        engines = [_result(i, p) for i, p in enumerate(procs)]
        final = _record_bytes(cache_dir)
        namespace = engines[0]["namespace"]
        unreachable = _unreachable_bytes(cache_dir, namespace, prompt_pool(**pool_args), engines)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if args.dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "device": args.device,
        "dtype": args.dtype,
        "engines": ranks,
        "capacity_bytes": capacity,
        "rescan_s": args.rescan_s,
        "duration_s": args.duration_s,
        "affinity": args.affinity,
        "over_capacity": _summary(samples, capacity),
        "final_ratio": round(final / capacity, 3),
        "unreachable_ratio": round(unreachable / capacity, 3),
        "served": sum(e["served"] for e in engines),
        "errors": sum(e["errors"] for e in engines),
        "answers_differing": _answers_differing(engines),
        "tokens_loaded": sum(e["tokens_loaded"] for e in engines),
        "evictions": sum(e["evictions"] for e in engines),
        "per_engine": engines,
        "series": [[round(t, 2), round(b / capacity, 3)] for t, b in samples],
    }
    print(show(result), file=sys.stderr, flush=True)
    return result


def show(result: dict[str, Any]) -> str:
    s = result["over_capacity"]
    return "\n".join(
        [
            f"engines {result['engines']}, capacity {result['capacity_bytes']} bytes, "
            f"rescan_s {result['rescan_s']}, {result['duration_s']} s",
            f"directory / capacity once full: min {s['min']}, p10 {s['p10']}, median "
            f"{s['median']}, p90 {s['p90']}, max {s['max']}; over it in {s['over']} of "
            f"{s['samples']} samples; at the end {result['final_ratio']}",
            f"unreachable blocks at the end: {result['unreachable_ratio']} of the capacity",
            f"served {result['served']} prompts ({result['errors']} errors, "
            f"{result['answers_differing']} answers differing), loaded "
            f"{result['tokens_loaded']} tokens, {result['evictions']} evictions",
        ]
    )


def _start_engine(
    num_ranks: int,
    index: int,
    cache_dir: str,
    settings: dict[str, Any],
    pool_args: dict[str, Any],
    args: argparse.Namespace,
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "kvdist.bench.shared_cache_engine",
        "--cache-dir", cache_dir,
        "--settings", json.dumps(settings),
        "--model", args.model,
        "--device", args.device,
        "--dtype", args.dtype,
        "--pool", json.dumps(pool_args),
        "--seed", str(100 + index),
        "--own", f"{index}/{len(args.engines)}",
        "--affinity", str(args.affinity),
        "--duration-s", str(args.duration_s),
        "--batch", str(args.batch),
    ]  # fmt: skip
    if num_ranks > 1:
        launcher = Path(__file__).resolve().parents[2] / "launch" / "mpirun.sh"
        if not launcher.is_file():
            raise ValueError(f"an engine of {num_ranks} ranks needs {launcher} (a source checkout)")
        cmd = [str(launcher), "-n", str(num_ranks), "--", *cmd]
    env = {**os.environ, "KVDIST_COMM": "mpi" if num_ranks > 1 else "local"}
    # `python -m` puts its working directory first on the path: run from the directory
    # holding the kvdist this benchmark imported, so the engines run that code too (run
    # from a checkout with PYTHONPATH naming another tree, they ran the checkout's).
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=_package_root())


def _package_root() -> str:
    import kvdist

    return str(Path(kvdist.__file__).resolve().parents[1])


def _result(index: int, proc: subprocess.Popen) -> dict[str, Any]:
    out, _ = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine {index} failed (exit {proc.returncode}); its output:\n{out}")
    res = json.loads(lines[-1])
    stats = res.pop("stats")
    res["evictions"] = int(stats.get("connector_evictions", 0))
    res["connector_stats"] = {k: v for k, v in stats.items() if k.startswith("connector_")}
    return res


def _answers_differing(engines: list[dict[str, Any]]) -> int:
    """Answers that differ from the first one the engine gave to the prompt, and prompts
    whose first answers differ between engines (greedy: each should be the same)."""
    firsts: dict[str, set[tuple[int, ...]]] = {}
    for e in engines:
        for i, tokens in e["outputs"].items():
            firsts.setdefault(i, set()).add(tuple(tokens))
    return sum(e["answers_differing"] for e in engines) + sum(len(s) - 1 for s in firsts.values())


def _record_bytes(cache_dir: str) -> int:
    """Bytes of every record in the cache directory (temporary files not counted)."""
    total = 0
    for root, _, files in os.walk(cache_dir):
        for name in files:
            if name.endswith(SUFFIX):
                with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                    total += os.stat(os.path.join(root, name)).st_size
    return total


def _unreachable_bytes(
    cache_dir: str, namespace: str, pool: list[list[int]], engines: list[dict[str, Any]]
) -> int:
    """Bytes of blocks on disk that no prompt of the pool (with what it generated) reaches:
    an earlier block of each chain they are in is missing."""
    from kvdist import block_hashes

    ns_dir = os.path.join(cache_dir, namespace_id(namespace))
    outputs = {int(k): v for e in engines for k, v in e["outputs"].items()}
    on_disk = {}
    reachable = set()
    chained = set()
    for i, prompt in enumerate(pool):
        chain = block_hashes(prompt + outputs.get(i, []), 16, namespace)
        chained.update(chain)
        for key in chain:
            if key not in on_disk:
                on_disk[key] = sum(r.size for r in list_records(block_dir(ns_dir, key)))
            if not on_disk[key]:
                break
            reachable.add(key)
    return sum(size for key, size in on_disk.items() if size and key not in reachable)


def _summary(samples: list[tuple[float, int]], capacity: int) -> dict[str, Any]:
    full = next((i for i, (_, b) in enumerate(samples) if b >= capacity), None)
    ratios = [b / capacity for _, b in samples[full:]] if full is not None else []
    if not ratios:
        return {"samples": 0, "over": 0, "min": None, "p10": None, "median": None,
                "p90": None, "max": None}  # fmt: skip
    ratios_sorted = sorted(ratios)

    def q(f: float) -> float:
        return round(ratios_sorted[min(len(ratios) - 1, int(f * len(ratios)))], 3)

    return {
        "samples": len(ratios),
        "over": sum(r > 1.0 for r in ratios),
        "min": round(ratios_sorted[0], 3),
        "p10": q(0.1),
        "median": round(statistics.median(ratios), 3),
        "p90": q(0.9),
        "max": round(ratios_sorted[-1], 3),
    }
