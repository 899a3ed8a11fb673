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


def _failed_step(ranks: SimulatedRanks, rid: str) -> tuple[object, bool]:
    """A step that plans the saves of request `rid` (TOKENS on SRC) and fails halfway on
    every rank: no `wait_for_save`, its blocks left half written. Returns the request and
    whether its finish held its blocks."""
    req = make_request(rid, TOKENS, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, SRC, 0)
    meta = ranks.scheduler.build_connector_meta(new_request_output(0, req, SRC, 0, len(TOKENS)))
    for w, kv in zip(ranks.workers, ranks.caches):
        w.bind_connector_meta(meta)
        w.start_load_kv(None)  # ... and a forward that fails halfway
        kv[:, :, SRC] = 7.0
    return req, ranks.scheduler.request_finished(req, SRC)


def _computed_again(ranks: SimulatedRanks, full, rid: str, step: int) -> None:
    """Request `rid` (TOKENS) computed on SRC with the right KV, its step complete."""
    for ctx, kv in zip(ranks.ctxs, ranks.caches):
        kv[:, :, SRC] = shard(full, ctx)[:, :, SRC]
    req = make_request(rid, TOKENS, ranks.ctx)
    assert ranks.scheduler.get_num_new_matched_tokens(req, 0)[0] == 0
    ranks.scheduler.update_state_after_alloc(req, SRC, 0)
    ranks.step(new_request_output(step, req, SRC, 0, len(TOKENS)))
    held = ranks.scheduler.request_finished(req, SRC)
    ranks.step(SchedulerOutput(step=step + 1, finished_req_ids=[rid]))
    ranks.wait(finished={rid} if held else ())


def _loads_back(ranks: SimulatedRanks, full, rid: str, step: int) -> None:
    """Request `rid` (TOKENS) hits its 3 full blocks and loads them into DST, equal to
    the right KV on every rank, with no load error."""
    for kv in ranks.caches:
        kv.zero_()
    req = make_request(rid, TOKENS, ranks.ctx)
    n, is_async = ranks.scheduler.get_num_new_matched_tokens(req, 0)
    assert n == 12
    ranks.scheduler.update_state_after_alloc(req, DST, n)
    ranks.step(SchedulerOutput(step=step))
    assert ranks.wait(started={rid} if is_async else ()) == set()
    for ctx, kv in zip(ranks.ctxs, ranks.caches):
        ref = shard(full, ctx)
        for src, dst in zip(SRC[:3], DST[:3]):
            assert torch.equal(kv[:, :, dst], ref[:, :, src]), (ctx.rank, src, dst)


@pytest.mark.parametrize(
    "kind, before",
    [("cpu", "next_step"), ("disk", "next_step"), ("tiered", "next_step")]
    + [("disk", "shutdown"), ("tiered", "shutdown")],
)
def test_saves_of_a_step_without_wait_for_save_are_dropped(tmp_path, full, kind, before):
    """An engine that leaves out `wait_for_save` in a step (the step failed on some rank:
    its blocks may be half written) does not get that step's saves, neither when the next
    step's metadata is bound nor at shutdown: saving them then would cache KV no forward
    finished, as a hit. The disk connector reports them not stored, the cpu connector
    their slots (rank 0 unmaps them): a later lookup misses. Computed again, the blocks
    are saved again and load back right."""
    ranks = SimulatedRanks(config(kind, tmp_path), WORLD, full, fill=True)
    _, held = _failed_step(ranks, "a")
    failed = ranks
    if before == "shutdown":
        ranks.shutdown()
        ranks = SimulatedRanks(config(kind, tmp_path), WORLD, full)  # a new engine
    else:
        ranks.step(SchedulerOutput(step=1, finished_req_ids=["a"]))
        ranks.wait(finished={"a"} if held else ())
    # The 3 full blocks, on each rank (and by each of the tiered connector's 2 tiers).
    assert [_dropped(w) for w in failed.workers] == [3 * (1 + (kind == "tiered"))] * WORLD
    _computed_again(ranks, full, "b", 2)  # asserts the lookup missed
    _loads_back(ranks, full, "c", 4)
    ranks.shutdown()


@pytest.mark.parametrize("kind", ["cpu", "tiered"])
def test_a_load_planned_before_the_drop_was_reported_fails(tmp_path, full, kind):
    """Rank 0 plans a load from the slots of a failed step's saves before the workers
    drop them (at the next bind) and say so: that load reports its blocks failed, and the
    engine computes them again. Then the slots are unmapped, the blocks saved again and
    loaded back right (before, the bad slots stayed mapped: every later hit failed)."""
    ranks = SimulatedRanks(config(kind, tmp_path), WORLD, full, fill=True)
    _failed_step(ranks, "a")
    hit = make_request("b", TOKENS, ranks.ctx)
    n, is_async = ranks.scheduler.get_num_new_matched_tokens(hit, 0)
    assert n == 12  # the map still names the slots
    ranks.scheduler.update_state_after_alloc(hit, DST, n)
    ranks.step(SchedulerOutput(step=1, finished_req_ids=["a"]))  # binds: the drop
    assert ranks.wait(started={"b"} if is_async else ()) == set(DST[:3])
    ranks.step(SchedulerOutput(step=2, finished_req_ids=["b"]))
    _computed_again(ranks, full, "c", 3)  # asserts the lookup missed
    _loads_back(ranks, full, "d", 5)
    ranks.shutdown()


def _dropped(worker) -> int:
    """The worker's `saves_dropped` (the tiered connector's, summed over its tiers)."""
    return int(sum(v for k, v in worker.stats.items() if k.endswith("saves_dropped")))
