"""The `tiered` connector with a cpu tier in front of a disk tier (simulated ranks)."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from devices import DEVICES

from kvdist.api.types import ConnectorConfig, RequestData, SchedulerOutput
from kvdist.connectors import create_connector
from kvdist.connectors.cpu.settings import slot_bytes
from kvdist.connectors.disk.store import block_dir
from kvdist.connectors.testing import (
    SimulatedRanks,
    make_request,
    new_request_output,
    shard,
    tp_context,
    wait_finished,
)

WORLD = 2


def tiered(path, cpu_slots):
    cap = cpu_slots * slot_bytes(tp_context(0, WORLD))
    return {
        "name": "tiered",
        "kwargs": {
            "tiers": [
                {"name": "cpu", "kwargs": {"capacity_bytes": cap}},
                ConnectorConfig(name="disk", kwargs={"path": str(path), "io_threads": 2}),
            ]
        },
    }


def save(ranks, rid, tokens, blocks, step):
    req = make_request(rid, tokens, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, blocks, 0)
    ranks.step(new_request_output(step, req, blocks, 0, len(tokens)))
    held = ranks.scheduler.request_finished(req, blocks)
    meta = ranks.step(SchedulerOutput(step=step + 1, finished_req_ids=[rid]))
    assert held and meta["held"] == {rid: [1]}  # only the disk tier holds blocks
    ranks.wait(finished={rid})
    return req


def load(ranks, rid, tokens, blocks, step):
    """Returns (tokens matched, tier that served the load, load errors)."""
    req = make_request(rid, tokens, ranks.ctx)
    n, _ = ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ext = min(n, len(tokens) - 1)
    ranks.scheduler.update_state_after_alloc(req, blocks, ext)
    meta = ranks.step(SchedulerOutput(step=step))
    tiers = [i for i, m in enumerate(meta["tiers"]) if any(ld["req"] == rid for ld in m["loads"])]
    assert len(tiers) <= 1, f"{rid} loaded by tiers {tiers}"
    # Only async loads (the disk tier's) are named in load_tier and reported later; the cpu
    # tier's are in place once the step's layers waited for them.
    assert (rid in meta["load_tier"]) == (tiers == [1])
    errors = ranks.wait(started={rid}) if rid in meta["load_tier"] else set()
    return n, tiers[0] if tiers else None, errors


def check(ranks, full, pairs):
    for ctx, kv in zip(ranks.ctxs, ranks.caches):
        for src, dst in pairs:
            assert torch.equal(kv[:, :, dst], shard(full, ctx)[:, :, src])


@pytest.mark.parametrize("device", DEVICES)
def test_served_from_cpu_then_from_disk_after_eviction(tmp_path, full, device):
    """A hit comes from the cpu tier while it holds the blocks, and from the disk tier once
    the cpu tier evicted them; the data is right both times. A save counts done only when
    the disk tier (the one holding blocks) reports it."""
    full = full.to(device)
    ranks = SimulatedRanks(tiered(tmp_path, 4), WORLD, full, fill=True, device=device)
    a = list(range(9))
    save(ranks, "a", a, [5, 9, 2], step=0)
    for kv in ranks.caches:
        kv[:, :, 16:].zero_()
    assert load(ranks, "a1", a, [16, 17, 18], step=2) == (8, 0, set())
    check(ranks, full, [(5, 16), (9, 17)])
    ranks.scheduler.request_finished(make_request("a1", a, ranks.ctx), [16, 17, 18])
    save(ranks, "b", list(range(50, 59)), [3, 4, 6], step=3)
    save(ranks, "c", list(range(70, 79)), [7, 8, 10], step=5)  # cpu now holds b and c
    assert load(ranks, "a2", a, [20, 21, 22], step=7) == (8, 1, set())
    check(ranks, full, [(5, 20), (9, 21)])
    stats = ranks.scheduler.stats
    assert stats["hits"] == 4 and stats["evictions"] >= 2
    ranks.shutdown()


def test_disk_hits_are_promoted_into_cpu(tmp_path, full):
    """Blocks loaded from disk are saved into the cpu tier when the request runs, so the
    next hit comes from cpu."""
    writer = SimulatedRanks(tiered(tmp_path, 8), WORLD, full, fill=True)
    a = list(range(9))
    save(writer, "a", a, [5, 9, 2], step=0)
    writer.shutdown()
    ranks = SimulatedRanks(tiered(tmp_path, 8), WORLD, full)  # fresh: empty cpu tier
    assert load(ranks, "a1", a, [16, 17, 18], step=0) == (8, 1, set())
    # The engine schedules the loaded request: both of its loaded blocks become cpu saves.
    rd = RequestData("a1", a, [16, 17, 18], 8, 1)
    meta = ranks.step(SchedulerOutput(step=1, new_requests=[rd]))
    assert len(meta["tiers"][0]["saves"]["slots"]) // 4 == 2
    assert meta["tiers"][1]["saves"] == []  # already on disk
    assert ranks.scheduler.request_finished(make_request("a1", a, ranks.ctx), [16, 17, 18]) is False
    assert load(ranks, "a2", a, [20, 21, 22], step=2) == (8, 0, set())
    check(ranks, full, [(5, 20), (9, 21)])
    # The stack's stats sum the tiers' traffic: the promotion counts as saved (by the cpu
    # tier), and each tier's own stay apart.
    for worker in ranks.workers:
        cpu_tier, disk_tier = worker.tier_stats
        assert cpu_tier["blocks_saved"] == 2 and disk_tier.get("blocks_saved", 0) == 0
        assert worker.stats["blocks_saved"] == 2
    ranks.shutdown()


def test_load_failure_in_the_chosen_tier_is_reported(tmp_path, full):
    """A corrupt disk record in the tier that serves the load surfaces as a load error."""
    writer = SimulatedRanks(tiered(tmp_path, 8), WORLD, full, fill=True)
    req = save(writer, "a", list(range(9)), [5, 9, 2], step=0)
    writer.shutdown()
    bdir = block_dir(writer.scheduler.tiers[1].ns_dir, req.block_hashes[1])
    path = os.path.join(bdir, sorted(os.listdir(bdir))[0])
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    ranks = SimulatedRanks(tiered(tmp_path, 8), WORLD, full)
    n, tier, errors = load(ranks, "a1", list(range(9)), [16, 17, 18], step=0)
    assert (n, tier) == (8, 1) and errors == {17}
    assert torch.all(ranks.caches[0][:, :, 17] == 0)
    ranks.shutdown()


def test_tiers_by_dotted_path(tmp_path, full):
    """Any connector stacks, named or by dotted path (here the cpu one by module path)."""
    cfg = {
        "name": "tiered",
        "kwargs": {
            "tiers": [
                {
                    "module": "kvdist.connectors.cpu",
                    "scheduler_class": "CpuConnectorScheduler",
                    "worker_class": "CpuConnectorWorker",
                    "kwargs": {"capacity_bytes": 1 << 20},
                }
            ]
        },
    }
    sched, worker = create_connector(cfg, tp_context(0, 1))
    assert type(sched.tiers[0]).__name__ == "CpuConnectorScheduler"
    assert type(worker.tiers[0]).__name__ == "CpuConnectorWorker"


def test_bad_settings(tmp_path):
    """Missing or empty tiers, a bad tier, and unknown tier kwargs are ValueErrors."""
    ctx = tp_context(0, 1)
    with pytest.raises(ValueError, match="needs setting"):
        create_connector("tiered", ctx)
    with pytest.raises(ValueError, match="at least one"):
        create_connector({"name": "tiered", "kwargs": {"tiers": []}}, ctx)
    for not_a_list in ("cpu", b"cpu", (t for t in ["cpu"])):
        # A generator would be used up by the scheduler's settings, the worker's empty.
        with pytest.raises(ValueError, match="list of connector configs"):
            create_connector({"name": "tiered", "kwargs": {"tiers": not_a_list}}, ctx)
    with pytest.raises(ValueError, match="tier 0 .nope.: unknown connector 'nope'"):
        create_connector({"name": "tiered", "kwargs": {"tiers": ["nope"]}}, ctx)
    with pytest.raises(ValueError, match=r"tier 1 .*unknown ConnectorConfig fields"):
        create_connector({"name": "tiered", "kwargs": {"tiers": ["cpu", {"nam": "disk"}]}}, ctx)
    # The cpu tier fails after the disk tier started its threads: named, and the disk
    # tier shut down again.
    before = {t.ident for t in threading.enumerate()}
    tiers = [
        tiered(tmp_path, 4)["kwargs"]["tiers"][1],
        {"name": "cpu", "kwargs": {"capacity_bytes": 0}},
    ]
    with pytest.raises(ValueError, match="tier 1 .cpu.: .*capacity_bytes"):
        create_connector({"name": "tiered", "kwargs": {"tiers": tiers}}, ctx)
    assert [t.name for t in threading.enumerate() if t.ident not in before] == []
    with pytest.raises(ValueError, match="bogus"):
        bad = [{"name": "cpu", "kwargs": {"bogus": 1}}]
        create_connector({"name": "tiered", "kwargs": {"tiers": bad}}, ctx)


def test_each_tier_hears_from_its_own_workers(tmp_path, full):
    """The workers' reports travel per tier: the disk tier's scheduler learns that both
    ranks stored the blocks (complete, without reading the directory), and a report
    shaped for other tiers is refused, naming the rank."""
    ranks = SimulatedRanks(tiered(tmp_path, 8), WORLD, full, fill=True)
    tokens = list(range(100, 113))  # 3 full blocks
    save(ranks, "a", tokens, [5, 9, 2, 7], step=0)
    disk_tier = ranks.scheduler.tiers[1]
    assert disk_tier.stats["blocks_stored_all_ranks"] == 3
    assert ranks.scheduler.stats["blocks_stored_all_ranks"] == 3
    req = make_request("a", tokens, ranks.ctx)
    assert all(disk_tier.index._entries[k].complete for k in req.block_hashes)
    with pytest.raises(ValueError, match="rank 1 reported .* not a list of 2"):
        ranks.scheduler.update_from_workers([None, {"v": 1, "tiers": [None]}])
    ranks.shutdown()


def test_two_disk_tiers_on_one_directory_are_refused(tmp_path) -> None:
    """Each disk tier would evict what the other saved, by its own count of the bytes
    there (failed loads, found in review): the settings name both tiers instead."""
    from kvdist.connectors.tiered import TieredSettings

    same = [
        {"name": "disk", "kwargs": {"path": str(tmp_path)}},
        {"name": "disk", "kwargs": {"path": str(tmp_path / "sub" / "..")}},
    ]
    with pytest.raises(ValueError, match="tiers 0 and 1 are disk connectors on one directory"):
        TieredSettings(tiers=same)
    apart = [same[0], {"name": "disk", "kwargs": {"path": str(tmp_path / "other")}}]
    assert len(TieredSettings(tiers=apart).tiers) == 2
    # In a nested tiered tier, and named by its module (the review's cases: both built
    # two disk connectors on one directory).
    nested = [same[0], {"name": "tiered", "kwargs": {"tiers": ["cpu", same[1]]}}]
    with pytest.raises(ValueError, match="tiers 0 and 1.1 are disk connectors on one directory"):
        TieredSettings(tiers=nested)
    by_module = {
        "module": "kvdist.connectors.disk",
        "scheduler_class": "DiskConnectorScheduler",
        "worker_class": "DiskConnectorWorker",
        "kwargs": {"path": str(tmp_path)},
    }
    with pytest.raises(ValueError, match="tiers 0 and 1 are disk connectors on one directory"):
        TieredSettings(tiers=[same[0], by_module])


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        ((0, True), r"answered \(0, True\)"),
        ((-16, False), r"returned -16 tokens"),
        ((16, "yes"), r"must return \(int, bool\)"),
        (None, r"must return \(int, bool\)"),
    ],
)
def test_a_tier_answering_what_the_engine_would_refuse_is_named(answer, match):
    """Each tier's lookup answer is checked as the engine checks a connector's, naming
    the tier: the engine sees only the answer that wins. A failure means a tier's bad
    answer is dropped silently (a losing one) or fails with a bare TypeError."""
    from kvdist.coordination.errors import ProtocolError

    cfg = {
        "name": "tiered",
        "kwargs": {"tiers": [{"name": "cpu", "kwargs": {"capacity_bytes": 1 << 20}}]},
    }
    ctx = tp_context(0, 1)
    sched, worker = create_connector(cfg, ctx)
    try:
        req = make_request("r", list(range(40)), ctx)
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        sched.tiers[0].get_num_new_matched_tokens = lambda request, computed: answer
        with pytest.raises(ProtocolError, match=rf"CpuConnectorScheduler\.get_num_new.*{match}"):
            sched.get_num_new_matched_tokens(req, 0)
    finally:
        worker.shutdown()
        sched.shutdown()


def fail_once(tier, hook, error):
    """`tier.<hook>` raises `error` at its next call, and is the tier's own again after."""

    def failing(*args):
        del vars(tier)[hook]
        raise error

    setattr(tier, hook, failing)


