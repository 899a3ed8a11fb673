"""Per-rank half of the `disk` connector: reads and writes this rank's shard of blocks.

Saves: after the forward (`wait_for_save`), the step's blocks are gathered in one batch
into a staging buffer and copied to one pooled host buffer (the engine may reuse the
device blocks once the gather ran); IO threads then checksum and write one record per
block. Loads: IO threads read and verify the records of each block into a host buffer,
ahead of any queued writes (`IOPool`); when a request's reads are over, its verified
prefix of blocks is copied to the device in one batch. A block that fails (missing shard, truncated, corrupt, other layout) is never
copied to the device; it and the blocks after it are reported through
`get_block_ids_with_load_errors`.

A rank reads the heads it holds from whichever records hold them, so a cache written at
one tensor-parallel degree is read at any other. With more ranks than KV heads, the ranks
holding one head hold the same bytes: only the first of them (`ctx.writes_shared_kv`)
writes, and the others report their saves done at once (the request still completes only
once the writer's save is).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvdist.api.connector import ConnectorWorker
from kvdist.api.types import ConnectorContext
from kvdist.connectors.disk.io_pool import READ, WRITE, IOPool
from kvdist.connectors.disk.record import (
    RecordError,
    RecordHeader,
    dtype_itemsize,
    dtype_name,
    read_record,
)
from kvdist.connectors.disk.settings import DiskSettings
from kvdist.connectors.disk.store import (
    block_dir,
    cover,
    list_records,
    namespace_id,
    prepare_namespace_dir,
    record_name,
)
from kvdist.connectors.disk.writer_process import Done, WriterProcess, write_blocks
from kvdist.connectors.placement import resolve_helper_cpus
from kvdist.connectors.settings import Counters, parse_settings
from kvdist.connectors.tracking import check_meta, unpack_hashes, unpack_ids
from kvdist.kv.pinned import HostBufferPool, HostLease
from kvdist.kv.transfer import BlockTransfer, SaveBatch, check_kv_cache

log = logging.getLogger(__name__)


# Blocks per IO task: about this many bytes. Each task costs a queue handoff (and each
# handoff takes the GIL from the engine's thread); a larger task would keep a queued read
# waiting longer behind a write.
_TASK_BYTES = 4 << 20


@dataclass
class _LoadJob:
    req: str
    block_ids: list[int]
    keys: list[bytes]
    lease: HostLease
    rows: list[memoryview]  # the bytes of each block's row of `lease`
    ready: torch.cuda.Event | None
    remaining: int
    first_bad: int
    failed: set[int] | None = None  # set once the job is over


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


def _byte_rows(t: torch.Tensor) -> list[memoryview]:
    """The bytes of each row of a contiguous host tensor, as memoryviews (made once, on the
    engine's thread, so the IO threads slice no tensors: every torch call lets go of the
    GIL and takes it back, and each time the engine's thread may wait for it)."""
    flat = t.view(torch.uint8).numpy().reshape(-1).data
    n = t.shape[0]
    size = flat.nbytes // n if n else 0
    return [flat[i * size : (i + 1) * size] for i in range(n)]


def _task_ranges(n: int, block_bytes: int) -> list[tuple[int, int]]:
    per = max(1, _TASK_BYTES // max(1, block_bytes))
    return [(lo, min(lo + per, n)) for lo in range(0, n, per)]


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
        self._loads: dict[str, _LoadJob] = {}
        self._load_wait: set[str] = set()  # started-loading ids given, not reported yet
        self._errors: set[int] = set()
        self._save_error_logged = False

    @property
    def stats(self) -> dict[str, float]:
        return self._counters.snapshot()

    def register_kv_caches(self, kv_cache: torch.Tensor) -> None:
        check_kv_cache(kv_cache, self.ctx)
        # Only a rank that writes needs the writer process and shared staging memory.
        separate = self.settings.writer_process and self.ctx.writes_shared_kv
        pool = HostBufferPool(pin=kv_cache.is_cuda, shared=separate)
        self._xfer = BlockTransfer(kv_cache, host_pool=pool)
        if separate and self._writer is None:
            try:
                self._writer = WriterProcess(
                    self.settings.io_threads, f"kvdist-disk-writer-r{self.ctx.rank}", self._cpus
                )
            except OSError as exc:
                log.warning(
                    "disk connector (rank %d): cannot start the writer process (%s); this "
                    "rank writes its records from threads of its own",
                    self.ctx.rank, exc,
                )  # fmt: skip
            else:
                pool.on_free = self._writer.forget

    def bind_connector_meta(self, meta: Any) -> None:
        if self._save is not None:  # the engine skipped wait_for_save: finish that step first
            self.wait_for_save(None)
        meta = check_meta(meta, "disk")
        super().bind_connector_meta(meta)
        with self._lock:
            self._held.update(meta["held"])

    # -- loads ---------------------------------------------------------------------------

    def start_load_kv(self, stream: torch.cuda.Stream | None) -> None:
        meta = self.get_connector_meta()
        if not meta or not meta["loads"]:
            return
        xfer = self._require_xfer()
        for load in meta["loads"]:
            ids, keys = unpack_ids(load["block_ids"]), unpack_hashes(load["hashes"])
            # Scatter only after the compute stream's earlier work on these blocks.
            lease = xfer.host_buffer(len(ids))
            job = _LoadJob(
                load["req"], ids, keys, lease, _byte_rows(lease.tensor), xfer.mark(stream),
                remaining=len(ids), first_bad=len(ids),
            )  # fmt: skip
            with self._lock:
                self._loads[job.req] = job
            if not ids:
                self._finish_load(job)
            for lo, hi in _task_ranges(len(ids), xfer.block_bytes):
                self._io.submit(READ, self._read_blocks, job, lo, hi)

    def _read_blocks(self, job: _LoadJob, lo: int, hi: int) -> None:
        """Read blocks `[lo, hi)` of `job` in order, up to the first unusable one."""
        t0 = time.perf_counter()
        bad = len(job.keys)  # none of this task's blocks failed
        for j in range(lo, hi):
            if j >= job.first_bad:  # racy read: a later block may still be read needlessly
                break
            try:
                self._read_into(job.keys[j], job.rows[j], job.lease, j)
                continue
            except RecordError as exc:
                log.debug("disk connector: block %s unusable: %s", job.keys[j].hex(), exc)
            except Exception:
                log.exception(
                    "disk connector: unexpected error reading block %s", job.keys[j].hex()
                )
            bad = j
            break
        with self._lock:
            job.first_bad = min(job.first_bad, bad)
            job.remaining -= hi - lo
            last = job.remaining == 0
        self._counters.add(io_seconds=time.perf_counter() - t0)
        if last:
            self._finish_load(job)

    def _read_into(self, key: bytes, row: memoryview, lease: HostLease, j: int) -> None:
        """Block `key`'s heads of this rank into `row` (row `j` of `lease`)."""
        ctx = self.ctx
        s, e = ctx.kv_head_start, ctx.kv_head_end
        bdir = block_dir(self.ns_dir, key)
        own = os.path.join(bdir, self._name)
        try:
            # The common case: a record of exactly this rank's heads (the same TP degree).
            read_record(own, self._header(key, s, e), into=row)
        except RecordError:
            if os.path.exists(own):
                raise  # there, but unusable
        else:
            with contextlib.suppress(OSError):
                os.utime(own)  # last use, for LRU eviction after a restart
            return
        records = cover(list_records(bdir, stat=False), s, e, ctx.num_kv_heads)
        if records is None:
            raise RecordError(f"no records hold heads [{s}, {e}) of block {key.hex()}")
        for rec in records:
            want = self._header(key, rec.head_start, rec.head_end)
            if (rec.head_start, rec.head_end) == (s, e):
                read_record(rec.path, want, into=row)
            else:
                _, payload = read_record(rec.path, want)
                src = torch.frombuffer(payload, dtype=torch.uint8).view(ctx.dtype).view(want.shape)
                lo, hi = max(s, rec.head_start), min(e, rec.head_end)
                lease.tensor[j][:, :, :, lo - s : hi - s].copy_(
                    src[:, :, :, lo - rec.head_start : hi - rec.head_start]
                )
            with contextlib.suppress(OSError):
                os.utime(rec.path)  # last use, for LRU eviction after a restart

    def _finish_load(self, job: _LoadJob) -> None:
        k = job.first_bad
        try:
            if k > 0:
                batch = self._require_xfer().load(job.block_ids[:k], job.lease.tensor)
                batch.start(job.ready)
                batch.synchronize()
            failed = set(job.block_ids[k:])
        except Exception:
            log.exception("disk connector: copying loaded blocks to the device failed")
            k, failed = 0, set(job.block_ids)
        finally:
            job.lease.release()
        n = len(job.block_ids)
        assert self._xfer is not None
        self._counters.add(
            blocks_loaded=k, bytes_loaded=k * self._xfer.block_bytes, load_failures=n - k
        )
        with self._lock:
            job.failed = failed

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
        ranges = _task_ranges(len(step.keys), block_bytes)
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
        step.rows = _byte_rows(step.lease.tensor)
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
        def done(written: list[int], error: str | None, seconds: float) -> None:
            self._writes_done(step, lo, hi, written, error, seconds)

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
            self._load_wait |= started_loading_req_ids
            loaded = set()
            for r in self._load_wait:
                job = self._loads.get(r)
                if job is None or job.failed is not None:  # unknown: nothing to wait for
                    loaded.add(r)
                    if job is not None:
                        self._errors |= job.failed or set()
                        del self._loads[r]
            self._load_wait -= loaded
        return saved, loaded

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

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
