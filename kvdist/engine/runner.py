"""Every rank's model runner: mirrors the requests from plan deltas and runs the forward.

Each rank keeps, per request, the token list and block table it has been sent; the plan of
each step only carries what is new. Every rank runs the same batch on its shard; rank 0
alone gets full logits (for sampling).
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

import torch

from kvdist.api.types import SchedulerOutput
from kvdist.coordination.worker_hooks import WorkerHooks
from kvdist.engine.decode_graphs import DecodeGraphs
from kvdist.engine.model.attention import AttentionMetadata
from kvdist.engine.model.llama import LlamaForCausalLM


@dataclass
class _Mirror:
    tokens: array
    block_table: array
    """int32, as the plan carries them: the decode graphs copy rows as memory."""


@dataclass
class ForwardResult:
    logits: torch.Tensor | None
    """Full-vocab logits of the sampled rows (rank 0), None elsewhere or when none."""
    sample_ids: list[str] = field(default_factory=list)
    forward_seconds: float = 0.0
    """Forward pass and logits, the connector's per-layer hooks included."""
    hook_seconds: float = 0.0
    """Of which in the connector's per-layer hooks."""
    graph: bool = False
    """The forward took the decode-graph path (a replayed CUDA graph, or its padded eager
    form when the graphs do not capture)."""


class LayerHooks(WorkerHooks):
    """`WorkerHooks` under the names the model calls around each decoder layer (a hook
    that raises does not stop the forward; see `kvdist.coordination.worker_hooks`)."""

    def reset(self) -> None:
        self.begin()

    def needed(self) -> bool:
        return self.needs_layer_hooks()

    def before_layer(self, i: int) -> None:
        self.wait_for_layer_load(i)

    def after_layer(self, i: int) -> None:
        self.save_kv_layer(i)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        *,
        block_size: int,
        device: torch.device,
        graphs: DecodeGraphs | None = None,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.graphs = graphs
        """Decode-only steps replay these when set (see `kvdist.engine.decode_graphs`)."""
        self.requests: dict[str, _Mirror] = {}

    def apply_plan(self, out: SchedulerOutput) -> None:
        for rid in out.finished_req_ids:
            self.requests.pop(rid, None)
        for rid in out.preempted_req_ids:
            self.requests.pop(rid, None)
        for rid, _, _, tokens, blocks in out.new_requests.rows():
            self.requests[rid] = _Mirror(tokens, blocks)
        for rid, _, _, tokens, blocks in out.cached_requests.rows():
            m = self.requests.get(rid)
            if m is None:
                raise RuntimeError(f"plan names request {rid!r}, unknown on this rank")
            m.tokens += tokens
            if blocks:
                m.block_table += blocks

    # no_grad, not inference_mode: connectors allocate buffers inside the per-layer hooks
    # and update them later outside the forward, which inference tensors forbid.
    @torch.no_grad()
    def execute(self, out: SchedulerOutput, hooks: LayerHooks | None) -> ForwardResult:
        input_ids: list[int] = []
        seqs = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        decode_only = True
        for batch in (out.new_requests, out.cached_requests):
            for rid, start, num, _, _ in batch.rows():
                m = self.requests[rid]
                end = start + num
                if end > len(m.tokens) or len(m.block_table) * self.block_size < end:
                    raise RuntimeError(
                        f"request {rid!r}: step covers tokens up to {end}, the rank holds "
                        f"{len(m.tokens)} tokens and {len(m.block_table)} blocks"
                    )
                input_ids += m.tokens[start:end]
                seqs.append((m.block_table, start, num))
                decode_only = decode_only and num == 1
                if end == len(m.tokens):
                    sample_rows.append(len(input_ids) - 1)
                    sample_ids.append(rid)
        if not seqs:
            return ForwardResult(None)
        t0 = time.perf_counter()
        hooks_before = hooks.seconds if hooks is not None else 0.0
        # Steps the connector has no per-layer work in run without its hooks.
        layer_hooks = hooks if hooks is not None and hooks.needed() else None
        hidden = None
        if self.graphs is not None and decode_only and layer_hooks is None:
            hidden = self.graphs.run(input_ids, seqs)
        graph = hidden is not None
        if hidden is None:
            ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
            attn = AttentionMetadata.build(seqs, block_size=self.block_size, device=self.device)
            hidden = self.model(ids, attn.positions, attn, self.kv_cache, layer_hooks)
        logits = None
        if len(sample_rows) == len(hidden):  # every row (increasing, distinct)
            logits = self.model.compute_logits(hidden)
        elif sample_rows:
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        hook_s = hooks.seconds - hooks_before if hooks is not None else 0.0
        return ForwardResult(logits, sample_ids, time.perf_counter() - t0, hook_s, graph)
