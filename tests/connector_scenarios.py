"""Built-in connectors end to end in the engine, at any world size.

The cache directory comes from KVDIST_TEST_CACHE_DIR (set by the test that launches the
ranks). Each scenario returns this rank's observation; tests/test_connectors_mp.py checks
the observations of all ranks.
"""

from __future__ import annotations

import os
from typing import Any

from engine_scenarios import GREEDY, PROMPTS, _llm, _run

from kvdist.comm.setup import Topology


def _dir() -> str:
    return os.environ["KVDIST_TEST_CACHE_DIR"]


def _disk() -> dict[str, Any]:
    return {"name": "disk", "kwargs": {"path": _dir()}}


def disk_write(topo: Topology) -> dict[str, Any]:
    """A fresh engine on the directory: computes everything, saves full blocks."""
    llm = _llm(topo, _disk())
    out = _run(llm)
    out["io"] = llm.connector_worker.stats
    # Rank 0's scheduler, from the ranks' reports: blocks every writing rank stored.
    sched = llm.connector_scheduler
    out["confirmed"] = sched.stats["blocks_stored_all_ranks"] if sched is not None else None
    return out


def no_connector(topo: Topology) -> dict[str, Any]:
    """The engine without a connector: the tokens every cache path must reproduce."""
    return _run(_llm(topo))


def disk_read(topo: Topology) -> dict[str, Any]:
    """A new engine on the same directory: loads what is there (any TP size wrote it).
    The device prefix cache is off, so every request loads its own blocks."""
    llm = _llm(topo, _disk(), enable_prefix_caching=False)
    out = _run(llm)
    out["io"] = llm.connector_worker.stats
    return out


def disk_read_shared(topo: Topology) -> dict[str, Any]:
    """A new engine with the device prefix cache on: the shared prefix is loaded once."""
    llm = _llm(topo, _disk())
    outs = llm.generate(PROMPTS, GREEDY)
    io = llm.connector_worker.stats
    llm.shutdown()
    return {
        "tokens": [o.output_token_ids for o in outs],
        "external": [o.num_external_tokens for o in outs],
        "cached": [o.num_cached_tokens for o in outs],
        "io": io,
    }


def cpu_roundtrip(topo: Topology) -> dict[str, Any]:
    """The pinned-CPU pool: a second pass with the device prefix cache off hits the pool."""
    base = _run(_llm(topo))
    conn = {"name": "cpu", "kwargs": {"capacity_bytes": 8 << 20}}
    llm = _llm(topo, conn, enable_prefix_caching=False)
    first = llm.generate(PROMPTS, GREEDY)
    after_first = llm.stats["engine_steps"]
    second = llm.generate(PROMPTS, GREEDY)
    stats = llm.stats
    llm.shutdown()
    return {
        "base": base["tokens"],
        "first": [o.output_token_ids for o in first],
        "second": [o.output_token_ids for o in second],
        "external": [o.num_external_tokens for o in second],
        "second_steps": stats["engine_steps"] - after_first,
        "max_tokens": GREEDY.max_tokens,
        "leaked": llm.num_used_blocks(),
        "max_collectives": stats["max_collectives_per_step"],
    }


def tiered_roundtrip(topo: Topology) -> dict[str, Any]:
    """cpu in front of disk: a new engine (empty cpu tier) is served from disk."""
    conn = {
        "name": "tiered",
        "kwargs": {"tiers": [{"name": "cpu", "kwargs": {"capacity_bytes": 8 << 20}}, _disk()]},
    }
    first = _run(_llm(topo, conn))
    second = _run(_llm(topo, conn, enable_prefix_caching=False))
    return {"first": first, "second": second}


SCENARIOS = {
    f.__name__: f
    for f in (
        no_connector,
        disk_write,
        disk_read,
        disk_read_shared,
        cpu_roundtrip,
        tiered_roundtrip,
    )
}