def cpu_pair():
    """A tiered connector of two cpu tiers on one rank: scheduler and worker."""
    cpu = {"name": "cpu", "kwargs": {"capacity_bytes": 1 << 20}}
    return create_connector({"name": "tiered", "kwargs": {"tiers": [cpu, cpu]}}, tp_context(0, 1))


def _scheduled(ranks):
    """Request "a" (9 tokens, blocks 5, 9 and 2) looked up, allocated and run one step."""
    tokens, blocks = list(range(9)), [5, 9, 2]
    req = make_request("a", tokens, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, blocks, 0)
    ranks.step(new_request_output(0, req, blocks, 0, len(tokens)))
    return req, blocks


def test_a_tier_raising_at_a_finish_leaves_no_other_tier_untold(tmp_path, full):
    """The cpu tier raises at a request's finish: the disk tier behind it is told all the
    same (it forgets the request, and holds the blocks for its save, which every rank then
    reports), and the error names the tier. A failure means a tier after one that raised
    keeps the request, or a save of blocks the engine may reuse, for good."""
    ranks = SimulatedRanks(tiered(tmp_path, 4), WORLD, full, fill=True)
    req, blocks = _scheduled(ranks)
    disk = ranks.scheduler.tiers[1]
    assert "a" in disk._tracker.requests  # so the check below can fail
    fail_once(ranks.scheduler.tiers[0], "request_finished", RuntimeError("pool gone"))
    match = r"tier 0 \(CpuConnectorScheduler\) in request_finished: pool gone"
    with pytest.raises(RuntimeError, match=match):
        ranks.scheduler.request_finished(req, blocks)
    assert "a" not in disk._tracker.requests
    meta = ranks.step(SchedulerOutput(step=1, finished_req_ids=["a"]))
    assert meta["held"] == {"a": [1]}  # the disk tier's save is reported, as without error
    ranks.wait(finished={"a"})
    ranks.shutdown()


