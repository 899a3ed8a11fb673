"""Disk connector benchmark: save and load throughput of one rank's worker against the
directory's sequential write and read bandwidth, measured in the same run.

Sequential: one file of the same payload size written in 8 MiB chunks (fsync'd at the end
when `--fsync`), then read back in 8 MiB chunks. Connector: one step saves `--blocks`
blocks (one record each, written by the IO threads; timed from the step's start until the
worker reports the save done), then a fresh engine (a restart: it scans the directory)
loads them into other device blocks (timed from the step's start until the load is
reported). Each engine first moves another prompt of the same size, untimed, so that its
pinned host buffers exist (steady state) before the timed transfer. Before each read, dirty pages are flushed (`os.sync`) and the files' cached
pages dropped with `posix_fadvise(DONTNEED)`; whether that reached the disk depends on
the filesystem (tmpfs, for one, keeps everything in memory), so the report says what the
directory is mounted on. Without `--fsync` the write numbers include the page cache
absorbing writes, for the sequential baseline and the connector alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from kvdist.api.types import SchedulerOutput
from kvdist.cli.common import bench_device, count_arg
from kvdist.connectors.disk.io_pool import IOPool
from kvdist.connectors.disk.store import block_dir
from kvdist.connectors.testing import SimulatedRanks, make_request, new_request_output

_CHUNK = 8 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=None, help="directory to test (default: a temp dir in .)")
    parser.add_argument("--blocks", type=count_arg(1), default=256)
    parser.add_argument("--layers", type=count_arg(1), default=32)
    parser.add_argument("--heads", type=count_arg(1), default=8, help="KV heads of the (one) rank")
    parser.add_argument("--head-dim", type=count_arg(1), default=128)
    parser.add_argument("--block-size", type=count_arg(1), default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--io-threads", type=count_arg(1), default=8)
    parser.add_argument(
        "--no-writer-process",
        dest="writer_process",
        action="store_false",
        help="write records from threads of this process (the connector's writer_process=False)",
    )
    parser.add_argument(
        "--fsync", action="store_true", help="fsync every record (and the baseline)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")


def _drop(paths: list[str]) -> None:
    os.sync()
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sequential(path: str, nbytes: int, fsync: bool) -> tuple[float, float]:
    buf = os.urandom(_CHUNK)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[: min(left, _CHUNK)])
        if fsync:
            os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    _drop([path])
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        mv = memoryview(bytearray(_CHUNK))
        while f.readinto(mv):
            pass
    read_s = time.perf_counter() - t0
    os.unlink(path)
    return write_s, read_s


def _mount(path: str) -> str:
    best = ("", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if os.path.realpath(path).startswith(mnt) and len(mnt) > len(best[0]):
                    best = (mnt, f"{fstype} ({dev} on {mnt})")
    except OSError:
        pass
    return best[1]


def _save(ranks: SimulatedRanks, rid: str, tokens: list[int], blocks: list[int], step: int):
    """One step computing and saving every block, then the step that reports it saved."""
    req = _start_save(ranks, rid, tokens, blocks, step)
    _finish_save(ranks, req, blocks, step + 1)
    return req


def _start_save(ranks: SimulatedRanks, rid: str, tokens: list[int], blocks: list[int], step: int):
    """The step computing every block of `tokens`: it queues their writes."""
    req = make_request(rid, tokens, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, blocks, 0)
    ranks.step(new_request_output(step, req, blocks, 0, len(tokens)))
    return req


def _finish_save(ranks: SimulatedRanks, req, blocks: list[int], step: int) -> None:
    ranks.scheduler.request_finished(req, blocks)
    ranks.step(SchedulerOutput(step=step, finished_req_ids=[req.request_id]))
    ranks.wait(finished={req.request_id}, timeout_s=600)


def _record_paths(ns_dir: str, keys) -> list[str]:
    """Every record file of the blocks `keys`."""
    return [
        os.path.join(block_dir(ns_dir, k), f)
        for k in keys
        for f in os.listdir(block_dir(ns_dir, k))
    ]


def _load(ranks: SimulatedRanks, rid: str, tokens: list[int], blocks: list[int], step: int):
    """Load every full block of `tokens` into `blocks`; returns the load errors."""
    req = make_request(rid, tokens, ranks.ctx)
    matched, _ = ranks.scheduler.get_num_new_matched_tokens(req, 0)
    if matched != len(tokens) - 1:
        raise RuntimeError(f"expected {len(tokens) - 1} tokens on disk, found {matched}")
    ranks.scheduler.update_state_after_alloc(req, blocks, matched)
    ranks.step(SchedulerOutput(step=step))
    errors = ranks.wait(started={rid}, timeout_s=600)
    ranks.scheduler.request_finished(req, blocks)
    return errors


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns a JSON-ready dict."""
    if args.quick:
        args.blocks, args.layers = min(args.blocks, 64), min(args.layers, 4)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown --dtype {args.dtype!r}")
    device = str(bench_device(args.device))
    root = tempfile.mkdtemp(prefix="kvdist-bench-disk-", dir=args.dir or ".")
    try:
        return _run(args, root, dtype, device)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _run(args: argparse.Namespace, root: str, dtype: torch.dtype, device: str) -> dict:
    n, bs = args.blocks, args.block_size
    fields = dict(
        num_layers=args.layers, block_size=bs, num_kv_heads=args.heads, head_dim=args.head_dim,
        dtype=dtype, device=device, num_blocks=2 * n, model_namespace="bench-disk",
    )  # fmt: skip
    cfg = {
        "name": "disk",
        "kwargs": {
            "path": root,
            "fsync": args.fsync,
            "io_threads": args.io_threads,
            "writer_process": args.writer_process,
        },
    }
    g = torch.Generator().manual_seed(0)
    shape = (args.layers, 2, 2 * n, bs, args.heads, args.head_dim)
    full = torch.randn(shape, generator=g).to(dtype).to(device)
    writer = SimulatedRanks(cfg, 1, full, fill=True, **fields)
    payload = n * writer.workers[0].shard.transfers().block_bytes  # type: ignore[attr-defined]
    seq_write_s, seq_read_s = _sequential(os.path.join(root, "sequential.bin"), payload, args.fsync)

    tokens = list(range(n * bs + 1))
    warm = [t + 10**6 for t in tokens]  # another prompt: other block hashes
    src = list(range(n))
    dst = list(range(n, 2 * n))
    _save(writer, "warm-up", warm, src, step=0)
    t0 = time.perf_counter()
    req = _save(writer, "save", tokens, src, step=2)
    save_s = time.perf_counter() - t0
    wstats = writer.workers[0].stats  # type: ignore[attr-defined]
    writer.shutdown()
    if wstats["save_failures"]:
        raise RuntimeError(f"{wstats['save_failures']} saves failed; see the log")
    _drop(_record_paths(writer.scheduler.ns_dir, req.block_hashes))

    reader = SimulatedRanks(cfg, 1, full, **fields)
    _load(reader, "warm-up", warm, dst, step=0)
    io_before = reader.workers[0].stats["io_seconds"]  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    errors = _load(reader, "load", tokens, dst, step=2)
    load_s = time.perf_counter() - t0
    rstats = reader.workers[0].stats  # type: ignore[attr-defined]
    rstats["io_seconds"] -= io_before
    ok = not errors and torch.equal(reader.caches[0][:, :, dst], full[:, :, src])
    reader.shutdown()
    if not ok:
        raise RuntimeError(f"loaded blocks differ from the saved ones (errors: {sorted(errors)})")

    slowdown = _engine_thread_slowdown(cfg, fields, full, tokens)
    bound = _bound_slowdown(cfg, fields, full, tokens)
    behind: dict[str, float] = {}
    for run, mode in enumerate(("fifo", "reads_first", "fifo", "reads_first")):
        behind[mode] = _load_behind_saves(
            cfg, fields, full, tokens, warm, run=run, reads_first=mode == "reads_first"
        )

    def gbps(sec: float) -> float:
        return round(payload / sec / 1e9, 3)

    return {
        "benchmark": "disk",
        "directory": root,
        "filesystem": _mount(root),
        "device": device,
        "dtype": args.dtype,
        "fsync": args.fsync,
        "io_threads": args.io_threads,
        "writer_process": args.writer_process,
        "blocks": n,
        "block_record_payload_bytes": payload // n,
        "payload_bytes": payload,
        "record_bytes_written": wstats["bytes_saved"],
        "sequential_write_gbps": gbps(seq_write_s),
        "sequential_read_gbps": gbps(seq_read_s),
        "connector_save_gbps": gbps(save_s),
        "connector_load_gbps": gbps(load_s),
        "save_pct_of_sequential": round(100 * seq_write_s / save_s, 1),
        "load_pct_of_sequential": round(100 * seq_read_s / load_s, 1),
        "worker_io_seconds_save_incl_warmup": round(wstats["io_seconds"], 4),
        "worker_io_seconds_load": round(rstats["io_seconds"], 4),
        "load_behind_saves_s": {mode: round(sec, 4) for mode, sec in behind.items()},
        "engine_thread_slowdown": slowdown,
        "engine_thread_slowdown_bound": bound,
        "what_was_measured": (
            "payload bytes / wall time. Sequential: one file, 8 MiB writes"
            + (" + fsync" if args.fsync else " (page cache, no fsync)")
            + "; read after os.sync + posix_fadvise(DONTNEED). Connector: one step saving every "
            "block until reported done (gather + checksum + one record per block"
            + (" + fsync per record" if args.fsync else "")
            + "); a restarted engine loading them until reported done (read + verify + copy to the "
            "device), after the same cache drop. load_behind_saves_s: the same load started "
            "in the step after one that saved as many blocks of another prompt, with the IO "
            "threads serving reads first (the connector) or in submission order (fifo), the "
            "last of two runs of each (with the IO process, which reads before it writes "
            "whatever this setting, both measure a load beside the child's writes). "
            "engine_thread_slowdown: the engine's thread issuing "
            f"tiny torch ops (batches of {_OPS_PER_SLICE}) while the IO threads save, then "
            "load, the same blocks: median time per op over the median with the IO threads "
            "idle (1.0: no interference). engine_thread_slowdown_bound: the same with this "
            "thread bound to one CPU, as Open MPI binds each of up to two ranks, and the "
            "connector's helpers moved off it (io_cpus 'auto', the default) or left on it "
            "('inherit')."
        ),
    }


