"""Per-rank half of the `disk` connector: reads and writes this rank's shard of blocks.

Saves: after the forward (`wait_for_save`), the step's blocks are gathered in one batch
into a staging buffer and copied to one pooled host buffer (the engine may reuse the
device blocks once the gather ran); the rank's IO process (`writer_process`, else IO
threads of this process) then checksums and writes one record per block. Loads
(`kvdist.connectors.disk.loads`): records are read and verified into a host buffer, ahead
of any queued writes, and when a request's reads are over its verified prefix of blocks
is copied to the device in one batch. A block that fails (missing shard, truncated,
corrupt, other layout) is never copied to the device; it and the blocks after it are
reported through `get_block_ids_with_load_errors`.

A rank reads the heads it holds from whichever records hold them, so a cache written at
one tensor-parallel degree is read at any other. With more ranks than KV heads, the ranks
holding one head hold the same bytes: only the first of them (`ctx.writes_shared_kv`)
writes, and the others report their saves done at once (the request still completes only
once the writer's save is).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvdist.api.connector import ConnectorWorker
from kvdist.api.types import ConnectorContext
from kvdist.connectors.disk import staging
from kvdist.connectors.disk.io_pool import WRITE, IOPool
from kvdist.connectors.disk.loads import DiskLoader
from kvdist.connectors.disk.record import RecordError, RecordHeader, dtype_itemsize, dtype_name
from kvdist.connectors.disk.settings import DiskSettings
from kvdist.connectors.disk.store import namespace_id, prepare_namespace_dir, record_name
from kvdist.connectors.disk.writer_process import Done, WriterProcess, write_blocks
from kvdist.connectors.placement import resolve_helper_cpus
from kvdist.connectors.settings import Counters, parse_settings
from kvdist.connectors.tracking import check_meta, unpack_hashes, unpack_ids
from kvdist.kv.pinned import HostBufferPool, HostLease
from kvdist.kv.transfer import BlockTransfer, SaveBatch, check_kv_cache

log = logging.getLogger(__name__)


@dataclass
class _SaveStep:
    reqs: list[str]
    keys: list[bytes]
    lease: HostLease
    batch: SaveBatch
    remaining: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    rows: list[memoryview] = field(default_factory=list)
    synced: bool = False  # the copy to `lease` is complete (checked once per step)
    sync_lock: threading.Lock = field(default_factory=threading.Lock)


class DiskConnectorWorker(ConnectorWorker):
    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.settings = parse_settings(DiskSettings, ctx.kwargs, "disk")
        try:
            dtype_itemsize(dtype_name(ctx.dtype))
        except RecordError:
            raise ValueError(
                f"disk connector: KV cache dtype {ctx.dtype} has no record format"
            ) from None
        self.ns_dir = prepare_namespace_dir(self.settings.path, ctx.model_namespace)
        self._ns = bytes.fromhex(namespace_id(ctx.model_namespace))
        self._name = record_name(ctx.kv_head_start, ctx.kv_head_end, ctx.num_kv_heads)
        # Helpers run off the CPUs this rank is bound to (kvdist.connectors.placement).
        self._cpus = resolve_helper_cpus(self.settings.io_cpus)
        self._io = IOPool(self.settings.io_threads, f"kvdist-disk-r{ctx.rank}", cpus=self._cpus)
        self._xfer: BlockTransfer | None = None
        self._writer: WriterProcess | None = None
        self._lock = threading.Lock()
        self._counters = Counters()
        self._save: _SaveStep | None = None
        self._outstanding: dict[str, int] = {}  # request -> block writes not over
        self._held: set[str] = set()  # ids the scheduler held, not given as finished yet
        self._save_wait: set[str] = set()  # held ids given as finished, not reported yet
        self._loader = DiskLoader(
            ctx, self.ns_dir, self._name, self._header, self._io, self._counters
        )
        self._save_error_logged = False

    @property
    def stats(self) -> dict[str, float]:
        return self._counters.snapshot()

    def register_kv_caches(self, kv_cache: torch.Tensor) -> None:
        check_kv_cache(kv_cache, self.ctx)
        # The IO process reads into and writes from staging buffers in shared memory.
        separate = self.settings.writer_process
        pool = HostBufferPool(pin=kv_cache.is_cuda, shared=separate)
        self._xfer = BlockTransfer(kv_cache, host_pool=pool)
        if separate and self._writer is None:
            try:
                self._writer = WriterProcess(
                    self.settings.io_threads, f"kvdist-disk-writer-r{self.ctx.rank}", self._cpus
                )
            except OSError as exc:
                log.warning(
                    "disk connector (rank %d): cannot start the IO process (%s); this rank "
                    "reads and writes its records from threads of its own",
                    self.ctx.rank, exc,
                )  # fmt: skip
            else:
                pool.on_free = self._writer.forget
        self._loader.attach(self._xfer, self._writer)

    def bind_connector_meta(self, meta: Any) -> None:
        if self._save is not None:  # the engine skipped wait_for_save: finish that step first
            self.wait_for_save(None)
        meta = check_meta(meta, "disk")
        super().bind_connector_meta(meta)
        with self._lock:
            self._held.update(meta["held"])

    # -- loads (kvdist.connectors.disk.loads) -------------------------------------------

    def start_load_kv(self, stream: torch.cuda.Stream | None) -> None:
        meta = self.get_connector_meta()
        if meta and meta["loads"]:
            self._loader.start(meta["loads"], stream)

    # -- saves ---------------------------------------------------------------------------

    def wait_for_save(self, stream: torch.cuda.Stream | None) -> None:
        step = self._save_step()
        if step is None:
            return
        self._save = None
        step.batch.commit(stream)
        step.batch.release_blocks(stream)
        with self._lock:
            for req, n in step.counts.items():
                self._outstanding[req] = self._outstanding.get(req, 0) + n
            step.remaining = len(step.keys)
        block_bytes = self._require_xfer().block_bytes
        ranges = staging.task_ranges(len(step.keys), block_bytes)
        writer, shared = self._writer, step.lease.shared
        if writer is not None and shared is not None and writer.alive:
            header = self._header(b"", self.ctx.kv_head_start, self.ctx.kv_head_end)
            for lo, hi in ranges:
                writer.write(
                    shared, block_bytes, list(range(lo, hi)), step.keys[lo:hi], header,
                    self.ns_dir, self._name, fsync=self.settings.fsync,
                    wait=lambda: self._wait_for_copy(step), done=self._done_for(step, lo, hi),
                )  # fmt: skip
            return
        step.rows = staging.byte_rows(step.lease.tensor)
        for lo, hi in ranges:
            self._io.submit(WRITE, self._write_blocks, step, lo, hi)

    def _save_step(self) -> _SaveStep | None:
        if self._save is not None:
            return self._save
        meta = self.get_connector_meta()
        if not meta or not meta["saves"] or not self.ctx.writes_shared_kv:
            return None
        reqs, ids, keys = [], [], []
        counts: dict[str, int] = {}
        for save in meta["saves"]:
            k = unpack_hashes(save["hashes"])
            ids += unpack_ids(save["block_ids"])
            keys += k
            reqs += [save["req"]] * len(k)
            counts[save["req"]] = counts.get(save["req"], 0) + len(k)
        xfer = self._require_xfer()
        lease = xfer.host_buffer(len(ids))
        self._save = _SaveStep(reqs, keys, lease, xfer.save(ids, lease.tensor), counts=counts)
        # Consumed: a second wait_for_save in the same step must not save again.
        self._meta = {**meta, "saves": []}
        return self._save

    def _done_for(self, step: _SaveStep, lo: int, hi: int) -> Done:
        def done(written: list[int] | None, error: str | None, seconds: float) -> None:
            # None: the IO process never ran the task (it is gone): those writes failed.
            self._writes_done(step, lo, hi, written or [0] * (hi - lo), error, seconds)

        return done

    @staticmethod
    def _wait_for_copy(step: _SaveStep) -> None:
        """Block until the step's blocks are in its host buffer (the first caller waits)."""
        with step.sync_lock:
            if not step.synced:
                step.batch.synchronize()
                step.synced = True

    def _write_blocks(self, step: _SaveStep, lo: int, hi: int) -> None:
        """Write blocks `[lo, hi)` of `step` from this process, one record each."""
        t0 = time.perf_counter()
        try:
            self._wait_for_copy(step)
        except Exception as exc:  # the copy failed: nothing to write
            failed = f"{type(exc).__name__}: {exc}"
            self._writes_done(step, lo, hi, [0] * (hi - lo), failed, time.perf_counter() - t0)
            return
        header = self._header(b"", self.ctx.kv_head_start, self.ctx.kv_head_end)
        written, error = write_blocks(
            self.ns_dir, self._name, header, step.keys[lo:hi], step.rows[lo:hi], self.settings.fsync
        )
        self._writes_done(step, lo, hi, written, error, time.perf_counter() - t0)

    def _writes_done(
        self,
        step: _SaveStep,
        lo: int,
        hi: int,
        written: list[int],
        error: str | None,
        seconds: float,
    ) -> None:
        """Blocks `[lo, hi)` of `step` are over: `written[i]` bytes of block `lo + i` (0:
        its write failed, `error` says why)."""
        failed = [step.keys[lo + i] for i, n in enumerate(written) if not n]
        self._counters.add(
            io_seconds=seconds,
            blocks_saved=len(written) - len(failed),
            bytes_saved=sum(written),
            save_failures=len(failed),
        )
        if failed:
            self._save_failed(failed[0], error or "not written")
        with self._lock:
            for j in range(lo, hi):
                self._outstanding[step.reqs[j]] -= 1
            step.remaining -= hi - lo
            last = step.remaining == 0
        if last:
            step.lease.release()

    def _save_failed(self, key: bytes, exc: Exception | str) -> None:
        with self._lock:
            first, self._save_error_logged = not self._save_error_logged, True
        if first:
            log.warning(
                "disk connector (rank %d): saving block %s under %s failed: %s; the request "
                "completes without it. Later save errors are only counted in "
                "stats['save_failures'].",
                self.ctx.rank, key.hex(), self.ns_dir, exc,
            )  # fmt: skip

    # -- reports -------------------------------------------------------------------------

    def get_finished(
        self, finished_gen_req_ids: set[str], started_loading_req_ids: set[str]
    ) -> tuple[set[str], set[str]]:
        with self._lock:
            # Only held ids are reported: the others were never async saves.
            held = finished_gen_req_ids & self._held
            self._held -= held
            self._save_wait |= held
            saved = {r for r in self._save_wait if self._outstanding.get(r, 0) == 0}
            self._save_wait -= saved
            for r in saved:
                self._outstanding.pop(r, None)
        return saved, self._loader.finished(started_loading_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._loader.take_errors()

    def shutdown(self) -> None:
        if self._save is not None:
            self.wait_for_save(None)
        if self._writer is not None:
            self._writer.shutdown()
        self._io.shutdown()
        if self._xfer is not None:
            self._xfer.host_pool.trim()  # every lease is back: unpin and free the buffers

    # -- helpers -------------------------------------------------------------------------

    def _require_xfer(self) -> BlockTransfer:
        if self._xfer is None:
            raise RuntimeError("disk connector: register_kv_caches() must come before transfers")
        return self._xfer

    def _header(self, key: bytes, head_start: int, head_end: int) -> RecordHeader:
        ctx = self.ctx
        return RecordHeader(
            key=key,
            ns=self._ns,
            dtype=dtype_name(ctx.dtype),
            num_layers=ctx.num_layers,
            block_size=ctx.block_size,
            num_kv_heads=ctx.num_kv_heads,
            head_start=head_start,
            head_end=head_end,
            head_dim=ctx.head_dim,
        )