def test_every_tier_raising_at_a_finish_names_the_first(caplog):
    """Both tiers raise at a finish: both were asked, the first error is raised (an
    error type that takes more than a message as a RuntimeError naming it) with the
    original as its cause, and the second is logged, naming its tier."""
    sched, worker = cpu_pair()
    try:
        req = make_request("r", list(range(8)), tp_context(0, 1))
        first, second = KeyError("slot 3"), ValueError("bad block")
        fail_once(sched.tiers[0], "request_finished", first)
        fail_once(sched.tiers[1], "request_finished", second)
        match = r"tier 0 \(CpuConnectorScheduler\) in request_finished: KeyError: 'slot 3'"
        with pytest.raises(RuntimeError, match=match) as raised:
            sched.request_finished(req, [])
        assert not any("request_finished" in vars(t) for t in sched.tiers)  # both asked
        assert raised.value.__cause__ is first
        assert "tier 1 (CpuConnectorScheduler) in request_finished: bad block" in caplog.text
    finally:
        worker.shutdown()
        sched.shutdown()


def test_a_tier_raising_at_its_workers_reports_leaves_no_other_tier_unheard():
    """Tier 0's scheduler raises at its workers' reports: tier 1's still gets its own (a
    report comes once; a failure means it is lost, and the tier's view of what its workers
    stored with it)."""
    sched, worker = cpu_pair()
    try:
        heard = []
        fail_once(sched.tiers[0], "update_from_workers", ValueError("bad report"))
        sched.tiers[1].update_from_workers = heard.append
        with pytest.raises(ValueError, match=r"tier 0 .* in update_from_workers: bad report"):
            sched.update_from_workers([{"v": 1, "tiers": ["for 0", "for 1"]}])
        assert heard == [["for 1"]]
    finally:
        worker.shutdown()
        sched.shutdown()


