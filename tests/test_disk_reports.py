"""The disk connector's workers reporting to rank 0's scheduler (`build_worker_meta` →
`update_from_workers`): which blocks each rank stored or did not, and how far behind its
writes are. Simulated ranks in one process; the engine path is in test_engine_mp.py."""

from __future__ import annotations

import time

import pytest
import torch
from test_disk_writer_process import DST, SRC, TOKENS, disk

from kvdist.api.types import SchedulerOutput
from kvdist.connectors.disk import saves as saves_mod
from kvdist.connectors.disk.scheduler import full_block_bytes
from kvdist.connectors.disk.store import block_dir, list_records
from kvdist.connectors.testing import SimulatedRanks, make_request, new_request_output
from kvdist.connectors.tracking import unpack_hashes


def admit(ranks, rid, tokens, blocks, step):
    """Admit a request that computes everything and run its step (which saves its full
    blocks, if the scheduler plans to); returns the request and that step's metadata."""
    req = make_request(rid, tokens, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, blocks, 0)
    meta = ranks.step(new_request_output(step, req, blocks, 0, len(tokens)))
    return req, meta


def saved_keys(meta) -> list[bytes]:
    return [k for s in meta["saves"] for k in unpack_hashes(s["hashes"])]


def finish(ranks, req, blocks, step) -> bool:
    """Finish `req`; wait for its save on every rank if the scheduler held it."""
    held = ranks.scheduler.request_finished(req, blocks)
    ranks.step(SchedulerOutput(step=step, finished_req_ids=[req.request_id]))
    if held:
        ranks.wait(finished={req.request_id}, timeout_s=60)
    return held


