"""Batched block copies between one rank's paged KV cache and host memory.

A block's shard is `2 * num_layers` fragments of a few KB to 64 KB scattered through the
cache (see `kvdist.kv.layout`); one copy call per fragment runs at a tenth of the PCIe
bandwidth (DESIGN.md §5). So a save gathers every fragment of every block into a device
staging buffer and moves it to host memory in large copies; a load copies host rows to
device staging and scatters them. Whole blocks are gathered as rows of a 2-D view of the
cache, one row per (layer, K/V, block) fragment (`index_select`, 1.5-1.8 TB/s on an H200,
~30x PCIe); single layers with `index_select` over the permuted layer. The two halves are
pipelined over a few chunks on two side streams (the copy of one chunk runs while the
next is gathered), with a small first chunk so the copy engine starts early; a load issues
its first host copy before uploading the block ids, which that copy does not need.

Host memory is block-major, `(n, num_layers, 2, block_size, heads, head_dim)`, so that one
block's shard is contiguous: a disk record is written from it without a copy and a CPU
pool slot is one row.

CUDA ordering: the copies of one `BlockTransfer` run on its own two streams, never behind
the model: its side stream, and a copy stream for the pipelined host copies, which first
waits for the side stream; a host copy on the side stream first waits for the copy stream
(`after_host_copies`). So later copies are ordered after earlier ones (a pool slot written
by a save is never read by an earlier-issued load, and vice versa). A save's gather first
waits for the compute stream (the layer that wrote the blocks); `SaveBatch.release_blocks`
makes the compute stream wait until the gather has read them, which is all the engine
needs before it overwrites them: the device-to-host copy reads only staging. A load's
scatter first waits for the compute stream (earlier kernels may still read the blocks'
previous contents); its consumer waits on the event recorded after the scatter, per layer
if asked. Device staging is allocated while the side stream is current, so the caching
allocator hands its memory only to later work on that stream: dropping the tensor right
after enqueuing is safe.

On the CPU the same calls run synchronously with streams and events None.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kvdist.api.types import ConnectorContext
from kvdist.kv.layout import kv_cache_shape
from kvdist.kv.pinned import HostBufferPool, HostLease, IdUploader

Waitable = torch.cuda.Stream | torch.cuda.Event | None


def check_kv_cache(kv_cache: torch.Tensor, ctx: ConnectorContext) -> None:
    """ValueError unless `kv_cache` has this rank's layout, dtype and device."""
    want = kv_cache_shape(ctx, kv_cache.shape[2] if kv_cache.dim() == 6 else 0)
    if tuple(kv_cache.shape) != want or kv_cache.dtype != ctx.dtype:
        raise ValueError(
            f"KV cache of shape {tuple(kv_cache.shape)} and dtype {kv_cache.dtype} does not match "
            f"the connector context: expected {want} (num_layers, 2, num_blocks, block_size, "
            f"local kv heads, head_dim) of {ctx.dtype}"
        )
    if kv_cache.device.type != torch.device(ctx.device).type:
        raise ValueError(f"KV cache is on {kv_cache.device}, the context says {ctx.device}")