def test_a_tier_raising_in_get_finished_leaves_no_other_tier_without_its_ids(tmp_path, full):
    """The cpu tier's worker raises in `get_finished`: the disk tier still gets the
    finished id (given once) and reports its save, and what was found done in the call
    that raised is returned by the next. A failure means the save is never reported: the
    engine would hold the request's blocks for good."""
    ranks = SimulatedRanks(tiered(tmp_path, 4), WORLD, full, fill=True)
    req, blocks = _scheduled(ranks)
    assert ranks.scheduler.request_finished(req, blocks)
    ranks.step(SchedulerOutput(step=1, finished_req_ids=["a"]))
    for w in ranks.workers:
        fail_once(w.tiers[0], "get_finished", RuntimeError("pool gone"))
        with pytest.raises(RuntimeError, match=r"tier 0 \(CpuConnectorWorker\) in get_finished"):
            w.get_finished({"a"}, {"x"})  # no tier loads "x": done at once
        saved, loaded = w.get_finished(set(), set())
        assert loaded == {"x"}
        if "a" not in saved:  # passed again, "a" is ignored: each tier had it once
            wait_finished(w, finished={"a"}, timeout_s=5)
    ranks.shutdown()


def test_a_tier_raising_at_shutdown_leaves_no_other_tier_running(tmp_path, full):
    """The cpu tier's shutdown raises, on the scheduler and on every worker: the disk
    tier behind it is shut down all the same (its threads end), and the error names the
    tier. A failure means the disk tier's threads outlive the connector."""
    before = {t.ident for t in threading.enumerate()}
    ranks = SimulatedRanks(tiered(tmp_path, 4), WORLD, full)
    assert [t for t in threading.enumerate() if t.ident not in before]  # the disk tier's
    for half in [*ranks.workers, ranks.scheduler]:
        fail_once(half.tiers[0], "shutdown", OSError("flush failed"))
        with pytest.raises(RuntimeError, match=r"tier 0 .* in shutdown: OSError: flush failed"):
            half.shutdown()
    assert [t.name for t in threading.enumerate() if t.ident not in before] == []


