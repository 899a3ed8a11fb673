"""The `disk` connector, driven without an engine: several tensor-parallel ranks simulated in
one process, each with its slice of a full reference KV cache."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time

import pytest
import torch
from devices import DEVICES
from records import flip_version_bit, make_newer_format

from kvdist.api.types import RequestData, SchedulerOutput
from kvdist.connectors import create_connector
from kvdist.connectors.disk import index as index_mod
from kvdist.connectors.disk import loads as loads_mod
from kvdist.connectors.disk import record as record_mod
from kvdist.connectors.disk import staging
from kvdist.connectors.disk import store as store_mod
from kvdist.connectors.disk.maintenance import evict_cache, list_cache, verify_cache
from kvdist.connectors.disk.scheduler import full_block_bytes
from kvdist.connectors.disk.store import block_dir, remove_block
from kvdist.connectors.testing import (
    SimulatedRanks,
    make_request,
    new_request_output,
    shard,
    tp_context,
    wait_finished,
)
from kvdist.kv.hashing import extend_block_hashes

BS = 4


def disk(path, **kw):
    return {"name": "disk", "kwargs": {"path": str(path), "io_threads": 4, **kw}}


def save_prompt(ranks, rid, tokens, block_ids, step=0):
    """Admit, compute and finish a request whose blocks are saved; wait for the saves."""
    req = make_request(rid, tokens, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, block_ids, 0)
    ranks.step(new_request_output(step, req, block_ids, 0, len(tokens)))
    held = ranks.scheduler.request_finished(req, block_ids)
    ranks.step(SchedulerOutput(step=step + 1, finished_req_ids=[rid]))
    ranks.wait(finished={rid} if held else ())
    return req


def load_prompt(ranks, rid, tokens, block_ids, step=10):
    """Ask for a hit and load it (async); returns (matched tokens, union of load errors)."""
    req = make_request(rid, tokens, ranks.ctx)
    n, is_async = ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ext = min(n, len(tokens) - 1)  # the engine computes at least the last prompt token
    ranks.scheduler.update_state_after_alloc(req, block_ids, ext)
    errors: set[int] = set()
    if ext:
        assert is_async
        ranks.step(SchedulerOutput(step=step))
        errors = ranks.wait(started={rid})
    return n, errors


def assert_blocks(ranks, full, pairs):
    """Each rank's cache holds its slice of reference block `src` at block `dst`."""
    for ctx, kv in zip(ranks.ctxs, ranks.caches):
        ref = shard(full, ctx)
        for src, dst in pairs:
            assert torch.equal(kv[:, :, dst], ref[:, :, src]), (ctx.rank, src, dst)


def assert_untouched(ranks, blocks):
    for kv in ranks.caches:
        assert torch.all(kv[:, :, blocks] == 0)


TOKENS = list(range(100, 113))  # 13 tokens: 3 full blocks, all loadable
SRC = [5, 9, 2, 7]
DST = [1, 3, 4, 6]


@pytest.fixture(params=["one_task", "task_per_block"])
def io_tasks(request, monkeypatch):
    """The IO threads take a step's blocks in one task (these blocks are small) or one
    task per block (as 8B-sized blocks are split), so blocks of one save or load finish
    in different tasks, in any order."""
    if request.param == "task_per_block":
        monkeypatch.setattr(staging, "TASK_BYTES", 1)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("io", ["process", "threads"])
def test_save_then_load_equals_original(tmp_path, full, device, io_tasks, io):
    """Blocks saved by one engine and loaded by a fresh one are the reference blocks, read
    and written by the rank's IO process or by its own threads; a failure means the record
    format or the batched copies lose or misplace bytes."""
    full = full.to(device)
    cfg = disk(tmp_path, writer_process=io == "process")
    writer = SimulatedRanks(cfg, 1, full, fill=True, device=device)
    save_prompt(writer, "a", TOKENS, SRC)
    assert writer.workers[0].stats["blocks_saved"] == 3
    writer.shutdown()
    reader = SimulatedRanks(cfg, 1, full, device=device)
    n, errors = load_prompt(reader, "b", TOKENS, DST)
    assert (n, errors) == (12, set())
    assert_blocks(reader, full, list(zip(SRC[:3], DST[:3])))
    assert_untouched(reader, [DST[3]])
    assert reader.workers[0].stats["blocks_loaded"] == 3
    assert reader.scheduler.stats["hits"] == 3
    reader.shutdown()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("write_tp,read_tp", [(2, 1), (2, 4), (4, 2), (1, 4)])
def test_cross_tp_reload_is_byte_identical(tmp_path, full, write_tp, read_tp, device):
    """A cache written at one tensor-parallel degree loads at another, each rank getting
    exactly its head slice; a failure means head ranges are mixed up between records."""
    full = full.to(device)
    writer = SimulatedRanks(disk(tmp_path), write_tp, full, fill=True, device=device)
    save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    reader = SimulatedRanks(disk(tmp_path), read_tp, full, device=device)
    n, errors = load_prompt(reader, "b", TOKENS, DST)
    assert (n, errors) == (12, set())
    assert_blocks(reader, full, list(zip(SRC[:3], DST[:3])))
    reader.shutdown()


def _records(ranks, req, index):
    bdir = block_dir(ranks.scheduler.ns_dir, req.block_hashes[index])
    return sorted(os.path.join(bdir, n) for n in os.listdir(bdir))


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _corrupt(kind, paths):
    p0, p1 = paths
    if kind == "flip_payload":
        _flip(p0, os.path.getsize(p0) - 3)
    elif kind == "flip_header":
        _flip(p0, record_mod.PREFIX.size + 7)
    elif kind == "truncate":
        os.truncate(p0, os.path.getsize(p0) - 10)
    elif kind == "flip_version":
        flip_version_bit(p0)
    elif kind == "newer_format":
        make_newer_format(p0)
    elif kind == "newer_format_other_types":  # fields this version cannot multiply
        make_newer_format(p0, head_start=None, dtype=["float32", "le"])
    elif kind == "bad_magic":
        _flip(p0, 0)
    elif kind == "flip_reserved":  # the prefix's reserved field, written 0, read by none
        _flip(p0, len(record_mod.MAGIC) + 2)
    elif kind == "swapped_heads":  # right bytes, wrong place: headers must catch it
        os.replace(p0, p0 + ".x")
        os.replace(p1, p0)
        os.replace(p0 + ".x", p1)
    elif kind == "empty_file":
        open(p0, "wb").close()
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["flip_payload", "flip_header", "truncate", "flip_version", "newer_format", "bad_magic",
     "flip_reserved", "swapped_heads", "empty_file"],
)  # fmt: skip
@pytest.mark.parametrize("device", DEVICES)
def test_corrupt_record_is_a_load_error_never_wrong_data(tmp_path, full, kind, device, io_tasks):
    """A damaged record of block 1 makes blocks 1.. load errors on the reading rank(s); block 0
    still loads, and the failed blocks are never written. A failure means corrupt bytes can
    reach the KV cache."""
    full = full.to(device)
    writer = SimulatedRanks(disk(tmp_path), 2, full, fill=True, device=device)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    _corrupt(kind, _records(writer, req, 1))
    reader = SimulatedRanks(disk(tmp_path), 1, full, device=device)
    n, errors = load_prompt(reader, "b", TOKENS, DST)
    assert n == 12
    assert errors == {DST[1], DST[2]}
    assert_blocks(reader, full, [(SRC[0], DST[0])])
    assert_untouched(reader, DST[1:])
    assert reader.workers[0].stats["load_failures"] == 2
    reader.shutdown()