def _writes_over(ranks, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(w._saver.backlog_bytes for w in ranks.workers):
        assert time.monotonic() < deadline, "writes not over"
        time.sleep(0.01)


def test_a_block_is_complete_once_every_writing_rank_reported_it(tmp_path, full, monkeypatch):
    """At TP 2 the scheduler counts a block stored when both ranks reported their records
    written, without reading the directory; not after one rank alone, nor after one rank
    twice. A failure means rank 0 believes a block is on disk that is not (or never
    learns that it is)."""
    ranks = SimulatedRanks(disk(tmp_path, writer_process=False), 2, full, fill=True)
    index = ranks.scheduler.index
    monkeypatch.setattr(ranks, "report", lambda: None)  # the reports are passed by hand
    req, meta = admit(ranks, "a", TOKENS, SRC, step=0)
    keys = saved_keys(meta)
    assert len(keys) == 3
    _writes_over(ranks)
    metas = [w.build_worker_meta() for w in ranks.workers]
    assert [len(unpack_hashes(m["stored"])) for m in metas] == [3, 3], metas
    ranks.scheduler.update_from_workers([metas[0], None])
    ranks.scheduler.update_from_workers([metas[0], None])  # a repeat is not a second rank
    assert not any(index._entries[k].complete for k in keys)
    assert ranks.scheduler.stats["blocks_stored_all_ranks"] == 0
    ranks.scheduler.update_from_workers([None, metas[1]])
    assert all(index._entries[k].complete for k in keys)
    assert all(index._entries[k].pending_since is None for k in keys)
    assert ranks.scheduler.stats["blocks_stored_all_ranks"] == 3
    assert ranks.scheduler.stats["blocks_not_stored"] == 0
    monkeypatch.undo()
    assert finish(ranks, req, SRC, step=1)
    # Nothing changed since: the workers have nothing to say (no bytes on the step's path).
    assert ranks.report() == [None, None]
    ranks.shutdown()


def test_only_the_writing_replica_counts_when_kv_heads_are_replicated(tmp_path):
    """Two ranks, one KV head: only replica 0 writes, so its report alone completes a
    block (a scheduler waiting for both would keep it in flight for pending_timeout_s)."""
    from kvdist.connectors.testing import full_kv, tp_context

    one_head = full_kv(tp_context(0, 1, num_kv_heads=1))
    ranks = SimulatedRanks(
        disk(tmp_path, writer_process=False), 2, one_head, fill=True, num_kv_heads=1
    )
    req, meta = admit(ranks, "a", TOKENS, SRC, step=0)
    assert finish(ranks, req, SRC, step=1)
    assert all(ranks.scheduler.index._entries[k].complete for k in saved_keys(meta))
    assert ranks.scheduler.stats["blocks_stored_all_ranks"] == 3
    ranks.shutdown()


def test_a_block_one_rank_failed_to_write_is_saved_again_at_once(tmp_path, full, monkeypatch):
    """Rank 1's writes fail: its report makes the blocks saveable again, so the next
    request with the same prefix saves them (rank 1's records land this time) instead of
    the scheduler believing them in flight for pending_timeout_s (60 s) and the prefix
    staying a miss. Then a reader gets the right bytes."""
    ranks = SimulatedRanks(disk(tmp_path, writer_process=False), 2, full, fill=True)
    real = saves_mod.write_blocks
    rank1 = ranks.workers[1].shard.name
    broken = [True]

    def flaky(ns_dir, name, *args):
        if name == rank1 and broken[0]:
            keys = args[1]
            return [0] * len(keys), "OSError: [Errno 5] Input/output error"
        return real(ns_dir, name, *args)

    monkeypatch.setattr(saves_mod, "write_blocks", flaky)
    req, meta = admit(ranks, "a", TOKENS, SRC, step=0)
    keys = saved_keys(meta)
    assert finish(ranks, req, SRC, step=1)
    assert ranks.scheduler.stats["blocks_not_stored"] == 3
    assert ranks.scheduler.stats["blocks_stored_all_ranks"] == 0
    index = ranks.scheduler.index
    assert not any(index._entries[k].complete for k in keys)
    # Their reservations are released: the index accounts rank 0's records, no more.
    on_disk = sum(r.size for k in keys for r in list_records(block_dir(index.ns_dir, k)))
    assert 0 < on_disk == index.total_bytes < 3 * full_block_bytes(ranks.ctx)
    assert ranks.scheduler.get_num_new_matched_tokens(make_request("x", TOKENS, ranks.ctx), 0)[
        0
    ] == 0  # fmt: skip
    ranks.scheduler.request_finished(make_request("x", TOKENS, ranks.ctx), [])

    broken[0] = False
    req2, meta2 = admit(ranks, "b", TOKENS, DST, step=2)
    assert saved_keys(meta2) == keys, "the failed blocks are planned again"
    assert finish(ranks, req2, DST, step=3)
    assert ranks.scheduler.stats["blocks_stored_all_ranks"] == 3
    ranks.shutdown()

    reader = SimulatedRanks(disk(tmp_path), 2, full)
    req = make_request("r", TOKENS, reader.ctx)
    n, _ = reader.scheduler.get_num_new_matched_tokens(req, 0)
    assert n == 12
    reader.scheduler.update_state_after_alloc(req, SRC, n)
    reader.step(SchedulerOutput(step=0))
    assert reader.wait(started={"r"}, timeout_s=60) == set()
    for r in range(2):
        want = full[:, :, DST[:3]][
            ..., reader.ctxs[r].kv_head_start : reader.ctxs[r].kv_head_end, :
        ]
        assert torch.equal(reader.caches[r][:, :, SRC[:3]], want)
    reader.shutdown()


def _slow_writes(monkeypatch, seconds: float) -> None:
    real = saves_mod.write_blocks

    def slow(*args):
        time.sleep(seconds)
        return real(*args)

    monkeypatch.setattr(saves_mod, "write_blocks", slow)


def test_rank0_skips_saves_past_the_backlog_bound_on_every_rank(tmp_path, full, monkeypatch):
    """Writes take 0.3 s a task; the backlog may hold 4 blocks per rank. Of three requests
    saving 3 blocks each in back-to-back steps at TP 2, the first is saved (nothing
    waited) and the scheduler, from the ranks' reported backlogs, plans no saves for the
    next two, on any rank: those requests are not held, no record of theirs is on disk
    (no block half written by one rank), and no worker had to skip on its own. A failure
    means a slow disk grows host memory without bound, or ranks decide apart."""
    _slow_writes(monkeypatch, 0.3)
    block_bytes = full[:, :, 0].numel() * full.element_size() // 2  # one rank's shard
    conf = disk(tmp_path, writer_process=False, max_save_backlog_bytes=4 * block_bytes)
    ranks = SimulatedRanks(conf, 2, full, fill=True)
    prompts = [[t + 1000 * i for t in TOKENS] for i in range(3)]
    admitted = [admit(ranks, f"s{i}", p, SRC, step=i) for i, p in enumerate(prompts)]
    assert [len(saved_keys(meta)) for _, meta in admitted] == [3, 0, 0]
    held = [finish(ranks, req, SRC, step=10 + i) for i, (req, _) in enumerate(admitted)]
    assert held == [True, False, False]
    stats = ranks.scheduler.stats
    assert (stats["saves_skipped_all_ranks"], stats["blocks_stored_all_ranks"]) == (6, 3), stats
    for w in ranks.workers:
        assert (w.stats["blocks_saved"], w.stats["saves_skipped"]) == (3, 0), w.stats
        assert w._saver.backlog_bytes == 0
    ranks.shutdown()
    reader = SimulatedRanks(disk(tmp_path), 2, full)
    for i, p in enumerate(prompts):
        req = make_request(f"r{i}", p, reader.ctx)
        assert reader.scheduler.get_num_new_matched_tokens(req, 0)[0] == (12 if i == 0 else 0)
        reader.scheduler.request_finished(req, [])
    assert len(reader.scheduler.index) == 3, "no partial block of the skipped saves"
    reader.shutdown()


def test_a_worker_still_bounds_its_backlog_alone_and_says_so(tmp_path, full, monkeypatch):
    """A scheduler that does not read the reports (here: they are dropped) cannot stop
    the saves; the worker then skips them itself, and its report names every skipped
    block as not stored. The requests still complete; the saved blocks are hits with the
    right data, the skipped ones misses."""
    _slow_writes(monkeypatch, 0.3)
    block_bytes = full[:, :, 0].numel() * full.element_size()
    conf = disk(tmp_path, writer_process=False, max_save_backlog_bytes=4 * block_bytes)
    ranks = SimulatedRanks(conf, 1, full, fill=True)
    reports: list = []
    monkeypatch.setattr(ranks.scheduler, "update_from_workers", reports.append)
    prompts = [[t + 1000 * i for t in TOKENS] for i in range(3)]
    admitted = [admit(ranks, f"s{i}", p, SRC, step=i) for i, p in enumerate(prompts)]
    for i, (req, _) in enumerate(admitted):
        assert finish(ranks, req, SRC, step=10 + i)
    stats = ranks.workers[0].stats
    assert (stats["blocks_saved"], stats["saves_skipped"]) == (3, 6), stats
    not_stored = [k for (m,) in reports for k in unpack_hashes(m["not_stored"])]
    stored = [k for (m,) in reports for k in unpack_hashes(m["stored"])]
    assert sorted(not_stored) == sorted(saved_keys(admitted[1][1]) + saved_keys(admitted[2][1]))
    assert sorted(stored) == sorted(saved_keys(admitted[0][1]))
    assert reports[-1][0]["backlog"] == 0
    ranks.shutdown()
    reader = SimulatedRanks(disk(tmp_path), 1, full)
    req = make_request("r0", prompts[0], reader.ctx)
    n, _ = reader.scheduler.get_num_new_matched_tokens(req, 0)
    assert n == 12
    reader.scheduler.update_state_after_alloc(req, DST, n)
    reader.step(SchedulerOutput(step=20))
    assert reader.wait(started={"r0"}, timeout_s=60) == set()
    assert torch.equal(reader.caches[0][:, :, DST[:3]], full[:, :, SRC[:3]])
    for i in (1, 2):
        req = make_request(f"r{i}", prompts[i], reader.ctx)
        assert reader.scheduler.get_num_new_matched_tokens(req, 0)[0] == 0, "skipped: a miss"
        reader.scheduler.request_finished(req, [])
    reader.shutdown()


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"v": 9}, "version 9"),
        ({"v": 1, "stored": b"x" * 15, "not_stored": b"", "lost": b"", "backlog": 0}, "stored="),
        ({"v": 1, "stored": b"", "not_stored": [], "lost": b"", "backlog": 0}, "not_stored="),
        ({"v": 1, "stored": b"", "not_stored": b"", "lost": b"", "backlog": -1}, "backlog=-1"),
        (
            {"v": 1, "stored": b"", "not_stored": b"", "lost": b"", "backlog": 0, "full": 1},
            "full=1",
        ),
        (
            {"v": 1, "stored": b"", "not_stored": b"", "lost": b"", "backlog": 0, "loads_over": 7},
            "loads_over=7",
        ),
    ],
)
def test_bad_worker_reports_are_named(tmp_path, full, meta, message):
    ranks = SimulatedRanks(disk(tmp_path, writer_process=False), 2, full)
    with pytest.raises(ValueError, match=message) as info:
        ranks.scheduler.update_from_workers([None, meta])
    assert "rank 1" in str(info.value)
    ranks.shutdown()


