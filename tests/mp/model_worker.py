"""One rank of the model parity tests (tests/test_model_parity.py launches 1, 2 or 4).

    python tests/mp/model_worker.py SPEC_JSON OUT_DIR RANK WORLD STORE_FILE

Ranks meet through a gloo FileStore (no port, no launcher environment). Each job of the
spec is a model source (checkpoint directory or preset); for it every rank runs the same
scenarios on its shard and rank 0 writes `OUT_DIR/<key>.safetensors`:

- full:    logits of every token of prompt A, one prefill into a paged cache whose
           blocks are handed out in reverse order (so block-table bugs cannot hide);
- greedy:  16 greedy tokens continuing A by single-token decode steps;
- prefix:  logits of prompt B, which shares A's first three blocks: prefilled from
           position 12 on top of A's cached blocks (a prefix-cache hit);
- chunked: logits of A prefilled in chunks of 5 tokens (chunks straddle 4-token blocks);
- batch:   greedy tokens [3, 16] of three prompts run together as an engine would:
           a full prefill beside a first chunk, then a decode beside a second chunk and
           a new prefill, then batched decodes of all three.

Nothing is asserted here: the test process compares the files with transformers.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from kvdist.engine.model import AttentionMetadata, TPInfo, load_model

BLOCK_SIZE = 4
NUM_BLOCKS = 64
GEN = 16


class Runner:
    def __init__(self, model, config, tp: TPInfo, device="cpu") -> None:
        self.model, self.config, self.tp = model, config, tp
        self.device = torch.device(device)

    def fresh_cache(self) -> torch.Tensor:
        c = self.config
        heads = self.model.num_local_kv_heads
        # NaN, not zeros: a read of a slot that was never written poisons the result.
        shape = (c.num_layers, 2, NUM_BLOCKS, BLOCK_SIZE, heads, c.head_dim)
        return torch.full(
            shape, float("nan"), dtype=self.model.lm_head.weight.dtype, device=self.device
        )

    def step(self, kv, seqs, all_rows: bool = False):
        """seqs: [(token_ids, block_ids, computed_position)] -> logits (rank 0) of the last
        row of each sequence, or of every row when `all_rows`."""
        ids = [t for toks, _, _ in seqs for t in toks]
        meta = AttentionMetadata.build(
            [(b, c, len(t)) for t, b, c in seqs], BLOCK_SIZE, device=self.device
        )
        hidden = self.model(torch.tensor(ids, device=self.device), meta.positions, meta, kv)
        rows = meta.query_start_loc[1:] - 1 if not all_rows else slice(None)
        logits = self.model.compute_logits(hidden[rows])
        return None if logits is None else logits.cpu()

    def argmax(self, logits) -> list[int]:
        """Greedy tokens decided on rank 0 and shared, as the engine's plan broadcast does."""
        # Collectives run on the model's device (NCCL needs CUDA tensors, gloo takes CPU).
        n = torch.zeros(1, dtype=torch.long, device=self.device)
        if self.tp.rank == 0:
            n[0] = logits.shape[0]
        if self.tp.size > 1:
            dist.broadcast(n, src=0)
        if self.tp.rank == 0:
            toks = logits.argmax(-1).to(self.device)
        else:
            toks = torch.zeros(int(n), dtype=torch.long, device=self.device)
        if self.tp.size > 1:
            dist.broadcast(toks, src=0)
        return toks.tolist()


def blocks_for(start: int, count: int) -> list[int]:
    return [NUM_BLOCKS - 1 - start - i for i in range(count)]


def run_job(r: Runner, prompts: list[list[int]], prefix_suffix: list[int]) -> dict:
    a = prompts[0]
    out: dict[str, torch.Tensor | None] = {}
    kv = r.fresh_cache()
    blocks_a = blocks_for(0, -(-(len(a) + GEN) // BLOCK_SIZE))
    out["full"] = r.step(kv, [(a, blocks_a, 0)], all_rows=True)
    tokens = [r.argmax(out["full"][-1:] if out["full"] is not None else None)[0]]
    for _ in range(GEN - 1):
        pos = len(a) + len(tokens) - 1
        tokens += r.argmax(r.step(kv, [([tokens[-1]], blocks_a, pos)]))
    out["greedy"] = torch.tensor(tokens)

    b = a[:12] + prefix_suffix
    blocks_b = blocks_a[:3] + blocks_for(len(blocks_a), 3)
    out["prefix"] = r.step(kv, [(b[12:], blocks_b, 12)], all_rows=True)

    kv = r.fresh_cache()
    chunks = [r.step(kv, [(a[i : i + 5], blocks_a, i)], all_rows=True) for i in range(0, len(a), 5)]
    out["chunked"] = torch.cat(chunks) if r.tp.rank == 0 else None

    out["batch"] = torch.tensor(run_batch(r, prompts))
    return out


def run_batch(r: Runner, prompts: list[list[int]]) -> list[list[int]]:
    kv = r.fresh_cache()
    per_seq = -(-(max(map(len, prompts)) + GEN) // BLOCK_SIZE)
    blocks = [blocks_for(i * per_seq, per_seq) for i in range(3)]
    p0, p1, p2 = prompts
    gen: list[list[int]] = [[], [], []]
    # Step 1: p0 whole, p1's first chunk (no token sampled for a partial prompt).
    first = r.argmax(r.step(kv, [(p0, blocks[0], 0), (p1[:5], blocks[1], 0)]))
    gen[0].append(first[0])
    # Step 2: p0 decodes beside p1's last chunk and p2's whole prompt.
    seqs = [([gen[0][-1]], blocks[0], len(p0)), (p1[5:], blocks[1], 5), (p2, blocks[2], 0)]
    for i, t in enumerate(r.argmax(r.step(kv, seqs))):
        gen[i].append(t)
    # Then batched decodes of whoever is not done yet.
    while any(len(g) < GEN for g in gen):
        live = [i for i in range(3) if len(gen[i]) < GEN]
        seqs = [([gen[i][-1]], blocks[i], len(prompts[i]) + len(gen[i]) - 1) for i in live]
        for i, t in zip(live, r.argmax(r.step(kv, seqs))):
            gen[i].append(t)
    return gen


def main() -> None:
    spec_path, out_dir, rank, world, store_file = sys.argv[1:6]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)  # ranks share 2 cores; more threads only oversubscribe
    group = None
    if world > 1:
        store = dist.FileStore(store_file, world)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        # An explicit group, not the default one, so the group-rank path of the LM head's
        # gather is what gets tested.
        group = dist.new_group(list(range(world)))
    tp = TPInfo(rank=rank, size=world, group=group)
    spec = json.loads(Path(spec_path).read_text())
    for job in spec["jobs"]:
        model, config, _, fingerprint = load_model(job["source"], tp=tp, dtype=torch.float32)
        result = run_job(Runner(model, config, tp), spec["prompts"], spec["prefix_suffix"])
        if rank == 0:
            tensors = {k: v.contiguous() for k, v in result.items() if v is not None}
            save_file(
                tensors,
                str(Path(out_dir) / f"{job['key']}.safetensors"),
                metadata={"fingerprint": fingerprint},
            )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
