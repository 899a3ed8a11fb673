"""Helpers to drive connectors without an engine: several tensor-parallel ranks simulated in
one process, each with its worker, context and slice of a full reference KV cache.

Used by kvdist's tests and useful for testing user connectors.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import torch

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
from kvdist.api.types import (
    ConnectorConfig,
    ConnectorContext,
    Request,
    RequestBatch,
    SchedulerOutput,
)
from kvdist.connectors.registry import create_connector
from kvdist.kv.hashing import block_hashes


def tp_context(
    rank: int,
    world_size: int,
    *,
    num_layers: int = 2,
    block_size: int = 4,
    num_kv_heads: int = 4,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    model_namespace: str = "test-model|float32|bs4|layout1",
    num_blocks: int = 32,
    kwargs: dict[str, Any] | None = None,
) -> ConnectorContext:
    """The context of `rank` in a `world_size`-way split of `num_kv_heads` heads (each
    head replicated when there are more ranks than heads)."""
    return ConnectorContext.for_rank(
        rank=rank,
        world_size=world_size,
        num_kv_heads=num_kv_heads,
        num_layers=num_layers,
        block_size=block_size,
        head_dim=head_dim,
        dtype=dtype,
        device=torch.device(device),
        model_namespace=model_namespace,
        num_blocks=num_blocks,
        kwargs=dict(kwargs or {}),
    )


def full_kv(ctx: ConnectorContext, *, seed: int = 0) -> torch.Tensor:
    """A random full (all heads) KV cache for `ctx`'s model."""
    g = torch.Generator().manual_seed(seed)
    shape = (ctx.num_layers, 2, ctx.num_blocks, ctx.block_size, ctx.num_kv_heads, ctx.head_dim)
    return torch.randn(shape, generator=g).to(ctx.dtype).to(ctx.device)


def shard(full: torch.Tensor, ctx: ConnectorContext) -> torch.Tensor:
    """This rank's slice of a full KV cache (a copy)."""
    return full[..., ctx.kv_head_start : ctx.kv_head_end, :].clone()


def make_request(
    request_id: str, token_ids: Sequence[int], ctx: ConnectorContext, cache_salt: str | None = None
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(token_ids),
        block_hashes=block_hashes(token_ids, ctx.block_size, ctx.model_namespace, cache_salt),
        cache_salt=cache_salt,
    )


def new_request_output(
    step: int, request: Request, block_ids: Sequence[int], computed: int, scheduled: int
) -> SchedulerOutput:
    """A SchedulerOutput scheduling one request new to the ranks."""
    batch = RequestBatch()
    batch.add(request.request_id, request.all_token_ids, block_ids, computed, scheduled)
    return SchedulerOutput(step=step, new_requests=batch)


def run_step(workers: Sequence[ConnectorWorker], meta: Any, *, layerwise: bool = True) -> None:
    """One engine step on every simulated rank (no model: the cache is not written)."""
    for w in workers:
        w.bind_connector_meta(meta)
        w.start_load_kv(None)
        if layerwise:
            for layer in range(w.ctx.num_layers):
                w.wait_for_layer_load(layer, None)
                w.save_kv_layer(layer, None)
        w.wait_for_save(None)


def wait_finished(
    worker: ConnectorWorker,
    *,
    finished: Iterable[str] = (),
    started: Iterable[str] = (),
    timeout_s: float = 10.0,
) -> tuple[set[str], set[str], set[int]]:
    """Pass the ids once, then poll `get_finished` until every one is reported; returns
    (saved, loaded, block ids with load errors). TimeoutError if they are not."""
    want_saved, want_loaded = set(finished), set(started)
    saved: set[str] = set()
    loaded: set[str] = set()
    errors: set[int] = set()
    f, s = set(want_saved), set(want_loaded)
    deadline = time.monotonic() + timeout_s
    while True:
        got_saved, got_loaded = worker.get_finished(f, s)
        f, s = set(), set()
        saved |= got_saved
        loaded |= got_loaded
        errors |= worker.get_block_ids_with_load_errors()
        if saved >= want_saved and loaded >= want_loaded:
            return saved, loaded, errors
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"not reported after {timeout_s}s: saves {sorted(want_saved - saved)}, "
                f"loads {sorted(want_loaded - loaded)}"
            )
        time.sleep(0.002)


class SimulatedRanks:
    """One connector on `world_size` simulated ranks: rank 0's scheduler and every rank's
    worker, each registered with its own KV cache shard (`caches[r]`).

    `caches` start as each rank's slice of `full` when `fill`, else zeros. Every meta goes
    through a msgpack round trip, as it would over the wire."""

    def __init__(
        self,
        config: ConnectorConfig | str | dict[str, Any],
        world_size: int,
        full: torch.Tensor,
        *,
        fill: bool = False,
        **ctx_fields: Any,
    ) -> None:
        self.ctxs = [tp_context(r, world_size, **ctx_fields) for r in range(world_size)]
        self.workers: list[ConnectorWorker] = []
        self.caches: list[torch.Tensor] = []
        sched: ConnectorScheduler | None = None
        for ctx in self.ctxs:
            s, w = create_connector(config, ctx)
            sched = sched or s
            kv = shard(full, ctx) if fill else torch.zeros_like(shard(full, ctx))
            w.register_kv_caches(kv)
            self.workers.append(w)
            self.caches.append(kv)
        assert sched is not None
        self.scheduler: Any = sched

    @property
    def ctx(self) -> ConnectorContext:
        return self.ctxs[0]

    def step(self, so: SchedulerOutput, *, layerwise: bool = True) -> Any:
        """Build the meta on rank 0, send it through msgpack, run the step on every rank."""
        meta = self.scheduler.build_connector_meta(so)
        wire = msgpack.unpackb(msgpack.packb(meta, use_bin_type=True), raw=False)
        run_step(self.workers, wire, layerwise=layerwise)
        self.report()
        return wire

    def report(self) -> list[Any]:
        """Pass every worker's `build_worker_meta` (through msgpack) to the scheduler, as
        the engine does after a step's report exchange; returns them, by rank."""
        metas = [
            msgpack.unpackb(msgpack.packb(w.build_worker_meta(), use_bin_type=True), raw=False)
            for w in self.workers
        ]
        if any(m is not None for m in metas):
            self.scheduler.update_from_workers(metas)
        return metas

    def wait(
        self, *, finished: Iterable[str] = (), started: Iterable[str] = (), timeout_s: float = 10.0
    ) -> set[int]:
        """Every rank reports the given ids; returns the union of their load errors."""
        errors: set[int] = set()
        for w in self.workers:
            errors |= wait_finished(w, finished=finished, started=started, timeout_s=timeout_s)[2]
        self.report()
        return errors

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown()
        self.scheduler.shutdown()