_OPS_PER_SLICE = 500


def _op_slice(a: torch.Tensor, out: torch.Tensor) -> float:
    """Seconds per op of a batch of tiny ops, as an engine's thread launching kernels
    issues them (each one leaves and re-takes the GIL, as torch's ops do)."""
    t0 = time.perf_counter()
    for _ in range(_OPS_PER_SLICE):
        torch.add(a, a, out=out)
    return (time.perf_counter() - t0) / _OPS_PER_SLICE


def _engine_thread_slowdown(
    cfg: dict, fields: dict, full: torch.Tensor, tokens: list[int], run: int = 0
) -> dict[str, dict[str, float]]:
    """How much slower this (the engine's) thread runs while the IO threads save, then
    load, the full blocks of `tokens` but its last token's, against the same ops with them idle. Each
    `run` saves prompts of its own (a block already on disk is not saved again)."""
    n = (len(tokens) - 1) // fields["block_size"]
    src, dst = list(range(n)), list(range(n, 2 * n))
    ranks = SimulatedRanks(cfg, 1, full, fill=True, **fields)
    worker = ranks.workers[0]
    a, out = torch.ones(8), torch.empty(8)
    salt = 7 * 10**6 + run * 2 * 10**6
    fresh = [t + salt for t in tokens]  # saved by no other part of the benchmark
    _save(ranks, "warm-up", [t + salt + 10**6 for t in tokens], src, step=0)

    def idle() -> list[float]:
        return [_op_slice(a, out) for _ in range(40)]

    def while_busy(rid: str, idle: list[float], *, saving: bool) -> dict[str, float]:
        busy = []
        first = {rid}
        while True:
            busy.append(_op_slice(a, out))
            saved, loaded = worker.get_finished(
                first if saving else set(), set() if saving else first
            )
            first = set()
            if rid in (saved if saving else loaded):
                break
        if worker.get_block_ids_with_load_errors():
            raise RuntimeError(f"{rid}: load errors in the slowdown measurement")
        idle_op, busy_op = float(np.median(idle)), float(np.median(busy))
        return {
            "idle_op_us": round(idle_op * 1e6, 3),
            "busy_op_us": round(busy_op * 1e6, 3),
            "ratio": round(busy_op / idle_op, 3),
            "busy_slices": len(busy),
        }

    before = idle()
    req = _start_save(ranks, "fresh", fresh, src, step=2)  # queues the writes
    ranks.scheduler.request_finished(req, src)
    ranks.step(SchedulerOutput(step=3, finished_req_ids=[req.request_id]))
    during_save = while_busy(req.request_id, before, saving=True)
    _drop(_record_paths(ranks.scheduler.ns_dir, req.block_hashes))
    probe = make_request("reload", fresh, ranks.ctx)
    matched, _ = ranks.scheduler.get_num_new_matched_tokens(probe, 0)
    if matched != len(fresh) - 1:
        raise RuntimeError(f"expected {len(fresh) - 1} tokens on disk, found {matched}")
    ranks.scheduler.update_state_after_alloc(probe, dst, matched)
    before = idle()
    ranks.step(SchedulerOutput(step=4))  # queues the reads
    during_load = while_busy("reload", before, saving=False)
    ranks.scheduler.request_finished(probe, dst)
    ranks.shutdown()
    return {"during_save": during_save, "during_load": during_load}