def test_a_tier_raising_at_shutdown_after_a_failed_start_leaves_the_others_running(tmp_path):
    """Tier 2 fails to start; of the tiers started before it, the first raises at its
    shutdown. The disk tier after it is shut down all the same, and the start's own
    error is the one raised. A failure means the disk tier's threads outlive the start,
    or the shutdown's error hides why the start failed."""
    from kvdist.connectors.tiered import TieredConnectorWorker

    tiers = [
        {
            "module": "misbehaving_connector",
            "scheduler_class": "MisbehavingScheduler",
            "worker_class": "MisbehavingWorker",
            "kwargs": {"mode": "shutdown_raises"},
        },
        tiered(tmp_path, 4)["kwargs"]["tiers"][1],
        {"name": "cpu", "kwargs": {"capacity_bytes": 0}},
    ]
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ValueError, match="tier 2 .cpu.: .*capacity_bytes"):
        TieredConnectorWorker(tp_context(0, 1, kwargs={"tiers": tiers}))
    assert [t.name for t in threading.enumerate() if t.ident not in before] == []


def test_every_tier_raising_at_its_load_errors_names_the_first(caplog):
    """Both tiers' workers raise when asked for their load errors: both were asked, the
    first error is raised naming tier 0, and the second is logged naming tier 1 (as for
    `get_finished`). A failure means a tier after one that raised is never asked, and its
    report waits, or is lost, without a word."""
    sched, worker = cpu_pair()
    try:
        hook = "get_block_ids_with_load_errors"
        fail_once(worker.tiers[0], hook, RuntimeError("pool gone"))
        fail_once(worker.tiers[1], hook, ValueError("bad slot"))
        with pytest.raises(RuntimeError, match=rf"tier 0 \(CpuConnectorWorker\) in {hook}: pool"):
            worker.get_block_ids_with_load_errors()
        assert not any(hook in vars(t) for t in worker.tiers)  # both asked
        assert f"tier 1 (CpuConnectorWorker) in {hook}: bad slot" in caplog.text
    finally:
        worker.shutdown()
        sched.shutdown()