def test_a_block_planned_in_the_step_that_evicts_is_not_deleted(tmp_path, full, monkeypatch):
    """Capacity for 4 blocks. Rank 1 fails request A's 3 blocks, so they are on disk only
    in part (half a block each): not in flight, and evictable. In one step, B (2 new
    blocks) and C (A's prompt again, growing A's blocks to whole ones) are saved, 5 blocks
    in all: making room must not evict A's blocks, which the same step plans again (their
    directories would be deleted under the new records, and the index would count on disk
    blocks that are gone). Every block the index ends up calling complete must be complete
    on disk."""
    from kvdist.api.step import RequestBatch
    from kvdist.connectors.disk import index as index_mod
    from kvdist.connectors.testing import tp_context

    cap = 4 * full_block_bytes(tp_context(0, 2))
    conf = disk(tmp_path, writer_process=False, capacity_bytes=cap, rescan_s=None)
    ranks = SimulatedRanks(conf, 2, full, fill=True)
    sched, index = ranks.scheduler, ranks.scheduler.index
    real_write, real_remove = saves_mod.write_blocks, index_mod.remove_block
    rank1 = ranks.workers[1].shard.name
    broken = [True]

    def flaky(ns_dir, name, *args):
        if name == rank1 and broken[0]:
            return [0] * len(args[1]), "OSError: [Errno 5] Input/output error"
        return real_write(ns_dir, name, *args)

    def late_remove(bdir, *args, **kwargs):
        time.sleep(0.3)  # the deleter runs after the new writes
        return real_remove(bdir, *args, **kwargs)

    monkeypatch.setattr(saves_mod, "write_blocks", flaky)
    monkeypatch.setattr(index_mod, "remove_block", late_remove)
    a, meta = admit(ranks, "a", TOKENS, SRC, step=0)
    keys_a = saved_keys(meta)
    assert finish(ranks, a, SRC, step=1)
    assert sched.stats["blocks_not_stored"] == 3
    broken[0] = False
    b = make_request("b", list(range(500, 509)), ranks.ctx)  # 2 full blocks
    c = make_request("c", TOKENS, ranks.ctx)
    batch = RequestBatch()
    jobs = ((b, [10, 11, 12]), (c, [20, 21, 22, 23]))
    for req, blocks in jobs:
        assert sched.get_num_new_matched_tokens(req, 0)[0] == 0
        sched.update_state_after_alloc(req, blocks, 0)
        batch.add(req.request_id, req.all_token_ids, blocks, 0, len(req.prompt_token_ids))
    planned = saved_keys(ranks.step(SchedulerOutput(step=2, new_requests=batch)))
    with index._lock:
        deleting = set(index._deleting)
    assert not deleting & set(planned), "a block planned while its directory is deleted"
    assert set(keys_a) & set(planned), "A's blocks are saved again"
    for step, (req, blocks) in enumerate(jobs, start=3):
        finish(ranks, req, blocks, step=step)
    index.close()  # the deleter is done
    complete = [k for k, e in index._entries.items() if e.complete]
    assert complete and all(index.probe(k) for k in complete)
    ranks.shutdown()


