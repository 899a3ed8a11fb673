"""Using kvdist from your own engine: the step loop, without `kvdist.LLM`.

A toy engine (no model: its "forward" writes each position's K and V as a known function of
the token and the position, so every block a connector loads can be checked) drives the
`disk` connector through kvdist's `Coordinator` on every tensor-parallel rank, after
`start_connector` started it on every rank together:

    rank 0                                      every rank
    admit requests, ask the connector for hits
    build the SchedulerOutput and the metadata
    coordinator.publish_plan(plan)      ──────► plan = coordinator.publish_plan(None)
                                                hooks.start_load_kv(); per layer:
                                                wait_for_layer_load, compute, all-reduce,
                                                save_kv_layer (when needs_layer_hooks());
                                                hooks.wait_for_save()
    consensus = coordinator.exchange_reports(plan)            (on every rank, the same)
    loads_done: the request may run; saves_done: its held blocks may be freed;
    failed_blocks: recompute from the first failed block;
    worker_metas: to connector.update_from_workers (which blocks each rank stored)

A connector lookup that raises (or answers malformed) fails its request alone; a worker
hook that raises on one rank leaves the connector out for the rest of that rank's step,
whose forward still runs (the other ranks wait in its all-reduces), and every rank raises
the error together in the report exchange.

It runs twice on one cache directory: a fresh engine computes the prompts and saves their
blocks; a new engine loads them and computes only the rest. On a CUDA machine the KV cache
is on each rank's GPU and the hooks get the compute stream; elsewhere, on the CPU.

Run it:   python examples/engine_integration.py
          launch/mpirun.sh -n 2 python examples/engine_integration.py
          launch/mpirun.sh -n 2 python examples/engine_integration.py --kv-heads 1
(the last: more ranks than KV heads, so both ranks hold head 0 and only rank 0 writes it)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvdist import (
    ConnectorContext,
    ConnectorError,
    Consensus,
    Coordinator,
    Plan,
    Request,
    SchedulerOutput,
    WorkerHooks,
    block_hashes,
    init_distributed,
    matched_tokens,
    shutdown_connector,
    start_connector,
)
from kvdist.comm.setup import Topology, abort_on_error

LAYERS, KV_HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 2, 4, 8, 4, 256
NAMESPACE = "engine-integration-example"
PREFIX = list(range(100, 130))  # 30 tokens shared by every prompt: 7 full blocks
PROMPTS = [PREFIX + [7, 8, 9], PREFIX + [11, 12, 13, 14, 15], PREFIX + [21]]


def expected_kv(tokens: torch.Tensor, positions: torch.Tensor, layer: int, h0: int, h1: int):
    """What the toy forward writes: `(2, len, heads h0..h1, HEAD_DIM)`, exact in float32."""
    dev = tokens.device
    kv = torch.arange(2, device=dev).view(2, 1, 1, 1)
    head = torch.arange(h0, h1, device=dev).view(1, 1, -1, 1)
    dim = torch.arange(HEAD_DIM, device=dev).view(1, 1, 1, -1)
    t, p = tokens.view(1, -1, 1, 1), positions.view(1, -1, 1, 1)
    return ((t * 131 + p * 17 + layer * 7 + kv * 3 + head * 5 + dim) % 1000).float()


# -- every rank ---------------------------------------------------------------------------


class Runner:
    """Every rank's half: the KV cache shard, the forward with the per-layer hooks, and a
    check that each request's KV is what computing it would have written."""

    def __init__(self, ctx: ConnectorContext, kv: torch.Tensor, tp_group):
        self.ctx = ctx
        self.kv = kv  # the worker registered it when the connector started
        self.tp_group = tp_group  # None at one rank
        self.checked = self.mismatched = 0

    def step(self, so: SchedulerOutput, hooks: WorkerHooks) -> None:
        # A hook that raises is kept in hooks.error and the worker is called no more this
        # step, but the forward goes on: the other ranks wait for this one in its
        # all-reduces. The error names the connector and the hook.
        hooks.start_load_kv()
        # False: nothing to do layer by layer this step (an engine could replay a captured
        # graph of its forward); the same answer on every rank.
        layer_hooks = hooks.needs_layer_hooks()
        rows = list(so.new_requests.rows())
        for layer in range(LAYERS):
            if layer_hooks:
                hooks.wait_for_layer_load(layer)
            for _, start, num, tokens, blocks in rows:
                self._write(layer, tokens, blocks, start, start + num)
            if self.tp_group is not None:  # stands for a layer's tensor-parallel all-reduce
                dist.all_reduce(torch.zeros(1, device=self.ctx.device), group=self.tp_group)
            if layer_hooks:
                hooks.save_kv_layer(layer)
        hooks.wait_for_save()
        for _, start, num, tokens, blocks in rows:  # loaded and computed, every position
            self._check(tokens, blocks, start + num)

    def _where(self, blocks, start: int, end: int):
        dev = self.ctx.device
        pos = torch.arange(start, end, device=dev)
        block_ids = torch.tensor(blocks.tolist(), dtype=torch.long, device=dev)[pos // BLOCK]
        return pos, block_ids, pos % BLOCK

    def _write(self, layer: int, tokens, blocks, start: int, end: int) -> None:
        pos, b, off = self._where(blocks, start, end)
        tok = torch.tensor(tokens[start:end].tolist(), device=self.ctx.device)
        h0, h1 = self.ctx.kv_head_start, self.ctx.kv_head_end
        self.kv[layer][:, b, off] = expected_kv(tok, pos, layer, h0, h1)

    def _check(self, tokens, blocks, end: int) -> None:
        pos, b, off = self._where(blocks, 0, end)
        tok = torch.tensor(tokens[:end].tolist(), device=self.ctx.device)
        h0, h1 = self.ctx.kv_head_start, self.ctx.kv_head_end
        for layer in range(LAYERS):
            if not torch.equal(self.kv[layer][:, b, off], expected_kv(tok, pos, layer, h0, h1)):
                self.mismatched += 1
        self.checked += 1


# -- rank 0 -------------------------------------------------------------------------------


@dataclass
class Seq:
    request: Request
    blocks: list[int]
    computed: int = 0
    """Tokens whose KV is in this engine's cache."""
    loading: int = 0
    """Tokens an async load in flight will add."""


class Scheduler:
    """Rank 0's half: admission with the connector's hits, the plan of each step, and what
    to do with each step's consensus. Every request runs one prefill step, then finishes,
    or fails alone when its lookup fails."""

    def __init__(self, connector, prompts: list[list[int]]):
        self.connector = connector
        self.free = list(range(NUM_BLOCKS))
        self.waiting = [
            Seq(Request(f"r{i}", p, block_hashes=block_hashes(p, BLOCK, NAMESPACE)), [])
            for i, p in enumerate(prompts)
        ]
        self.loading: dict[str, Seq] = {}
        self.held: dict[str, list[int]] = {}  # finished, blocks kept until saved everywhere
        self.finished: list[str] = []  # finished since the last plan: the next one says so
        self.saving: list[str] = []  # ... and which of them save asynchronously
        self.failed: dict[str, str] = {}  # request id -> why its lookup failed
        self.step = 0
        self.scheduled: list[Seq] = []
        self.loaded_tokens = self.computed_tokens = 0

    def busy(self) -> bool:
        return bool(self.waiting or self.loading or self.held or self.finished)

    def plan(self) -> Plan:
        self.step += 1
        if not self.busy():
            return Plan(step=self.step, scheduler_output=SchedulerOutput(self.step), stop=True)
        finished, saving = self.finished, self.saving
        self.finished, self.saving = [], []
        so = SchedulerOutput(self.step, finished_req_ids=finished)
        loading_ids, self.scheduled = [], []
        for seq in self.waiting:
            started = self._admit(seq) if not seq.blocks else False
            if started is None:  # its lookup failed: it failed alone
                continue
            if started:  # an async load: it waits for loads_done
                loading_ids.append(seq.request.request_id)
                continue
            r = seq.request
            so.new_requests.add(
                r.request_id, r.prompt_token_ids, seq.blocks, seq.computed,
                r.num_tokens - seq.computed,
            )  # fmt: skip
            self.scheduled.append(seq)
        self.waiting = []
        meta = self.connector.build_connector_meta(so)
        return Plan(self.step, so, loading_ids, saving, connector_meta=meta)

    def _admit(self, seq: Seq) -> bool | None:
        """Ask the connector and allocate blocks: True when an async load starts, None when
        the lookup failed."""
        r = seq.request
        try:  # the hook raising, or answering anything but (int >= 0, bool): ConnectorError
            hit, is_async = matched_tokens(self.connector, r, 0)
        except ConnectorError as exc:
            # Nothing is allocated for it yet: it fails alone and the others go on. Asked
            # about, it still gets its one request_finished, with no blocks.
            self.failed[r.request_id] = str(exc)
            self._finish(r, [])
            return None
        hit = min(hit, r.num_tokens - 1)  # keep a token to compute, as an engine samples it
        n = -(-r.num_tokens // BLOCK)
        if n > len(self.free):  # a real engine would wait or preempt
            raise RuntimeError(
                f"request {r.request_id!r} needs {n} KV blocks, {len(self.free)} free"
            )
        seq.blocks, self.free = self.free[:n], self.free[n:]
        self.connector.update_state_after_alloc(r, list(seq.blocks), hit)
        if hit and is_async:
            seq.loading = hit
            self.loading[r.request_id] = seq
            return True
        seq.computed = hit  # a synchronous load happens in this step's start_load_kv
        return False

    def after_step(self, consensus: Consensus) -> None:
        if consensus.worker_metas:  # the workers' word to the connector scheduler
            self.connector.update_from_workers(consensus.worker_metas)
        for seq in self.loading.values():
            if consensus.failed_blocks.intersection(seq.blocks):  # compute those instead
                first = min(i for i, b in enumerate(seq.blocks) if b in consensus.failed_blocks)
                seq.loading = min(seq.loading, first * BLOCK)
        for rid in consensus.loads_done:
            seq = self.loading.pop(rid)
            seq.computed, seq.loading = seq.loading, 0
            self.loaded_tokens += seq.computed
            self.waiting.append(seq)
        for rid in consensus.saves_done:
            self.free += self.held.pop(rid)
        for seq in self.scheduled:  # each ran its prefill: it is done
            r = seq.request
            self.computed_tokens += r.num_tokens - seq.computed
            self._finish(r, seq.blocks)

    def _finish(self, r: Request, blocks: list[int]) -> None:
        """`r` stopped: the next plan says so, and its blocks stay held while it saves."""
        self.finished.append(r.request_id)
        if self.connector.request_finished(r, list(blocks)):
            self.held[r.request_id] = blocks
            self.saving.append(r.request_id)
        else:
            self.free += blocks


# -- one engine run ---------------------------------------------------------------------------


def planned(scheduler: Scheduler) -> Plan:
    """Rank 0's plan, or, when planning raised (a connector hook, the scheduler), a plan
    carrying the error: the other ranks are waiting for a plan, and publishing this one
    makes every rank raise it together (`kvdist.RemoteError`) instead of leaving them to
    time out."""
    try:
        return scheduler.plan()
    except Exception as exc:
        step = scheduler.step
        return Plan(step, SchedulerOutput(step), error=f"{type(exc).__name__}: {exc}")


def run_engine(topo: Topology, cache_dir: str, kv_heads: int = KV_HEADS) -> dict[str, int]:
    """A fresh engine on `cache_dir`: every prompt once; rank 0 returns its counters."""
    # This rank's KV heads (replicated when there are more ranks than heads) filled in.
    ctx = ConnectorContext.for_rank(
        rank=topo.rank,
        world_size=topo.world_size,
        num_kv_heads=kv_heads,
        num_layers=LAYERS,
        block_size=BLOCK,
        head_dim=HEAD_DIM,
        dtype=torch.float32,
        device=topo.device,
        model_namespace=NAMESPACE,
        num_blocks=NUM_BLOCKS,
        ranks_on_host=topo.env.local_world_size,
    )
    kv = torch.zeros(
        (LAYERS, 2, NUM_BLOCKS, BLOCK, ctx.num_local_kv_heads, HEAD_DIM), device=topo.device
    )
    # Every rank together: builds the halves, registers the KV cache, and fails every rank
    # at once if any failed, or if the ranks' settings or cache directories differ.
    connector, worker = start_connector(
        {"name": "disk", "kwargs": {"path": cache_dir}}, ctx, kv, topo.comm, topo.env.timeout_s
    )
    coordinator = Coordinator(
        topo.comm, worker, timeout_s=topo.env.timeout_s, num_blocks=NUM_BLOCKS
    )
    runner = Runner(ctx, kv, topo.tp_group)
    # The hooks take the stream the forward runs on (None on the CPU).
    stream = torch.cuda.current_stream(ctx.device) if ctx.device.type == "cuda" else None
    hooks = WorkerHooks(worker, stream)
    scheduler = Scheduler(connector, PROMPTS) if topo.rank == 0 else None
    try:
        while True:
            plan = coordinator.publish_plan(planned(scheduler) if scheduler else None)
            if plan.stop:
                break
            # A worker that refused the step's metadata (bind_error) is left out of the
            # step, as one whose hook raises; the forward still runs.
            hooks.begin(coordinator.bind_error)
            # A forward that raises ends the job (abort_on_error, in main): the other ranks
            # may be waiting for this one in one of its all-reduces.
            runner.step(plan.scheduler_output, hooks)
            # A rank's hook error ends the step on every rank together (a RemoteError).
            consensus = coordinator.exchange_reports(plan, error=hooks.error)
            if scheduler is not None:
                scheduler.after_step(consensus)
                if not scheduler.scheduled and (scheduler.loading or scheduler.held):
                    time.sleep(0.001)  # only transfers in flight: let their threads run
    finally:
        for problem in shutdown_connector(connector, worker):  # both halves, whatever one raises
            print(problem, file=sys.stderr)
    checks = [runner.checked, runner.mismatched]
    gathered = topo.comm.allgather_bytes(
        bytes(checks), timeout_s=topo.env.timeout_s, what="example: KV checks"
    )
    counts = [list(g) for g in gathered]
    if scheduler is None:
        return {}
    return {
        "computed": scheduler.computed_tokens,
        "loaded": scheduler.loaded_tokens,
        "failed": scheduler.failed,
        "checked": sum(c[0] for c in counts),
        "mismatched": sum(c[1] for c in counts),
        "steps": coordinator.stats.steps,
        "max_collectives_per_step": max(coordinator.stats.step_collectives),
    }


@contextlib.contextmanager
def shared_cache_dir(topo: Topology) -> Iterator[str]:
    """A temporary directory rank 0 makes and names to every rank, removed at the end."""
    made = tempfile.mkdtemp(prefix="kvdist-example-") if topo.rank == 0 else None
    path = topo.comm.broadcast_bytes(
        made.encode() if made else None, timeout_s=topo.env.timeout_s, what="cache dir"
    ).decode()
    try:
        yield path
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="kvdist from an engine of its own")
    parser.add_argument("--kv-heads", type=int, default=KV_HEADS, help="KV heads of the model")
    args = parser.parse_args()
    topo = init_distributed()  # each rank's GPU when CUDA is there, else the CPU
    with abort_on_error(topo.comm), shared_cache_dir(topo) as cache_dir:
        runs = [run_engine(topo, cache_dir, args.kv_heads) for _ in ("cold", "warm")]
    if topo.rank == 0:
        for name, r in zip(("fresh engine", "new engine, same cache"), runs):
            print(
                f"{name}: {r['computed']} tokens computed, {r['loaded']} loaded, "
                f"{r['checked']} request shards checked, {r['mismatched']} mismatched, "
                f"{r['steps']} steps, at most {r['max_collectives_per_step']} collectives each"
            )
            for rid, why in r["failed"].items():
                print(f"  {rid} failed alone: {why}")
        ok = runs[1]["loaded"] > 0 and all(r["mismatched"] == 0 for r in runs)
        print(
            f"ranks: {topo.world_size} ({topo.device.type}); "
            f"KV loaded on every rank matches recompute: {ok}"
        )
    topo.close()


if __name__ == "__main__":
    main()
