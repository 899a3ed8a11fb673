"""What every built-in connector's worker does when an engine leaves out an optional call
(simulated ranks in one process)."""

from __future__ import annotations

import pytest
import torch

from kvdist.api.types import SchedulerOutput
from kvdist.connectors.cpu.settings import slot_bytes
from kvdist.connectors.testing import (
    SimulatedRanks,
    make_request,
    new_request_output,
    shard,
    tp_context,
)

WORLD = 2
TOKENS = list(range(300, 313))  # 3 full blocks of 4 tokens
SRC = [5, 9, 2, 7]
DST = [1, 3, 4, 6]


def config(kind, path):
    cpu = {"name": "cpu", "kwargs": {"capacity_bytes": 8 * slot_bytes(tp_context(0, WORLD))}}
    disk = {"name": "disk", "kwargs": {"path": str(path), "io_threads": 2}}
    if kind == "tiered":
        return {"name": "tiered", "kwargs": {"tiers": [cpu, disk]}}
    return {"cpu": cpu, "disk": disk}[kind]


@pytest.mark.parametrize(
    "kind, before",
    # Only what persists outlives the workers: the cpu pool does not.
    [("cpu", "next_step"), ("disk", "next_step"), ("tiered", "next_step")]
    + [("disk", "shutdown"), ("tiered", "shutdown")],
)
def test_saves_of_a_step_without_wait_for_save_still_land(tmp_path, full, kind, before):
    """An engine that never calls `wait_for_save` in a step (the hook is the end of the
    step's forward) still gets that step's saves: the worker makes them when the next
    step's metadata is bound, or at shutdown, while the blocks still hold the step's KV.
    The blocks then load back equal on every rank; were the saves dropped, the cache would
    answer hits for blocks it never received."""
    ranks = SimulatedRanks(config(kind, tmp_path), WORLD, full, fill=True)
    req = make_request("a", TOKENS, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, SRC, 0)
    meta = ranks.scheduler.build_connector_meta(new_request_output(0, req, SRC, 0, len(TOKENS)))
    for w in ranks.workers:
        w.bind_connector_meta(meta)
        w.start_load_kv(None)  # ... and the forward; no wait_for_save
    held = ranks.scheduler.request_finished(req, SRC)
    if before == "shutdown":
        ranks.shutdown()
        ranks = SimulatedRanks(config(kind, tmp_path), WORLD, full)  # a new engine
    else:
        ranks.step(SchedulerOutput(step=1, finished_req_ids=["a"]))
        ranks.wait(finished={"a"} if held else ())
        for kv in ranks.caches:
            kv.zero_()
    hit = make_request("b", TOKENS, ranks.ctx)
    n, is_async = ranks.scheduler.get_num_new_matched_tokens(hit, 0)
    assert n == 12
    ranks.scheduler.update_state_after_alloc(hit, DST, n)
    ranks.step(SchedulerOutput(step=2))
    assert ranks.wait(started={"b"} if is_async else ()) == set()
    for ctx, kv in zip(ranks.ctxs, ranks.caches):
        ref = shard(full, ctx)
        for src, dst in zip(SRC[:3], DST[:3]):
            assert torch.equal(kv[:, :, dst], ref[:, :, src]), (kind, ctx.rank, src, dst)
    ranks.shutdown()