def test_a_lost_report_is_forgotten_even_when_nothing_is_saved():
    """A block whose report never comes stops being in flight after ten times
    `give_up_s` once reports arrive, whether or not a later step saves anything: while it
    is in flight it cannot be evicted, so with the capacity full of such blocks no save
    would succeed, and a cleanup run only when one does would never run."""
    from kvdist.connectors.disk.save_reports import SaveReports
    from kvdist.connectors.testing import tp_context

    now = [0.0]
    reports = SaveReports(tp_context(0, 1), None, give_up_s=1.0, clock=lambda: now[0])
    key = b"\x01" * 16
    reports.planned([key])
    reports.apply([{"v": 1, "stored": b"", "not_stored": b"", "lost": b"", "backlog": 0}])  # active
    now[0] = 5.0
    reports.expire()
    assert reports.awaits(key), "forgotten before ten times give_up_s"
    now[0] = 11.0
    reports.expire()  # a step that plans no save
    assert not reports.awaits(key)


def test_planning_after_a_load_does_not_list_the_loaded_blocks(tmp_path, full, monkeypatch):
    """A request that loaded 30 blocks computes its last token: the step's save planning
    must not list the directory for each loaded block (they were just found there; only
    blocks the engine computed are looked for again), or every request that hits pays a
    listing per block on rank 0's step path, on NFS too."""
    from kvdist.connectors.disk import index as index_mod

    tokens, blocks = list(range(100, 100 + 4 * 30 + 1)), list(range(31))
    conf = disk(tmp_path, writer_process=False, rescan_s=None)
    writer = SimulatedRanks(conf, 1, full, fill=True)
    a, _ = admit(writer, "a", tokens, blocks, step=0)
    assert finish(writer, a, blocks, step=1)
    writer.shutdown()
    ranks = SimulatedRanks(conf, 1, full, fill=True)
    listings = []
    real = index_mod.list_records
    monkeypatch.setattr(
        index_mod, "list_records", lambda *a, **k: listings.append(1) or real(*a, **k)
    )
    req = make_request("b", tokens, ranks.ctx)
    n, _ = ranks.scheduler.get_num_new_matched_tokens(req, 0)
    assert n == 120
    ranks.scheduler.update_state_after_alloc(req, blocks, n)
    del listings[:]
    meta = ranks.scheduler.build_connector_meta(new_request_output(1, req, blocks, n, 1))
    assert meta["saves"] == [] and listings == []
    ranks.scheduler.request_finished(req, blocks)
    ranks.shutdown()


