"""Decode-only steps replayed from captured CUDA graphs.

Run eagerly, an 8B decode step issues about a thousand kernel launches, and on a GPU the
engine's step time is the host's time to issue them (the profiles in
benchmarks/results/README.md). A decode-only step does the same work every time, up to its
batch size and its longest context, so each (batch bucket, context bucket) is captured
once as a CUDA graph and replayed with one call.

Shapes are made static by padding:

- the batch, to the next size in `batch_buckets`. Padding rows repeat the last real row
  (token, position, cache slot, block table): they compute what that row computes and write
  the same K/V to the same slot, so they change nothing, and their outputs are dropped;
- the context, to the next power of two of blocks (`context_buckets`). Gathered slots past
  each row's context are zeroed and masked, as in the eager path.

A graph's inputs are two buffers on the device (tokens, positions, slots and context
lengths in int64; the block tables in int32, copied as memory from the runner's tables),
filled by one copy each per step; the masks are computed inside the graph. Every
tensor-parallel rank runs the same plan, so every rank captures the same graphs at the
same step, and the NCCL all-reduces are captured with them.

Per-layer connector hooks are Python and cannot run inside a graph: the runner replays a
graph only in steps where the connector says it needs none
(`ConnectorWorker.needs_layer_hooks`).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvdist.engine.model.attention import AttentionMetadata
from kvdist.engine.model.llama import LlamaForCausalLM

_MIN_CONTEXT_BLOCKS = 8
"""The smallest context bucket, in blocks (fewer graphs for short contexts)."""


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, multiples of 8 up to 64, multiples of
    32 after that, and `max_num_seqs` itself (the largest)."""
    sizes = [1, 2, 4, *range(8, 65, 8), *range(96, max_num_seqs, 32)]
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


def context_buckets(max_blocks: int) -> list[int]:
    """Context lengths, in blocks, a graph is captured for: powers of two from
    `_MIN_CONTEXT_BLOCKS`, and `max_blocks` itself (the largest)."""
    sizes, n = [], _MIN_CONTEXT_BLOCKS
    while n < max_blocks:
        sizes.append(n)
        n *= 2
    return [*sizes, max_blocks]


def _ceil_to(buckets: list[int], n: int) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class _Entry:
    """One captured shape: `batch` rows attending over `blocks` blocks."""

    batch: int
    blocks: int
    inputs: torch.Tensor
    """[4, batch] int64: tokens, positions, slots, context lengths."""
    tables: torch.Tensor
    """[batch, blocks] int32: the block tables."""
    hidden: torch.Tensor | None = None
    """The graph's output, [batch, hidden] (rewritten by every replay)."""
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class GraphStats:
    captured: int = 0
    capture_seconds: float = 0.0


