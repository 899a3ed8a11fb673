"""The data plane (`kvdist.kv.transfer`, `kvdist.kv.pinned`) on the CPU: batched gathers and
scatters between the paged KV cache and host rows, against plain indexing."""

from __future__ import annotations

import pytest
import torch
from devices import CUDA, DEVICES

from kvdist.kv.pinned import HostBufferPool
from kvdist.kv.transfer import (
    PIPELINE_CHUNKS,
    PIPELINE_MIN_ROWS,
    BlockTransfer,
    load_blocks_naive,
    pipeline_chunks,
    row_runs,
    save_blocks_naive,
)


def _kv(dtype=torch.float32, blocks=12, seed=0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((3, 2, blocks, 4, 2, 8), generator=g).to(dtype).to(device)


def _ref(kv: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Blocks `ids` in the host layout, built with plain indexing (on the CPU)."""
    return torch.stack([kv[:, :, b] for b in ids]).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_gathers_scattered_blocks(dtype, device):
    """A save of scattered blocks (some layers gathered early, the rest at commit) fills host
    rows 0..n-1 with exactly those blocks; a failure means the gather/permute is wrong."""
    kv = _kv(dtype, device=device)
    x = BlockTransfer(kv)
    lease = x.host_buffer(5)
    assert lease.tensor.is_pinned() == (device == "cuda")
    ids = [9, 0, 4, 11, 2]
    batch = x.save(ids, lease.tensor)
    batch.gather_layer(2)
    batch.gather_layer(0)
    batch.commit()
    batch.synchronize()
    assert batch.done()
    assert torch.equal(lease.tensor, _ref(kv, ids))
    lease.release()


def test_layer_gather_captures_the_layer_when_called():
    """`gather_layer(i)` copies layer i at that moment (the engine may move on to the next
    layer); a failure means layer-wise saves read blocks later than promised."""
    kv = _kv()
    x = BlockTransfer(kv)
    host = torch.empty((2, *x.block_shape))
    batch = x.save([3, 5], host)
    batch.gather_layer(0)
    before = kv[0, :, [3, 5]].clone()
    kv[0].add_(1.0)  # written after the gather: must not be in the saved copy
    batch.commit()
    assert torch.equal(host[:, 0], before.transpose(0, 1))
    assert torch.equal(host[:, 1:], _ref(kv, [3, 5])[:, 1:])


@pytest.mark.parametrize("layer_first", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_rows_round_trip_through_a_slot_pool(device, layer_first):
    """Blocks saved to arbitrary pool rows (a cpu-connector pool), with one layer gathered
    on its own first or all of them by `commit` in one batch (what the connectors do), and
    loaded back into other device blocks equal the originals, and other device blocks are
    untouched."""
    kv = _kv(device=device)
    x = BlockTransfer(kv)
    pool = torch.zeros((8, *x.block_shape), pin_memory=device == "cuda")
    ids, rows = [1, 7, 3, 10], [6, 2, 3, 0]
    batch = x.save(ids, pool, rows)
    if layer_first:
        batch.gather_layer(1)
    batch.commit()
    batch.synchronize()
    for b, r in zip(ids, rows):
        assert torch.equal(pool[r], kv[:, :, b].cpu())
    kv2 = torch.full_like(kv, -7.0)
    y = BlockTransfer(kv2)
    for per_layer in (False, True):
        load = y.load([0, 5, 8, 11], pool, rows)
        load.start(per_layer=per_layer)
        load.wait_layer(0)
        load.wait()
        load.synchronize()
        assert load.done()
        for b_src, b_dst in zip(ids, [0, 5, 8, 11]):
            assert torch.equal(kv2[:, :, b_dst], kv[:, :, b_src])
        assert torch.all(kv2[:, :, [1, 2, 3, 4, 6, 7, 9, 10]] == -7.0)


@pytest.mark.parametrize("device", DEVICES)
def test_naive_paths_match_batched(device):
    """The one-copy-per-fragment baseline moves the same bytes as the batched path (so the
    benchmark compares like with like)."""
    kv = _kv(device=device)
    ids = [4, 2, 9]
    host = torch.empty((3, *BlockTransfer(kv).block_shape), pin_memory=device == "cuda")
    save_blocks_naive(kv, ids, host)
    assert torch.equal(host, _ref(kv, ids))
    kv2 = torch.zeros_like(kv)
    load_blocks_naive(kv2, [0, 1, 2], host)
    assert torch.equal(kv2[:, :, :3].cpu(), _ref(kv, ids).permute(1, 2, 0, 3, 4, 5))


@pytest.mark.parametrize("n", [0, 1, 31, 32, 100, 512, 4096])
def test_pipeline_chunks_cover_the_batch_in_order(n):
    """Chunks tile [0, n) in order, at most PIPELINE_CHUNKS, a small first one when split;
    a failure means blocks skipped or moved twice."""
    chunks = pipeline_chunks(n)
    if n == 0:
        assert chunks == []
        return
    assert [a for a, _ in chunks] == [0] + [b for _, b in chunks[:-1]]
    assert chunks[-1][1] == n
    assert len(chunks) <= PIPELINE_CHUNKS
    if len(chunks) > 1:
        sizes = [b - a for a, b in chunks]
        assert sizes[0] <= min(sizes[1:]) and min(sizes[1:]) >= PIPELINE_MIN_ROWS


@pytest.mark.parametrize("device", DEVICES)
def test_large_batches_round_trip_through_the_pipeline(device):
    """Enough blocks for several pipeline chunks, saved and loaded back into other blocks."""
    kv = _kv(torch.bfloat16, blocks=300, device=device)
    x = BlockTransfer(kv)
    ids = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:140].tolist()
    assert len(pipeline_chunks(len(ids))) > 2
    lease = x.host_buffer(len(ids))
    for _ in range(3):  # reused id upload buffers must not leak one batch's ids into another
        batch = x.save(ids, lease.tensor)
        batch.commit()
        batch.synchronize()
        assert torch.equal(lease.tensor, _ref(kv, ids))
    back = torch.zeros_like(kv)
    y = BlockTransfer(back)
    load = y.load(ids[::-1], lease.tensor)
    load.start()
    load.synchronize()
    assert torch.equal(back[:, :, ids[::-1]].cpu(), kv[:, :, ids].cpu())
    lease.release()


def test_row_runs():
    """Consecutive rows are merged into one copy; a failure means extra or wrong copies."""
    assert row_runs([]) == []
    assert row_runs([3, 4, 5, 9, 1, 2]) == [(0, 3, 3), (3, 9, 1), (4, 1, 2)]
    assert row_runs([5, 4]) == [(0, 5, 1), (1, 4, 1)]


def test_empty_batches_are_no_ops():
    """Zero blocks: nothing moves, nothing fails, both report done."""
    kv = _kv()
    x = BlockTransfer(kv)
    lease = x.host_buffer(0)
    save = x.save([], lease.tensor)
    save.commit()
    load = x.load([], lease.tensor)
    load.start()
    assert save.done() and load.done()


def test_bad_arguments_are_rejected():
    """Out-of-range ids (a fatal device assert on CUDA), duplicate load targets, and host
    buffers of the wrong shape or dtype raise ValueError before any copy."""
    kv = _kv()
    x = BlockTransfer(kv)
    host = torch.empty((4, *x.block_shape))
    with pytest.raises(ValueError, match="block ids"):
        x.save([12], host)
    with pytest.raises(ValueError, match="block ids"):
        x.load([-1], host)
    with pytest.raises(ValueError, match="same device block"):
        x.load([1, 1], host)
    with pytest.raises(ValueError, match="shape"):
        x.save([1], torch.empty((4, 3, 2, 4, 2, 9)))
    with pytest.raises(ValueError, match="dtype"):
        x.save([1], host.to(torch.float64))
    with pytest.raises(ValueError, match="host rows"):
        x.save([1, 2], host, [0, 9])
    with pytest.raises(ValueError, match="fit"):
        x.save(list(range(5)), host)
    with pytest.raises(ValueError, match="num_layers"):
        BlockTransfer(torch.empty(3, 4))


def test_host_pool_reuses_and_grows():
    """Leases reuse released buffers (no allocation per step) and the pool grows only when a
    larger buffer is needed; a failure means pinned memory is allocated every step."""
    pool = HostBufferPool(pin=False)
    a = pool.acquire((4, 1000), torch.float32)
    ptr = a.tensor.data_ptr()
    a.release()
    a.release()  # idempotent
    b = pool.acquire((2, 1000), torch.float32)
    assert b.tensor.data_ptr() == ptr and pool.allocations == 1
    c = pool.acquire((2, 1000), torch.float32)  # b still leased: a second buffer
    assert pool.allocations == 2 and c.tensor.data_ptr() != ptr
    b.release()
    c.release()
    big = pool.acquire((1 << 20,), torch.float32)  # 4 MiB > the 1 MiB buffers
    assert pool.allocations == 3 and big.tensor.shape == (1 << 20,)
    big.release()
    pool.trim()
    assert pool.allocated_bytes == 0


def test_host_pool_picks_the_smallest_fitting_buffer_among_several():
    """With buffers of several sizes idle, a lease takes the smallest that fits, wherever it
    sits in the free list. A failure (a crash comparing buffers, as an 8B run on a GPU hit)
    means a second load of another size takes the engine down."""
    pool = HostBufferPool(pin=False)
    leases = [pool.acquire((n,), torch.uint8) for n in (8 << 20, 1 << 20, 2 << 20)]
    ptrs = [lease.tensor.data_ptr() for lease in leases]
    for lease in leases:
        lease.release()
    mid = pool.acquire((3 << 19,), torch.uint8)  # 1.5 MiB: the 2 MiB buffer, third in line
    assert mid.tensor.data_ptr() == ptrs[2] and pool.allocations == 3
    small = pool.acquire((1 << 10,), torch.uint8)
    assert small.tensor.data_ptr() == ptrs[1]


def _busy(stream: torch.cuda.Stream) -> None:
    """Queue ~tens of ms of work on `stream`, so that work queued after it runs late."""
    with torch.cuda.stream(stream):
        a = torch.randn(2048, 2048, device="cuda")
        for _ in range(40):
            a = torch.tanh(a @ a)


@pytest.mark.gpu
@CUDA
def test_cuda_save_waits_for_the_layer_that_wrote_the_blocks():
    """The gather runs on a side stream but after the compute stream's earlier work: a block
    written by a slow compute stream is saved with the new values. A failure means saves
    race the model and store stale KV."""
    kv = torch.zeros((3, 2, 8, 16, 2, 64), device="cuda")
    x = BlockTransfer(kv)
    compute = torch.cuda.Stream()
    lease = x.host_buffer(2)
    for _ in range(3):
        _busy(compute)
        with torch.cuda.stream(compute):
            kv[:, :, 3] = 1.0
            kv[:, :, 5] = 2.0
        batch = x.save([3, 5], lease.tensor)
        for layer in range(3):
            batch.gather_layer(layer, compute)
        batch.commit(compute)
        batch.release_blocks(compute)
        with torch.cuda.stream(compute):
            kv.zero_()  # the engine reuses the blocks: must not reach the saved copy
        batch.wait(compute)  # a stream can wait for the host copy instead of the thread
        compute.synchronize()
        assert batch.done()
        assert torch.all(lease.tensor[0] == 1.0) and torch.all(lease.tensor[1] == 2.0)
        torch.cuda.synchronize()
    lease.release()


@pytest.mark.gpu
@CUDA
def test_cuda_load_is_ordered_both_ways():
    """A load's scatter waits for the compute stream's earlier work on the blocks (which
    could otherwise overwrite the loaded data), and a consumer that waits on the layer event
    sees the loaded values. A failure means loads race the model."""
    kv = torch.zeros((3, 2, 8, 16, 2, 64), device="cuda")
    x = BlockTransfer(kv)
    compute = torch.cuda.Stream()
    host = torch.full((2, *x.block_shape), 5.0, pin_memory=True)
    for _ in range(3):
        _busy(compute)
        with torch.cuda.stream(compute):
            kv[:, :, 4] = -1.0  # earlier work on a block about to be loaded
        batch = x.load([4, 6], host)
        batch.start(compute, per_layer=True)
        sums = []
        for layer in range(3):
            batch.wait_layer(layer, compute)
            with torch.cuda.stream(compute):
                sums.append(kv[layer, :, [4, 6]].sum())
        torch.cuda.synchronize()
        expect = 5.0 * 2 * 2 * 16 * 2 * 64
        assert [float(v) for v in sums] == [expect] * 3
        assert batch.done()
        kv.zero_()


@pytest.mark.gpu
@CUDA
def test_cuda_copy_on_the_side_stream_waits_for_a_pipelined_save():
    """A pipelined save copies to the host on the copy stream; a later transfer of the same
    host rows that copies on the side stream (here a load with its host rows given) must
    read what the save wrote. The copy stream is held up first, so without the ordering
    the load reads the rows before the save's copy reaches them. A failure means a slot
    reused at once is loaded with its previous contents."""
    kv = torch.zeros((2, 2, 64, 16, 2, 64), device="cuda")
    x = BlockTransfer(kv)
    n = 48
    host = torch.zeros((n, *x.block_shape), pin_memory=True)
    for value in (1.0, 2.0, 3.0):
        kv[:, :, :n] = value
        kv[:, :, n:] = -1.0
        torch.cuda.synchronize()
        assert x.copy_stream is not None
        _busy(x.copy_stream)  # the save's host copy runs late
        save = x.save(list(range(n)), host)  # no host rows given: the pipelined path
        save.commit()
        load = x.load(list(range(n, 64)), host, host_rows=list(range(64 - n)))
        load.start()
        load.synchronize()
        save.synchronize()
        assert torch.all(host == value)
        assert torch.all(kv[:, :, n:] == value), f"loaded stale rows in round {value}"