def test_failed_blocks_of_a_tier_before_one_that_raises_are_kept():
    """Tier 0 returns failed block 3, then tier 1 raises: the error is raised (the step
    fails on every rank) and block 3 is not lost: the next call returns it, with what the
    tiers report then. A failure means a load that failed could be taken for a good one."""
    sched, worker = cpu_pair()
    try:
        hook = "get_block_ids_with_load_errors"
        worker.tiers[0].get_block_ids_with_load_errors = lambda: {3}
        fail_once(worker.tiers[1], hook, RuntimeError("pool gone"))
        with pytest.raises(RuntimeError, match=rf"tier 1 \(CpuConnectorWorker\) in {hook}"):
            worker.get_block_ids_with_load_errors()
        worker.tiers[0].get_block_ids_with_load_errors = lambda: {4}
        assert worker.get_block_ids_with_load_errors() == {3, 4}
        assert worker.get_block_ids_with_load_errors() == {4}  # returned once
    finally:
        worker.shutdown()
        sched.shutdown()


def test_every_tier_builds_its_worker_meta_when_one_raises(caplog):
    """Tier 0's worker raises building its meta: tier 1's still runs (a tier's hook runs
    once a step, as it expects), the first error is raised naming tier 0, and the meta
    lost with the step is logged; the next call sends the tiers' metas as usual. Both
    raising: the first is raised, the second logged. A failure means a later tier's hook
    is skipped, or an error and what it cost go unsaid."""
    sched, worker = cpu_pair()
    try:
        hook = "build_worker_meta"
        built = []
        worker.tiers[1].build_worker_meta = lambda: built.append(1) or {"n": len(built)}
        fail_once(worker.tiers[0], hook, RuntimeError("pool gone"))
        with pytest.raises(RuntimeError, match=rf"tier 0 \(CpuConnectorWorker\) in {hook}: pool"):
            worker.build_worker_meta()
        assert built == [1]
        assert "worker metas of tier(s) [1] are not sent" in caplog.text
        assert worker.build_worker_meta() == {"v": 1, "tiers": [None, {"n": 2}]}
        fail_once(worker.tiers[0], hook, RuntimeError("pool gone"))
        fail_once(worker.tiers[1], hook, ValueError("no meta"))
        with pytest.raises(RuntimeError, match=r"tier 0 .* in build_worker_meta: pool gone"):
            worker.build_worker_meta()
        assert f"tier 1 (CpuConnectorWorker) in {hook}: no meta" in caplog.text
    finally:
        worker.shutdown()
        sched.shutdown()


def test_a_tier_raising_at_its_load_errors_fails_the_step_on_every_rank(full):
    """Through the coordinator, on 2 ranks: on rank 1, tier 0 reports failed block 3 and
    tier 1 raises. Every rank raises the same error, naming rank 1 and tier 1, so no rank
    serves the step's loads (rank 0 without knowing of block 3 included) and none is left
    waiting; rank 1 still holds block 3 as failed. A failure means the ranks disagree on
    the step, or one of them goes on as though its loads were good."""
    from test_coordinator import run_threads

    from kvdist.coordination.coordinator import Coordinator
    from kvdist.coordination.errors import RemoteError
    from kvdist.wire.codec import Plan

    cpu = {"name": "cpu", "kwargs": {"capacity_bytes": 1 << 20}}
    ranks = SimulatedRanks({"name": "tiered", "kwargs": {"tiers": [cpu, cpu]}}, WORLD, full)
    rank1 = ranks.workers[1]
    once = [{3}]  # a tier hands a failed block over once
    rank1.tiers[0].get_block_ids_with_load_errors = lambda: once.pop() if once else set()
    fail_once(rank1.tiers[1], "get_block_ids_with_load_errors", RuntimeError("pool gone"))
    meta = ranks.scheduler.build_connector_meta(SchedulerOutput(step=0))

    def rank(comm):
        coord = Coordinator(comm, ranks.workers[comm.rank], timeout_s=30)
        plan = Plan(step=0, scheduler_output=SchedulerOutput(step=0), connector_meta=meta)
        got = coord.publish_plan(plan if comm.rank == 0 else None)
        try:
            coord.exchange_reports(got)
        except RemoteError as exc:
            return str(exc)
        return None

    try:
        errors = run_threads(WORLD, rank)
        assert errors[0] is not None and errors == [errors[0]] * WORLD, errors
        assert "rank 1" in errors[0] and "tier 1 (CpuConnectorWorker)" in errors[0], errors
        assert rank1.get_block_ids_with_load_errors() == {3}
    finally:
        ranks.shutdown()
