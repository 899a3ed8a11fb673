"""The disk connector on a cache it may not or cannot write: `read_only`, a read-only
filesystem, a full one (at start, and found full by a save)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time

import pytest
from test_disk_connector import (
    DST,
    SRC,
    TOKENS,
    _corrupt,
    _records,
    assert_blocks,
    disk,
    load_prompt,
    save_prompt,
)

from kvdist.api.types import SchedulerOutput
from kvdist.connectors import create_connector
from kvdist.connectors.disk import index as index_mod
from kvdist.connectors.disk import record as record_mod
from kvdist.connectors.disk import store as store_mod
from kvdist.connectors.disk.scheduler import full_block_bytes
from kvdist.connectors.disk.store import block_dir, remove_block
from kvdist.connectors.testing import SimulatedRanks, make_request, tp_context


def _files(root) -> dict[str, tuple[int, int]]:
    """Every file under `root`, with its inode and modification time (ns)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("io", ["process", "threads"])
def test_read_only_loads_and_writes_nothing(tmp_path, full, io):
    """A cache written by one engine, read by another with `read_only`: hits load the
    right bytes; a computed prompt is not saved, loads set no file times, a corrupt record
    is kept (its block misses from then on, rather than failing each load), and the
    temporary file of a write that died long ago stays. Every file is as it was."""
    writer = SimulatedRanks(disk(tmp_path), 2, full, fill=True)
    req = save_prompt(writer, "a", TOKENS, SRC)
    writer.shutdown()
    stale = os.path.join(os.path.dirname(_records(writer, req, 0)[0]), "h0-2of4.kvb.1-2.tmp")
    with open(stale, "wb") as f:
        f.write(b"x")
    os.utime(stale, (1e9, 1e9))
    before = _files(tmp_path)
    cfg = disk(tmp_path, read_only=True, writer_process=io == "process", rescan_s=0.05)
    reader = SimulatedRanks(cfg, 2, full, fill=True)
    assert load_prompt(reader, "b", TOKENS, DST) == (12, set())
    assert_blocks(reader, full, list(zip(SRC[:3], DST[:3])))
    # Finished, a request's chain would be stamped (its file times set, first block newest).
    assert not reader.scheduler.request_finished(make_request("b", TOKENS, reader.ctx), DST)
    assert reader.step(SchedulerOutput(step=15, finished_req_ids=["b"]))["stamp"] == []
    save_prompt(reader, "c", [t + 1000 for t in TOKENS], SRC, step=20)  # computed: not saved
    assert sum(w.stats["blocks_saved"] for w in reader.workers) == 0
    bad = _records(writer, req, 1)[0]
    _corrupt("flip_payload", _records(writer, req, 1))
    corrupted = os.stat(bad).st_ino, os.stat(bad).st_mtime_ns
    assert load_prompt(reader, "d", TOKENS, DST, step=30) == (12, {DST[1], DST[2]})
    assert load_prompt(reader, "e", TOKENS, DST, step=40) == (4, set())
    reader.scheduler.index.rescan_now()
    reader.shutdown()
    assert _files(tmp_path) == {**before, bad: corrupted}  # the stale temp file too


def test_read_only_needs_the_directory_and_takes_no_capacity(tmp_path, full, caplog):
    """The directory must exist (it is not created); a namespace not in it is a warning,
    and every lookup misses; `capacity_bytes` (evictions) is refused with `read_only`."""
    with pytest.raises(ValueError, match="does not exist"):
        create_connector(disk(tmp_path / "none", read_only=True), tp_context(0, 1))
    assert not (tmp_path / "none").exists()
    with caplog.at_level(logging.WARNING, logger="kvdist.connectors.disk"):
        ranks = SimulatedRanks(disk(tmp_path, read_only=True), 1, full)
    assert "holds no cache of this model" in caplog.text
    assert load_prompt(ranks, "b", TOKENS, DST) == (0, set())
    ranks.shutdown()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="capacity_bytes needs writes"):
        create_connector(disk(tmp_path, read_only=True, capacity_bytes=1 << 30), tp_context(0, 1))
    with pytest.raises(ValueError, match="read_only must be True or False"):
        create_connector(disk(tmp_path, read_only="yes"), tp_context(0, 1))


