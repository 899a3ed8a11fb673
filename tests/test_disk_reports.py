"""The disk connector's workers reporting to rank 0's scheduler (`build_worker_meta` →
`update_from_workers`): which blocks each rank stored or did not, and how far behind its
writes are. Simulated ranks in one process; the engine path is in test_engine_mp.py."""

from __future__ import annotations

import time

import pytest
import torch

from kvdist.api.types import SchedulerOutput
from kvdist.connectors.disk import saves as saves_mod
from kvdist.connectors.testing import SimulatedRanks, make_request, new_request_output
from kvdist.connectors.tracking import unpack_hashes

BS = 4
TOKENS = list(range(100, 113))  # 3 full blocks
SRC = [5, 9, 2, 7]
DST = [1, 3, 4, 6]


def disk(path, **kw):
    return {"name": "disk", "kwargs": {"path": str(path), "io_threads": 2, **kw}}


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


def test_a_block_is_complete_once_every_writing_rank_reported_it(tmp_path, full):
    """At TP 2 the scheduler counts a block stored when both ranks reported their records
    written, without reading the directory; not after one rank alone. A failure means rank
    0 believes a block is on disk that is not (or never learns that it is)."""
    ranks = SimulatedRanks(disk(tmp_path, writer_process=False), 2, full, fill=True)
    index = ranks.scheduler.index
    req, meta = admit(ranks, "a", TOKENS, SRC, step=0)
    keys = saved_keys(meta)
    assert len(keys) == 3
    # Rank 0's report alone: written there, but the block is not complete yet.
    while True:
        stored, _, _ = ranks.workers[0]._saver.take_outcomes()
        if len(stored) == 3:
            break
        time.sleep(0.01)
    ranks.workers[0]._saver._stored += stored  # put them back for the worker's report
    ranks.scheduler.update_from_workers([ranks.workers[0].build_worker_meta(), None])
    assert not any(index._entries[k].complete for k in keys)
    assert finish(ranks, req, SRC, step=1)
    assert all(index._entries[k].complete for k in keys)
    assert all(index._entries[k].pending_since is None for k in keys)
    assert ranks.scheduler.stats["blocks_stored_all_ranks"] == 3
    assert ranks.scheduler.stats["blocks_not_stored"] == 0
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
    assert not any(ranks.scheduler.index._entries[k].complete for k in keys)
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
    assert (stats["saves_skipped"], stats["blocks_stored_all_ranks"]) == (6, 3), stats
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
    block as not stored. The requests still complete; the saved blocks are hits."""
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


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"v": 9}, "version 9"),
        ({"v": 1, "stored": b"x" * 15, "not_stored": b"", "backlog": 0}, "stored="),
        ({"v": 1, "stored": b"", "not_stored": [], "backlog": 0}, "not_stored="),
        ({"v": 1, "stored": b"", "not_stored": b"", "backlog": -1}, "backlog=-1"),
    ],
)
def test_bad_worker_reports_are_named(tmp_path, full, meta, message):
    ranks = SimulatedRanks(disk(tmp_path, writer_process=False), 2, full)
    with pytest.raises(ValueError, match=message) as info:
        ranks.scheduler.update_from_workers([None, meta])
    assert "rank 1" in str(info.value)
    ranks.shutdown()
