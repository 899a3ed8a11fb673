"""The disk connector's loads through a fixed set of host buffers: loads larger than a
buffer go through in turns, loads beyond the buffers wait for one, and host memory for
loads never grows past them, with the IO process and with threads."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
from test_disk_writer_process import corrupt_block, disk, save

from kvdist.api.types import SchedulerOutput
from kvdist.connectors.disk import loads as loads_mod
from kvdist.connectors.testing import SimulatedRanks, make_request

BS = 4
BLOCKS = 6  # full blocks per request
ROWS = 2  # block rows per load buffer in these tests: a request takes 3 chunks


def tokens_of(i: int) -> list[int]:
    return [1000 * (i + 1) + t for t in range(BLOCKS * BS + 1)]


def src_of(i: int) -> list[int]:
    return list(range(BLOCKS * i, BLOCKS * (i + 1)))


def dst_of(i: int) -> list[int]:
    return [31 - b for b in src_of(i)]


def saved(tmp_path, full, requests: int) -> list:
    writer = SimulatedRanks(disk(tmp_path), 1, full, fill=True)
    reqs = [save(writer, f"w{i}", tokens_of(i), src_of(i), step=2 * i) for i in range(requests)]
    writer.shutdown()
    return reqs


def reader_with_small_buffers(tmp_path, full, **kw) -> SimulatedRanks:
    block_bytes = full[:, :, 0].numel() * full.element_size()
    return SimulatedRanks(disk(tmp_path, staging_bytes=4 * ROWS * block_bytes, **kw), 1, full)


def load_all(ranks: SimulatedRanks, requests: int, step: int = 50) -> set[int]:
    """Start every request's load in one step; return the load errors once all are over."""
    ids = []
    for i in range(requests):
        req = make_request(f"r{i}", tokens_of(i), ranks.ctx)
        n, is_async = ranks.scheduler.get_num_new_matched_tokens(req, 0)
        assert (n, is_async) == (BLOCKS * BS, True)
        ranks.scheduler.update_state_after_alloc(req, dst_of(i), n)
        ids.append(req.request_id)
    ranks.step(SchedulerOutput(step=step))
    return ranks.wait(started=ids, timeout_s=60)


@pytest.mark.parametrize("writer_process", [True, False], ids=["io_process", "threads"])
def test_loads_beyond_the_buffers_wait_for_them_and_land_whole(tmp_path, full, writer_process):
    """Three loads of 3 chunks each, at once, through 4 buffers of 2 blocks: every block of
    every request lands equal to the saved one, and loads allocated 4 buffers at most. A
    failure means chunks overwrote each other's buffers, a queued chunk never started (the
    wait times out) or loads grew host memory past their budget."""
    saved(tmp_path, full, 3)
    reader = reader_with_small_buffers(tmp_path, full, writer_process=writer_process)
    worker = reader.workers[0]
    assert worker.shard.load_buffers().rows == ROWS
    assert load_all(reader, 3) == set()
    for i in range(3):
        assert torch.equal(reader.caches[0][:, :, dst_of(i)], full[:, :, src_of(i)]), i
    assert worker.stats["blocks_loaded"] == 3 * BLOCKS
    assert worker.shard.load_buffers().pool.allocations <= 4
    # Again: the buffers are reused, still no more than four (the first round may have
    # needed fewer at once).
    reader.caches[0].zero_()
    assert load_all(reader, 3, step=60) == set()
    assert torch.equal(reader.caches[0][:, :, dst_of(2)], full[:, :, src_of(2)])
    assert worker.shard.load_buffers().pool.allocations <= 4
    reader.shutdown()


@pytest.mark.parametrize("writer_process", [True, False], ids=["io_process", "threads"])
def test_a_corrupt_block_ends_the_load_there_across_chunks(tmp_path, full, writer_process):
    """Block 3 of a 6-block load (the second chunk's second block) is corrupt: blocks 0-2
    land, block 3 never reaches the cache, and 3-5 are load errors, whatever order the
    chunks finish in. A failure means a chunk after the bad block was reported loaded, or
    a corrupt block was copied to the device."""
    (req,) = saved(tmp_path, full, 1)
    corrupt_block(req_ns_dir(tmp_path), req.block_hashes[3])
    reader = reader_with_small_buffers(tmp_path, full, writer_process=writer_process)
    dst = dst_of(0)
    before = reader.caches[0][:, :, dst[3]].clone()
    assert load_all(reader, 1) == set(dst[3:])
    assert torch.equal(reader.caches[0][:, :, dst[:3]], full[:, :, src_of(0)[:3]])
    assert torch.equal(reader.caches[0][:, :, dst[3]], before)
    stats = reader.workers[0].stats
    assert (stats["blocks_loaded"], stats["load_failures"]) == (3, 3)
    reader.shutdown()


def req_ns_dir(tmp_path) -> str:
    (ns,) = [d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)]
    return str(tmp_path / ns)