@dataclass
class DecodeGraphs:
    """The decode graphs of one model and KV cache (one per rank).

    `capture=False` runs the same padded static-shape path eagerly (on the CPU, or to
    compare with the graphs); the tests check it against the unpadded eager path."""

    model: LlamaForCausalLM
    kv_cache: torch.Tensor
    block_size: int
    max_num_seqs: int
    max_model_len: int
    capture: bool = True
    stats: GraphStats = field(default_factory=GraphStats)

    def __post_init__(self) -> None:
        self.device = self.kv_cache.device
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the KV cache is on {self.device}")
        self.batch_sizes = batch_buckets(self.max_num_seqs)
        self.context_blocks = context_buckets(-(-self.max_model_len // self.block_size))
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def bucket(self, num_seqs: int, context_blocks: int) -> tuple[int, int] | None:
        """The (batch, blocks) shape that holds a step, None when none does."""
        b = _ceil_to(self.batch_sizes, num_seqs)
        nb = _ceil_to(self.context_blocks, context_blocks)
        return None if b is None or nb is None else (b, nb)

    def run(
        self, input_ids: Sequence[int], seqs: Sequence[tuple[Sequence[int], int, int]]
    ) -> torch.Tensor | None:
        """Hidden states [D, hidden] of a decode-only step, or None when no bucket holds it
        (the caller then runs it eagerly). `seqs` as for `AttentionMetadata.build`, each
        with one new token (`input_ids[i]`). The result is a view of the graph's output:
        use it before the next `run`."""
        bs = self.block_size
        need = max(-(-(computed + 1) // bs) for _, computed, _ in seqs)
        key = self.bucket(len(seqs), need)
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._new_entry(*key)
        self._fill(entry, input_ids, seqs)
        if not self.capture:
            return self._forward(entry)[: len(seqs)]
        if entry.graph is None:
            try:
                self._capture(entry)
            except Exception as exc:
                raise RuntimeError(
                    f"capturing the decode graph for {entry.batch} sequences over "
                    f"{entry.blocks} blocks failed ({type(exc).__name__}: {exc}); run with "
                    "cuda_graphs=False (--eager on the command line), or lower max_num_seqs "
                    "or max_model_len"
                ) from exc
        assert entry.graph is not None and entry.hidden is not None
        entry.graph.replay()
        return entry.hidden[: len(seqs)]

    # -- internals ----------------------------------------------------------------------
    def _new_entry(self, batch: int, blocks: int) -> _Entry:
        dev = self.device
        return _Entry(
            batch,
            blocks,
            torch.zeros((4, batch), dtype=torch.int64, device=dev),
            torch.zeros((batch, blocks), dtype=torch.int32, device=dev),
        )

    def _fill(self, entry: _Entry, input_ids, seqs) -> None:
        # The tables are most of the input (a step of 256 sequences over 512-block contexts
        # is 130k ids): int32 arrays copied as memory and handed to torch as one buffer.
        # Through Python lists and torch.tensor they took ~20 ms of host time a step.
        bs, nb, b = self.block_size, entry.blocks, entry.batch
        if len(input_ids) != len(seqs):
            raise ValueError(f"{len(input_ids)} tokens for {len(seqs)} decode sequences")
        positions, slots, tables = array("q"), array("q"), array("i")
        zeros = array("i", bytes(4 * nb))
        for table, computed, num_new in seqs:
            if num_new != 1:
                raise ValueError(f"decode graphs take one new token per sequence, got {num_new}")
            positions.append(computed)
            slots.append(table[computed // bs] * bs + computed % bs)
            row = table[:nb]
            tables.extend(row)
            if len(row) < nb:
                tables.extend(zeros[: nb - len(row)])
        pad = b - len(seqs)
        contexts = array("q", [p + 1 for p in positions])
        small = array("q")
        for col in (array("q", input_ids), positions, slots, contexts):
            small.extend(col)
            small.extend(col[-1:] * pad)
        tables.extend(tables[-nb:] * pad)
        entry.inputs.copy_(torch.frombuffer(small, dtype=torch.int64).view(4, b))
        entry.tables.copy_(torch.frombuffer(tables, dtype=torch.int32).view(b, nb))

    def _forward(self, entry: _Entry) -> torch.Tensor:
        """The padded step on the entry's input buffer (what the graph captures)."""
        b, nb = entry.batch, entry.blocks
        ids, positions, slots, context = entry.inputs
        tables = entry.tables.long()
        valid = torch.arange(nb * self.block_size, device=self.device)[None, :] < context[:, None]
        meta = AttentionMetadata(
            slot_mapping=slots,
            positions=positions,
            query_start_loc=torch.arange(b + 1, device=self.device),
            block_size=self.block_size,
            num_prefill_tokens=0,
            prefill_groups=(),
            num_decode_tokens=b,
            decode_token_idx=torch.arange(b, device=self.device),
            decode_block_tables=tables,
            decode_mask=valid[:, None, None, :],
            decode_pad=~valid[:, :, None, None],
        )
        return self.model(ids, positions, meta, self.kv_cache)

    def _capture(self, entry: _Entry) -> None:
        t0 = time.perf_counter()
        current = torch.cuda.current_stream(self.device)
        # One eager run first, on a side stream, so that cuBLAS, the attention kernels and
        # NCCL set themselves up outside the capture. It runs on this step's inputs, so
        # its K/V writes are the ones the replay makes again.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(entry)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: connector IO threads may use CUDA while the main thread captures.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            entry.hidden = self._forward(entry)
        entry.graph = graph
        self.stats.captured += 1
        self.stats.capture_seconds += time.perf_counter() - t0