def _failing_writes(monkeypatch, code: int) -> None:
    """Writes into the cache directory fail with `code`, as on a read-only or full disk."""
    real_open = open

    def fake_open(path, mode="r", *args, **kw):
        if "w" in mode:
            raise OSError(code, os.strerror(code), path)
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(store_mod, "open", fake_open, raising=False)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_directory_points_to_read_only(tmp_path, full, monkeypatch, code):
    """A directory that cannot be written (read-only mount, another user's) fails the
    start naming it, and the error says how to use it anyway."""
    ranks = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    save_prompt(ranks, "a", TOKENS, SRC)
    ranks.shutdown()
    _failing_writes(monkeypatch, code)
    with pytest.raises(ValueError, match="pass read_only=true to load from it") as info:
        create_connector(disk(tmp_path), tp_context(0, 1))
    assert str(tmp_path) in str(info.value)
    ranks = SimulatedRanks(disk(tmp_path, read_only=True), 1, full)
    assert load_prompt(ranks, "b", TOKENS, DST) == (12, set())
    ranks.shutdown()


def test_a_full_disk_at_start_still_loads(tmp_path, full, monkeypatch, caplog):
    """A cache whose filesystem is full (its probe write fails with ENOSPC) starts, with
    a warning, and its blocks load."""
    ranks = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    save_prompt(ranks, "a", TOKENS, SRC)
    ranks.shutdown()
    _failing_writes(monkeypatch, errno.ENOSPC)
    with caplog.at_level(logging.WARNING, logger="kvdist.connectors.disk"):
        ranks = SimulatedRanks(disk(tmp_path), 1, full)
    assert "is full" in caplog.text
    assert load_prompt(ranks, "b", TOKENS, DST) == (12, set())
    assert_blocks(ranks, full, list(zip(SRC[:3], DST[:3])))
    ranks.shutdown()