def test_reports_settle_a_block_only_once_every_writer_reported():
    """Unit rules of `SaveReports` at TP 4 over 2 KV heads (ranks 0 and 2 write, 1 and 3
    are replicas): one writer's report leaves the block in flight; the second settles it,
    complete only if both stored it; a report of a block never planned here is ignored;
    a replica reporting blocks is an error naming it."""
    from kvdist.connectors.disk.save_reports import SaveReports
    from kvdist.connectors.testing import tp_context

    settled = []

    class Index:
        def settle(self, key, complete, found_there=0.0):
            settled.append((key, complete))

        def probe(self, key):  # rank 0 finds a block every writer stored (none are lost)
            return True

    reports = SaveReports(tp_context(0, 4, num_kv_heads=2), Index(), give_up_s=60)
    assert reports.writers == {0, 2}
    k1, k2, k3 = (bytes([i]) * 16 for i in (1, 2, 3))
    reports.planned([k1, k2])

    def meta(stored=b"", not_stored=b"", backlog=0):
        return {"v": 1, "stored": stored, "not_stored": not_stored, "lost": b"", "backlog": backlog}

    assert reports.apply([meta(k1 + k2 + k3, backlog=7), None, None, None]) == (0, 0)
    assert settled == [] and len(reports) == 2
    assert reports.apply([None, None, meta(k1, k2), None]) == (1, 1)
    assert settled == [(k1, True), (k2, False)] and len(reports) == 0
    assert reports.ranks_behind(10, 16) == {0: 7} and reports.ranks_behind(9, 16) == {}
    with pytest.raises(ValueError, match="rank 3 reported blocks stored, but it is a replica"):
        reports.apply([None, None, None, meta(k1)])


def _reporting_ranks(tmp_path, full, world: int, capacity_blocks: int | None = None):
    """Simulated ranks of a disk connector (in-process writes, no rescans, a 0.05 s
    `pending_timeout_s`) whose first request's reports already came: rank 0 now keeps a
    planned block in flight until every writing rank reported it."""
    from kvdist.connectors.testing import tp_context

    cap = capacity_blocks and capacity_blocks * full_block_bytes(tp_context(0, world))
    conf = disk(
        tmp_path, writer_process=False, capacity_bytes=cap, pending_timeout_s=0.05, rescan_s=None
    )
    ranks = SimulatedRanks(conf, world, full, fill=True)
    warm, _ = admit(ranks, "warm", list(range(900, 905)), SRC, step=0)  # 1 block
    assert finish(ranks, warm, SRC, step=1)  # its reports made the reports active
    return ranks


def test_a_save_queued_past_pending_timeout_is_neither_evicted_nor_saved_again(
    tmp_path, full, monkeypatch
):
    """Writes take 0.5 s, `pending_timeout_s` is 0.05 s, capacity is 3 blocks. Once the
    ranks report (they did, for an earlier block), rank 0 keeps a block in flight until
    every rank reported it, not until the timeout: while A's writes wait, a request with
    A's prompt does not save them again, and B's new blocks cannot evict them (B's saves
    find no room). A failure means a slow disk's queued blocks are deleted under their
    writes, or written twice; before the reports, both happened after 60 s."""
    ranks = _reporting_ranks(tmp_path, full, 1, capacity_blocks=3)
    index = ranks.scheduler.index
    _slow_writes(monkeypatch, 0.5)
    a, meta = admit(ranks, "a", TOKENS, SRC, step=2)
    keys_a = saved_keys(meta)
    assert len(keys_a) == 3
    time.sleep(0.2)  # past pending_timeout_s, writes still queued
    again, meta = admit(ranks, "again", TOKENS, DST, step=3)
    assert saved_keys(meta) == [], "saved again while its first writes wait"
    b, meta = admit(ranks, "b", list(range(500, 513)), [20, 21, 22, 23], step=4)
    assert saved_keys(meta) == [], "B's blocks evicted A's in flight"
    with index._lock:
        assert not set(keys_a) & index._deleting.keys()
    assert finish(ranks, a, SRC, step=5)
    assert all(index._entries[k].complete for k in keys_a)
    assert all(index.probe(k) for k in keys_a)
    for step, (req, blocks) in enumerate([(again, DST), (b, [20, 21, 22, 23])], start=6):
        finish(ranks, req, blocks, step=step)
    ranks.shutdown()


def test_a_block_on_disk_is_not_evicted_before_its_writers_reported(tmp_path, full, monkeypatch):
    """At TP 2 with capacity for 3 blocks, A's 3 blocks are all on disk but the ranks'
    reports of them have not come yet (past `pending_timeout_s`). B's new blocks must not
    evict them: evicted and saved again meanwhile, a block would take the late reports of
    its first save for those of the second, and be counted stored before it is. Once the
    reports come, A's blocks are complete and B's next save may evict them."""
    ranks = _reporting_ranks(tmp_path, full, 2, capacity_blocks=3)
    index = ranks.scheduler.index
    report = ranks.report
    monkeypatch.setattr(ranks, "report", lambda: None)  # A's reports are late
    a, meta = admit(ranks, "a", TOKENS, SRC, step=2)
    keys_a = saved_keys(meta)
    assert len(keys_a) == 3
    _writes_over(ranks)
    assert all(index.probe(k) for k in keys_a)  # every record is on disk
    time.sleep(0.1)  # past pending_timeout_s
    b_tokens = list(range(500, 513))
    b, meta = admit(ranks, "b", b_tokens, [20, 21, 22, 23], step=3)
    assert saved_keys(meta) == [], "B's blocks evicted A's before their reports"
    with index._lock:
        assert not set(keys_a) & index._deleting.keys()
    monkeypatch.setattr(ranks, "report", report)
    assert finish(ranks, a, SRC, step=4)
    assert all(index._entries[k].complete for k in keys_a)
    assert ranks.scheduler.stats["blocks_stored_all_ranks"] == 4
    ranks.scheduler.request_finished(b, [20, 21, 22, 23])
    b2, meta = admit(ranks, "b2", b_tokens, [20, 21, 22, 23], step=5)
    assert len(saved_keys(meta)) == 3, "settled blocks are evictable again"
    assert finish(ranks, b2, [20, 21, 22, 23], step=6)
    ranks.shutdown()