def _bound_slowdown(
    cfg: dict, fields: dict, full: torch.Tensor, tokens: list[int]
) -> dict[str, Any] | None:
    """`_engine_thread_slowdown` with this thread bound to one CPU (None with fewer than
    two to choose from), helpers moved off it and left on it."""
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(mine) < 2:
        return None
    out: dict[str, Any] = {"cpu": mine[0]}
    os.sched_setaffinity(0, {mine[0]})
    try:
        for run, spec in enumerate(("auto", "inherit"), start=1):
            placed = {**cfg, "kwargs": {**cfg["kwargs"], "io_cpus": spec}}
            out[f"io_cpus_{spec}"] = _engine_thread_slowdown(placed, fields, full, tokens, run)
    finally:
        os.sched_setaffinity(0, mine)
    return out


def _load_behind_saves(
    cfg: dict,
    fields: dict,
    full: torch.Tensor,
    tokens: list[int],
    warm: list[int],
    *,
    run: int,
    reads_first: bool,
) -> float:
    """Seconds to load `tokens` (on disk, pages dropped) when the step before queued the
    writes of as many blocks of another prompt."""
    n = (len(tokens) - 1) // fields["block_size"]
    ranks = SimulatedRanks(cfg, 1, full, **fields)
    worker = ranks.workers[0]
    worker._io.shutdown()  # type: ignore[attr-defined]
    pool = IOPool(cfg["kwargs"]["io_threads"], "bench-disk", reads_first=reads_first)
    worker._io = worker._loader._io = worker._saver._io = pool  # type: ignore[attr-defined]
    dst = list(range(n, 2 * n))
    _load(ranks, "warm-up", warm, dst, step=0)
    keys = make_request("probe", tokens, ranks.ctx).block_hashes
    _drop(_record_paths(ranks.scheduler.ns_dir, keys))
    backlog = [t + (run + 2) * 10**6 for t in tokens]  # a prompt no run saved before
    src = list(range(n))
    req = _start_save(ranks, "backlog", backlog, src, step=2)
    t0 = time.perf_counter()
    errors = _load(ranks, "load", tokens, dst, step=3)
    seconds = time.perf_counter() - t0
    _finish_save(ranks, req, src, step=5)
    ranks.shutdown()
    if errors:
        raise RuntimeError(f"load behind saves failed for blocks {sorted(errors)}")
    return seconds