def _gather_layer(kv: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    """`out[:, layer] = kv[layer, :, ids]`: `index_select` into the strided destination."""
    torch.index_select(kv[layer].transpose(0, 1), 0, ids, out=out[:, layer])


def _scatter_layer(kv: torch.Tensor, ids: torch.Tensor, src: torch.Tensor, layer: int) -> None:
    """The reverse of `_gather_layer`: `kv[layer, :, ids] = src[:, layer]`."""
    kv[layer].transpose(0, 1).index_copy_(0, ids, src[:, layer])


PIPELINE_CHUNKS = 4
PIPELINE_MIN_ROWS = 16


def pipeline_chunks(n: int) -> list[tuple[int, int]]:
    """Row ranges of a batch split so that the host copy of one chunk overlaps the
    on-device gather or scatter of the next: a small first chunk (1/16) so the copy engine
    starts early, then up to PIPELINE_CHUNKS - 1 equal ones, each >= PIPELINE_MIN_ROWS.
    Few chunks: the gather runs ~30x faster than the copy, and each chunk costs the issuing
    thread about a dozen launches."""
    if n < 2 * PIPELINE_MIN_ROWS or PIPELINE_CHUNKS < 2:
        return [(0, n)] if n else []
    first = max(1, n // 16)
    k = max(1, min(PIPELINE_CHUNKS - 1, (n - first) // PIPELINE_MIN_ROWS))
    bounds = [first + (n - first) * i // k for i in range(k + 1)]
    return [(0, first), *zip(bounds[:-1], bounds[1:])]


def row_runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """`(batch index, first row, length)` of each run of consecutive `rows`."""
    runs: list[tuple[int, int, int]] = []
    for i, r in enumerate(rows):
        if runs and runs[-1][1] + runs[-1][2] == r:
            b, first, n = runs[-1]
            runs[-1] = (b, first, n + 1)
        else:
            runs.append((i, r, 1))
    return runs


class BlockTransfer:
    """Moves sets of blocks of one rank's paged KV cache to and from host rows."""

    def __init__(self, kv_cache: torch.Tensor, *, host_pool: HostBufferPool | None = None) -> None:
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                "kv_cache must have shape (num_layers, 2, num_blocks, block_size, "
                f"num_local_kv_heads, head_dim), got {tuple(kv_cache.shape)}"
            )
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous")
        self.kv = kv_cache
        self.device = kv_cache.device
        layers, two, blocks, bs, heads, dim = kv_cache.shape
        # One row per (layer, K/V, block) fragment. Whole-block moves gather and scatter
        # these rows: a row gather over a 2-D view runs ~2.5x faster on the GPU than
        # index_select over the permuted 6-D cache (1.5 vs 0.6 TB/s for 4 KB fragments).
        self.fragments = kv_cache.view(layers * two * blocks, bs * heads * dim)
        self._fragment_base = np.arange(layers * two, dtype=np.int64) * blocks
        self._uploader = IdUploader(self.device) if kv_cache.is_cuda else None
        self.stream = torch.cuda.Stream(device=self.device) if kv_cache.is_cuda else None
        # Host copies run on their own stream so the copy engine works on one chunk while
        # the SMs gather or scatter the next (the copy, not the gather, sets the pace).
        self.copy_stream = torch.cuda.Stream(device=self.device) if kv_cache.is_cuda else None
        self.host_pool = host_pool or HostBufferPool(pin=kv_cache.is_cuda)

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[2]

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block's shard, all layers: `(num_layers, 2, block_size, heads, dim)`."""
        layers, two, _, bs, heads, dim = self.kv.shape
        return (layers, two, bs, heads, dim)

    @property
    def block_bytes(self) -> int:
        n = 1
        for s in self.block_shape:
            n *= s
        return n * self.kv.element_size()

    def host_buffer(self, num_blocks: int) -> HostLease:
        """A pooled host buffer of `num_blocks` block rows (pinned on CUDA)."""
        return self.host_pool.acquire((num_blocks, *self.block_shape), self.kv.dtype)

    def save(
        self, block_ids: Sequence[int], host: torch.Tensor, host_rows: Sequence[int] | None = None
    ) -> SaveBatch:
        """Prepare copying device blocks `block_ids` to `host[host_rows]` (default rows 0..n-1)."""
        return SaveBatch(self, block_ids, host, host_rows)

    def load(
        self, block_ids: Sequence[int], host: torch.Tensor, host_rows: Sequence[int] | None = None
    ) -> LoadBatch:
        """Prepare copying `host[host_rows]` (default rows 0..n-1) into device blocks `block_ids`."""
        return LoadBatch(self, block_ids, host, host_rows)

    def mark(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """An event recorded now on `stream` (the current stream if None); None on the CPU.

        Lets work issued later from another thread wait for what `stream` has enqueued."""
        if self.stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return ev

    @contextlib.contextmanager
    def on_side(self, after: Waitable) -> Iterator[None]:
        """Run the body on the side stream, after `after` (a stream, an event, or the current
        stream when None). No-op on the CPU."""
        if self.stream is None:
            yield
            return
        # Explicit device: IO threads start on device 0 whatever the rank's device is.
        with torch.cuda.device(self.device):
            if isinstance(after, torch.cuda.Event):
                self.stream.wait_event(after)
            else:
                self.stream.wait_stream(
                    after if after is not None else torch.cuda.current_stream(self.device)
                )
            with torch.cuda.stream(self.stream):
                yield

    def after_host_copies(self) -> None:
        """Order the side stream's next work after every host copy queued on the copy
        stream: a transfer that copies on the side stream itself (host rows given, or a
        per-layer load) must not touch host rows a pipelined save is still writing, or a
        pipelined load still reading. (The pipelined paths need no such wait: they copy on
        the copy stream, in order, after the side stream's earlier work.)"""
        if self.stream is not None and self.copy_stream is not None:
            self.stream.wait_stream(self.copy_stream)

    def _event(self, *, blocking: bool = False) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        ev = torch.cuda.Event(blocking=blocking)
        ev.record(self.stream)
        return ev

    def _check(
        self, block_ids: Sequence[int], host: torch.Tensor, host_rows: Sequence[int] | None
    ) -> tuple[np.ndarray, list[int] | None]:
        try:
            ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"block ids must be integers: {exc}") from None
        # Out-of-range indices are a device-side assert on CUDA (fatal to the process).
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise ValueError(f"block ids must be in [0, {self.num_blocks}), got {ids.tolist()}")
        if host.device.type != "cpu" or tuple(host.shape[1:]) != self.block_shape:
            raise ValueError(
                f"host buffer must be a CPU tensor of shape (rows, {', '.join(map(str, self.block_shape))}), "
                f"got {tuple(host.shape)} on {host.device}"
            )
        if host.dtype != self.kv.dtype:
            raise ValueError(f"host dtype {host.dtype} differs from the KV cache's {self.kv.dtype}")
        if host_rows is None:
            if len(ids) > host.shape[0]:
                raise ValueError(f"{len(ids)} blocks do not fit {host.shape[0]} host rows")
            return ids, None
        rows = [int(r) for r in host_rows]
        if len(rows) != len(ids):
            raise ValueError(f"{len(ids)} block ids but {len(rows)} host rows")
        if rows and (min(rows) < 0 or max(rows) >= host.shape[0]):
            raise ValueError(f"host rows must be in [0, {host.shape[0]}), got {rows}")
        return ids, rows

    def _index(self, values: np.ndarray) -> torch.Tensor:
        """An int64 index tensor on the cache's device (uploaded on the current stream)."""
        if self._uploader is None:
            return torch.from_numpy(values)
        return self._uploader.upload(values)

    @property
    def fragments_per_block(self) -> int:
        return self._fragment_base.size

    def _fragment_rows(self, ids: np.ndarray) -> torch.Tensor:
        """Rows of `fragments` holding blocks `ids`, block-major (the host row order), on
        the device: computed here and uploaded in one copy."""
        return self._index((ids[:, None] + self._fragment_base[None, :]).reshape(-1))

    def _gather_all(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        torch.index_select(self.fragments, 0, rows, out=out.view(-1, self.fragments.shape[1]))

    def _scatter_all(self, rows: torch.Tensor, src: torch.Tensor) -> None:
        # index_copy_, not index_put_: in a pipelined load on an H200 the latter overlapped
        # the next chunk's host copy worse (88-90 % of the copy bandwidth against 91-99 %;
        # `benchmarks/transfer_probe.py` repeats the comparison).
        self.fragments.index_copy_(0, rows, src.reshape(-1, self.fragments.shape[1]))


class _Batch:
    """What a save and a load share: the checked block ids and host rows."""

    def __init__(
        self,
        xfer: BlockTransfer,
        block_ids: Sequence[int],
        host: torch.Tensor,
        host_rows: Sequence[int] | None,
    ) -> None:
        self._x = xfer
        self._block_ids, self._rows = xfer._check(block_ids, host, host_rows)
        self.num_blocks = len(self._block_ids)
        self._host = host

    @functools.cached_property
    def _runs(self) -> list[tuple[int, int, int]]:
        """`(batch index, first host row, length)` of each run of consecutive host rows."""
        if self._rows is None:
            return [(0, 0, self.num_blocks)] if self.num_blocks else []
        return row_runs(self._rows)

    @property
    def host_copies(self) -> int:
        """Runs of consecutive host rows the batch moves: its host copies on a GPU when
        given rows (without rows, one run, which the pipelined path copies in chunks)."""
        return len(self._runs)


class SaveBatch(_Batch):
    """Device blocks → host rows. Gather layer by layer (`gather_layer`) as the model writes
    them, then `commit` gathers the rest and starts the host copy."""

    def __init__(
        self,
        xfer: BlockTransfer,
        block_ids: Sequence[int],
        host: torch.Tensor,
        host_rows: Sequence[int] | None,
    ) -> None:
        super().__init__(xfer, block_ids, host, host_rows)
        self._pending = set(range(xfer.kv.shape[0]))
        self._gathered: torch.cuda.Event | None = None
        self._done: torch.cuda.Event | None = None
        self._ids: torch.Tensor | None = None  # block ids on the device, for layer gathers
        self.committed = False
        shape = (self.num_blocks, *xfer.block_shape)
        if xfer.stream is None:
            direct = self._rows is None
            self._staging = (
                host[: self.num_blocks] if direct else torch.empty(shape, dtype=host.dtype)
            )
        else:
            with torch.cuda.device(xfer.device), torch.cuda.stream(xfer.stream):
                self._staging = torch.empty(shape, dtype=xfer.kv.dtype, device=xfer.device)

    def gather_layer(self, layer: int, after: Waitable = None) -> None:
        """Gather layer `layer` of the blocks, once `after` (the compute stream) wrote it."""
        if self.committed or layer not in self._pending or self.num_blocks == 0:
            return
        self._pending.discard(layer)
        with self._x.on_side(after):
            _gather_layer(self._x.kv, self._device_ids(), self._staging, layer)

    def _device_ids(self) -> torch.Tensor:
        if self._ids is None:
            self._ids = self._x._index(self._block_ids)
        return self._ids

    def commit(self, after: Waitable = None) -> None:
        """Gather the layers not gathered yet and start the copy to host rows."""
        if self.committed:
            return
        self.committed = True
        if self.num_blocks == 0:
            return
        x = self._x
        with x.on_side(after):
            if len(self._pending) == x.kv.shape[0] and x.stream is not None and self._rows is None:
                self._pipelined_gather_copy()
                self._staging = self._ids = None  # type: ignore[assignment]
                return
            if len(self._pending) == x.kv.shape[0]:
                x._gather_all(x._fragment_rows(self._block_ids), self._staging)
            else:
                for layer in sorted(self._pending):
                    _gather_layer(x.kv, self._device_ids(), self._staging, layer)
            self._pending.clear()
            self._gathered = x._event()
            x.after_host_copies()
            self._copy_out()
            self._done = x._event(blocking=True)
        self._staging = self._ids = None  # type: ignore[assignment]

    def _pipelined_gather_copy(self) -> None:
        """Gather chunk i on the side stream while chunk i-1 is copied to the host."""
        x, copy = self._x, self._x.copy_stream
        assert x.stream is not None and copy is not None
        copy.wait_stream(x.stream)
        rows, k = x._fragment_rows(self._block_ids), x.fragments_per_block
        for a, b in pipeline_chunks(self.num_blocks):
            x._gather_all(rows[a * k : b * k], self._staging[a:b])
            gathered = torch.cuda.Event()
            gathered.record(x.stream)
            copy.wait_event(gathered)
            with torch.cuda.stream(copy):
                self._host[a:b].copy_(self._staging[a:b], non_blocking=True)
        self._pending.clear()
        self._gathered = x._event()
        # The staging buffer belongs to the side stream's allocator pool; keep it alive
        # until the copy stream is done with it.
        self._staging.record_stream(copy)
        self._done = torch.cuda.Event(blocking=True)
        self._done.record(copy)

    def _copy_out(self) -> None:
        n, rows, host = self.num_blocks, self._rows, self._host
        if self._x.stream is None:
            if rows is not None:
                host.index_copy_(0, torch.tensor(rows, dtype=torch.long), self._staging)
            return
        if rows is None:
            host[:n].copy_(self._staging, non_blocking=True)
            return
        for b, first, k in self._runs:
            host[first : first + k].copy_(self._staging[b : b + k], non_blocking=True)

    def release_blocks(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (the compute stream) wait until the device blocks have been read."""
        if self._gathered is not None:
            (stream or torch.cuda.current_stream(self._x.device)).wait_event(self._gathered)

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (the current stream if None) wait until the host rows hold the data."""
        if self._done is not None:
            (stream or torch.cuda.current_stream(self._x.device)).wait_event(self._done)

    def done(self) -> bool:
        """Whether the host rows hold the data (always True on the CPU once committed)."""
        return self.committed and (self._done is None or self._done.query())

    def synchronize(self) -> None:
        """Block this thread until the host rows hold the data."""
        if not self.committed:
            raise RuntimeError("SaveBatch.synchronize() before commit()")
        if self._done is not None:
            self._done.synchronize()


class LoadBatch(_Batch):
    """Host rows → device blocks, with an event after the scatter (per layer if asked)."""

    def __init__(
        self,
        xfer: BlockTransfer,
        block_ids: Sequence[int],
        host: torch.Tensor,
        host_rows: Sequence[int] | None,
    ) -> None:
        super().__init__(xfer, block_ids, host, host_rows)
        if np.unique(self._block_ids).size != self._block_ids.size:
            raise ValueError(
                f"a load names the same device block twice: {self._block_ids.tolist()}"
            )
        self._events: list[torch.cuda.Event | None] = []
        self.started = False

    def start(self, after: Waitable = None, *, per_layer: bool = False) -> None:
        """Copy and scatter, after `after` (the compute stream or an event recorded on it).

        `per_layer`: scatter layer by layer with an event each, for `wait_layer`."""
        if self.started:
            return
        self.started = True
        if self.num_blocks == 0:
            return
        x, n, rows = self._x, self.num_blocks, self._rows
        with x.on_side(after):
            if x.stream is not None and rows is None and not per_layer:
                self._pipelined_copy_scatter()
                return
            if x.stream is None:
                staging = self._host[:n] if rows is None else self._host[rows]
            else:
                staging = torch.empty((n, *x.block_shape), dtype=x.kv.dtype, device=x.device)
                x.after_host_copies()
                for b, first, k in self._runs:
                    staging[b : b + k].copy_(self._host[first : first + k], non_blocking=True)
            if per_layer:
                ids = x._index(self._block_ids)
                for layer in range(x.kv.shape[0]):
                    _scatter_layer(x.kv, ids, staging, layer)
                    self._events.append(x._event())
            else:
                x._scatter_all(x._fragment_rows(self._block_ids), staging)
            self._events.append(x._event(blocking=True))

    def _pipelined_copy_scatter(self) -> None:
        """Copy chunk i to the device on the copy stream while chunk i-1 is scattered. The
        first copy is issued before anything else: it needs no block ids."""
        x, copy, n = self._x, self._x.copy_stream, self.num_blocks
        assert x.stream is not None and copy is not None
        staging = torch.empty((n, *x.block_shape), dtype=x.kv.dtype, device=x.device)
        copy.wait_stream(x.stream)  # the staging memory may have been in use on the side
        # The small chunk goes last here: its scatter is the part no copy hides.
        chunks = [(n - b, n - a) for a, b in reversed(pipeline_chunks(n))]
        arrived = []
        for i, (a, b) in enumerate(chunks):
            with torch.cuda.stream(copy):
                staging[a:b].copy_(self._host[a:b], non_blocking=True)
                arrived.append(torch.cuda.Event())
                arrived[-1].record(copy)
            if i == 0:  # the row upload overlaps the first copy
                rows, k = x._fragment_rows(self._block_ids), x.fragments_per_block
        for (a, b), ev in zip(chunks, arrived):
            x.stream.wait_event(ev)
            x._scatter_all(rows[a * k : b * k], staging[a:b])
        staging.record_stream(copy)
        self._events.append(x._event(blocking=True))

    def wait_layer(self, layer: int, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` wait until layer `layer` is in place."""
        if not self._events:
            return
        ev = self._events[layer] if len(self._events) > layer + 1 else self._events[-1]
        if ev is not None:
            (stream or torch.cuda.current_stream(self._x.device)).wait_event(ev)

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` wait until every layer is in place."""
        if self._events and self._events[-1] is not None:
            (stream or torch.cuda.current_stream(self._x.device)).wait_event(self._events[-1])

    def done(self) -> bool:
        """Whether the device blocks hold the data and the host rows may be reused."""
        if not self.started:
            return False
        return not self._events or self._events[-1] is None or self._events[-1].query()

    def synchronize(self) -> None:
        if not self.started:
            raise RuntimeError("LoadBatch.synchronize() before start()")
        if self._events and self._events[-1] is not None:
            self._events[-1].synchronize()


def save_blocks_naive(kv: torch.Tensor, block_ids: Sequence[int], host: torch.Tensor) -> None:
    """Benchmark baseline: one copy call per contiguous fragment (block, layer, K/V)."""
    for j, b in enumerate(block_ids):
        for layer in range(kv.shape[0]):
            for k in range(2):
                host[j, layer, k].copy_(kv[layer, k, b], non_blocking=True)
    if kv.is_cuda:
        torch.cuda.current_stream(kv.device).synchronize()


def load_blocks_naive(kv: torch.Tensor, block_ids: Sequence[int], host: torch.Tensor) -> None:
    """Benchmark baseline: one copy call per contiguous fragment (block, layer, K/V)."""
    for j, b in enumerate(block_ids):
        for layer in range(kv.shape[0]):
            for k in range(2):
                kv[layer, k, b].copy_(host[j, layer, k], non_blocking=True)
    if kv.is_cuda:
        torch.cuda.current_stream(kv.device).synchronize()
