"""`kvdist bench multiturn`: multi-turn conversations through `kvdist.LLM`, without a
connector and with each one asked for, in one run on the same ranks: what KV offload buys
when the device cache cannot keep every conversation between its turns.

`--conversations` conversations share a system prompt; each turn appends a user message to
the conversation's history (its earlier prompts and answers) and generates
`--answer-len` greedy tokens. Turns go round by round (every conversation's turn k before
any turn k + 1), at most `--concurrency` at a time, on a device cache sized to hold about
that many conversations (`--num-blocks`, by default computed so): when a conversation comes
back, its blocks have been evicted. Without a connector its history is computed again;
with `cpu`, `disk` or `tiered` (cpu in front of disk) it is loaded.

Each engine first runs one untimed round of unrelated prompts. Reported per configuration:
time to first token of the first turn and of the later ones (median and p90, from
submission: a round submits every conversation at once, so a turn also waits for the
turns ahead of it; and for the later turns, from admission: the load or prefill alone),
prompt tokens computed, found in the device prefix cache and loaded, the wall time of the
turns and of the engine's shutdown after them (which waits for the saves in flight), and
how many answers equal those of the run without connector. `--repeats N` runs N rounds of
all configurations, in the same order each round, and summarises each connector's wall time
over its round's run without connector (median, min, max): on a shared host one round
each can differ by tens of percent. The histories are read back seconds after they were
written, so disk loads come mostly from the page cache; `--drop-page-cache` asks the kernel
to drop the cache directory's pages before each later turn (untimed), so they come from the
device (or from what caches it below the kernel: a VM host's page cache).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from typing import Any

from kvdist.bench.ranks import run_on_every_rank
from kvdist.cli.common import json_object_arg

# Runs on every rank and prints its own result on rank 0.
PRINTS_RESULT = True
CONNECTORS = ("cpu", "disk", "tiered")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-len", type=int, default=128, help="tokens of the shared prompt")
    p.add_argument("--user-len", type=int, default=64, help="tokens of each user message")
    p.add_argument("--answer-len", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--concurrency", type=int, default=4, help="requests running at once")
    p.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="device KV blocks (default: enough for --concurrency conversations at their "
        "last turn, so the others are evicted between turns)",
    )
    p.add_argument(
        "--connectors",
        default="cpu",
        help=f"comma-separated, run after the run without connector; of {', '.join(CONNECTORS)}",
    )
    p.add_argument(
        "--cpu-capacity-bytes",
        type=int,
        default=None,
        help="the cpu pool per rank (default: twice what every conversation's history takes)",
    )
    p.add_argument(
        "--disk-kwargs",
        type=json_object_arg("--disk-kwargs"),
        default={},
        help="settings of the disk connector (and tier) as JSON, e.g. '{\"fsync\": true}'",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of none and each connector (none first in even rounds, last in odd "
        "ones); with more than one, the summary gives each connector's wall time over its "
        "round's none run: median, min and max",
    )
    p.add_argument(
        "--drop-page-cache",
        action="store_true",
        help="before each turn after the first, evict the disk cache's files from the page "
        "cache (posix_fadvise DONTNEED, untimed), so disk loads read the device, not memory",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON result here (rank 0)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    connectors = [c for c in args.connectors.split(",") if c]
    unknown = sorted(set(connectors) - set(CONNECTORS))
    if unknown:
        raise ValueError(f"--connectors: unknown {unknown}; choose from {', '.join(CONNECTORS)}")
    for name in ("conversations", "turns", "user_len", "answer_len", "concurrency", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    return run_on_every_rank(
        args.device,
        lambda topo: _run(topo, args, connectors),
        lambda result: format_table(result["runs"]) + format_summary(result["summary"]),
        args.out,
    )


def _run(topo, args, connectors: list[str]) -> dict[str, Any]:
    workload = Workload(args)
    cache_dir = _shared_tempdir(topo)
    runs: list[dict[str, Any]] = []
    try:
        block_bytes = 0
        for round_ in range(args.repeats):
            # Each round's connectors start from empty directories of their own. The run
            # without connector goes first in even rounds (the first measures the block
            # size the cpu pool is sized by) and last in odd ones, so that no position in
            # the order favours one side.
            round_dir = os.path.join(cache_dir, f"round{round_}")
            order: list[str | None] = [None, *connectors]
            if round_ % 2:
                order = [*connectors, None]
            got_runs = {}
            for name in order:
                got = _run_one(topo, args, workload, name, round_dir, block_bytes)
                block_bytes = block_bytes or got["block_bytes"]
                got.pop("block_bytes")
                got_runs[name] = got
            base = got_runs[None]
            first_turn = args.conversations  # answers are in turn order: turn 1's first
            for name in connectors:
                same = [a == b for a, b in zip(got_runs[name].pop("answers"), base["answers"])]
                got_runs[name]["answers_identical"] = sum(same)
                # Turn 1 loads nothing: the later turns are where a connector's KV is used.
                got_runs[name]["later_answers_identical"] = sum(same[first_turn:])
            base["answers_identical"] = len(base["answers"])
            base["later_answers_identical"] = len(base.pop("answers")[first_turn:])
            runs += [
                {"round": round_, "position": order.index(name), **got_runs[name]}
                for name in [None, *connectors]
            ]
    finally:
        if topo.rank == 0:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "benchmark": "multiturn",
        "ranks": topo.world_size,
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "out")},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
        "summary": summarise(runs),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per connector, its wall time over the no-connector run of the same round: as timed
    (the turns), without the CUDA graphs captured during the timed turns (a one-time cost
    per engine, which differs between configurations: they meet different batch and context
    sizes), and with the shutdown after the turns (which waits for the saves in flight)."""
    out: dict[str, dict[str, float]] = {}
    for key, suffix in (
        ("wall_s", ""),
        ("wall_s_without_graph_capture", "_without_capture"),
        ("wall_s_with_shutdown", "_with_shutdown"),
    ):
        none = {r["round"]: r[key] for r in runs if r["connector"] == "none"}
        ratios: dict[str, list[float]] = {}
        for r in runs:
            if r["connector"] != "none":
                ratios.setdefault(r["connector"], []).append(r[key] / none[r["round"]])
        for name, v in ratios.items():
            out.setdefault(name, {"rounds": len(v)}).update(
                {
                    f"wall_over_none{suffix}_median": statistics.median(v),
                    f"wall_over_none{suffix}_min": min(v),
                    f"wall_over_none{suffix}_max": max(v),
                }
            )
    return out


