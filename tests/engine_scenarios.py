"""Engine scenarios that run on every rank, at any world size.

Each returns a JSON-able observation of its rank; the multi-rank test gathers them from
every rank and checks them together. The memory connector (tests/memory_connector.py)
moves real KV data, so any wrong block, head range or missed recompute changes tokens.
"""

from __future__ import annotations

import os
import time
from typing import Any

from kvdist.comm.setup import Topology
from kvdist.engine.llm import LLM
from kvdist.engine.sampling import SamplingParams
from kvdist.engine.scheduler import COUNTER_NAMES

MEMORY = {
    "module": "memory_connector",
    "scheduler_class": "MemoryScheduler",
    "worker_class": "MemoryWorker",
}
SHARED = list(range(7, 7 + 37))  # 37 tokens: two full 16-token blocks and a tail
PROMPTS = [SHARED + [100 + i, 200 + i, 300 + i] for i in range(4)] + [[3, 1, 4, 1, 5]]
GREEDY = SamplingParams(max_tokens=8)


def _llm(topo: Topology, connector=None, **kw) -> LLM:
    kw.setdefault("num_blocks", 128)
    kw.setdefault("dtype", "float32")  # the same math on CPU and CUDA
    kw.setdefault("max_num_batched_tokens", 24)  # forces chunked prefill
    # The launching test may name another model (a checkpoint directory).
    model = os.environ.get("KVDIST_TEST_MODEL", "tiny")
    return LLM(model, connector=connector, topology=topo, **kw)


def _memory(store: str, **kwargs) -> dict[str, Any]:
    return {**MEMORY, "kwargs": {"store": store, **kwargs}}


def _run(llm: LLM, prompts=PROMPTS, params=GREEDY, **kw) -> dict[str, Any]:
    outs = llm.generate(prompts, params, **kw)
    stats = llm.stats
    llm.shutdown()
    return {
        "tokens": [o.output_token_ids for o in outs],
        "reasons": [o.finish_reason for o in outs],
        "external": [o.num_external_tokens for o in outs],
        "errors": [o.error for o in outs],
        "leaked": llm.num_used_blocks(),
        "max_collectives": stats["max_collectives_per_step"],
        "recomputed": stats["recomputed_tokens"],
        "load_failures": stats["load_failures"],
        # Rank 0's scheduler counters, on every rank as of the end of generate.
        "counters": {k: stats[k] for k in COUNTER_NAMES},
        "graph_steps": stats["cuda_graph_steps"],
    }


def tp_tokens(topo: Topology) -> dict[str, Any]:
    """Greedy and seeded sampling; the tokens must not depend on the TP size."""
    greedy = _run(_llm(topo))
    sampled = _run(
        _llm(topo), params=SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7)
    )
    return {"greedy": greedy, "sampled": sampled}


def async_lifecycle(topo: Topology) -> dict[str, Any]:
    """Async saves, then a fresh engine loads them asynchronously; ranks report in
    different steps (delay grows with rank). Outputs must equal a run without connector."""
    base = _run(_llm(topo))
    store = f"async-{topo.world_size}"
    conn = _memory(store, async_load=True, async_save=True, delay_per_rank=2)
    first = _run(_llm(topo, conn))
    second = _run(_llm(topo, conn, enable_prefix_caching=False))
    return {"base": base, "first": first, "second": second}


def load_failure(topo: Topology) -> dict[str, Any]:
    """The last rank alone fails the load of one block, sync and async; policy recompute
    must give the tokens of a run without connector; policy fail ends those requests."""
    base = _run(_llm(topo))
    out: dict[str, Any] = {"base": base}
    for mode in ("sync", "async"):
        store = f"fail-{mode}-{topo.world_size}"
        _run(_llm(topo, _memory(store)))  # fill the store
        conn = _memory(
            store,
            async_load=mode == "async",
            fail_rank=topo.world_size - 1,
            fail_block_index=1,
            delay_per_rank=1,
        )
        out[mode] = _run(_llm(topo, conn, enable_prefix_caching=False))
        out[f"{mode}_fail"] = _run(
            _llm(topo, conn, enable_prefix_caching=False, load_failure_policy="fail")
        )
    return out


