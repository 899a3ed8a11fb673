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
    dtype_name,
    read_record,
    write_record,
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
from kvdist.connectors.settings import Counters, parse_settings
from kvdist.connectors.tracking import check_meta, unpack_hashes, unpack_ids
from kvdist.kv.pinned import HostLease
from kvdist.kv.transfer import BlockTransfer, SaveBatch, check_kv_cache

log = logging.getLogger(__name__)


@dataclass
class _LoadJob:
    req: str
    block_ids: list[int]
    keys: list[bytes]
    lease: HostLease
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


class DiskConnectorWorker(ConnectorWorker):
    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.settings = parse_settings(DiskSettings, ctx.kwargs, "disk")
        self.ns_dir = prepare_namespace_dir(self.settings.path, ctx.model_namespace)
        self._ns = bytes.fromhex(namespace_id(ctx.model_namespace))
        self._name = record_name(ctx.kv_head_start, ctx.kv_head_end, ctx.num_kv_heads)
        self._io = IOPool(self.settings.io_threads, f"kvdist-disk-r{ctx.rank}")
        self._xfer: BlockTransfer | None = None
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
        self._xfer = BlockTransfer(kv_cache)

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
            job = _LoadJob(
                load["req"], ids, keys, xfer.host_buffer(len(ids)), xfer.mark(stream),
                remaining=len(ids), first_bad=len(ids),
            )  # fmt: skip
            with self._lock:
                self._loads[job.req] = job
            if not ids:
                self._finish_load(job)
            for j in range(len(ids)):
                self._io.submit(READ, self._read_block, job, j)

    def _read_block(self, job: _LoadJob, j: int) -> None:
        t0 = time.perf_counter()
        ok = False
        try:
            if j < job.first_bad:  # racy read: a later block may still be read needlessly
                self._read_into(job.keys[j], job.lease.tensor[j])
                ok = True
        except RecordError as exc:
            log.debug("disk connector: block %s unusable: %s", job.keys[j].hex(), exc)
        except Exception:
            log.exception("disk connector: unexpected error reading block %s", job.keys[j].hex())
        with self._lock:
            if not ok:
                job.first_bad = min(job.first_bad, j)
            job.remaining -= 1
            last = job.remaining == 0
        self._counters.add(io_seconds=time.perf_counter() - t0)
        if last:
            self._finish_load(job)

    def _read_into(self, key: bytes, row: torch.Tensor) -> None:
        ctx = self.ctx
        s, e = ctx.kv_head_start, ctx.kv_head_end
        records = cover(
            list_records(block_dir(self.ns_dir, key), stat=False), s, e, ctx.num_kv_heads
        )
        if records is None:
            raise RecordError(f"no records hold heads [{s}, {e}) of block {key.hex()}")
        for rec in records:
            want = self._header(key, rec.head_start, rec.head_end)
            if (rec.head_start, rec.head_end) == (s, e):
                read_record(rec.path, want, into=row.view(torch.uint8).numpy().data)
            else:
                _, payload = read_record(rec.path, want)
                src = torch.frombuffer(payload, dtype=torch.uint8).view(ctx.dtype).view(want.shape)
                lo, hi = max(s, rec.head_start), min(e, rec.head_end)
                row[:, :, :, lo - s : hi - s].copy_(
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
        for j in range(len(step.keys)):
            self._io.submit(WRITE, self._write_block, step, j)

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

    def _write_block(self, step: _SaveStep, j: int) -> None:
        t0 = time.perf_counter()
        key = step.keys[j]
        written = 0
        try:
            step.batch.synchronize()
            row = step.lease.tensor[j]
            payload = row.view(torch.uint8).numpy().data
            header = self._header(key, self.ctx.kv_head_start, self.ctx.kv_head_end)
            bdir = block_dir(self.ns_dir, key)
            for attempt in range(2):
                try:
                    os.makedirs(bdir, exist_ok=True)
                    written = write_record(
                        bdir, self._name, header, payload, fsync=self.settings.fsync
                    )
                    break
                except FileNotFoundError:
                    if attempt:  # the directory was evicted between makedirs and the write
                        raise
        except Exception as exc:
            self._save_failed(key, exc)
        self._counters.add(
            io_seconds=time.perf_counter() - t0,
            blocks_saved=1 if written else 0,
            bytes_saved=written,
        )
        with self._lock:
            self._outstanding[step.reqs[j]] -= 1
            step.remaining -= 1
            last = step.remaining == 0
        if last:
            step.lease.release()

    def _save_failed(self, key: bytes, exc: Exception) -> None:
        self._counters.add(save_failures=1)
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
        self._io.shutdown()

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
