"""What every built-in connector's worker does when an engine leaves out an optional call
(simulated ranks in one process)."""

from __future__ import annotations

import pytest

from kvdist.api.types import SchedulerOutput
from kvdist.connectors.cpu.settings import slot_bytes
from kvdist.connectors.testing import (
    SimulatedRanks,
    make_request,
    new_request_output,
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
    [("cpu", "next_step"), ("disk", "next_step"), ("tiered", "next_step")]
    + [("disk", "shutdown"), ("tiered", "shutdown")],
)
def test_saves_of_a_step_without_wait_for_save_are_dropped(tmp_path, full, kind, before):
    """An engine that leaves out `wait_for_save` in a step (the step failed on some rank:
    its blocks may be half written) does not get that step's saves, neither when the next
    step's metadata is bound nor at shutdown: saving them then would cache KV no forward
    finished, as a hit. The disk connector reports them not stored (a later engine finds
    no block); the cpu connector fails a later load from their slots, so the engine
    computes those blocks again. Nothing of the half-written blocks is served as good."""
    ranks = SimulatedRanks(config(kind, tmp_path), WORLD, full, fill=True)
    req = make_request("a", TOKENS, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, SRC, 0)
    meta = ranks.scheduler.build_connector_meta(new_request_output(0, req, SRC, 0, len(TOKENS)))
    for w, kv in zip(ranks.workers, ranks.caches):
        w.bind_connector_meta(meta)
        w.start_load_kv(None)  # ... and a forward that fails halfway: no wait_for_save
        kv[:, :, SRC] = 7.0
    held = ranks.scheduler.request_finished(req, SRC)
    failed = ranks
    if before == "shutdown":
        ranks.shutdown()
        ranks = SimulatedRanks(config(kind, tmp_path), WORLD, full)  # a new engine
    else:
        ranks.step(SchedulerOutput(step=1, finished_req_ids=["a"]))
        ranks.wait(finished={"a"} if held else ())
        for kv in ranks.caches:
            kv.zero_()
    # The 3 full blocks, on each rank (and by each of the tiered connector's 2 tiers).
    assert [_dropped(w) for w in failed.workers] == [3 * (1 + (kind == "tiered"))] * WORLD
    hit = make_request("b", TOKENS, ranks.ctx)
    n, is_async = ranks.scheduler.get_num_new_matched_tokens(hit, 0)
    if kind == "disk" or before == "shutdown":
        assert n == 0, "the dropped blocks were found stored"
    if n:  # the cpu tier's map still names the slots: the load must fail, block by block
        ranks.scheduler.update_state_after_alloc(hit, DST, n)
        ranks.step(SchedulerOutput(step=2))
        errors = ranks.wait(started={"b"} if is_async else ())
        assert errors == set(DST[: n // ranks.ctx.block_size]), errors
    ranks.shutdown()


def _dropped(worker) -> int:
    """The worker's `saves_dropped` (the tiered connector's, summed over its tiers)."""
    return int(sum(v for k, v in worker.stats.items() if k.endswith("saves_dropped")))
