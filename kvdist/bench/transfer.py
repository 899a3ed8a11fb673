"""Data-plane benchmark: scattered-block save/load of one rank's KV shard.

For an 8B-shaped model (32 layers, head_dim 128, 16-token blocks) and 8, 4, 2, 1 KV heads
per rank (tensor parallel 1, 2, 4, 8), moves `--blocks` randomly scattered blocks between
the paged cache and host memory three ways, each timed from issue to completion:

- contiguous: one copy of a contiguous device tensor of the same bytes to/from a pinned
  host buffer (the bandwidth ceiling, measured in the same run);
- batched: `kvdist.kv.transfer` (gather on the device, one pinned copy; and the reverse),
  also with the save gathered layer by layer as the engine does;
- slots: the same batched transfer to and from scattered rows of a host pool twice the
  size (the `cpu` connector's slots): one host copy per run of consecutive rows (runs of
  `--slot-run` rows; by default each row at random);
- naive: one copy call per contiguous fragment (block, layer, K or V).

Two clocks. *Wall*: from the first Python call to completion on an idle GPU, so the CPU's
cost of issuing the work (a few hundred µs of torch calls for a batched transfer, ~20 µs
for one copy) is counted. *Device* (CUDA only): the same work queued behind a spin kernel
that outlasts the issuing, timed with CUDA events from the end of the spin to the end of
the transfer; that is how the engine runs it (a save is issued while the forward still
runs, a load before it), and it is the copy bandwidth the target speaks of. Both clocks
time the contiguous baseline the same way.

A fragment is `block_size * heads * head_dim` elements: 32 KB (K or V; 64 KB K+V per layer)
at 8 bf16 heads down to 4 KB (8 KB K+V) at 1 head. On the CPU every copy is a memcpy and
"contiguous" is a host-to-host copy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from kvdist.cli.common import bench_device, count_arg, count_list_arg
from kvdist.kv.transfer import BlockTransfer, load_blocks_naive, row_runs, save_blocks_naive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--layers", type=count_arg(1), default=32)
    parser.add_argument("--head-dim", type=count_arg(1), default=128)
    parser.add_argument("--block-size", type=count_arg(1), default=16)
    parser.add_argument(
        "--heads",
        type=count_list_arg(1),
        default=[8, 4, 2, 1],
        help="KV heads per rank, comma-separated (default: 8,4,2,1)",
    )
    parser.add_argument(
        "--blocks", type=count_arg(1), default=512, help="scattered blocks per transfer"
    )
    parser.add_argument("--cache-blocks", type=count_arg(0), default=0, help="default: 2x --blocks")
    parser.add_argument("--iters", type=count_arg(1), default=10)
    parser.add_argument(
        "--slot-run",
        type=count_arg(1),
        default=1,
        help="the slots rows' runs of consecutive pool rows (one host copy each); 1: rows "
        "scattered at random (default: 1)",
    )
    parser.add_argument("--no-naive", action="store_true", help="skip the per-fragment baseline")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")


def _time(fn: Callable[[], object], iters: int, sync: Callable[[], None]) -> float:
    """Median seconds of `fn` (after one warm-up), each run ending in `sync`."""
    fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_time(issue: Callable[[], Callable | None], iters: int, device: torch.device) -> float:
    """Median device seconds of the work `issue` enqueues, its issuing hidden behind a spin
    kernel on the current stream (lengthened until it outlasts the issuing). `issue` returns
    a function making a stream wait for the work's end, or None for current-stream work."""
    stream = torch.cuda.current_stream(device)
    gate, times = 1 << 22, list[float]()
    while len(times) < iters + 1:  # the first is a warm-up
        torch.cuda.synchronize(device)
        torch.cuda._sleep(gate)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        wait = issue()
        if wait is not None:
            wait(stream)
        end.record(stream)
        hidden = not start.query()
        end.synchronize()
        if hidden:
            times.append(start.elapsed_time(end) / 1e3)
        elif gate < 1 << 34:
            gate *= 2
        else:
            raise RuntimeError("could not hide the issuing cost behind the spin kernel")
    return statistics.median(times[1:])


