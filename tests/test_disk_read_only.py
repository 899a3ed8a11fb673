"""The disk connector on a cache it may not write: `read_only`, a read-only or full
filesystem at start."""

from __future__ import annotations

import errno
import logging
import os

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
from kvdist.connectors.disk import store as store_mod
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