@pytest.mark.parametrize("io", ["process", "threads"])
@pytest.mark.parametrize(
    "kind",
    ["flip_payload", "swapped_heads", "flip_version", "newer_format", "newer_format_other_types"],
)
def test_a_corrupt_record_is_removed_and_its_block_saved_again(tmp_path, full, kind, io):
    """The rank that reads a corrupt record deletes it: the block then misses, is computed
    and saved again, and the next engine loads every block; so is a record whose version
    field alone was damaged. A record of another format (a newer kvdist may share the
    directory) is left alone: the block misses from then on, rather than failing each
    load, until it is saved again; also one whose header gives a field another type
    (before, its TypeError failed the IO process's whole read task, the good block 0
    with it)."""
    kw = {"writer_process": io == "process"}
    writer = SimulatedRanks(disk(tmp_path, **kw), 2, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    paths = _records(writer, req, 1)
    _corrupt(kind, paths)
    ranks = SimulatedRanks(disk(tmp_path, **kw), 2, full, fill=True)
    n, errors = load_prompt(ranks, "b", TOKENS, DST)
    assert n == 12 and errors == {DST[1], DST[2]}
    if kind.startswith("newer_format"):
        assert all(os.path.exists(p) for p in paths)
        assert load_prompt(ranks, "b2", TOKENS, DST, step=20) == (4, set())
    else:
        assert not all(os.path.exists(p) for p in paths)
    hit = make_request("probe", TOKENS, ranks.ctx)
    assert ranks.scheduler.get_num_new_matched_tokens(hit, 0) == (4, True)
    save_prompt(ranks, "c", TOKENS, SRC, step=30)  # computed again: block 1 is saved
    ranks.shutdown()
    reader = SimulatedRanks(disk(tmp_path, **kw), 2, full)
    assert load_prompt(reader, "d", TOKENS, DST) == (12, set())
    assert_blocks(reader, full, list(zip(SRC[:3], DST[:3])))
    reader.shutdown()


def test_a_corrupt_record_that_cannot_be_removed_misses_rather_than_fails_again(
    tmp_path, full, monkeypatch
):
    """A corrupt record the reading rank cannot delete (another user's file, a read-only
    directory): its block fails to load once, then misses, also once its file times are
    set again (a stamp), and hits again once a save wrote the record anew."""
    writer = SimulatedRanks(disk(tmp_path), 2, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    paths = _records(writer, req, 1)
    _corrupt("flip_payload", paths)
    # IO threads in this process: the unlink below is what they call.
    ranks = SimulatedRanks(disk(tmp_path, writer_process=False), 2, full, fill=True)

    def cannot(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(store_mod.os, "unlink", cannot)
    assert load_prompt(ranks, "b", TOKENS, DST) == (12, {DST[1], DST[2]})
    monkeypatch.undo()
    assert all(os.path.exists(p) for p in paths)  # kept
    assert load_prompt(ranks, "b2", TOKENS, DST, step=20) == (4, set())
    for p in paths:
        os.utime(p)
    assert load_prompt(ranks, "b3", TOKENS, DST, step=30) == (4, set())
    # For a minute: a record that failed for a passing reason (EMFILE) is tried again.
    monkeypatch.setattr(index_mod, "_UNUSABLE_S", 0.0)
    monkeypatch.setattr(store_mod.os, "unlink", cannot)
    assert load_prompt(ranks, "b4", TOKENS, DST, step=32) == (12, {DST[1], DST[2]})
    monkeypatch.undo()
    failures = sum(w.stats["load_failures"] for w in ranks.workers)
    save_prompt(ranks, "c", TOKENS, SRC, step=40)  # computed again: block 1 written anew
    assert load_prompt(ranks, "d", TOKENS, DST, step=50) == (12, set())
    assert_blocks(ranks, full, list(zip(SRC[:3], DST[:3])))
    assert sum(w.stats["load_failures"] for w in ranks.workers) == failures
    ranks.shutdown()


def test_a_fifo_under_a_records_name_is_a_miss_never_a_hang(tmp_path, full):
    """Block 1's record is replaced by a FIFO: opening it would block forever (and a load
    with it, and `kvdist cache verify`). The lookup counts only regular files, so the hit
    stops before block 1; a read of it fails at once, and verify calls it corrupt."""
    writer = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    (path,) = _records(writer, req, 1)
    os.unlink(path)
    os.mkfifo(path)
    reader = SimulatedRanks(disk(tmp_path), 1, full)
    assert load_prompt(reader, "b", TOKENS, DST) == (4, set())
    reader.shutdown()
    with pytest.raises(record_mod.CorruptRecord, match="not a regular file"):
        record_mod.read_record(path)
    report = verify_cache(str(tmp_path))
    assert [p for p, _ in report.corrupt] == [path]


@pytest.mark.parametrize("io", ["process", "threads"])
def test_a_directory_under_a_records_name(tmp_path, full, io, caplog):
    """Block 1's record is replaced by a directory (left by hand or by a tool): the block
    misses. An empty one is removed when the block is saved again, which then succeeds; one
    with files in it is left alone, and the save's warning names it."""
    kw = {"writer_process": io == "process"}
    writer = SimulatedRanks(disk(tmp_path, **kw), 1, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    (path,) = _records(writer, req, 1)
    os.unlink(path)
    os.mkdir(path)
    ranks = SimulatedRanks(disk(tmp_path, **kw), 1, full, fill=True)
    assert load_prompt(ranks, "b", TOKENS, DST) == (4, set())
    save_prompt(ranks, "c", TOKENS, SRC, step=30)
    ranks.shutdown()
    assert os.path.isfile(path)
    reader = SimulatedRanks(disk(tmp_path, **kw), 1, full)
    assert load_prompt(reader, "d", TOKENS, DST) == (12, set())
    reader.shutdown()

    os.unlink(path)
    os.makedirs(os.path.join(path, "kept"))
    ranks = SimulatedRanks(disk(tmp_path, **kw), 1, full, fill=True)
    with caplog.at_level(logging.WARNING, logger="kvdist"):
        save_prompt(ranks, "e", TOKENS, SRC, step=40)
        ranks.shutdown()
    assert os.path.isdir(os.path.join(path, "kept"))
    assert f"a directory is in the way of record {path}" in caplog.text
    assert ranks.workers[0].stats["save_failures"] == 1


@pytest.mark.parametrize("io", ["process", "threads"])
def test_an_unreadable_record_is_removed_and_its_block_saved_again(tmp_path, full, io, caplog):
    """Reading block 0's record fails with EIO (a bad sector; EACCES would be the same): the
    load fails, and the record is removed with a warning, so the block misses from then on
    and is saved again, instead of being found, and failing, at every lookup."""
    kw = {"writer_process": io == "process"}
    writer = SimulatedRanks(disk(tmp_path, **kw), 1, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    (path,) = _records(writer, req, 0)
    # A regular file that cannot be read, as root and in the IO process alike: reading
    # /proc/self/mem at offset 0 fails with EIO.
    os.unlink(path)
    os.symlink("/proc/self/mem", path)
    ranks = SimulatedRanks(disk(tmp_path, **kw), 1, full, fill=True)
    assert ranks.scheduler.get_num_new_matched_tokens(make_request("x", TOKENS, ranks.ctx), 0)[
        0
    ] == 12  # fmt: skip
    ranks.scheduler.request_finished(make_request("x", TOKENS, ranks.ctx), [])
    with caplog.at_level(logging.WARNING):
        n, errors = load_prompt(ranks, "b", TOKENS, DST)
    assert n == 12 and errors == set(DST[:3])
    assert not os.path.lexists(path), "the unreadable record was not removed"
    hit = make_request("probe", TOKENS, ranks.ctx)
    assert ranks.scheduler.get_num_new_matched_tokens(hit, 0) == (0, False)
    ranks.scheduler.request_finished(hit, [])
    save_prompt(ranks, "c", TOKENS, SRC, step=30)  # computed again: block 0 is saved
    ranks.shutdown()
    reader = SimulatedRanks(disk(tmp_path, **kw), 1, full)
    assert load_prompt(reader, "d", TOKENS, DST) == (12, set())
    reader.shutdown()


def test_a_record_that_cannot_be_opened_for_another_reason_is_kept(tmp_path, full, monkeypatch):
    """EACCES (another user's record), EMFILE, ESTALE say nothing about the record: the
    load fails (the block is computed) but the file stays, for whoever can read it."""
    writer = SimulatedRanks(disk(tmp_path, writer_process=False), 1, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    (path,) = _records(writer, req, 0)
    real_open = os.open

    def denied(p, *args, **kwargs):
        if p == path:
            raise PermissionError(errno.EACCES, "Permission denied", p)
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(record_mod.os, "open", denied)
    with pytest.raises(record_mod.RecordIOError) as info:
        record_mod.read_record(path)
    assert not isinstance(info.value, record_mod.UnreadableRecord)
    reader = SimulatedRanks(disk(tmp_path, writer_process=False), 1, full)
    n, errors = load_prompt(reader, "b", TOKENS, DST)
    assert n == 12 and errors == set(DST[:3])
    reader.shutdown()
    monkeypatch.undo()
    assert os.path.exists(path)


def test_missing_shard_is_a_miss(tmp_path, full):
    """A block whose records do not cover every head is not a hit (the hit stops before it)."""
    writer = SimulatedRanks(disk(tmp_path), 2, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    os.unlink(_records(writer, req, 1)[1])
    reader = SimulatedRanks(disk(tmp_path), 2, full)
    assert load_prompt(reader, "b", TOKENS, DST) == (4, set())
    assert_blocks(reader, full, [(SRC[0], DST[0])])
    reader.shutdown()


def test_files_vanishing_after_the_hit_fail_the_load(tmp_path, full):
    """Another engine evicting between the hit answer and the read: load errors, no crash."""
    writer = SimulatedRanks(disk(tmp_path), 2, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    reader = SimulatedRanks(disk(tmp_path), 2, full)
    r = make_request("b", TOKENS, reader.ctx)
    assert reader.scheduler.get_num_new_matched_tokens(r, 0) == (12, True)
    reader.scheduler.update_state_after_alloc(r, DST, 12)
    remove_block(block_dir(reader.scheduler.ns_dir, req.block_hashes[2]))
    reader.step(SchedulerOutput(step=3))
    assert reader.wait(started={"b"}) == {DST[2]}
    assert_blocks(reader, full, list(zip(SRC[:2], DST[:2])))
    assert_untouched(reader, [DST[2]])
    reader.shutdown()


@pytest.mark.parametrize("io", ["process", "threads"])
def test_a_namespace_removed_under_the_engine_gets_its_label_back(tmp_path, full, io):
    """`rm -rf` of the namespace directory while an engine runs: its next saves make the
    directory again, load back, and write its NAMESPACE label again, by which `kvdist
    cache ls` names the model. A failure means the cache shows as "?" (or is lost) until
    an engine is started again."""
    ranks = SimulatedRanks(disk(tmp_path, writer_process=io == "process"), 2, full, fill=True)
    save_prompt(ranks, "a", TOKENS, SRC)
    ns_dir = ranks.scheduler.ns_dir
    label = os.path.join(ns_dir, store_mod.NAMESPACE_FILE)
    assert os.path.exists(label)
    shutil.rmtree(ns_dir)
    other = list(range(200, 213))
    save_prompt(ranks, "c", other, SRC, step=10)
    with open(label) as f:
        assert f.read() == ranks.ctx.model_namespace + "\n"
    (row,) = list_cache(str(tmp_path))
    assert (row.namespace, row.complete_blocks) == (ranks.ctx.model_namespace, 3), row
    assert load_prompt(ranks, "d", other, DST, step=20) == (12, set())
    assert_blocks(ranks, full, list(zip(SRC[:3], DST[:3])))
    ranks.shutdown()


def test_other_namespace_gets_zero_hits(tmp_path, full):
    """Another model's engine on the same directory finds nothing and fails nothing."""
    writer = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    other = SimulatedRanks(disk(tmp_path), 1, full, model_namespace="other-model")
    assert load_prompt(other, "b", TOKENS, DST) == (0, set())
    other.shutdown()


def test_records_under_a_foreign_namespace_are_rejected(tmp_path, full):
    """Records copied into another namespace's directory fail the header's namespace check."""
    writer = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    other = SimulatedRanks(disk(tmp_path), 1, full, model_namespace="other-model")
    for key in req.block_hashes:
        src = block_dir(writer.scheduler.ns_dir, key)
        shutil.copytree(src, block_dir(other.scheduler.ns_dir, key))
    r = make_request("b", TOKENS, writer.ctx)  # the writer's keys, the other's namespace
    assert other.scheduler.get_num_new_matched_tokens(r, 0) == (12, True)
    other.scheduler.update_state_after_alloc(r, DST, 12)
    other.step(SchedulerOutput(step=1))
    assert other.wait(started={"b"}) == set(DST[:3])
    assert_untouched(other, DST)
    other.shutdown()


def test_save_plan_follows_full_blocks_and_dedups(tmp_path, full):
    """Saves name only blocks that become full in the step (chunked prefill, decode), each
    block once, and none a second request shares; a failure means saving incomplete blocks
    or saving twice."""
    ctx = tp_context(0, 1, kwargs={"path": str(tmp_path)})
    sched, _ = create_connector(disk(tmp_path), ctx)
    req = make_request("a", list(range(10)), ctx)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, [7, 8, 9], 0)

    def saved(meta):
        return [len(s["hashes"]) // 16 for s in meta["saves"]]

    m = sched.build_connector_meta(new_request_output(0, req, [7, 8, 9], 0, 6))
    assert saved(m) == [1] and m["saves"][0]["hashes"] == req.block_hashes[0]
    cont = RequestData("a", [], [], 6, 4)
    assert saved(sched.build_connector_meta(SchedulerOutput(step=1, cached_requests=[cont]))) == [1]
    req.output_token_ids.append(1)
    extend_block_hashes(req.block_hashes, req.all_token_ids, BS, ctx.model_namespace)
    dec = RequestData("a", [1], [], 10, 1)
    assert saved(sched.build_connector_meta(SchedulerOutput(step=2, cached_requests=[dec]))) == []
    req.output_token_ids.append(2)
    extend_block_hashes(req.block_hashes, req.all_token_ids, BS, ctx.model_namespace)
    dec = RequestData("a", [2], [], 11, 1)
    m = sched.build_connector_meta(SchedulerOutput(step=3, cached_requests=[dec]))
    assert saved(m) == [1] and m["saves"][0]["hashes"] == req.block_hashes[2]
    twin = make_request("b", list(range(10)), ctx)
    sched.get_num_new_matched_tokens(twin, 0)
    sched.update_state_after_alloc(twin, [1, 2, 3], 0)
    assert saved(sched.build_connector_meta(new_request_output(4, twin, [1, 2, 3], 0, 10))) == []
    assert sched.request_finished(req, [7, 8, 9]) is True
    assert sched.request_finished(twin, [1, 2, 3]) is False
    assert sched.build_connector_meta(SchedulerOutput(step=5))["held"] == ["a"]
    sched.shutdown()


def test_unheld_finished_ids_are_not_reported(tmp_path, full):
    """The engine passes every finished id; a worker must report only ids whose blocks the
    scheduler held (the coordinator rejects any other report)."""
    ranks = SimulatedRanks(disk(tmp_path), 2, full, fill=True)
    for w in ranks.workers:
        assert w.get_finished({"never-saved"}, set()) == (set(), set())
    ranks.shutdown()


def _block_bytes_on_disk(ns_dir: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(ns_dir)
        for f in fs
        if f.endswith(".kvb")
    )


def test_capacity_evicts_least_recently_used_blocks(tmp_path, full):
    """Beyond capacity_bytes the least recently used blocks go (all their shards), a hit
    refreshes a block, and a restarted engine learns the sizes from the directory."""
    ctx = tp_context(0, 2)
    cap = full_block_bytes(ctx) * 4
    ranks = SimulatedRanks(disk(tmp_path, capacity_bytes=cap), 2, full, fill=True)
    a = save_prompt(ranks, "a", list(range(9)), [0, 1, 2], step=0)  # 2 full blocks
    b = save_prompt(ranks, "b", list(range(50, 59)), [3, 4, 5], step=2)
    assert len(ranks.scheduler.index) == 4
    # A hit on a refreshes it: c's saves must evict b's blocks.
    assert load_prompt(ranks, "a2", list(range(9)), [10, 11, 12], step=4) == (8, set())
    ranks.scheduler.request_finished(make_request("a2", [], ranks.ctx), [10, 11, 12])
    c = save_prompt(ranks, "c", list(range(70, 79)), [6, 7, 8], step=6)
    ranks.scheduler.index.close()  # waits for the deletions
    ns = ranks.scheduler.ns_dir
    assert all(os.path.isdir(block_dir(ns, k)) for k in a.block_hashes + c.block_hashes)
    assert not any(os.path.exists(block_dir(ns, k)) for k in b.block_hashes)
    assert ranks.scheduler.stats["evictions"] == 2
    assert ranks.scheduler.index.total_bytes <= cap
    on_disk = _block_bytes_on_disk(ns)
    ranks.shutdown()
    restarted = SimulatedRanks(disk(tmp_path, capacity_bytes=cap), 2, full)
    assert restarted.scheduler.index.total_bytes == on_disk
    assert len(restarted.scheduler.index) == 4
    assert load_prompt(restarted, "c2", list(range(70, 79)), [1, 2, 3]) == (8, set())
    restarted.shutdown()


def test_blocks_a_stopped_request_still_loads_are_not_evicted_under_the_reads(
    tmp_path, full, monkeypatch
):
    """A request aborted while its async load reads (its `request_finished` comes at once,
    the reads go on): another request's saves must not evict the blocks being read until
    every rank reported its load over, and may once they have. Evicted before, their files
    are deleted under the reads, which fail: load failures, and records reported lost,
    from an intact cache. (The fuzz of restarts found it: a second run whose aborts fell
    on loads counted load failures with no record damaged.)"""
    cap = full_block_bytes(tp_context(0, 2)) * 3
    ranks = SimulatedRanks(
        disk(tmp_path, capacity_bytes=cap, writer_process=False), 2, full, fill=True
    )
    sched = ranks.scheduler
    a = save_prompt(ranks, "a", TOKENS, SRC)  # 3 blocks: the capacity
    go = threading.Event()
    read = loads_mod.read_record

    def gated(*args, **kwargs):
        assert go.wait(30), "reads never let go"
        return read(*args, **kwargs)

    monkeypatch.setattr(loads_mod, "read_record", gated)
    again = make_request("a2", TOKENS, ranks.ctx)
    assert sched.get_num_new_matched_tokens(again, 0) == (12, True)
    sched.update_state_after_alloc(again, DST, 12)
    ranks.step(SchedulerOutput(step=2))  # both ranks start reading, and wait
    for w in ranks.workers:
        assert w.get_finished(set(), {"a2"}) == (set(), set())
    assert sched.request_finished(again, []) is False  # aborted while loading
    save_prompt(ranks, "b", list(range(50, 63)), [20, 21, 22, 23], step=3)
    assert all(k in sched.index for k in a.block_hashes)
    assert sched.stats["evictions"] == 0
    go.set()
    for w in ranks.workers:
        assert wait_finished(w, started={"a2"})[1:] == ({"a2"}, set())
    metas = [w.build_worker_meta() for w in ranks.workers]
    assert [m["loads_over"] for m in metas] == [["a2"], ["a2"]]
    sched.update_from_workers([metas[0], None])  # one rank's read is still going, as seen
    assert all(sched._tracker.is_pinned(k) for k in a.block_hashes)
    sched.update_from_workers([None, metas[1]])
    assert not any(sched._tracker.is_pinned(k) for k in a.block_hashes)
    assert_blocks(ranks, full, list(zip(SRC[:3], DST[:3])))
    assert sched.stats["load_failures"] == 0
    assert all(w.stats["load_failures"] == 0 for w in ranks.workers)
    save_prompt(ranks, "c", list(range(70, 83)), [24, 25, 26, 27], step=5)
    assert sched.stats["evictions"] == 3  # now they may go
    ranks.shutdown()


def test_a_restart_with_a_smaller_capacity_evicts_at_start(tmp_path, full):
    """A cache restarted with a capacity below what it holds is trimmed at the engine's
    first step (least recently used first), not at its first rescan or save (with
    `rescan_s=None`: never). Not before: the ranks have not agreed on the settings yet,
    and a start refused for another capacity on some rank must not have evicted."""
    ctx = tp_context(0, 2)
    ranks = SimulatedRanks(disk(tmp_path), 2, full, fill=True)
    old = save_prompt(ranks, "a", list(range(9)), [0, 1, 2], step=0)  # 2 full blocks
    new = save_prompt(ranks, "b", list(range(50, 59)), [3, 4, 5], step=2)
    ranks.shutdown()
    for key in old.block_hashes:  # older files: the least recently used
        bdir = block_dir(ranks.scheduler.ns_dir, key)
        for name in os.listdir(bdir):
            os.utime(os.path.join(bdir, name), (1e9, 1e9))
    cap = full_block_bytes(ctx) * 2
    restarted = SimulatedRanks(disk(tmp_path, capacity_bytes=cap, rescan_s=None), 2, full)
    assert restarted.scheduler.stats["evictions"] == 0
    restarted.step(SchedulerOutput(step=0))
    restarted.scheduler.index.close()  # waits for the deletions
    ns = restarted.scheduler.ns_dir
    assert restarted.scheduler.index.total_bytes <= cap
    assert _block_bytes_on_disk(ns) <= cap
    assert not any(os.path.exists(block_dir(ns, k)) for k in old.block_hashes)
    assert all(os.path.isdir(block_dir(ns, k)) for k in new.block_hashes)
    restarted.shutdown()


@pytest.mark.parametrize("io", ["process", "threads", "threads, slow writes"])
def test_a_restart_evicts_a_prefix_last_blocks_first(tmp_path, full, io, monkeypatch):
    """A conversation's second turn, its first turn's blocks still on the device, saves
    only its new blocks, after another prompt was saved. Going by when each file was
    written, a restarted engine (or `kvdist cache evict`) would evict the first turn's
    blocks first and keep the second turn's, which no lookup can then reach. Finishing a
    request stamps its chain's file times, first block newest: the other prompt goes
    first, and the conversation loads whole after the restart. With slow writes the stamp
    is asked for while the request's last blocks are still being written: it must wait
    for them, or they would land newer than the blocks before them."""
    if io == "threads, slow writes":
        from kvdist.connectors.disk import saves

        def slow(*args, write=saves.write_blocks):
            time.sleep(0.3)
            return write(*args)

        monkeypatch.setattr(saves, "write_blocks", slow)
    ctx = tp_context(0, 2)
    cfg = disk(tmp_path, writer_process=io == "process")
    ranks = SimulatedRanks(cfg, 2, full, fill=True)
    turn1 = list(range(9))  # 2 full blocks
    save_prompt(ranks, "t1", turn1, [0, 1, 2], step=0)
    other = save_prompt(ranks, "q", list(range(50, 59)), [3, 4, 5], step=2)
    turn2 = turn1[:8] + list(range(200, 209))  # 4 full blocks; the first 2 on the device
    req = make_request("t2", turn2, ranks.ctx)
    assert ranks.scheduler.get_num_new_matched_tokens(req, 8) == (0, False)
    ranks.scheduler.update_state_after_alloc(req, [0, 1, 6, 7, 8], 0)
    ranks.step(new_request_output(4, req, [0, 1, 6, 7, 8], 8, len(turn2) - 8))
    held = ranks.scheduler.request_finished(req, [0, 1, 6, 7, 8])
    ranks.step(SchedulerOutput(step=5, finished_req_ids=["t2"]))
    ranks.wait(finished={"t2"} if held else ())
    ranks.shutdown()  # its IO drains: the stamps are on disk
    ns = ranks.scheduler.ns_dir

    def mtime(key):
        return max(e.stat().st_mtime_ns for e in os.scandir(block_dir(ns, key)))

    times = [mtime(k) for k in req.block_hashes]
    assert times == sorted(times, reverse=True), "the chain's first block is not newest"
    assert min(times) > max(mtime(k) for k in other.block_hashes)
    # `kvdist cache evict` goes by the same file times (on a copy of the directory).
    copy = tmp_path.parent / f"{tmp_path.name}-copy"
    shutil.copytree(tmp_path, copy)
    ns_copy = os.path.join(copy, os.path.relpath(ns, tmp_path))
    assert evict_cache(str(copy), to_bytes=_block_bytes_on_disk(ns) * 4 // 6).removed == 2
    assert all(os.path.isdir(block_dir(ns_copy, k)) for k in req.block_hashes)
    # Room for 6 blocks, 6 on disk: saving 2 more evicts the 2 least recently used.
    cap = full_block_bytes(ctx) * 6
    restarted = SimulatedRanks(disk(tmp_path, capacity_bytes=cap), 2, full, fill=True)
    save_prompt(restarted, "r", list(range(70, 79)), [9, 10, 11], step=0)
    restarted.scheduler.index.close()  # waits for the deletions
    assert not any(os.path.exists(block_dir(ns, k)) for k in other.block_hashes)
    assert load_prompt(restarted, "t3", turn2, [12, 13, 14, 15, 16], step=2) == (16, set())
    restarted.shutdown()


def test_a_stamp_due_while_the_io_threads_drain_is_made(tmp_path, full, monkeypatch, caplog):
    """Shut down while a finished request's writes are still queued (IO threads, slow
    writes): its stamp comes due on an IO thread once the pool is draining, where it can no
    longer be queued; it is made there, not lost with an error logged."""
    from kvdist.connectors.disk import saves

    def slow(*args, write=saves.write_blocks):
        time.sleep(0.2)
        return write(*args)

    monkeypatch.setattr(saves, "write_blocks", slow)
    cfg = disk(tmp_path, writer_process=False, io_threads=1)
    ranks = SimulatedRanks(cfg, 1, full, fill=True)
    tokens = list(range(17))  # 4 full blocks
    req = make_request("a", tokens, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, [0, 1, 2, 3, 4], 0)
    ranks.step(new_request_output(0, req, [0, 1, 2, 3, 4], 0, len(tokens)))
    ranks.scheduler.request_finished(req, [0, 1, 2, 3, 4])
    ranks.step(SchedulerOutput(step=1, finished_req_ids=["a"]))  # the stamp, deferred
    with caplog.at_level(logging.ERROR):
        ranks.shutdown()  # drains the writes, then the stamp
    assert not [r for r in caplog.records if "IO task" in r.getMessage()], caplog.text
    ns = ranks.scheduler.ns_dir
    times = [
        max(e.stat().st_mtime_ns for e in os.scandir(block_dir(ns, k))) for k in req.block_hashes
    ]
    assert times == sorted(times, reverse=True)


def test_rescan_accounts_another_engines_blocks_against_capacity(tmp_path, full):
    """Blocks another engine wrote count against capacity_bytes once a re-read of the
    directory finds them: the namespace is brought back under capacity by evicting the
    least recently used, the other engine's oldest first, and blocks the other engine
    removed are forgotten. A failure means capacity bounds only this engine's writes."""
    cap = full_block_bytes(tp_context(0, 2)) * 3
    mine = SimulatedRanks(disk(tmp_path, capacity_bytes=cap, rescan_s=None), 2, full, fill=True)
    other = SimulatedRanks(disk(tmp_path), 2, full, fill=True)
    a = save_prompt(mine, "a", list(range(9)), [0, 1, 2])  # 2 full blocks
    b = save_prompt(other, "b", list(range(50, 59)), [3, 4, 5])  # 2 more: 4 > 3 blocks
    old = block_dir(other.scheduler.ns_dir, b.block_hashes[1])  # written an hour ago
    for name in os.listdir(old):
        t = os.path.getmtime(os.path.join(old, name)) - 3600
        os.utime(os.path.join(old, name), (t, t))
    index = mine.scheduler.index
    assert len(index) == 2  # nothing has told this engine about b yet
    index.rescan_now()
    mine.step(SchedulerOutput(step=5))  # the scheduler applies it between steps
    assert index.blocks_learnt == 2 and index.rescans == 1
    assert mine.scheduler.stats["blocks_learnt"] == 2
    index.close()  # waits for the deletions
    ns = mine.scheduler.ns_dir
    assert all(os.path.isdir(block_dir(ns, k)) for k in a.block_hashes)
    kept = [k for k in b.block_hashes if os.path.isdir(block_dir(ns, k))]
    assert kept == b.block_hashes[:1] and mine.scheduler.stats["evictions"] == 1
    assert index.total_bytes == _block_bytes_on_disk(ns) <= cap
    mine.shutdown()

    # The other engine removes its last block: a re-read forgets it.
    again = SimulatedRanks(disk(tmp_path, capacity_bytes=cap, rescan_s=None), 2, full)
    assert len(again.scheduler.index) == 3
    remove_block(block_dir(ns, kept[0]))
    again.scheduler.index.rescan_now()
    again.step(SchedulerOutput(step=1))
    assert len(again.scheduler.index) == 2
    assert again.scheduler.index.total_bytes == _block_bytes_on_disk(ns)
    again.shutdown()
    other.shutdown()


@pytest.mark.parametrize("tiered", [False, True])
def test_a_prompt_longer_than_the_capacity_keeps_its_first_blocks(tmp_path, tiered):
    """A 5-block prompt into a disk cache of 3 blocks, prefilled a block a step (alone, and
    as the disk tier behind cpu): saving its later blocks must not evict its own first
    ones, leaving on disk blocks no lookup can reach; a new engine loads the first 3."""
    import kvdist
    from kvdist.engine.sampling import SamplingParams

    # 3 blocks of the tiny model in float32 (32 KiB and a record header each), not 4.
    disk_cfg = {"name": "disk", "kwargs": {"path": str(tmp_path), "capacity_bytes": 7 << 14}}
    cpu_cfg = {"name": "cpu", "kwargs": {"capacity_bytes": 1 << 20}}
    conn = {"name": "tiered", "kwargs": {"tiers": [cpu_cfg, disk_cfg]}} if tiered else disk_cfg
    prompt = list(range(1, 82))
    once = SamplingParams(max_tokens=1)
    kw = {"num_blocks": 64, "enable_prefix_caching": False, "dtype": "float32"}
    llm = kvdist.LLM("tiny", connector=conn, max_num_batched_tokens=16, **kw)
    llm.generate([prompt], once)
    llm.shutdown()
    fresh = kvdist.LLM("tiny", connector=disk_cfg, **kw)
    (again,) = fresh.generate([prompt], once)
    fresh.shutdown()
    assert again.num_external_tokens == 48, again


def test_rescan_does_not_bring_back_blocks_this_engine_evicted(tmp_path, full):
    """A re-read that ran while this engine was deleting a block may still list it; the
    block is not accounted again, unless it is really there on a later read (another
    engine wrote it back)."""
    ranks = SimulatedRanks(disk(tmp_path, rescan_s=None), 1, full, fill=True)
    a = save_prompt(ranks, "a", list(range(9)), [0, 1, 2])
    index, ns = ranks.scheduler.index, ranks.scheduler.ns_dir
    index.rescan_now()  # lists a's blocks
    index.evict_to(0, lambda key: False)  # this engine evicts them meanwhile
    for _ in range(500):
        if not any(os.path.exists(block_dir(ns, k)) for k in a.block_hashes):
            break
        threading.Event().wait(0.01)
    index.apply_rescan(lambda key: False)
    assert len(index) == 0 and index.total_bytes == 0 and index.blocks_learnt == 0
    # Another engine writes them again: the next read accounts them.
    other = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    save_prompt(other, "a", list(range(9)), [0, 1, 2])
    other.shutdown()
    index.rescan_now()
    index.apply_rescan(lambda key: False)
    assert len(index) == 2 and index.total_bytes == _block_bytes_on_disk(ns)
    ranks.shutdown()


def test_background_rescans_run_every_rescan_s(tmp_path, full):
    """With rescan_s set, a background thread re-reads the directory on its own; the
    scheduler picks up what it found at its next step, and shutdown stops the thread."""
    ranks = SimulatedRanks(disk(tmp_path, rescan_s=0.02), 1, full, fill=True)
    other = SimulatedRanks(disk(tmp_path, rescan_s=None), 1, full, fill=True)
    save_prompt(other, "b", list(range(50, 59)), [3, 4, 5])
    other.shutdown()
    index = ranks.scheduler.index
    on_disk = _block_bytes_on_disk(ranks.scheduler.ns_dir)
    for step in range(500):  # a read may have caught the other engine mid-write: wait
        ranks.step(SchedulerOutput(step=step))
        if index.total_bytes == on_disk:
            break
        threading.Event().wait(0.01)
    assert index.blocks_learnt == 2 and len(index) == 2 and index.total_bytes == on_disk
    ranks.shutdown()
    assert not any(t.name == "kvdist-disk-rescan" and t.is_alive() for t in threading.enumerate())


def test_two_engines_writing_the_same_keys_concurrently(tmp_path, full):
    """Two engines on one directory saving the same blocks at once leave complete, verified
    records and no temporary files; a third engine loads the right data."""
    engines = [SimulatedRanks(disk(tmp_path), 2, full, fill=True) for _ in range(2)]
    errors = []

    def body(ranks, i):
        try:
            for k in range(6):
                toks = [k * 1000 + t for t in range(13)]
                save_prompt(ranks, f"r{k}", toks, SRC, step=2 * k)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(e, i)) for i, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for e in engines:
        e.shutdown()
    report = verify_cache(str(tmp_path))
    assert report.records == 6 * 3 * 2 and not report.corrupt
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    assert leftovers == []
    reader = SimulatedRanks(disk(tmp_path), 4, full)
    toks = [5 * 1000 + t for t in range(13)]
    assert load_prompt(reader, "x", toks, DST) == (12, set())
    assert_blocks(reader, full, list(zip(SRC[:3], DST[:3])))
    reader.shutdown()


def test_full_disk_fails_the_save_once_and_leaves_nothing(tmp_path, full, monkeypatch, caplog):
    """ENOSPC while writing: the saves fail, are counted, logged once, leave no file, and the
    request is still reported saved so its blocks are freed. (Writes from this process: the
    failure is injected here; `test_writer_process_failures_are_reported` covers the
    writer process.)"""
    ranks = SimulatedRanks(disk(tmp_path, writer_process=False), 1, full, fill=True)

    def no_space(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_mod.os, "writev", no_space)
    with caplog.at_level(logging.WARNING, logger="kvdist.connectors.disk"):
        save_prompt(ranks, "a", TOKENS, SRC)  # waits until "a" is reported saved
    stats = ranks.workers[0].stats
    assert stats["save_failures"] == 3 and stats["blocks_saved"] == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    saving = [r for r in warnings if r.name.endswith(".saves")]
    assert len(saving) == 1 and "No space left" in saving[0].getMessage()
    # And once from rank 0's scheduler: the cache keeps room free from now on.
    assert ["found the filesystem" in r.getMessage() for r in warnings if r not in saving] == [True]
    labels = ("NAMESPACE", "DIRECTORY_ID")
    files = [f for _, _, fs in os.walk(ranks.scheduler.ns_dir) for f in fs if f not in labels]
    assert files == []
    # Nor any empty block directory (which nothing would ever list, evict or remove).
    ns_dir = ranks.scheduler.ns_dir
    fans = [os.path.join(ns_dir, f) for f in os.listdir(ns_dir) if len(f) == 2]
    assert [b for fan in fans for b in os.listdir(fan)] == []
    ranks.shutdown()


def test_temporary_files_of_writes_that_died_are_removed(tmp_path, full):
    """A write killed mid-record leaves its temporary file (here: one older than
    `STALE_TEMP_S`, in a block with no record). The engine's scan removes it and its
    directory, leaves a fresh one (a write in progress) alone, and `kvdist cache evict
    --to-bytes` removes stale ones without counting them as blocks. A failure means dead
    writes' files pile up, unseen by capacity accounting."""
    from kvdist.connectors.disk.maintenance import evict_cache
    from kvdist.connectors.disk.store import STALE_TEMP_S

    writer = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    ns_dir = writer.scheduler.ns_dir
    writer.shutdown()
    old = time.time() - STALE_TEMP_S - 60

    def temp(bdir, name, mtime=None):
        os.makedirs(bdir, exist_ok=True)
        path = os.path.join(bdir, name)
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    lonely = temp(block_dir(ns_dir, b"\x11" * 16), ".h0-4of4.kvb.dead-0.tmp", old)
    fresh = temp(block_dir(ns_dir, b"\x22" * 16), ".h0-4of4.kvb.live-2.tmp")
    # A write that died beside a record another engine completed the block with.
    beside = temp(block_dir(ns_dir, req.block_hashes[0]), ".h0-4of4.kvb.dead-1.tmp", old)
    reader = SimulatedRanks(disk(tmp_path), 1, full)  # its start-up scan
    assert not os.path.exists(lonely) and not os.path.isdir(os.path.dirname(lonely))
    assert not os.path.exists(beside) and len(_records(reader, req, 0)) == 1
    assert os.path.exists(fresh)
    reader.shutdown()
    os.utime(fresh, (old, old))
    beside = temp(block_dir(ns_dir, req.block_hashes[1]), ".h0-4of4.kvb.dead-3.tmp", old)
    evicted = evict_cache(str(tmp_path), to_bytes=10**12)
    assert (evicted.removed, evicted.freed) == (0, 2000)  # no block evicted
    assert not os.path.exists(fresh) and not os.path.exists(beside)
    assert len(verify_cache(str(tmp_path)).corrupt) == 0  # the saved block is untouched


def test_unwritable_directory_is_a_value_error(tmp_path, full):
    """A cache path that cannot be written fails at construction, naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = blocker / "cache"
    with pytest.raises(ValueError, match="not writable") as info:
        create_connector(disk(bad), tp_context(0, 1))
    assert str(bad) in str(info.value)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            create_connector(disk(ro), tp_context(1, 2))


def test_a_path_under_the_home_directory(tmp_path, full, monkeypatch):
    """`~/kv` is the user's home's `kv`, as in a shell, not a directory named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    ranks = SimulatedRanks(disk("~/kv"), 1, full, fill=True)
    assert ranks.scheduler.ns_dir.startswith(str(tmp_path / "home" / "kv") + os.sep)
    ranks.shutdown()
    assert not (tmp_path / "~").exists()


def test_bad_settings(tmp_path):
    """Unknown kwargs name themselves and the valid ones; a missing path or bad value says so."""
    with pytest.raises(ValueError, match=r"capacty_bytes.*valid settings.*capacity_bytes"):
        create_connector(disk(tmp_path, capacty_bytes=1), tp_context(0, 1))
    with pytest.raises(ValueError, match="needs setting"):
        create_connector({"name": "disk"}, tp_context(0, 1))
    with pytest.raises(ValueError, match="io_threads"):
        create_connector(disk(tmp_path, io_threads=0), tp_context(0, 1))
    for bad in (0, -1.0, "60", True, float("nan"), 1e12):  # 1e12: past what a thread waits
        with pytest.raises(ValueError, match="rescan_s"):
            create_connector(disk(tmp_path, rescan_s=bad), tp_context(0, 1))
    for bad in (0, float("nan"), True, float("inf")):
        with pytest.raises(ValueError, match="pending_timeout_s"):
            create_connector(disk(tmp_path, pending_timeout_s=bad), tp_context(0, 1))
    # Smaller than one block: it stored nothing, silently.
    small = full_block_bytes(tp_context(0, 1)) - 1
    with pytest.raises(ValueError, match=f"capacity_bytes={small} holds no block"):
        create_connector(disk(tmp_path, capacity_bytes=small), tp_context(0, 1))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        create_connector(disk(afile), tp_context(0, 1))


def test_a_connector_that_fails_to_build_leaves_no_threads(tmp_path):
    """The worker refusing the KV dtype after the scheduler started its rescan thread: the
    scheduler is shut down again (repeated failed starts would pile up threads)."""
    before = {t.ident for t in threading.enumerate()}
    for _ in range(3):
        with pytest.raises(ValueError, match="has no record format"):
            create_connector(disk(tmp_path), tp_context(0, 1, dtype=torch.int32))
    assert [t.name for t in threading.enumerate() if t.ident not in before] == []


def test_workers_name_their_directory_by_an_id_the_first_one_made(tmp_path, caplog):
    """`shared_storage()`: one id for every worker of one directory, another for another
    directory of the same name elsewhere (a node's own disk); a file that is not an id, or
    a directory where none can be made, is named in a warning and compared by no one."""
    halves = [create_connector(disk(tmp_path / "a"), tp_context(r, 2)) for r in range(2)]
    halves.append(create_connector(disk(tmp_path / "b"), tp_context(1, 2)))
    try:
        (name0, id0), (name1, id1), (_, other) = (
            next(iter(w.shared_storage().items())) for _, w in halves
        )
        assert name0 == name1 and name0.startswith(f"cache directory {tmp_path / 'a'}{os.sep}")
        assert id0 == id1 and len(id0) == 32 and other != id0
    finally:
        for part in (p for pair in halves for p in pair if p is not None):
            part.shutdown()
    ns_dir = name0.removeprefix("cache directory ")
    assert sorted(os.listdir(ns_dir)) == ["DIRECTORY_ID", "NAMESPACE"]  # no temporary left
    with open(os.path.join(ns_dir, "DIRECTORY_ID"), "w") as f:
        f.write("not an id\n")
    with caplog.at_level(logging.WARNING):
        w = create_connector(disk(tmp_path / "a"), tp_context(1, 2))[1]
    w.shutdown()
    assert w.shared_storage() == {}
    assert "does not hold a directory id: 'not an id'" in caplog.text


def test_a_process_that_loses_the_race_for_the_directory_id_reads_the_winners(
    tmp_path, monkeypatch
):
    """A process finds no DIRECTORY_ID, and another makes it before this one's link():
    this one must return the other's id (link() refuses a name that exists; a rename would
    replace it, and the two would disagree on one directory)."""
    from kvdist.connectors.disk import store

    winner = store.directory_id(str(tmp_path))
    real, reads = store._read_id, []

    def first_read_misses(path):
        reads.append(path)
        if len(reads) == 1:  # as if the winner had not linked its id yet
            raise FileNotFoundError(path)
        return real(path)

    monkeypatch.setattr(store, "_read_id", first_read_misses)
    assert store.directory_id(str(tmp_path)) == winner and len(reads) == 2
    assert sorted(os.listdir(tmp_path)) == ["DIRECTORY_ID"]  # its temporary file removed