def abort_during_save(topo: Topology) -> dict[str, Any]:
    """Abort a running request whose blocks are being saved asynchronously: its blocks
    must stay held until every rank reports the save, then be freed."""
    conn = _memory(f"abort-{topo.world_size}", async_save=True, delay_per_rank=3)
    llm = _llm(topo, conn, max_num_batched_tokens=64)
    seen: dict[str, Any] = {}

    def on_step(llm: LLM, step: int) -> None:
        if step == 3 and llm.abort_request("req-0"):
            seen["held_after_abort"] = llm.num_used_blocks()
            seen["pending_after_abort"] = sorted(llm.scheduler.pending.get("req-0", ()))

    outs = llm.generate(
        [SHARED + [1, 2, 3]], SamplingParams(max_tokens=30, ignore_eos=True), on_step=on_step
    )
    seen["reason"] = outs[0].finish_reason
    seen["held_before_shutdown"] = llm.num_used_blocks()
    llm.shutdown()
    seen["leaked"] = llm.num_used_blocks()
    return seen


def recording(topo: Topology) -> dict[str, Any]:
    """Record every connector call (checked by tests/test_engine_mp.py)."""
    conn = _memory(f"rec-{topo.world_size}")
    _run(_llm(topo, conn))  # fill the store
    llm = _llm(
        topo,
        {**conn, "kwargs": {**conn["kwargs"], "record_path": None}},
        enable_prefix_caching=False,
    )
    outs = llm.generate(PROMPTS, GREEDY)
    worker_calls = llm.connector_worker.calls
    sched = llm.connector_scheduler
    llm.shutdown()  # its steps (telling the ranks of the last finished requests) count too
    steps = llm.coordinator.stats.steps
    return {
        "worker": worker_calls,
        "scheduler": sched.calls if sched is not None else None,
        "steps": steps,
        "external": [o.num_external_tokens for o in outs],
        "prompt_lens": [len(p) for p in PROMPTS],
        "num_layers": llm.model_config.num_layers,
        "leaked": llm.num_used_blocks(),
    }


def bad_inputs(topo: Topology) -> dict[str, Any]:
    """Mistakes in a generate call at N ranks: a cache salt of the wrong type raises the
    same error on every rank before anything is queued; a request seed derived from a
    large engine seed samples on every rank; prompts that differ between ranks (in content,
    or in number) are an error on every rank; then the ranks are still in step, and a
    plain call gives every rank the same tokens."""
    llm = _llm(topo, seed=2**62)
    try:
        llm.generate([[1, 2, 3], [4, 5, 6]], GREEDY, cache_salt=["s", 5])
        raised = None
    except TypeError as exc:
        raised = str(exc)
    sampled = llm.generate(
        [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.8, ignore_eos=True)
    )[0]
    # Params of the wrong type on every rank alike: that request fails alone (its error
    # text names an object by address, different on each rank: not compared).
    odd = llm.generate([[1, 2, 3], [4, 5, 6]], [GREEDY, object()])  # type: ignore[list-item]
    try:  # each rank its own prompt: it would get rank 0's results for it
        llm.generate([[1, 2, 3 + topo.rank]], GREEDY)
        differ = None
    except ValueError as exc:
        differ = str(exc)
    try:  # a prompt more on each later rank: their request ids must not run ahead
        llm.generate([[1, 2, 3]] * (1 + topo.rank), GREEDY)
        more = None
    except ValueError as exc:
        more = str(exc)
    ids = [o.request_id for o in llm.generate([[7, 8, 9]], GREEDY)]
    out = _run(llm)
    llm.shutdown()
    return {
        "raised": raised,
        "sampled": sampled.output_token_ids,
        "differ": differ,
        "more": more,
        "ids": ids,
        "odd": [o.finish_reason for o in odd],
        "tokens": out["tokens"],
    }