def _one(heads: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    n = args.blocks
    cache_blocks = max(args.cache_blocks or 2 * n, n)
    shape = (args.layers, 2, cache_blocks, args.block_size, heads, args.head_dim)
    kv = torch.randn(shape, device=device).to(dtype)
    ids = torch.randperm(cache_blocks)[:n].tolist()
    xfer = BlockTransfer(kv)
    lease = xfer.host_buffer(n)
    host = lease.tensor
    nbytes = n * xfer.block_bytes
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    dev_flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host_flat = host.view(-1).view(torch.uint8)
    t = {}
    t["contiguous_save"] = _time(
        lambda: host_flat.copy_(dev_flat, non_blocking=True), args.iters, sync
    )
    t["contiguous_load"] = _time(
        lambda: dev_flat.copy_(host_flat, non_blocking=True), args.iters, sync
    )

    def batched_save() -> None:
        b = xfer.save(ids, host)
        b.commit()
        b.synchronize()

    def layerwise_save() -> None:
        b = xfer.save(ids, host)
        for layer in range(args.layers):
            b.gather_layer(layer)
        b.commit()
        b.synchronize()

    def batched_load() -> None:
        b = xfer.load(ids, host)
        b.start()
        b.synchronize()

    # The cpu connector's path: blocks to and from scattered rows (slots) of a host pool
    # twice their size, one copy per run of consecutive slots.
    pool_lease = xfer.host_buffer(2 * n)
    pool = pool_lease.tensor
    slots = _pool_rows(n, args.slot_run)

    def slots_save() -> None:
        b = xfer.save(ids, pool, slots)
        b.commit()
        b.synchronize()

    def slots_load() -> None:
        b = xfer.load(ids, pool, slots)
        b.start()
        b.synchronize()

    t["batched_save"] = _time(batched_save, args.iters, sync)
    t["batched_save_layerwise"] = _time(layerwise_save, args.iters, sync)
    t["batched_load"] = _time(batched_load, args.iters, sync)
    t["slots_save"] = _time(slots_save, args.iters, sync)
    t["slots_load"] = _time(slots_load, args.iters, sync)
    if cuda:

        def queued_save(layerwise: bool) -> Callable:
            b = xfer.save(ids, host)
            for layer in range(args.layers if layerwise else 0):
                b.gather_layer(layer)
            b.commit()
            return b.wait

        def queued_load(rows: list[int] | None = None) -> Callable:
            b = xfer.load(ids, host if rows is None else pool, rows)
            b.start()
            return b.wait

        def queued_slots_save() -> Callable:
            b = xfer.save(ids, pool, slots)
            b.commit()
            return b.wait

        def queued_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
            dst.copy_(src, non_blocking=True)  # on the current stream: no waiter needed

        device_clock: dict[str, Callable[[], Callable | None]] = {
            "contiguous_save": lambda: queued_copy(host_flat, dev_flat),
            "contiguous_load": lambda: queued_copy(dev_flat, host_flat),
            "batched_save": lambda: queued_save(False),
            "batched_save_layerwise": lambda: queued_save(True),
            "batched_load": queued_load,
            "slots_save": queued_slots_save,
            "slots_load": lambda: queued_load(slots),
        }
        for key, issue in device_clock.items():
            t[f"device_{key}"] = _device_time(issue, args.iters, device)
    # Correctness guard: a fast but wrong path must not produce a number. Every block both
    # ways: saved into the host buffer, then loaded back into blocks cleared first.
    want = kv[:, :, ids].movedim(2, 0).cpu()

    def round_trip(what: str, save: Callable[[], None], load: Callable[[], None], rows) -> None:
        save()
        if not torch.equal(rows(), want):
            raise RuntimeError(f"transfer bench: the {what} save copied the wrong bytes")
        kv[:, :, ids] = 0
        load()
        sync()
        if not torch.equal(kv[:, :, ids].movedim(2, 0).cpu(), want):
            raise RuntimeError(f"transfer bench: the {what} load copied the wrong bytes")

    round_trip("batched", batched_save, batched_load, lambda: host[:n])
    round_trip("slots", slots_save, slots_load, lambda: pool[slots])
    if not args.no_naive:
        naive_iters = max(1, args.iters // 3)
        t["naive_save"] = _time(lambda: save_blocks_naive(kv, ids, host), naive_iters, sync)
        t["naive_load"] = _time(lambda: load_blocks_naive(kv, ids, host), naive_iters, sync)
    lease.release()
    pool_lease.release()
    frag = args.block_size * heads * args.head_dim * torch.empty((), dtype=dtype).element_size()
    out: dict = {
        "kv_heads_per_rank": heads,
        "tensor_parallel": None,
        "fragment_bytes": frag,
        "fragment_kv_bytes_per_layer": 2 * frag,
        "block_shard_bytes": xfer.block_bytes,
        "blocks": n,
        "bytes_per_transfer": nbytes,
        "copy_calls_naive": n * args.layers * 2,
        "slot_run": args.slot_run,
        "copy_calls_slots": len(row_runs(slots)),
    }
    for k, sec in t.items():
        out[f"{k}_gbps"] = round(nbytes / sec / 1e9, 3)
    for kind in ("save", "load"):
        base = out[f"contiguous_{kind}_gbps"]
        for impl in ("batched", "slots", "naive"):
            if f"{impl}_{kind}_gbps" in out:
                out[f"{impl}_{kind}_pct_of_contiguous"] = round(
                    100 * out[f"{impl}_{kind}_gbps"] / base, 1
                )
    out["batched_save_layerwise_pct_of_contiguous"] = round(
        100 * out["batched_save_layerwise_gbps"] / out["contiguous_save_gbps"], 1
    )
    if cuda:
        for kind, impl in (
            ("save", "batched"),
            ("save", "batched_save_layerwise"),
            ("load", "batched"),
            ("save", "slots"),
            ("load", "slots"),
        ):
            key = impl if impl == "batched_save_layerwise" else f"{impl}_{kind}"
            out[f"device_{key}_pct_of_contiguous"] = round(
                100 * out[f"device_{key}_gbps"] / out[f"device_contiguous_{kind}_gbps"], 1
            )
    return out


def _pool_rows(n: int, run: int) -> list[int]:
    """`n` rows of a pool of `2 * n`, in runs of `run` consecutive rows (the last may be
    shorter) at random places, the runs in random order; `run` 1: each row at random."""
    if run == 1:
        return torch.randperm(2 * n)[:n].tolist()
    runs = -(-n // run)
    starts = torch.randperm(max(runs, 2 * n // run))[:runs].tolist()
    rows = [s * run + i for s in starts for i in range(run)]
    return rows[:n]


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns a JSON-ready dict (settings, environment, one row per
    heads-per-rank setting)."""
    if args.quick:
        args.layers, args.blocks, args.iters = (
            min(args.layers, 4),
            min(args.blocks, 64),
            min(args.iters, 3),
        )
    device = bench_device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown --dtype {args.dtype!r} (e.g. bfloat16, float16, float32)")
    heads_list = list(args.heads)
    max_heads = max(heads_list)
    rows = []
    for heads in heads_list:
        row = _one(heads, args, device, dtype)
        row["tensor_parallel"] = max_heads // heads if max_heads % heads == 0 else None
        rows.append(row)
    return {
        "benchmark": "transfer",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": dtype_name,
        "layers": args.layers,
        "head_dim": args.head_dim,
        "block_size": args.block_size,
        "iters": args.iters,
        "timing": "wall: median time from issue to completion on an idle device (synchronized), "
        "one warm-up; device_*: median CUDA-event time of the same work queued behind a spin "
        "kernel that hides its issuing",
        "results": rows,
    }