class Workload:
    """The conversations' token ids, drawn once so every configuration runs the same."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def draw(self, vocab: int) -> tuple[list[int], list[list[list[int]]]]:
        """The system prompt and every conversation's user messages, per turn."""
        a = self.args
        rng = random.Random(a.seed)
        system = [rng.randrange(vocab) for _ in range(a.system_len)]
        users = [
            [[rng.randrange(vocab) for _ in range(a.user_len)] for _ in range(a.turns)]
            for _ in range(a.conversations)
        ]
        return system, users

    def warmup(self, vocab: int) -> list[list[int]]:
        """A round of first-turn-sized prompts that share nothing with the conversations."""
        a = self.args
        rng = random.Random(a.seed + 1)
        n = a.system_len + a.user_len
        return [[rng.randrange(vocab) for _ in range(n)] for _ in range(a.concurrency)]

    def final_len(self) -> int:
        a = self.args
        return a.system_len + a.turns * (a.user_len + a.answer_len)


def _run_one(
    topo, args, workload: Workload, connector: str | None, cache_dir: str, block_bytes: int
) -> dict:
    """One configuration; `block_bytes` (one block of this rank's KV, measured by the run
    without connector) sizes the cpu pool."""
    from kvdist.engine.llm import LLM
    from kvdist.engine.sampling import SamplingParams

    block = 16
    blocks_per_conv = -(-workload.final_len() // block) + 1
    num_blocks = args.num_blocks or args.concurrency * blocks_per_conv + 8
    llm = LLM(
        args.model,
        connector=_connector_config(connector, args, cache_dir, blocks_per_conv * block_bytes),
        topology=topo,
        dtype=args.dtype,
        block_size=block,
        num_blocks=num_blocks,
        max_num_seqs=args.concurrency,
    )
    try:
        system, users = workload.draw(llm.model_config.vocab_size)
        params = SamplingParams(max_tokens=args.answer_len, temperature=0.0, ignore_eos=True)
        # Untimed: the first steps of a process or engine pay for kernel loading and the
        # allocator's growth; whichever configuration ran first would carry them.
        llm.generate(workload.warmup(llm.model_config.vocab_size), params)
        histories = [list(system) for _ in users]
        first: list[float] = []
        later: list[float] = []
        later_admitted: list[float] = []  # from admission: the load or prefill, no queue
        answers: list[list[int]] = []
        tokens = {"computed": 0, "cached": 0, "loaded": 0}
        capture_before = llm.stats.get("cuda_graph_capture_seconds", 0.0)
        dropped = {"files": 0, "seconds": 0.0}
        t0 = time.perf_counter()
        for turn in range(args.turns):
            if turn and args.drop_page_cache:
                files, seconds = drop_page_cache(os.path.join(cache_dir, connector or "none"))
                dropped["files"] += files
                dropped["seconds"] += seconds
            prompts = [h + u[turn] for h, u in zip(histories, users)]
            outs = llm.generate(prompts, params)
            for c, (prompt, out) in enumerate(zip(prompts, outs)):
                if out.finish_reason == "error":
                    raise RuntimeError(f"conversation {c}, turn {turn}: {out.error}")
                (first if turn == 0 else later).append(out.ttft_s)
                if turn:
                    later_admitted.append(out.ttft_s - out.queue_s)
                answers.append(out.output_token_ids)
                tokens["cached"] += out.num_cached_tokens
                tokens["loaded"] += out.num_external_tokens
                tokens["computed"] += len(prompt) - out.num_cached_tokens - out.num_external_tokens
                histories[c] = prompt + out.output_token_ids
        wall = time.perf_counter() - t0 - dropped["seconds"]
        capture = llm.stats.get("cuda_graph_capture_seconds", 0.0) - capture_before
        kv = llm.kv_cache
        measured_block_bytes = kv.numel() * kv.element_size() // num_blocks
        del kv
        # Timed too: shutdown waits for the saves still in flight, part of the work.
        t1 = time.perf_counter()
        llm.shutdown()
        shutdown = time.perf_counter() - t1
    finally:
        llm.shutdown()  # after an error; a no-op once shut down
    # After shutdown, which waits for the saves still in flight: they are counted too.
    stats = dict(llm.stats)
    return {
        "connector": connector or "none",
        "num_blocks": num_blocks,
        "ttft_ms_first_turn": _percentiles(first),
        "ttft_ms_later_turns": _percentiles(later),
        "ttft_ms_later_turns_from_admission": _percentiles(later_admitted),
        "prompt_tokens": tokens,
        "wall_s": wall,
        "graph_capture_s": capture,
        "wall_s_without_graph_capture": wall - capture,
        "shutdown_s": shutdown,
        "page_cache_dropped": dropped if args.drop_page_cache else None,
        "wall_s_with_shutdown": wall + shutdown,
        "max_collectives_per_step": stats.get("max_collectives_per_step"),
        "engine_stats": stats,
        "answers": answers,
        "block_bytes": measured_block_bytes,
    }


def _connector_config(name, args, cache_dir: str, conversation_bytes: int) -> Any:
    if name is None:
        return None
    # A directory of its own: the disk run's blocks must not be hits for the tiered run.
    disk = {"name": "disk", "kwargs": {**args.disk_kwargs, "path": os.path.join(cache_dir, name)}}
    if name == "disk":
        return disk
    capacity = args.cpu_capacity_bytes or 2 * args.conversations * conversation_bytes
    cpu = {"name": "cpu", "kwargs": {"capacity_bytes": capacity}}
    return cpu if name == "cpu" else {"name": "tiered", "kwargs": {"tiers": [cpu, disk]}}


def drop_page_cache(root: str) -> tuple[int, float]:
    """Ask the kernel to drop the cached pages of every file under `root`, after writing
    back every dirty page (`sync`: a page not yet written back would stay). Returns the
    files asked about and the seconds it took. Every rank asks for the files of its host:
    the page cache is the host's."""
    t0 = time.perf_counter()
    os.sync()
    files = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue  # removed meanwhile (an eviction), or not readable
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                files += 1
            finally:
                os.close(fd)
    return files, time.perf_counter() - t0


def _shared_tempdir(topo) -> str:
    """A fresh directory rank 0 made, named to every rank (for the disk connector)."""
    path = tempfile.mkdtemp(prefix="kvdist-multiturn-") if topo.rank == 0 else None
    got = topo.comm.broadcast_bytes(
        path.encode() if path is not None else None,
        timeout_s=topo.env.timeout_s,
        what="multiturn cache dir",
    )
    return got.decode()


def _percentiles(seconds: list[float]) -> dict[str, float] | None:
    if not seconds:
        return None
    ms = sorted(s * 1e3 for s in seconds)
    return {
        "p50": statistics.median(ms),
        "p90": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
        "mean": statistics.fmean(ms),
    }


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    rounds = max((s["rounds"] for s in summary.values()), default=0)
    if rounds < 2:
        return ""
    lines = [
        f"\n\nwall time over the same round's run without connector, {rounds} rounds "
        "(and without the CUDA graphs captured in the timed turns; and with the shutdown "
        "after them, which waits for the saves in flight):",
        "| connector | median | min | max | median without capture | median with shutdown |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['wall_over_none_median']:.2f} | {s['wall_over_none_min']:.2f} | "
            f"{s['wall_over_none_max']:.2f} | {s['wall_over_none_without_capture_median']:.2f} | "
            f"{s['wall_over_none_with_shutdown_median']:.2f} |"
        )
    return "\n".join(lines)


def format_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| round | connector | TTFT ms, turn 1 (p50 / p90) | TTFT ms, later turns (p50 / p90) | "
        "from admission, later turns (p50 / p90) | "
        "prompt tokens computed / device hit / loaded | wall s (+ shutdown) | "
        "answers as without | "
        "of it, CUDA graph capture s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    total, later_total = runs[0]["answers_identical"], runs[0].get("later_answers_identical")
    for r in runs:
        first, later = r["ttft_ms_first_turn"], r["ttft_ms_later_turns"]
        t = r["prompt_tokens"]
        admitted = r["ttft_ms_later_turns_from_admission"]
        later_cell = "-" if later is None else f"{later['p50']:.1f} / {later['p90']:.1f}"
        admitted_cell = (
            "-" if admitted is None else f"{admitted['p50']:.1f} / {admitted['p90']:.1f}"
        )
        lines.append(
            f"| {r.get('round', 0)} | {r['connector']} | {first['p50']:.1f} / {first['p90']:.1f} | "
            f"{later_cell} | "
            f"{admitted_cell} | "
            f"{t['computed']} / {t['cached']} / {t['loaded']} | "
            f"{r['wall_s']:.2f} (+ {r['shutdown_s']:.2f}) | "
            f"{r['answers_identical']} of {total}"
            + (
                f" (later turns {r['later_answers_identical']} of {later_total})"
                if later_total is not None
                else ""
            )
            + f" | {r.get('graph_capture_s', 0.0):.2f} |"
        )
    return "\n".join(lines)