def _failing_run(llm: LLM, on_step=None) -> dict[str, Any]:
    """Generate PROMPTS expecting an error: what was raised, how soon, and what shutdown
    (which drains through the same engine) raised."""
    t0 = time.monotonic()
    try:
        llm.generate(PROMPTS, GREEDY, on_step=on_step)
        seen: dict[str, Any] = {"raised": None}
    except Exception as exc:
        seen = {"raised": type(exc).__name__, "message": str(exc)}
    seen["seconds"] = time.monotonic() - t0
    try:
        llm.shutdown()
    except Exception as exc:
        seen["shutdown"] = f"{type(exc).__name__}: {exc}"
    return seen


HOOKS = ("bind_connector_meta", "start_load_kv", "wait_for_layer_load", "wait_for_save")


def hook_failures(topo: Topology) -> dict[str, Any]:
    """A worker hook raising on the last rank only, in a step whose forward runs on every
    rank: every rank must raise that error together, long before the collective deadline
    (the failing rank still runs the forward, or the others would wait in its
    all-reduces); then a new engine in the same processes serves as usual."""
    out: dict[str, Any] = {}
    for hook in HOOKS:
        conn = _memory(f"hook-{hook}", raise_in=hook, raise_rank=topo.world_size - 1)
        llm = _llm(topo, conn)
        out[hook] = _failing_run(llm)
    out["after"] = _run(_llm(topo))["tokens"]
    return out


