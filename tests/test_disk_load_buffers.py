"""The disk connector's loads through a fixed set of host buffers: loads larger than a
buffer go through in turns, loads beyond the buffers wait for one, and host memory for
loads never grows past them, with the IO process and with threads."""

from __future__ import annotations

import os

import pytest
import torch
from test_disk_writer_process import disk, save

from kvdist.api.types import SchedulerOutput
from kvdist.connectors.disk.store import block_dir
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
    # Again: the buffers are reused, none allocated.
    before = worker.shard.load_buffers().pool.allocations
    reader.caches[0].zero_()
    assert load_all(reader, 3, step=60) == set()
    assert torch.equal(reader.caches[0][:, :, dst_of(2)], full[:, :, src_of(2)])
    assert worker.shard.load_buffers().pool.allocations == before
    reader.shutdown()


@pytest.mark.parametrize("writer_process", [True, False], ids=["io_process", "threads"])
def test_a_corrupt_block_ends_the_load_there_across_chunks(tmp_path, full, writer_process):
    """Block 3 of a 6-block load (the second chunk's second block) is corrupt: blocks 0-2
    land, block 3 never reaches the cache, and 3-5 are load errors, whatever order the
    chunks finish in. A failure means a chunk after the bad block was reported loaded, or
    a corrupt block was copied to the device."""
    (req,) = saved(tmp_path, full, 1)
    bdir = block_dir(req_ns_dir(tmp_path), req.block_hashes[3])
    (name,) = os.listdir(bdir)
    with open(os.path.join(bdir, name), "r+b") as f:
        f.seek(-10, os.SEEK_END)
        b = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
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