def test_without_reports_the_pending_timeout_stays_in_charge(tmp_path, full, monkeypatch):
    """An engine that never passes the workers' reports on (one written before them):
    rank 0 must not wait for reports that never come, so a block it asked to save is in
    flight for `pending_timeout_s`, then saveable again, as before the reports."""
    conf = disk(tmp_path, writer_process=False, pending_timeout_s=0.05, rescan_s=None)
    ranks = SimulatedRanks(conf, 1, full, fill=True)
    monkeypatch.setattr(ranks, "report", lambda: [])
    _slow_writes(monkeypatch, 0.5)
    a, meta = admit(ranks, "a", TOKENS, SRC, step=0)
    keys = saved_keys(meta)
    _, meta = admit(ranks, "b", TOKENS, DST, step=1)
    assert saved_keys(meta) == [], "in flight: not saved twice"
    time.sleep(0.2)
    _, meta = admit(ranks, "c", TOKENS, [20, 21, 22, 23], step=2)
    assert saved_keys(meta) == keys, "past pending_timeout_s, with no reports: saved again"
    ranks.shutdown()


def test_no_host_memory_for_a_steps_saves_skips_them_and_the_engine_goes_on(
    tmp_path, full, monkeypatch
):
    """Rank 1 cannot get a host buffer to stage a step's saves in (memory pressure, a file
    size limit on its shared memory): saves are a cache, so the step goes on, the request
    completes, rank 1 reports the blocks not stored and rank 0 counts them so (they may be
    saved again). Before, the OSError ended the step on every rank and the engine with it."""
    ranks = SimulatedRanks(disk(tmp_path, writer_process=True), 2, full, fill=True)
    xfer = ranks.workers[1].shard.transfers()

    def no_memory(n):
        raise OSError(27, "File too large")

    monkeypatch.setattr(xfer, "host_buffer", no_memory)
    req, meta = admit(ranks, "a", TOKENS, SRC, step=0)
    assert len(saved_keys(meta)) == 3
    assert finish(ranks, req, SRC, step=1)
    assert ranks.workers[1].stats["save_failures"] == 3
    assert ranks.scheduler.stats["blocks_not_stored"] == 3
    monkeypatch.undo()
    again, meta = admit(ranks, "b", TOKENS, DST, step=2)
    assert len(saved_keys(meta)) == 3, "the blocks are saved again"
    assert finish(ranks, again, DST, step=3)
    assert ranks.scheduler.stats["blocks_stored_all_ranks"] == 3
    ranks.shutdown()


def test_blocks_removed_under_a_running_engine_are_saved_again(tmp_path, full):
    """Engine 1 saved A's 3 blocks; engine 2 starts (its index reads them, complete), then
    `kvdist cache evict --all` empties the directory. Engine 2's lookup misses at A's first
    block and it computes all three: all three must be saved again. Before, only the first
    was (the lookup dropped its entry alone; the others, still "complete" in the index,
    were skipped until a rescan), so the prefix kept missing past its first block."""
    from kvdist.connectors.disk.maintenance import evict_cache

    conf = disk(tmp_path, writer_process=False, rescan_s=None)
    first = SimulatedRanks(conf, 1, full, fill=True)
    req, meta = admit(first, "a", TOKENS, SRC, step=0)
    assert len(saved_keys(meta)) == 3
    assert finish(first, req, SRC, step=1)
    first.shutdown()
    second = SimulatedRanks(conf, 1, full, fill=True)
    assert len(second.scheduler.index) == 3
    removed = evict_cache(str(tmp_path)).removed
    assert removed == 3
    req, meta = admit(second, "b", TOKENS, DST, step=0)
    assert len(saved_keys(meta)) == 3, "blocks removed by someone else were not saved again"
    assert finish(second, req, DST, step=1)
    assert all(second.scheduler.index.probe(k) for k in saved_keys(meta))
    second.shutdown()