def test_a_filesystem_found_full_makes_room_and_keeps_it(tmp_path, full, monkeypatch, caplog):
    """With no capacity_bytes, a save that finds the filesystem full (ENOSPC) makes the
    cache keep 1 % of it free from then on: its least recently used blocks are evicted
    to get there, and later saves evict to stay there, rather than every later save
    failing while the cache never changes. (A filesystem of 6 blocks' room, whose free
    space is what the cache's files do not take; evicted files are deleted slowly, and
    are not evicted for again while they wait.) Once others freed space, the cache takes
    it again."""
    block = full_block_bytes(tp_context(0, 2))
    ranks = SimulatedRanks(disk(tmp_path, writer_process=False), 2, full, fill=True)
    index = ranks.scheduler.index
    ns_dir = ranks.scheduler.ns_dir

    class Fs:  # os.statvfs's answer: 100 blocks' size (1 % is one block), `room` the cache's
        f_frsize = 1
        f_blocks = 100 * block
        room = 6 * block

        @property
        def f_bavail(self):
            records = [
                os.path.getsize(os.path.join(d, n))
                for d, _, names in os.walk(ns_dir)
                for n in names
                if n.endswith(".kvb")
            ]
            return max(0, Fs.room - sum(records))

    def slow_remove(path, *args, remove=index_mod.remove_block, **kwargs):
        time.sleep(0.3)
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(index_mod.os, "statvfs", lambda path: Fs())
    monkeypatch.setattr(index_mod, "remove_block", slow_remove)
    monkeypatch.setattr(index_mod, "_MIN_KEEP_FREE", 0)
    save_prompt(ranks, "a", TOKENS, SRC)  # 3 blocks
    save_prompt(ranks, "b", [t + 1000 for t in TOKENS], SRC, step=2)
    assert len(index) == 6 and index.limit_bytes is None

    def no_room(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    writev = os.writev
    monkeypatch.setattr(record_mod.os, "writev", no_room)
    with caplog.at_level(logging.WARNING, logger="kvdist.connectors.disk"):
        save_prompt(ranks, "c", [t + 2000 for t in TOKENS], SRC, step=4)
    monkeypatch.setattr(record_mod.os, "writev", writev)
    assert ranks.scheduler.stats["disk_full_reports"] >= 1
    assert "found the filesystem" in caplog.text and "full" in caplog.text
    assert index.keep_free_bytes == block and index.total_bytes <= 5 * block
    assert ranks.scheduler.stats["evictions"] == 1
    for step in (6, 7, 8):  # steps while the eviction's file is still being deleted
        ranks.step(SchedulerOutput(step=step))
    assert ranks.scheduler.stats["evictions"] == 1  # not evicted for again
    saved = sum(w.stats["blocks_saved"] for w in ranks.workers)
    save_prompt(ranks, "c2", [t + 2000 for t in TOKENS], SRC, step=10)  # room made for it
    assert sum(w.stats["blocks_saved"] for w in ranks.workers) == saved + 2 * 3
    assert index.total_bytes <= 5 * block and ranks.scheduler.stats["evictions"] == 4
    assert load_prompt(ranks, "d", [t + 2000 for t in TOKENS], DST, step=12) == (12, set())
    assert_blocks(ranks, full, list(zip(SRC[:3], DST[:3])))
    time.sleep(1.5)  # the evicted files are gone
    Fs.room = 9 * block  # others freed space: the next step's limit takes it
    save_prompt(ranks, "e", [t + 3000 for t in TOKENS], SRC, step=14)
    assert len(index) == 8 and ranks.scheduler.stats["evictions"] == 4
    ranks.step(SchedulerOutput(step=16))  # its saves reported: the limit counts them landed
    assert index.limit_bytes > 7 * block  # 8 blocks' room, less a few bytes per block
    ranks.shutdown()


def test_room_on_a_full_filesystem_counts_saves_not_written_yet(tmp_path, monkeypatch):
    """The namespace may take what it holds on disk plus the free space, less what it
    keeps free: saves reserved but not written yet take free space when they land, so
    they count against it (here 15 in flight, 20 free, 1 kept: 4 more, not 19). A
    namespace directory a full disk kept from being made still has a filesystem."""
    index = index_mod.DiskIndex(str(tmp_path / "ns"), 1, None)
    index.scan()

    class Fs:
        f_frsize, f_blocks, f_bavail = 1, 100 * 1000, 20 * 1000

    monkeypatch.setattr(index_mod.os, "statvfs", lambda path: Fs())
    monkeypatch.setattr(index_mod, "_MIN_KEEP_FREE", 0)
    nothing = lambda key: False  # noqa: E731
    for i in range(15):
        assert index.reserve(bytes([i]) * 16, 1000, nothing)
    index.found_full(nothing)
    assert index.keep_free_bytes == 1000
    granted = sum(index.reserve(bytes([100 + i]) * 16, 1000, nothing) for i in range(30))
    assert granted == 4
    index.close()
    missing = index_mod.DiskIndex(str(tmp_path / "gone" / "ns"), 1, None)
    monkeypatch.undo()
    missing.found_full(nothing)  # statvfs of its nearest existing parent
    assert missing.keep_free_bytes is not None
    missing.close()


@pytest.mark.parametrize("case", ["shared", "copied", "evicted"])
def test_a_directory_copied_to_each_node_is_named(tmp_path, full, caplog, case):
    """Rank 1 writes to a copy of the directory (its id file copied too, so the start
    check passes: each node has its own copy). Rank 0 finds none of the first blocks every
    rank reported stored whole, and says why no block will ever be a hit; a directory the
    ranks share says nothing, even when another engine evicted each block before rank 0
    looked for it (as engines sharing a small capacity do)."""
    ranks = SimulatedRanks(disk(tmp_path / "cache", writer_process=False), 2, full, fill=True)
    if case == "copied":
        copy = tmp_path / "other-node"
        shutil.copytree(tmp_path / "cache", copy)
        w = ranks.workers[1]
        w.shard.ns_dir = os.path.join(copy, os.path.basename(w.shard.ns_dir))
    index = ranks.scheduler.index
    if case == "evicted":
        probe = index.probe

        def evicted_first(key: bytes) -> bool:
            remove_block(block_dir(index.ns_dir, key))
            return probe(key)

        index.probe = evicted_first  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="kvdist.connectors.disk"):
        for i in range(6):  # 18 blocks
            save_prompt(ranks, f"r{i}", [t + 1000 * i for t in TOKENS], SRC, step=2 * i)
    errors = [r.getMessage() for r in caplog.records if "do not share" in r.getMessage()]
    assert len(errors) == (1 if case == "copied" else 0), errors
    hit = load_prompt(ranks, "again", [t + 5000 for t in TOKENS], DST, step=20)  # r5's
    assert hit == ((12, set()) if case == "shared" else (0, set()))
    ranks.shutdown()
