"""The disk connector's IO process: records written and read by a child process through
shared staging memory, its failures reported, its death survived, its exit with the
parent."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from devices import CUDA

from kvdist.api.types import SchedulerOutput
from kvdist.connectors.disk import record as record_mod
from kvdist.connectors.disk import saves as saves_mod
from kvdist.connectors.disk import staging
from kvdist.connectors.disk import writer_process as writer_mod
from kvdist.connectors.disk.store import block_dir
from kvdist.connectors.testing import SimulatedRanks, make_request, new_request_output
from kvdist.kv.pinned import HostBufferPool

BS = 4
TOKENS = list(range(100, 113))  # 3 full blocks
SRC = [5, 9, 2, 7]
DST = [1, 3, 4, 6]


def disk(path, **kw):
    return {"name": "disk", "kwargs": {"path": str(path), "io_threads": 2, **kw}}


def start_save(ranks, rid, tokens, blocks, step):
    req = make_request(rid, tokens, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, blocks, 0)
    ranks.step(new_request_output(step, req, blocks, 0, len(tokens)))
    return req


def finish_save(ranks, req, blocks, step):
    assert ranks.scheduler.request_finished(req, blocks)
    ranks.step(SchedulerOutput(step=step, finished_req_ids=[req.request_id]))
    ranks.wait(finished={req.request_id}, timeout_s=60)


def save(ranks, rid, tokens, blocks, step):
    req = start_save(ranks, rid, tokens, blocks, step)
    finish_save(ranks, req, blocks, step + 1)
    return req


def load(ranks, rid, tokens, blocks, step=10):
    """Ask for a hit and load it; returns (matched tokens, load errors)."""
    req = make_request(rid, tokens, ranks.ctx)
    n, _ = ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, blocks, n)
    ranks.step(SchedulerOutput(step=step))
    return n, ranks.wait(started={rid}, timeout_s=60)


def saved_cache(tmp_path, full):
    """Blocks SRC of TOKENS saved at TP 1; returns their request and namespace directory."""
    writer = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    req = save(writer, "a", TOKENS, SRC, step=0)
    writer.shutdown()
    return req, writer.scheduler.ns_dir


def corrupt_block(ns_dir, key):
    """Flip one payload byte of block `key`'s only record."""
    bdir = block_dir(ns_dir, key)
    (name,) = os.listdir(bdir)
    with open(os.path.join(bdir, name), "r+b") as f:
        f.seek(-10, os.SEEK_END)
        b = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def kill_io_process(worker):
    """SIGKILL the worker's IO process; return once the worker has noticed (30 s at most)."""
    os.kill(worker.shard.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker.shard.process.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.shard.process.alive


def record_files(ns_dir, req):
    return [os.listdir(block_dir(ns_dir, k)) for k in req.block_hashes]


def test_records_are_written_by_the_writer_process(tmp_path, full, monkeypatch):
    """With `writer_process` (the default) this process writes no record: its own writes
    fail here, and the save still lands, every block, readable."""

    def no_writes_here(fd, buffers):
        raise OSError(errno.EIO, "this process must not write records")

    ranks = SimulatedRanks(disk(tmp_path), 2, full, fill=True)
    writers = [w.shard.process for w in ranks.workers]
    assert all(w is not None and w.alive and w.pid != os.getpid() for w in writers)
    monkeypatch.setattr(record_mod.os, "writev", no_writes_here)
    req = save(ranks, "a", TOKENS, SRC, step=0)
    monkeypatch.undo()
    for w in ranks.workers:
        assert w.stats["blocks_saved"] == 3 and w.stats["save_failures"] == 0
    assert all(len(names) == 2 for names in record_files(ranks.scheduler.ns_dir, req))
    ranks.shutdown()
    assert all(w._proc.poll() == 0 for w in writers)  # exited cleanly at shutdown


def test_writer_process_failures_are_reported(tmp_path, full, caplog):
    """A write failing in the child (its block directory cannot be made) is counted and
    logged once in this process, and the request is still reported saved."""
    ranks = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    req = make_request("a", TOKENS, ranks.ctx)
    for key in req.block_hashes:  # a file where each block's parent directory must go
        parent = os.path.dirname(block_dir(ranks.scheduler.ns_dir, key))
        if not os.path.exists(parent):
            open(parent, "wb").close()
    with caplog.at_level(logging.WARNING, logger="kvdist.connectors.disk"):
        save(ranks, "a", TOKENS, SRC, step=0)
    stats = ranks.workers[0].stats
    assert stats["save_failures"] == 3 and stats["blocks_saved"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "completes without it" in warnings[0]
    ranks.shutdown()


def test_writer_process_death_rewrites_in_flight_saves_on_threads(tmp_path, full, monkeypatch):
    """The child killed while a save waits for its copy: that save's blocks are written by
    threads of this process instead, from the same staging buffer (the request is reported
    saved, nothing hangs), and so is the next save."""
    ranks = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    worker = ranks.workers[0]
    gate = threading.Event()
    real_wait = saves_mod.DiskSaver._wait_for_copy

    def held(step):
        gate.wait(30)
        real_wait(step)

    monkeypatch.setattr(saves_mod.DiskSaver, "_wait_for_copy", staticmethod(held))
    req = start_save(ranks, "a", TOKENS, SRC, step=0)
    kill_io_process(worker)
    gate.set()
    finish_save(ranks, req, SRC, step=1)
    assert worker.stats["save_failures"] == 0 and worker.stats["blocks_saved"] == 3
    monkeypatch.undo()
    save(ranks, "b", [t + 1000 for t in TOKENS], SRC, step=2)
    assert worker.stats["blocks_saved"] == 6
    ranks.shutdown()


def test_a_write_that_found_no_room_marks_the_tasks_error(monkeypatch, tmp_path):
    """A task whose first failure is another error and a later one ENOSPC still says the
    disk is full (rank 0 then makes room), naming the first error."""
    calls = iter([OSError(errno.EIO, "I/O error"), OSError(errno.ENOSPC, "No space left")])

    def fails(*args):
        raise next(calls)

    monkeypatch.setattr(writer_mod, "write_block", fails)
    header = record_mod.RecordHeader(
        key=b"", ns=b"\0" * 16, dtype="float32", num_layers=1, block_size=1,
        num_kv_heads=1, head_start=0, head_end=1, head_dim=1,
    )  # fmt: skip
    written, error = writer_mod.write_blocks(
        str(tmp_path), "h0-1of1.kvb", header, [b"a" * 16, b"b" * 16], [b"", b""], False
    )
    assert written == [0, 0]
    assert error == f"{writer_mod.DISK_FULL}OSError: [Errno 5] I/O error"


def test_idle_writer_process_death_is_logged_and_in_the_stats(tmp_path, full, caplog):
    """The child killed with no write in flight loses nothing, but the rank's IO moves to
    its threads: a warning says so (once), and `io_process_alive` turns 0. A clean
    shutdown logs nothing."""
    ranks = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    worker = ranks.workers[0]
    assert worker.stats["io_process_alive"] == 1
    with caplog.at_level(logging.WARNING, logger="kvdist.connectors.disk"):
        kill_io_process(worker)
        save(ranks, "a", TOKENS, SRC, step=0)  # still saved, by threads
    ended = [r.getMessage() for r in caplog.records if "ended" in r.getMessage()]
    assert len(ended) == 1 and "no write in flight" in ended[0], ended
    assert worker.stats["io_process_alive"] == 0 and worker.stats["blocks_saved"] == 3
    ranks.shutdown()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvdist.connectors.disk"):
        other = SimulatedRanks(disk(tmp_path / "other"), 1, full, fill=True)
        other.shutdown()
    assert not [r for r in caplog.records if "ended" in r.getMessage()]


def test_loads_are_read_by_the_io_process(tmp_path, full, monkeypatch):
    """With `writer_process` this process reads no record of its own heads: its reads fail
    here, and the load still lands, every block equal to the saved one."""

    def no_reads_here(*args):
        raise OSError(errno.EIO, "this process must not read records")

    saved_cache(tmp_path, full)
    reader = SimulatedRanks(disk(tmp_path), 1, full)
    monkeypatch.setattr(record_mod.os, "pread", no_reads_here)
    monkeypatch.setattr(record_mod.os, "preadv", no_reads_here)
    assert load(reader, "b", TOKENS, DST) == (12, set())
    monkeypatch.undo()
    assert torch.equal(reader.caches[0][:, :, DST[:3]], full[:, :, SRC[:3]])
    assert reader.workers[0].stats["blocks_loaded"] == 3
    reader.shutdown()


@pytest.mark.parametrize("task_bytes", [4 << 20, 1], ids=["one_task", "task_per_block"])
def test_io_process_reports_a_corrupt_record(tmp_path, full, monkeypatch, task_bytes):
    """A flipped payload byte in block 1's record, read by the IO process: block 0 loads,
    blocks 1 and 2 are load errors and never reach the cache."""
    monkeypatch.setattr(staging, "TASK_BYTES", task_bytes)
    req, ns_dir = saved_cache(tmp_path, full)
    corrupt_block(ns_dir, req.block_hashes[1])
    reader = SimulatedRanks(disk(tmp_path), 1, full)
    before = reader.caches[0][:, :, DST[1:]].clone()
    assert load(reader, "b", TOKENS, DST) == (12, {DST[1], DST[2]})
    assert torch.equal(reader.caches[0][:, :, DST[0]], full[:, :, SRC[0]])
    assert torch.equal(reader.caches[0][:, :, DST[1:]], before)
    assert reader.workers[0].stats["load_failures"] == 2
    reader.shutdown()


def test_io_process_death_rereads_its_loads_on_threads(tmp_path, full, monkeypatch):
    """The IO process killed while a load's reads wait to be sent: they are read on this
    process's threads instead, and the load lands whole."""
    saved_cache(tmp_path, full)
    reader = SimulatedRanks(disk(tmp_path), 1, full)
    worker = reader.workers[0]
    gate = threading.Event()
    monkeypatch.setattr(writer_mod, "_no_wait", lambda: gate.wait(30))
    req = make_request("b", TOKENS, reader.ctx)
    n, _ = reader.scheduler.get_num_new_matched_tokens(req, 0)
    reader.scheduler.update_state_after_alloc(req, DST, n)
    reader.step(SchedulerOutput(step=10))  # its reads queue behind the gate
    kill_io_process(worker)
    gate.set()
    assert reader.wait(started={"b"}, timeout_s=60) == set()
    assert torch.equal(reader.caches[0][:, :, DST[:3]], full[:, :, SRC[:3]])
    reader.shutdown()


def test_freed_staging_buffers_are_unmapped_and_new_ones_mapped(tmp_path, full):
    """Trimming the staging pool tells the child to drop those buffers; the next save maps
    its new buffer and lands."""
    ranks = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    worker = ranks.workers[0]
    save(ranks, "a", TOKENS, SRC, step=0)
    mapped = set(worker.shard.process._mapped)
    assert mapped
    worker.shard.xfer.host_pool.trim()
    assert not worker.shard.process._mapped & mapped
    save(ranks, "b", [t + 1000 for t in TOKENS], SRC, step=2)
    assert worker.stats["blocks_saved"] == 6 and worker.shard.process.alive
    ranks.shutdown()


def test_writer_process_exits_with_its_parent(tmp_path):
    """A parent that dies without shutting down (killed) leaves no writer process behind:
    the child sees its socket close and exits."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from kvdist.connectors.disk.writer_process import WriterProcess
        w = WriterProcess(1, "test-writer")
        print(w.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail(f"writer process {child} outlived its parent")
    finally:
        parent.kill()
        parent.wait(30)


def test_shared_staging_buffers():
    """A shared pool's leases carry their buffer (mappable elsewhere, here by its fd in
    /proc): what one mapping writes the other reads."""
    import mmap

    pool = HostBufferPool(pin=False, shared=True)
    lease = pool.acquire((4, 8), torch.float32)
    assert lease.shared is not None and lease.shared.size >= lease.tensor.numel() * 4
    lease.tensor.copy_(torch.arange(32, dtype=torch.float32).view(4, 8))
    with open(f"/proc/self/fd/{lease.shared.fd}", "r+b") as f:
        other = mmap.mmap(f.fileno(), lease.shared.size)
    assert torch.equal(
        torch.frombuffer(other, dtype=torch.float32, count=32).view(4, 8), lease.tensor
    )
    lease.release()
    freed = []
    pool.on_free = freed.append
    pool.trim()
    assert freed == [lease.shared.buf_id] and lease.shared.fd == -1
    plain = HostBufferPool(pin=False).acquire((2,), torch.float32)
    assert plain.shared is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shared_staging_buffers_are_pinned_and_reregistered_on_cuda():
    """On CUDA, shared buffers are page-locked; buffers freed by `trim` or dropped with
    their pool are unregistered first, so new buffers (often at the same addresses) are
    pinned too, and kernels after them run (a failed registration left as CUDA's last
    error would fail the next kernel)."""
    import gc

    for round_ in range(3):
        pool = HostBufferPool(pin=True, shared=True)
        lease = pool.acquire((64, 1024), torch.float32)
        assert lease.shared.pinned and lease.tensor.is_pinned(), round_
        src = torch.arange(64 * 1024, dtype=torch.float32, device="cuda").view(64, 1024)
        lease.tensor.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(lease.tensor, src.cpu())
        lease.release()
        if round_ == 0:
            pool.trim()
        del lease, pool
        gc.collect()
    assert torch.zeros(4, device="cuda").sum().item() == 0


def test_a_task_failing_before_its_buffer_was_mapped_does_not_strand_later_ones(tmp_path):
    """The first write on a buffer fails before it is sent (its copy wait raises), so the
    buffer's map message never reaches the child. Later tasks on that buffer send it again
    and land; and a task the child cannot run (here: a buffer it never mapped) is still
    answered, as not run (None: its caller runs it itself), instead of leaving its caller
    waiting or failing every block."""
    from kvdist.connectors.disk.record import RecordHeader
    from kvdist.connectors.disk.store import block_dir as bdir_of

    pool = HostBufferPool(pin=False, shared=True)
    lease = pool.acquire((2, 64), torch.uint8)
    lease.tensor.copy_(torch.arange(128, dtype=torch.uint8).view(2, 64))
    header = RecordHeader(
        key=b"", ns=b"n" * 8, dtype="uint8", num_layers=1, block_size=1, num_kv_heads=1,
        head_start=0, head_end=1, head_dim=64 // 2,
    )  # fmt: skip
    outcomes: dict[str, tuple] = {}
    got = threading.Event()

    def done(tag, expected):
        def cb(rows, error, seconds):
            outcomes[tag] = (rows, error)
            if len(outcomes) == expected:
                got.set()

        return cb

    def broken_wait():
        raise RuntimeError("the device copy failed")

    w = writer_mod.WriterProcess(1, "test-writer")
    try:
        keys = [bytes([i]) * 16 for i in range(2)]
        w.write(lease.shared, 64, [0], keys[:1], header, str(tmp_path), "r.kvb",
                fsync=False, wait=broken_wait, done=done("first", 3))  # fmt: skip
        w.write(lease.shared, 64, [1], keys[1:], header, str(tmp_path), "r.kvb",
                fsync=False, wait=lambda: None, done=done("second", 3))  # fmt: skip
        unmapped = type("Buf", (), {"buf_id": 10**6, "size": 64, "fd": lease.shared.fd})()
        w._mapped.add(unmapped.buf_id)  # as if its map had been sent: the child lacks it
        w.read(unmapped, 64, [0], [os.path.join(tmp_path, "x")], keys[:1], header,
               done=done("read", 3))  # fmt: skip
        assert got.wait(30), outcomes
    finally:
        w.shutdown()
    assert outcomes["first"][0] is None and "device copy failed" in outcomes["first"][1]
    assert outcomes["second"][0][0] > 0, outcomes["second"]
    assert os.path.exists(os.path.join(bdir_of(str(tmp_path), keys[1]), "r.kvb"))
    assert outcomes["read"][0] is None and "never mapped" in outcomes["read"][1], outcomes


def test_a_block_directory_that_cannot_be_listed_is_a_miss(tmp_path, monkeypatch, caplog):
    """An error other than "not found" listing a block (ESTALE on NFS, EACCES) makes it a
    miss, logged once, instead of an exception out of the hit lookup on rank 0."""
    from kvdist.connectors.disk import store

    real = os.listdir

    def stale(path):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path)

    monkeypatch.setattr(store.os, "listdir", stale)
    monkeypatch.setattr(store, "_list_errors", [])
    with caplog.at_level(logging.WARNING):
        assert store.list_records(str(tmp_path / "aa" / "bb")) == []
        assert store.list_records(str(tmp_path / "cc" / "dd")) == []
    assert sum("cannot list" in r.message for r in caplog.records) == 1


def test_fsync_makes_new_block_directories_durable(tmp_path, monkeypatch):
    """With fsync, creating a block's directories also syncs the directories that now name
    them (the record's own fsync covers the file and its block directory only)."""
    synced: list[str] = []
    monkeypatch.setattr(writer_mod, "fsync_dir", synced.append)
    ns = tmp_path / "ns"
    ns.mkdir()
    writer_mod.make_block_dir(str(ns / "ab" / "abcd"), fsync=True)
    assert sorted(synced) == sorted([str(ns), str(ns / "ab")])
    synced.clear()
    writer_mod.make_block_dir(str(ns / "ab" / "abef"), fsync=True)
    assert synced == [str(ns / "ab")]
    synced.clear()
    writer_mod.make_block_dir(str(ns / "ab" / "abef"), fsync=True)  # exists: nothing new
    writer_mod.make_block_dir(str(ns / "cd" / "cdef"))  # no fsync asked
    assert synced == []


@pytest.mark.parametrize(
    "staging,device",
    [
        pytest.param(1 << 20, "cuda", marks=[pytest.mark.gpu, CUDA]),
        pytest.param(0, "cuda", marks=[pytest.mark.gpu, CUDA]),
        (1 << 20, "cpu"),
    ],
)
def test_staging_is_reserved_when_the_cache_is_registered(tmp_path, full, staging, device):
    """`staging_bytes` on a GPU: pinned buffers allocated at registration, one for saves
    and the four loads read through (and mapped in the IO process then), which a save and
    a load of up to that size use, allocating nothing in the step; 0 allocates on first
    use. On the CPU nothing is reserved (host memory costs nothing until touched)."""
    full = full.to(device)
    ranks = SimulatedRanks(disk(tmp_path, staging_bytes=staging), 1, full, fill=True, device=device)
    worker = ranks.workers[0]
    pools = [worker.shard.xfer.host_pool, worker.shard.load_buffers().pool]
    reserved = [p.allocations for p in pools]
    assert reserved == ([1, 4] if staging and device == "cuda" else [0, 0])
    assert worker.stats["staging_allocations"] == sum(reserved)
    for p in pools:
        assert {b.buf_id for b in p.shared_buffers()} <= worker.shard.process._mapped
    save(ranks, "a", TOKENS, SRC, step=0)
    assert load(ranks, "b", TOKENS, DST, step=5) == (12, set())
    after = [p.allocations for p in pools]
    if staging and device == "cuda":
        assert after == reserved
    else:
        assert after[0] > 0 and after[1] > 0, after
    ranks.shutdown()


def test_staging_bytes_must_be_a_size(tmp_path):
    from kvdist.connectors import create_connector
    from kvdist.connectors.testing import tp_context

    for bad in (-1, 1.5, True, "lots"):
        with pytest.raises(ValueError, match="staging_bytes"):
            create_connector(disk(tmp_path, staging_bytes=bad), tp_context(0, 1))
    _, worker = create_connector(disk(tmp_path, staging_bytes="1M"), tp_context(0, 1))
    assert worker.settings.staging_bytes == 1 << 20  # a unit is a size
    worker.shutdown()


def _one_row_buffer():
    """A shared staging buffer of one 64-byte row (the pool, kept alive, and its lease),
    and the header of a record of it."""
    from kvdist.connectors.disk.record import RecordHeader

    pool = HostBufferPool(pin=False, shared=True)
    lease = pool.acquire((1, 64), torch.uint8)
    header = RecordHeader(
        key=b"", ns=b"n" * 8, dtype="uint8", num_layers=1, block_size=1, num_kv_heads=1,
        head_start=0, head_end=1, head_dim=64 // 2,
    )  # fmt: skip
    return pool, lease, header


def test_a_failing_completion_callback_does_not_end_the_io_process(tmp_path):
    """A task's `done` callback raising is the caller's problem: the parent logs it and
    keeps taking answers, and the IO process stays in use (before, the receiver took it
    for a malformed answer and gave the live process up as dead)."""
    _pool, lease, header = _one_row_buffer()
    answered = threading.Event()

    def raising(*args):
        raise RuntimeError("a bug in the caller's callback")

    w = writer_mod.WriterProcess(1, "test-writer")
    try:
        missing = [os.path.join(tmp_path, "nope")]
        w.read(lease.shared, 64, [0], missing, [b"k" * 16], header, done=raising)
        w.read(lease.shared, 64, [0], missing, [b"k" * 16], header,
               done=lambda *a: answered.set())  # fmt: skip
        assert answered.wait(30)
        assert w.alive
    finally:
        w.shutdown()


def test_max_save_backlog_bytes_must_be_a_size(tmp_path):
    from kvdist.connectors import create_connector
    from kvdist.connectors.testing import tp_context

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_save_backlog_bytes"):
            create_connector(disk(tmp_path, max_save_backlog_bytes=bad), tp_context(0, 1))


def test_a_buffer_unmapped_while_a_slice_of_it_lives_is_closed_later():
    """The parent unmaps a staging buffer while an IO thread of the child still holds a
    slice of it (it answered an instant before dropping it): the child must not die
    (mm.close() raises BufferError then, and a dead child loses every write in flight),
    and closes the map later (at a later message, or as it exits), once the slice is
    gone."""
    import socket

    import msgpack

    parent, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = writer_mod._Child(child_sock, 1, "test-io")
    serving = threading.Thread(target=child.serve, daemon=True)
    serving.start()
    fd = os.memfd_create("kvdist-test")
    os.ftruncate(fd, 4096)
    socket.send_fds(parent, [msgpack.packb(["map", 7, 4096])], [fd])
    os.close(fd)
    deadline = time.monotonic() + 10
    while 7 not in child.maps:
        assert time.monotonic() < deadline, "the map never arrived"
        time.sleep(0.01)
    mm, view = child.maps[7]
    held = view[0:64]  # what an IO thread would still hold
    parent.send(msgpack.packb(["unmap", 7]))
    while 7 in child.maps:
        assert time.monotonic() < deadline, "the unmap never arrived"
        time.sleep(0.01)
    assert serving.is_alive(), "the child died unmapping an exported buffer"
    assert not mm.closed
    held.release()
    parent.close()  # the child's last step: it closes what is left
    serving.join(10)
    assert not serving.is_alive()
    assert mm.closed and child._closing == []


def test_the_io_process_is_out_of_reach_of_a_terminals_ctrl_c() -> None:
    """The IO process runs in a session of its own, so a Ctrl-C (SIGINT to the terminal's
    foreground process group) never reaches it: it used to, and one that came while the
    process still imported its modules ended it with a KeyboardInterrupt traceback. It
    still ends when its parent closes the socket."""
    from kvdist.connectors.disk.writer_process import WriterProcess

    w = WriterProcess(1, "test-writer")
    try:
        assert os.getsid(w.pid) == w.pid != os.getsid(0)
        assert os.getpgid(w.pid) != os.getpgid(0)
    finally:
        w.shutdown()
    assert w._proc.poll() is not None


def test_the_io_process_imports_this_kvdist_from_any_working_directory(tmp_path, monkeypatch):
    """Started from a directory holding another `kvdist` (a checkout of another version),
    the IO process still runs this one: `python -m` put the working directory first on
    its path, and the other tree's module failed on this one's arguments (the engine fell
    back to its IO threads)."""
    other = tmp_path / "kvdist"
    other.mkdir()
    (other / "__init__.py").write_text("raise ImportError('the other checkout')\n")
    monkeypatch.chdir(tmp_path)
    _pool, lease, header = _one_row_buffer()
    answers: list[list[int] | None] = []
    answered = threading.Event()

    def done(rows, error, seconds):
        answers.append(rows)
        answered.set()

    w = writer_mod.WriterProcess(1, "test-writer")
    try:
        w.read(lease.shared, 64, [0], [str(tmp_path / "nope")], [b"k" * 16], header, done=done)
        assert answered.wait(30)
        assert answers == [[writer_mod.MISSING]] and w.alive  # None: the process was gone
    finally:
        w.shutdown()


@pytest.mark.parametrize("link_error", [errno.EPERM, errno.EACCES, errno.EOPNOTSUPP])
def test_a_record_is_written_where_the_filesystem_has_no_hard_links(
    tmp_path, monkeypatch, link_error
) -> None:
    """A record is published by `link` (which tells which of two writers created it),
    falling back to `replace` wherever `link` fails otherwise: FAT, network and FUSE
    filesystems refuse links with different errors (EACCES failed every save); the
    second writer of a name is told the record was there."""
    from kvdist.connectors.disk.record import RecordHeader, read_record, write_record

    header = RecordHeader(
        key=b"k" * 16, ns=b"n" * 8, dtype="uint8", num_layers=1, block_size=1,
        num_kv_heads=1, head_start=0, head_end=1, head_dim=32,
    )  # fmt: skip
    payload = memoryview(bytes(range(64)))
    assert write_record(str(tmp_path), "r.kvb", header, payload, fsync=False).created
    assert not write_record(str(tmp_path), "r.kvb", header, payload, fsync=False).created

    def no_links(src, dst):
        raise OSError(link_error, os.strerror(link_error))

    monkeypatch.setattr(record_mod.os, "link", no_links)
    written = write_record(str(tmp_path), "s.kvb", header, payload, fsync=False)
    assert written.created and written.nbytes > 64
    assert sorted(os.listdir(tmp_path)) == ["r.kvb", "s.kvb"]  # no temporary file left
    assert bytes(read_record(str(tmp_path / "s.kvb"), header)[1]) == bytes(payload)