def test_eviction_takes_a_prompts_last_blocks_first(tmp_path, full):
    """Capacity for 4 blocks: A's 3 blocks, then B's 3 evict two of A's: A's last two,
    so A's first block still hits. Evicting A's first blocks (the least recently touched
    when a request's blocks are touched in order) would leave its third unreachable while
    it keeps its room."""
    from kvdist.connectors.testing import tp_context

    cap = 4 * full_block_bytes(tp_context(0, 1))
    conf = disk(tmp_path, writer_process=False, capacity_bytes=cap, rescan_s=None)
    ranks = SimulatedRanks(conf, 1, full, fill=True)
    a, meta = admit(ranks, "a", TOKENS, SRC, step=0)
    keys_a = saved_keys(meta)
    assert finish(ranks, a, SRC, step=1)
    b_tokens = list(range(500, 513))
    b, meta = admit(ranks, "b", b_tokens, DST, step=2)
    assert len(saved_keys(meta)) == 3
    assert finish(ranks, b, DST, step=3)
    index = ranks.scheduler.index
    assert [k in index for k in keys_a] == [True, False, False]
    n, _ = ranks.scheduler.get_num_new_matched_tokens(make_request("a2", TOKENS, ranks.ctx), 0)
    assert n == 4
    ranks.scheduler.request_finished(make_request("a2", TOKENS, ranks.ctx), [])
    ranks.shutdown()


def test_a_save_does_not_evict_its_own_prefix_between_the_blocks_it_saves(tmp_path, full):
    """Capacity for 3 blocks, holding blocks 1-2 of a prompt but not block 0 (removed). A
    request computing that prompt and one block more saves block 0, and would save block
    3: that must not evict block 1 or 2 (its own prefix, on disk between the blocks it
    saves), which would cut the chain; block 3 is skipped, and the prompt hits whole."""
    from kvdist.connectors.testing import tp_context

    cap = 3 * full_block_bytes(tp_context(0, 1))
    conf = disk(tmp_path, writer_process=False, capacity_bytes=cap, rescan_s=None)
    ranks = SimulatedRanks(conf, 1, full, fill=True)
    a, meta = admit(ranks, "a", TOKENS, SRC, step=0)
    keys = saved_keys(meta)
    assert len(keys) == 3
    assert finish(ranks, a, SRC, step=1)
    ranks.scheduler.index._delete(keys[0])
    longer = TOKENS[:12] + list(range(200, 205))  # TOKENS' 3 blocks, a 4th and a token
    blocks = [10, 11, 12, 13, 14]
    c, meta = admit(ranks, "c", longer, blocks, step=2)
    assert saved_keys(meta) == [keys[0]]
    assert finish(ranks, c, blocks, step=3)
    again = make_request("a2", TOKENS, ranks.ctx)
    assert ranks.scheduler.get_num_new_matched_tokens(again, 0)[0] == 12
    ranks.scheduler.request_finished(again, [])
    ranks.shutdown()


def test_a_block_awaiting_reports_is_not_saved_again_when_the_directory_loses_it(
    tmp_path, full, monkeypatch
):
    """A's blocks are all on disk (a lookup saw them complete) but the ranks' reports are
    late; then the directory is emptied (`kvdist cache evict`). A request computing A's
    prompt again must not plan them while they await the first save's reports: those late
    reports would settle the second save before it is written."""
    from kvdist.connectors.disk.maintenance import evict_cache

    ranks = _reporting_ranks(tmp_path, full, 1)
    report = ranks.report
    monkeypatch.setattr(ranks, "report", lambda: None)  # A's reports are late
    a, meta = admit(ranks, "a", TOKENS, SRC, step=2)
    assert len(saved_keys(meta)) == 3
    _writes_over(ranks)
    look = make_request("look", TOKENS, ranks.ctx)
    assert ranks.scheduler.get_num_new_matched_tokens(look, 0)[0] == 12  # probes: complete
    ranks.scheduler.request_finished(look, [])
    evict_cache(str(tmp_path))
    c, meta = admit(ranks, "c", TOKENS, DST, step=3)
    assert saved_keys(meta) == [], "a block awaiting its writers' reports was saved again"
    monkeypatch.setattr(ranks, "report", report)
    assert finish(ranks, a, SRC, step=4)
    c2, meta = admit(ranks, "c2", TOKENS, [20, 21, 22, 23], step=5)
    assert len(saved_keys(meta)) == 3, "once reported, the missing blocks are saved again"
    finish(ranks, c2, [20, 21, 22, 23], step=6)
    ranks.scheduler.request_finished(c, DST)
    ranks.shutdown()


