"""Where a load behind a save backlog spends its time, with the IO process and with threads.

A probe, not a benchmark: it wraps the disk connector's internals with timestamps and
runs `kvdist.bench.disk`'s load-behind-saves scenario (256 blocks of the 8B shape, the
save's writes queued a step before the load). Prints one JSON line per mode and run.
Run from the repository root: python3 benchmarks/results/gpu/loads_in_child/probe_behind.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import msgpack
import torch

from kvdist.bench import disk as bench
from kvdist.connectors.disk import loads, saves
from kvdist.connectors.disk import writer_process as wp

EVENTS: list[tuple[float, str]] = []


def mark(what: str) -> None:
    EVENTS.append((time.perf_counter(), what))


class _Msgpack:  # records each task message as the sender thread packs it to send
    unpackb = staticmethod(msgpack.unpackb)

    @staticmethod
    def packb(obj, **kw):
        if isinstance(obj, list) and obj and obj[0] in ("read", "write"):
            mark(f"sent_{obj[0]}")
        return msgpack.packb(obj, **kw)


def instrument() -> None:
    wp.msgpack = _Msgpack  # type: ignore[assignment]
    by_process = loads.DiskLoader._read_by_process

    def read_by_process(self, job, lo, hi):
        done = by_process(self, job, lo, hi)

        def wrapped(got, error, seconds):
            mark("answer_read")
            mark(f"child_read_s={seconds:.4f}")
            done(got, error, seconds)

        return wrapped

    loads.DiskLoader._read_by_process = read_by_process
    done_for = saves.DiskSaver._done_for

    def saver_done_for(self, step, lo, hi):
        done = done_for(self, step, lo, hi)

        def wrapped(written, error, seconds):
            mark("answer_write")
            done(written, error, seconds)

        return wrapped

    saves.DiskSaver._done_for = saver_done_for
    for cls, name in (
        (loads.DiskLoader, "_finish"),
        (loads.DiskLoader, "_read_blocks"),
        (saves.DiskSaver, "_write_blocks"),
    ):
        real = getattr(cls, name)

        def timed(self, *a, _real=real, _name=name):
            mark(f"{_name}_start")
            try:
                return _real(self, *a)
            finally:
                mark(f"{_name}_end")

        setattr(cls, name, timed)
    from kvdist.connectors.disk.scheduler import DiskConnectorScheduler
    from kvdist.kv import pinned

    for cls, name in (
        (loads.DiskLoader, "start"),
        (pinned.SharedBuffer, "__init__"),
        (DiskConnectorScheduler, "get_num_new_matched_tokens"),
        (DiskConnectorScheduler, "build_connector_meta"),
        (wp.WriterProcess, "_task"),
    ):
        real = getattr(cls, name)

        def timed2(*a, _real=real, _name=name, **kw):
            mark(f"{_name}_start")
            try:
                return _real(*a, **kw)
            finally:
                mark(f"{_name}_end")

        setattr(cls, name, timed2)
    real_wait = saves.DiskSaver._wait_for_copy

    def wait(step):
        mark("copy_wait_start")
        real_wait(step)
        mark("copy_wait_end")

    saves.DiskSaver._wait_for_copy = staticmethod(wait)
    real_load = bench._load

    def load(ranks, rid, *a, **kw):
        if rid == "load":
            EVENTS.clear()
            mark("load_start")
        out = real_load(ranks, rid, *a, **kw)
        if rid == "load":
            mark("load_end")
            summarise()
        return out

    bench._load = load


def summarise() -> None:
    t0 = EVENTS[0][0]
    out: dict[str, object] = {}
    child = [float(w.split("=")[1]) for _, w in EVENTS if w.startswith("child_read_s=")]
    for t, what in EVENTS:
        if "=" in what:
            continue
        ms = round((t - t0) * 1e3, 2)
        out.setdefault(f"first_{what}_ms", ms)
        out[f"last_{what}_ms"] = ms
        out[f"n_{what}"] = int(out.get(f"n_{what}", 0)) + 1  # type: ignore[arg-type]
    if child:
        out["child_read_task_s_sum"] = round(sum(child), 3)
        out["child_read_task_s_max"] = round(max(child), 4)
    out["mode"] = MODE
    print(json.dumps(out), flush=True)


MODE = ""


def main() -> int:
    global MODE
    instrument()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, layers = (256, 32) if device == "cuda" else (64, 8)
    fields = dict(
        num_layers=layers,
        block_size=16,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        device=device,
        num_blocks=2 * n,
        model_namespace="probe-behind",
    )
    full = torch.randn((layers, 2, 2 * n, 16, 8, 128)).to(torch.bfloat16).to(device)
    root = tempfile.mkdtemp(
        prefix="kvdist-probe-", dir=sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    )
    tokens = list(range(n * 16 + 1))
    warm = [t + 10**6 for t in tokens]
    cfg = {"name": "disk", "kwargs": {"path": root, "io_threads": 8}}
    writer = bench.SimulatedRanks(cfg, 1, full, fill=True, **fields)
    bench._save(writer, "warm-up", warm, list(range(n)), step=0)
    bench._save(writer, "save", tokens, list(range(n)), step=2)
    writer.shutdown()
    for run, process in enumerate((True, False, True, False)):
        MODE = "process" if process else "threads"
        cfg = {"name": "disk", "kwargs": {"path": root, "io_threads": 8, "writer_process": process}}
        bench._load_behind_saves(cfg, fields, full, tokens, warm, run=run, reads_first=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