def test_a_buffer_that_cannot_be_allocated_fails_its_blocks_only(tmp_path, full, monkeypatch):
    """Allocating the second chunk's buffer fails (host memory exhausted): the load ends
    with blocks 2-5 as load errors rather than hanging, blocks 0-1 land, the claim is given
    back, and the next load lands whole. A failure means a lost buffer claim (later loads
    wait forever) or a load that never ends."""
    saved(tmp_path, full, 1)
    reader = reader_with_small_buffers(tmp_path, full)
    buffers = reader.workers[0].shard.load_buffers()
    real, calls = buffers.pool.acquire, []

    def second_fails(*args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("cannot pin host memory")
        return real(*args)

    monkeypatch.setattr(buffers.pool, "acquire", second_fails)
    dst = dst_of(0)
    assert load_all(reader, 1) == set(dst[2:])
    assert torch.equal(reader.caches[0][:, :, dst[:2]], full[:, :, src_of(0)[:2]])
    monkeypatch.undo()
    reader.caches[0].zero_()
    assert load_all(reader, 1, step=60) == set()
    assert torch.equal(reader.caches[0][:, :, dst], full[:, :, src_of(0)])
    assert buffers._out == 0
    reader.shutdown()


def test_shutdown_with_loads_queued_ends_them_and_frees_every_buffer(tmp_path, full, monkeypatch):
    """Reads are slow and three loads of three chunks wait for four buffers when the worker
    shuts down: the chunks still queued fail, those reading finish, every job ends, every
    buffer comes back and is freed. A failure means a chunk started after the IO threads
    stopped, keeping its buffer (and its job) forever."""
    saved(tmp_path, full, 3)
    reader = reader_with_small_buffers(tmp_path, full, writer_process=False)
    worker = reader.workers[0]
    loader, buffers = worker._loader, worker.shard.load_buffers()
    real = loads_mod.DiskLoader._read_blocks

    def slow(self, *args):
        time.sleep(0.2)
        return real(self, *args)

    monkeypatch.setattr(loads_mod.DiskLoader, "_read_blocks", slow)
    for i in range(3):
        req = make_request(f"r{i}", tokens_of(i), reader.ctx)
        n, _ = reader.scheduler.get_num_new_matched_tokens(req, 0)
        reader.scheduler.update_state_after_alloc(req, dst_of(i), n)
    reader.step(SchedulerOutput(step=50))
    assert loader._queue, "nothing was queued: the test does not cover shutdown with a queue"
    pool = buffers.pool
    reader.shutdown()
    assert buffers._out == 0
    assert all(job.failed is not None for job in loader._jobs.values()), loader._jobs
    assert pool.allocated_bytes == 0


def test_a_map_message_that_fails_to_send_is_sent_again(tmp_path, full, monkeypatch):
    """Sending a load buffer's map to the IO process fails once: that load's tasks run on
    this process's threads instead, and later loads through the buffer land too (before,
    the buffer stayed marked as mapped, and every later task on it failed in the child)."""
    saved(tmp_path, full, 3)
    reader = reader_with_small_buffers(tmp_path, full)
    real, calls = socket.send_fds, []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(105, "No buffer space available")
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "send_fds", first_fails)
    here, real_read = [], loads_mod.DiskLoader._read_blocks

    def counted(self, *args):
        here.append(1)
        return real_read(self, *args)

    monkeypatch.setattr(loads_mod.DiskLoader, "_read_blocks", counted)
    for step in (50, 60, 70):
        here.clear()
        reader.caches[0].zero_()
        assert load_all(reader, 3, step=step) == set(), step
        for i in range(3):
            assert torch.equal(reader.caches[0][:, :, dst_of(i)], full[:, :, src_of(i)]), step
        if step > 50:  # the map went out again: the IO process reads everything
            assert not here, (step, len(here))
    assert reader.workers[0].shard.process.alive
    reader.shutdown()


def test_load_buffers_are_allocated_at_their_size(tmp_path, full):
    """Three rows per buffer (not a power of two of bytes): the four load buffers take
    exactly `staging_bytes`, not rounded up (a 300 MiB budget used to take 512 MiB)."""
    saved(tmp_path, full, 1)
    block_bytes = full[:, :, 0].numel() * full.element_size()
    reader = SimulatedRanks(disk(tmp_path, staging_bytes=4 * 3 * block_bytes), 1, full)
    buffers = reader.workers[0].shard.load_buffers()
    assert buffers.rows == 3
    assert load_all(reader, 1) == set()
    assert buffers.pool.allocated_bytes == buffers.pool.allocations * 3 * block_bytes
    reader.shutdown()


def test_load_buffers_grow_with_the_loads(tmp_path, full):
    """Buffers of up to 8 rows: a load of one block allocates one row, not a whole buffer
    (on the CPU nothing is reserved, and the IO process faults in every page it maps); a
    load of six then gets a buffer of 8 rows. Loads never hold more than `staging_bytes`.
    A failure means small loads pay for full buffers (the 2-rank demo's TTFT tripled), or
    replaced buffers were not freed."""
    saved(tmp_path, full, 1)
    block_bytes = full[:, :, 0].numel() * full.element_size()
    budget = 4 * 8 * block_bytes
    reader = SimulatedRanks(disk(tmp_path, staging_bytes=budget), 1, full)
    buffers = reader.workers[0].shard.load_buffers()
    pool = buffers.pool
    req = make_request("one", tokens_of(0)[: BS + 1], reader.ctx)
    n, _ = reader.scheduler.get_num_new_matched_tokens(req, 0)
    assert n == BS
    reader.scheduler.update_state_after_alloc(req, [20, 21], n)
    reader.step(SchedulerOutput(step=50))
    assert reader.wait(started={"one"}, timeout_s=60) == set()
    assert torch.equal(reader.caches[0][:, :, 20], full[:, :, src_of(0)[0]])
    assert pool.allocated_bytes == block_bytes
    assert load_all(reader, 1, step=60) == set()
    assert torch.equal(reader.caches[0][:, :, dst_of(0)], full[:, :, src_of(0)])
    assert pool.allocated_bytes <= budget and buffers._held <= 4
    reader.shutdown()
    assert pool.allocated_bytes == 0