def test_a_prompt_saved_over_several_steps_is_evicted_last_block_first(tmp_path, full):
    """A's 4 blocks are saved in two chunked-prefill steps (0-1, then 2-3). Once A
    finishes, its blocks are ordered last-first whatever steps saved them: B's 1 block,
    in a cache of 4, evicts A's block 3, and A's first 3 blocks still hit."""
    from kvdist.api.step import RequestBatch
    from kvdist.connectors.testing import tp_context

    cap = 4 * full_block_bytes(tp_context(0, 1))
    conf = disk(tmp_path, writer_process=False, capacity_bytes=cap, rescan_s=None)
    ranks = SimulatedRanks(conf, 1, full, fill=True)
    tokens, blocks = list(range(0, 17)), [10, 11, 12, 13, 14]
    req = make_request("a", tokens, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, blocks, 0)
    ranks.step(new_request_output(0, req, blocks, 0, 8))  # blocks 0 and 1
    rest = RequestBatch()
    rest.add("a", [], [], 8, 9)  # blocks 2 and 3
    ranks.step(SchedulerOutput(step=1, cached_requests=rest))
    assert finish(ranks, req, blocks, step=2)
    b, _ = admit(ranks, "b", list(range(100, 105)), [20, 21], step=3)
    assert finish(ranks, b, [20, 21], step=4)
    assert ranks.scheduler.index.evictions == 1
    n, _ = ranks.scheduler.get_num_new_matched_tokens(make_request("a2", tokens, ranks.ctx), 0)
    assert n == 12
    ranks.scheduler.request_finished(make_request("a2", tokens, ranks.ctx), [])
    ranks.shutdown()


def test_two_engines_saving_one_prompt_at_once_count_its_blocks_once(tmp_path, full):
    """Engines a and b compute one prompt at the same moment: each plans its 3 blocks
    (neither's records are there yet) and writes them, at TP 2; the directory holds them
    once. b's ranks find a's records there: b's ledger takes them back, so that the other
    engines count the blocks once. Before, both ledgers counted them (both renames
    succeed), and every other engine trimmed as much again for nothing."""
    import msgpack

    from kvdist.connectors.disk.ledger import read_ledgers
    from kvdist.connectors.testing import run_step, tp_context

    engines = [SimulatedRanks(disk(tmp_path), 2, full, fill=True) for _ in range(2)]
    reqs, metas = [], []
    for ranks in engines:  # both plan before either writes
        req = make_request("p", TOKENS, ranks.ctx)
        ranks.scheduler.get_num_new_matched_tokens(req, 0)
        ranks.scheduler.update_state_after_alloc(req, SRC, 0)
        meta = ranks.scheduler.build_connector_meta(new_request_output(0, req, SRC, 0, len(TOKENS)))
        reqs.append(req)
        metas.append(msgpack.unpackb(msgpack.packb(meta, use_bin_type=True), raw=False))
    assert saved_keys(metas[0]) == saved_keys(metas[1]) and len(saved_keys(metas[0])) == 3
    for ranks, meta in zip(engines, metas):
        run_step(ranks.workers, meta)
        _writes_over(ranks)
        ranks.report()
    for ranks, req in zip(engines, reqs):
        assert finish(ranks, req, SRC, step=1)
    block = full_block_bytes(tp_context(0, 2))
    a, b = (ranks.scheduler.index._ledger for ranks in engines)
    assert a.flush() and b.flush()
    assert read_ledgers(engines[0].scheduler.index.ns_dir) == {a.engine_id: (3 * block, 0)}
    assert b._added == 0  # (an engine whose counts are all 0 writes no ledger)
    assert all(not ranks.scheduler.index.unwritten_bytes for ranks in engines)
    for ranks in engines:
        ranks.shutdown()


def test_blocks_held_for_a_stopped_load_go_when_its_reports_never_come():
    """A request that stopped while loading keeps the blocks its load reads pinned until
    every rank reports the load over (`load_drains`); should a report never come, they
    are released after the give-up time, or they could never be evicted again. An id
    reused for a second stopped load waits for both."""
    from kvdist.connectors.disk.load_drains import LoadDrains
    from kvdist.connectors.tracking import RequestTracker

    now = [0.0]
    tracker = RequestTracker(4, 8)
    drains = LoadDrains(2, tracker, clock=lambda: now[0])
    keys = [b"\x01" * 16, b"\x02" * 16]
    tracker.pin("a", keys)
    drains.stopped("a")
    tracker.forget("a")  # request_finished forgets the request: its pins stay
    assert all(tracker.is_pinned(k) for k in keys) and drains.take_new() == ["a"]
    drains.over(1, ["a", "unknown"])
    now[0] = 5.0
    drains.expire(10.0)
    assert all(tracker.is_pinned(k) for k in keys), "given up before the time"
    now[0] = 11.0
    drains.expire(10.0)
    assert not any(tracker.is_pinned(k) for k in keys) and len(drains) == 0
    tracker.pin("b", keys[:1])
    drains.stopped("b")
    tracker.pin("b", keys[1:])
    drains.stopped("b")
    drains.over(0, ["b"])
    drains.over(1, ["b"])
    assert not any(tracker.is_pinned(k) for k in keys)