def after_step_failure(topo: Topology) -> dict[str, Any]:
    """Rank 0 fails after a step's report exchange (here: in postprocessing), when the
    other ranks are already past the step's collectives: the next plan carries the error,
    and every rank raises it (before, the others waited out the deadline)."""
    llm = _llm(topo)
    if llm.scheduler is not None:
        real, calls = llm.scheduler.postprocess, []

        def postprocess(*args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure after the exchange")
            return real(*args)

        llm.scheduler.postprocess = postprocess  # type: ignore[method-assign]
    return _failing_run(llm)


def abort_hook_failure(topo: Topology) -> dict[str, Any]:
    """The connector's request_finished raises when rank 0 aborts a request between steps
    (from on_step, outside any step): the error must reach every rank with the next plan.
    Before, it was raised to rank 0's caller alone, and the other ranks waited out the
    deadline for generate's results."""
    llm = _llm(topo, _memory("abort-hook"))

    def refuse(request, block_ids):
        raise RuntimeError("injected failure in request_finished")

    def on_step(engine: LLM, step: int) -> None:
        if step == 2 and engine.connector_scheduler is not None:
            engine.connector_scheduler.request_finished = refuse  # type: ignore[method-assign]
            engine.abort_request("req-0")

    return _failing_run(llm, on_step)


def start_failure(topo: Topology) -> dict[str, Any]:
    """The connector's worker failing to start on the last rank (its register_kv_caches
    raises): every rank's LLM() raises at once, the failing rank its own error, the others
    one naming that rank and the error (before, they waited out the deadline in the first
    collective, with an error that named no connector); then a new engine serves."""
    conn = _memory("start", raise_in="register_kv_caches", raise_rank=topo.world_size - 1)
    t0 = time.monotonic()
    try:
        _llm(topo, conn)
        seen: dict[str, Any] = {"raised": None}
    except Exception as exc:
        seen = {"raised": type(exc).__name__, "message": str(exc)}
    seen["seconds"] = time.monotonic() - t0
    seen["after"] = _run(_llm(topo))["tokens"]
    return seen


LOOKUP_MARKER = 499
"""A token none of PROMPTS holds: the memory connector's lookup fails for a prompt with it."""
LOOKUP_FAULTS = ("raise", "str")


def lookup_failure(topo: Topology) -> dict[str, Any]:
    """The connector's lookup (get_num_new_matched_tokens) raising, or answering
    malformed, for the third of six requests: it fails alone, the others load from the
    store (no device prefix cache) and give the tokens of a run without connector; rank
    0 records every request's request_finished."""
    seen: dict[str, Any] = {"base": _run(_llm(topo))}
    store = f"lookup-{topo.world_size}"
    _run(_llm(topo, _memory(store)))  # fill the store
    prompts = PROMPTS[:2] + [PROMPTS[2] + [LOOKUP_MARKER]] + PROMPTS[2:]
    for fault in LOOKUP_FAULTS:
        conn = _memory(store, lookup_fault=fault, lookup_marker=LOOKUP_MARKER)
        llm = _llm(topo, conn, enable_prefix_caching=False)
        sched = llm.connector_scheduler
        seen[fault] = _run(llm, prompts)
        seen[fault]["finished"] = (
            [c for c in sched.calls if c[0] == "finished"] if sched is not None else None
        )
    return seen


def settings_differ(topo: Topology) -> dict[str, Any]:
    """Connector settings that differ between ranks: a cpu pool sized per rank, tiers in
    another order on odd ranks (before, a step failed later with an error about host rows,
    or a TypeError), and a disk tier's IO threads per rank, which may differ; then a disk
    path that leads each rank to its own directory. Each rank's LLM() error, or its
    tokens."""
    import tempfile

    rank = topo.rank

    def start(connector, **kw) -> Any:
        try:
            return _run(_llm(topo, connector, **kw))["tokens"]
        except ValueError as exc:
            return str(exc)

    # The engine's own start: another model (here: dtype) or block count on odd ranks.
    seen = {
        "other_model": start(None, dtype="bfloat16" if rank % 2 else "float32"),
        "num_blocks": start(None, num_blocks=64 if rank % 2 else None),
    }
    # A rank with too little memory for the KV cache: every rank says so, none waits.
    import kvdist.engine.llm as llm_mod

    real_room = llm_mod.kv_cache_room
    if rank == 1:
        llm_mod.kv_cache_room = lambda ctx: (1000, "a test's small memory")
    try:
        seen["short_memory"] = start(None)
    finally:
        llm_mod.kv_cache_room = real_room
    cpu = {"name": "cpu", "kwargs": {"capacity_bytes": (1 << 20) * (1 + rank % 2)}}
    seen["cpu_capacity"] = start(cpu)
    llm = _llm(topo, {"name": "cpu", "kwargs": {"capacity_bytes": 1 << 20}})
    seen["ranks_on_host"] = llm.connector_worker.ctx.ranks_on_host  # the launcher's count
    llm.shutdown()
    with tempfile.TemporaryDirectory() as tmp:
        # One directory for every rank (of this host): rank 0's.
        mine = os.path.join(tmp, "shared").encode() if rank == 0 else None
        path = topo.comm.broadcast_bytes(mine, timeout_s=60, what="scenario path").decode()
        tiers = [{"name": "cpu"}, {"name": "disk", "kwargs": {"path": path}}]
        order = tiers[::-1] if rank % 2 else tiers
        seen["tier_order"] = start({"name": "tiered", "kwargs": {"tiers": order}})
        local = {"path": path, "io_threads": 1 + rank, "io_cpus": "inherit"}
        seen["io_threads"] = start({"name": "disk", "kwargs": local})
    # One path, another directory on each rank (as a local disk on each node would be).
    with tempfile.TemporaryDirectory() as own:
        cwd = os.getcwd()
        os.chdir(own)
        try:
            seen["unshared"] = start({"name": "disk", "kwargs": {"path": "kvcache"}})
            tiers = [{"name": "cpu"}, {"name": "disk", "kwargs": {"path": "kvcache"}}]
            seen["unshared_tier"] = start({"name": "tiered", "kwargs": {"tiers": tiers}})
        finally:
            os.chdir(cwd)
    return seen


SCENARIOS = {
    f.__name__: f
    for f in (
        tp_tokens,
        async_lifecycle,
        load_failure,
        abort_during_save,
        recording,
        bad_inputs,
        settings_differ,
    )
}
# Run on their own (not in "all"): a regression there hangs its job, not every scenario's.
ISOLATED = {
    f.__name__: f
    for f in (
        hook_failures,
        after_step_failure,
        abort_hook_failure,
        start_failure,
        lookup_failure,
    )
}
