"""`kvdist demo`: KV persistence across engine restarts, end to end.

Run 1, a fresh engine, generates for prompts that share long prefixes and saves their KV
through the connector (the on-disk cache by default). Run 2, a new engine on the same
cache directory, loads that KV instead of computing it. The outputs must be identical; a
table shows per run the time to first token, tokens computed vs loaded, and bytes moved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from kvdist.cli.common import add_model_args, command_errors, count_arg, llm_kwargs

log = logging.getLogger("kvdist")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="save KV in one engine, load it in a fresh one, compare")
    add_model_args(p)
    p.add_argument(
        "--connector",
        default="disk",
        choices=["disk", "tiered"],
        help="disk, or tiered (pinned CPU in front of disk)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="cache directory (default: a temporary one, removed afterwards); "
        "on several nodes it must be shared",
    )
    p.add_argument("--prompts", type=count_arg(1), default=8, help="number of prompts")
    p.add_argument(
        "--prefix-len", type=count_arg(1), default=480, help="tokens of the shared prefixes"
    )
    p.add_argument(
        "--suffix-len", type=count_arg(0), default=24, help="tokens unique to each prompt"
    )
    p.add_argument(
        "--max-tokens", type=count_arg(1), default=16, help="per prompt (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print the result table as JSON too")
    p.set_defaults(func=run)


def make_prompts(vocab: int, n: int, prefix_len: int, suffix_len: int) -> list[list[int]]:
    """n prompts over two shared prefixes (half of them each), each with its own suffix."""
    rng = random.Random(1234)
    prefixes = [[rng.randrange(3, vocab) for _ in range(prefix_len)] for _ in range(2)]
    return [
        prefixes[i % 2] + [rng.randrange(3, vocab) for _ in range(suffix_len)] for i in range(n)
    ]


def _connector(kind: str, path: str) -> dict[str, Any]:
    disk = {"name": "disk", "kwargs": {"path": path}}
    if kind == "disk":
        return disk
    return {
        "name": "tiered",
        "kwargs": {"tiers": [{"name": "cpu", "kwargs": {"capacity_bytes": 256 << 20}}, disk]},
    }


def _one_run(args, topo, path: str, prompts, label: str) -> tuple[list, dict[str, Any]]:
    from kvdist.engine.llm import LLM
    from kvdist.engine.sampling import SamplingParams

    # float32 unless asked otherwise: the demo checks tokens for equality, and in bf16 the
    # cold and warm runs compute the remainder in different batch shapes, whose rounding
    # can flip near-tied argmaxes of a random-weight model (the loaded KV itself is exact).
    kw = llm_kwargs(args)
    kw["dtype"] = args.dtype or "float32"
    llm = LLM(args.model, connector=_connector(args.connector, path), topology=topo, **kw)
    try:
        # Warm up (first-call kernel setup) so TTFT measures the cache, not the warm-up;
        # 3 tokens fill no block, so this saves and loads nothing.
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1))
        bar = _progress(topo.rank, label, len(prompts))
        t0 = time.perf_counter()
        outs = llm.generate(
            prompts,
            SamplingParams(max_tokens=args.max_tokens, ignore_eos=True),
            on_step=(lambda llm, step: bar.update(_done(llm) - bar.n)) if bar else None,
        )
    except BaseException:
        # Interrupted or failed: the IO processes stop writing into the cache directory
        # before the caller removes it (they would make its block directories again).
        # What that shutdown raises is logged: the error to report is the first one.
        try:
            llm.shutdown(drain=False)
        except Exception as exc:
            log.error("demo: shutting the engine down after an error: %s", exc)
        raise
    llm.shutdown()  # waits until every rank's saves are on disk
    wall = time.perf_counter() - t0
    if bar:
        bar.close()
    stats = getattr(llm.connector_worker, "stats", {})
    per_rank = topo.comm.allgather_bytes(
        json.dumps(stats).encode(), timeout_s=llm.timeout_s, what="demo stats"
    )
    io = [json.loads(x) for x in per_rank]
    computed = sum(
        len(o.prompt_token_ids) - o.num_cached_tokens - o.num_external_tokens for o in outs
    )
    loaded_bytes = sum(s.get("bytes_loaded", 0) for s in io)
    # Each rank's read rate per IO thread (its bytes over its threads' summed read time),
    # averaged over the ranks that read.
    rates = [
        s["bytes_loaded"] / s["load_io_seconds"]
        for s in io
        if s.get("bytes_loaded") and s.get("load_io_seconds")
    ]
    row = {
        "run": label,
        "ttft_ms_mean": 1e3 * sum(o.ttft_s for o in outs) / len(outs),
        "prompt_tokens_computed": computed,
        "prompt_tokens_on_device_hit": sum(o.num_cached_tokens for o in outs),
        "prompt_tokens_loaded": sum(o.num_external_tokens for o in outs),
        "bytes_saved": sum(s.get("bytes_saved", 0) for s in io),
        "bytes_loaded": loaded_bytes,
        "load_GBps": sum(rates) / len(rates) / 1e9 if rates else 0.0,
        "load_failures": sum(s.get("load_failures", 0) for s in io),
        "wall_s": wall,
    }
    return outs, row


def _done(llm) -> int:
    return sum(1 for _ in llm.scheduler.newly_finished) if llm.scheduler is not None else 0


def _progress(rank: int, label: str, total: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in logs and CI.
    return tqdm(total=total, desc=label, unit="req", disable=None, leave=False)


def _check_outputs(outs, label: str) -> None:
    """The demo's requests must all run: a failed one is the error to show."""
    for out in outs:
        if out.finish_reason == "error":
            raise ValueError(f"run {label}: request {out.request_id} failed: {out.error}")


