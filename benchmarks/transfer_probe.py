"""Where a batched block transfer spends its time on a GPU (a diagnostic, not a benchmark
of record; the numbers behind the choices in `kvdist.kv.transfer`).

Per KV-head count of an 8B-shaped shard (32 layers, 16-token blocks, head_dim 128, bf16),
with 512 scattered blocks, device-side (work queued behind a spin kernel, CUDA events):

- gather: `index_select` over the permuted 6-D cache vs a row gather over the 2-D
  fragment view kvdist uses; scatter: `index_copy_` vs `index_put_` on that view;
- whether each overlaps a host copy running on another stream (`h2d+scatter`, ...);
- the id upload: `pin_memory()` per call vs kvdist's reused pinned buffers (wall, µs);
- loads through `LoadBatch` at several pipeline chunk counts, as % of one contiguous copy.

    python benchmarks/transfer_probe.py [--heads 8,4,2,1] [--blocks 512]

The figures quoted in `kvdist/kv/transfer.py` and `benchmarks/results/README.md` came from
one-off versions of these measurements on an H200; this script gathers them in one place.
Its own output on an H200 (2026-11-28, torch 2.11.0+cu130) is
`benchmarks/results/gpu/transfer_probe.jsonl` (one JSON line per head count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import kvdist.kv.transfer as transfer
from kvdist.bench.transfer import _device_time
from kvdist.kv.pinned import IdUploader
from kvdist.kv.transfer import BlockTransfer


def _wall_us(fn, iters: int = 20) -> float:
    fn()
    out = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return round(statistics.median(out) * 1e6, 1)


def probe(heads: int, n: int, layers: int = 32, bs: int = 16, dim: int = 128) -> dict:
    dev = torch.device("cuda")
    nb = 2 * n
    kv = torch.randn(layers, 2, nb, bs, heads, dim, dtype=torch.bfloat16, device=dev)
    ids = torch.randperm(nb)[:n].tolist()
    x = BlockTransfer(kv)
    host = x.host_buffer(n).tensor
    staging = torch.empty(host.shape, dtype=host.dtype, device=dev)
    other = torch.empty_like(staging)
    flat_out = staging.view(-1, x.fragments.shape[1])
    rows = x._fragment_rows(np.asarray(ids, dtype=np.int64))
    ids_dev = torch.tensor(ids, device=dev)
    side, copy = torch.cuda.Stream(), torch.cuda.Stream()
    nbytes = host.numel() * host.element_size()
    cur = torch.cuda.current_stream()

    def gbps(seconds: float) -> float:
        return round(nbytes / seconds / 1e9, 1)

    def dev_gbps(fn) -> float:
        return gbps(_device_time(lambda: (fn(), None)[1], 7, dev))

    ops = {
        "h2d": lambda: other.copy_(host, non_blocking=True),
        "d2h": lambda: host.copy_(other, non_blocking=True),
        "gather_permuted": lambda: torch.index_select(
            kv.permute(2, 0, 1, 3, 4, 5), 0, ids_dev, out=staging
        ),
        "gather_rows": lambda: torch.index_select(x.fragments, 0, rows, out=flat_out),
        "scatter_index_copy": lambda: x.fragments.index_copy_(0, rows, flat_out),
        "scatter_index_put": lambda: x.fragments.index_put_((rows,), flat_out),
    }
    r: dict = {"heads": heads, "fragment_bytes": bs * heads * dim * 2, "mbytes": nbytes >> 20}
    for name, fn in ops.items():
        r[name] = dev_gbps(fn)

    def both(a, b):
        def issue():
            side.wait_stream(cur)
            copy.wait_stream(cur)
            with torch.cuda.stream(copy):
                ops[a]()
            with torch.cuda.stream(side):
                ops[b]()
            return lambda s: (s.wait_stream(side), s.wait_stream(copy))

        return issue

    for a, b in [
        ("h2d", "scatter_index_copy"),
        ("h2d", "scatter_index_put"),
        ("d2h", "gather_rows"),
    ]:
        r[f"{a}+{b}"] = gbps(_device_time(both(a, b), 7, dev))
    r["upload_pin_memory_us"] = _wall_us(
        lambda: torch.tensor(ids).pin_memory().to(dev, non_blocking=True)
    )
    up = IdUploader(dev)
    r["upload_reused_pinned_us"] = _wall_us(lambda: up.upload(np.asarray(ids, dtype=np.int64)))

    def load():
        b = x.load(ids, host)
        b.start()
        return b.wait

    base = _device_time(lambda: (ops["h2d"](), None)[1], 7, dev)
    for chunks in (1, 2, 4, 8):
        transfer.PIPELINE_CHUNKS = chunks
        r[f"load_chunks{chunks}_pct"] = round(100 * base / _device_time(load, 7, dev), 1)
    transfer.PIPELINE_CHUNKS = 4
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=512)
    p.add_argument("--heads", default="8,4,2,1")
    args = p.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for h in map(int, args.heads.split(",")):
        print(json.dumps(probe(h, args.blocks)), flush=True)


if __name__ == "__main__":
    main()