def run(args: argparse.Namespace) -> int:
    from kvdist.comm import init_distributed
    from kvdist.comm.shm import same_host

    if args.prefix_len + args.suffix_len <= args.block_size:
        raise ValueError(
            f"--prefix-len + --suffix-len ({args.prefix_len + args.suffix_len}) must be more "
            f"than --block-size ({args.block_size}): only whole blocks before a prompt's last "
            "token are saved and loaded"
        )
    from kvdist.engine.model import get_preset

    # Before the ranks start: a mistake here is one line, not a failed run later.
    vocab, context = _model_sizes(args.model, get_preset)
    if context is not None and args.prefix_len + args.suffix_len >= context:
        raise ValueError(
            f"--prefix-len + --suffix-len ({args.prefix_len + args.suffix_len}) must be less "
            f"than the model's context ({context} tokens): at least one token is generated"
        )
    topo = init_distributed(device=args.device)
    with command_errors(topo.comm, "demo"):
        if args.cache_dir is None and not same_host(topo.comm, topo.env.timeout_s):
            raise ValueError(
                "the ranks are on several hosts: pass --cache-dir on a filesystem they all "
                "share (the default is a temporary directory on rank 0's host)"
            )
        # Rank 0 makes the temporary directory, tells the others (one node), and removes
        # it however the demo ends: before an error aborts the job, too.
        temp = args.cache_dir is None and topo.rank == 0
        if temp:
            _remove_left_behind_caches()
        made = tempfile.mkdtemp(prefix=f"kvdist-demo-{os.getpid()}-") if temp else None
        try:
            path = args.cache_dir
            if path is None:
                path = topo.comm.broadcast_bytes(
                    made.encode() if made else None,
                    timeout_s=topo.env.timeout_s,
                    what="demo cache dir",
                ).decode()
            elif topo.rank == 0 and os.path.isdir(path) and os.listdir(path):
                print(
                    f"note: {path} is not empty: run 1 loads what an earlier run left there",
                    file=sys.stderr,
                )
            failure = _demo(args, topo, path, vocab)
        finally:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
    topo.close()
    if failure is not None:
        if topo.rank == 0:
            print(f"kvdist demo: FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


_DEMO_CACHE = re.compile(r"kvdist-demo-(\d{1,10})-[a-z0-9_]{8}")
"""A demo's temporary cache: `tempfile.mkdtemp` with the pid of the rank 0 that made it."""


def _remove_left_behind_caches() -> None:
    """Remove the temporary caches of demos killed before their cleanup (an hour old,
    their rank 0 gone: `kvdist.leftovers`); housekeeping, never a reason to fail."""
    from kvdist.leftovers import remove_left_behind

    try:
        # Its writes land two levels down (NSID/HH/): those times say whether it is live.
        removed = remove_left_behind(
            tempfile.gettempdir(), _DEMO_CACHE, remove=shutil.rmtree, depth=3
        )
    except Exception as exc:
        print(f"note: could not check for old demo caches: {exc}", file=sys.stderr)
        return
    for path in removed:
        print(f"note: removed {path}, left by a demo that was killed", file=sys.stderr)


def _demo(args: argparse.Namespace, topo, path: str, vocab: int) -> str | None:
    """Both runs; what went wrong when the demo's check fails (every rank says the same)."""
    prompts = make_prompts(vocab, args.prompts, args.prefix_len, args.suffix_len)
    out1, row1 = _one_run(args, topo, path, prompts, "1: fresh engine, cold cache")
    _check_outputs(out1, "1")
    if row1["prompt_tokens_loaded"]:  # --cache-dir held an earlier run's blocks
        row1["run"] = "1: fresh engine, cache of an earlier run"
    out2, row2 = _one_run(args, topo, path, prompts, "2: new engine, same cache dir")
    _check_outputs(out2, "2")
    same = [a.output_token_ids for a in out1] == [b.output_token_ids for b in out2]
    if topo.rank == 0:
        _print_table([row1, row2], topo.world_size, path, same)
        if args.json:
            print(json.dumps({"rows": [row1, row2], "identical": same, "ranks": topo.world_size}))
    topo.comm.barrier(timeout_s=topo.env.timeout_s, what="demo end")
    if not same:
        return "run 2 produced different tokens than run 1"
    if row2["prompt_tokens_loaded"] == 0:
        return "run 2 loaded nothing from the cache"
    return None


def _model_sizes(model: str, get_preset) -> tuple[int, int | None]:
    """The model's vocabulary size and context length (None when its config gives none)."""
    try:
        config = get_preset(model).config
        return config.vocab_size, config.max_position_embeddings
    except (KeyError, ValueError) as exc:
        config = os.path.join(model, "config.json")
        if not os.path.isdir(model):
            raise ValueError(
                f"model {model!r} is neither a checkpoint directory nor a preset"
            ) from None
        if not os.path.isfile(config):
            raise ValueError(f"model {model!r}: {exc}") from None
        try:
            with open(config) as f:
                fields = json.load(f)
            vocab = int(fields["vocab_size"])
        except (ValueError, KeyError, TypeError) as bad:
            raise ValueError(f"{config}: no usable vocab_size ({bad!r})") from None
        context = fields.get("max_position_embeddings")
        return vocab, context if isinstance(context, int) and context > 0 else None


def _print_table(rows: list[dict[str, Any]], ranks: int, path: str, same: bool) -> None:
    print(f"kvdist demo: {ranks} rank(s), cache {path}")
    head = (
        "run",
        "TTFT ms",
        "computed",
        "loaded",
        "device hit",
        "saved MB",
        "loaded MB",
        "GB/s per IO thread",
        "wall s",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(
            f"| {r['run']} | {r['ttft_ms_mean']:.1f} | {r['prompt_tokens_computed']} | "
            f"{r['prompt_tokens_loaded']} | {r['prompt_tokens_on_device_hit']} | "
            f"{r['bytes_saved'] / 1e6:.2f} | "
            f"{r['bytes_loaded'] / 1e6:.2f} | {r['load_GBps']:.2f} | {r['wall_s']:.2f} |"
        )
    speedup = rows[0]["ttft_ms_mean"] / max(rows[1]["ttft_ms_mean"], 1e-9)
    change = f"{speedup:.1f}x lower" if speedup >= 1 else f"{1 / max(speedup, 1e-9):.1f}x higher"
    also = " (run 1 loaded from it too)" if rows[0]["prompt_tokens_loaded"] else ""
    print(f"outputs identical: {same}; TTFT {change} with the cache{also}")
