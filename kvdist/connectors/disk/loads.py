"""The disk connector's loads on one rank: read and verify records, copy the good prefix.

Each request's blocks are read into one host staging buffer in tasks of a few MB, by the
rank's IO process when it has one (`writer_process`; its own interpreter, so reading and
checksumming never take the GIL from the engine's thread) and otherwise by IO threads of
this process. A block whose record of exactly this rank's heads is missing may still be
covered by records of other head ranges (a cache written at another tensor-parallel
degree): those are assembled on this process's IO threads. When a request's tasks are
over, its blocks up to the first unusable one are copied to the device in one batch; that
one and the blocks after it are reported as load errors (`take_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvdist.connectors.disk import staging
from kvdist.connectors.disk.io_pool import READ, IOPool
from kvdist.connectors.disk.record import CorruptRecord, RecordError, read_record
from kvdist.connectors.disk.shard import RankShard
from kvdist.connectors.disk.store import block_dir, cover, discard_record, list_records
from kvdist.connectors.disk.writer_process import MISSING, Done
from kvdist.connectors.settings import Counters
from kvdist.connectors.tracking import unpack_hashes, unpack_ids
from kvdist.kv.pinned import HostLease

log = logging.getLogger(__name__)


@dataclass
class LoadJob:
    """One request's load: its blocks, their keys and the staging buffer they land in."""

    req: str
    block_ids: list[int]
    keys: list[bytes]
    lease: HostLease
    rows: list[memoryview]  # the bytes of each block's row of `lease`
    ready: torch.cuda.Event | None
    remaining: int
    first_bad: int
    failed: set[int] | None = None  # set once the job is over


class DiskLoader:
    """Reads the loads a step's metadata names; reports them once over on this rank."""

    def __init__(self, shard: RankShard, io: IOPool, counters: Counters) -> None:
        self.shard = shard
        self._io = io
        self._counters = counters
        self._lock = threading.Lock()
        self._jobs: dict[str, LoadJob] = {}
        self._wait: set[str] = set()  # started-loading ids given, not reported yet
        self._errors: set[int] = set()

    # -- starting ------------------------------------------------------------------------

    def start(self, loads: list[dict[str, Any]], stream: torch.cuda.Stream | None) -> None:
        """Start reading each load of a step's metadata (`req`, `block_ids`, `hashes`)."""
        xfer = self.shard.transfers()
        for load in loads:
            ids, keys = unpack_ids(load["block_ids"]), unpack_hashes(load["hashes"])
            lease = xfer.host_buffer(len(ids))
            job = LoadJob(
                load["req"], ids, keys, lease, staging.byte_rows(lease.tensor),
                # Scatter only after the compute stream's earlier work on these blocks.
                xfer.mark(stream), remaining=len(ids), first_bad=len(ids),
            )  # fmt: skip
            with self._lock:
                self._jobs[job.req] = job
            if not ids:
                self._finish(job)
            for lo, hi in staging.task_ranges(len(ids), xfer.block_bytes):
                self._submit(job, lo, hi)

    def _submit(self, job: LoadJob, lo: int, hi: int) -> None:
        sh, shared = self.shard, job.lease.shared
        process = sh.usable_process(shared)
        if process is None:
            self._io.submit(READ, self._read_blocks, job, lo, hi)
            return
        assert shared is not None
        keys = job.keys[lo:hi]
        paths = [os.path.join(block_dir(sh.ns_dir, k), sh.name) for k in keys]
        process.read(
            shared, sh.transfers().block_bytes, list(range(lo, hi)), paths, keys,
            sh.own_header(), done=self._read_by_process(job, lo, hi),
        )  # fmt: skip

    # -- reading -------------------------------------------------------------------------

    def _read_by_process(self, job: LoadJob, lo: int, hi: int) -> Done:
        def done(got: list[int] | None, error: str | None, seconds: float) -> None:
            if got is None:  # the IO process is gone: read these blocks here
                self._io.submit(READ, self._read_blocks, job, lo, hi)
                return
            bad = next((lo + i for i, n in enumerate(got) if n == 0), len(job.keys))
            if error is not None:
                log.debug("disk connector: %s unusable: %s", job.req, error)
            missing = [lo + i for i, n in enumerate(got) if n == MISSING and lo + i < bad]
            if missing:  # other head ranges may cover them: assembled here
                self._io.submit(READ, self._read_missing, job, lo, hi, missing, bad, seconds)
            else:
                self._task_over(job, lo, hi, bad, seconds)

        return done

    def _read_missing(
        self, job: LoadJob, lo: int, hi: int, missing: list[int], bad: int, seconds: float
    ) -> None:
        t0 = time.perf_counter()
        for j in missing:
            if not self._read_or_log(job, j):
                bad = min(bad, j)
                break
        self._task_over(job, lo, hi, bad, seconds + time.perf_counter() - t0)

    def _read_blocks(self, job: LoadJob, lo: int, hi: int) -> None:
        """Read blocks `[lo, hi)` of `job` in order on this thread, up to the first
        unusable one."""
        t0 = time.perf_counter()
        bad = len(job.keys)  # none of this task's blocks failed
        for j in range(lo, hi):
            if j >= job.first_bad:  # racy read: a later block may still be read needlessly
                break
            if not self._read_or_log(job, j):
                bad = j
                break
        self._task_over(job, lo, hi, bad, time.perf_counter() - t0)

    def _read_or_log(self, job: LoadJob, j: int) -> bool:
        try:
            self._read_into(job.keys[j], job.rows[j], job.lease, j)
            return True
        except RecordError as exc:
            log.debug("disk connector: block %s unusable: %s", job.keys[j].hex(), exc)
        except Exception:
            log.exception("disk connector: unexpected error reading block %s", job.keys[j].hex())
        return False

    def _read_into(self, key: bytes, row: memoryview, lease: HostLease, j: int) -> None:
        """Block `key`'s heads of this rank into `row` (row `j` of `lease`)."""
        sh = self.shard
        ctx = sh.ctx
        s, e = ctx.kv_head_start, ctx.kv_head_end
        bdir = block_dir(sh.ns_dir, key)
        own = os.path.join(bdir, sh.name)
        try:
            # The common case: a record of exactly this rank's heads (the same TP degree).
            read_record(own, sh.header(key, s, e), into=row)
        except CorruptRecord as exc:
            discard_record(own, exc)  # the block misses from now on, and is saved again
            raise
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
            want = sh.header(key, rec.head_start, rec.head_end)
            payload: memoryview | None = None
            try:
                if (rec.head_start, rec.head_end) == (s, e):
                    read_record(rec.path, want, into=row)
                else:
                    _, payload = read_record(rec.path, want)
            except CorruptRecord as exc:
                discard_record(rec.path, exc)
                raise
            if payload is not None:
                src = torch.frombuffer(payload, dtype=torch.uint8).view(ctx.dtype).view(want.shape)
                lo, hi = max(s, rec.head_start), min(e, rec.head_end)
                lease.tensor[j][:, :, :, lo - s : hi - s].copy_(
                    src[:, :, :, lo - rec.head_start : hi - rec.head_start]
                )
            with contextlib.suppress(OSError):
                os.utime(rec.path)  # last use, for LRU eviction after a restart

    # -- finishing -----------------------------------------------------------------------

    def _task_over(self, job: LoadJob, lo: int, hi: int, bad: int, seconds: float) -> None:
        """Blocks `[lo, hi)` of `job` are read, up to `bad` (the first unusable one)."""
        with self._lock:
            job.first_bad = min(job.first_bad, bad)
            job.remaining -= hi - lo
            last = job.remaining == 0
        self._counters.add(io_seconds=seconds)
        if last:
            self._finish(job)

    def _finish(self, job: LoadJob) -> None:
        """Copy the job's good prefix of blocks to the device; the rest failed."""
        k = job.first_bad
        try:
            if k > 0:
                batch = self.shard.transfers().load(job.block_ids[:k], job.lease.tensor)
                batch.start(job.ready)
                batch.synchronize()
            failed = set(job.block_ids[k:])
        except Exception:
            log.exception("disk connector: copying loaded blocks to the device failed")
            k, failed = 0, set(job.block_ids)
        finally:
            job.lease.release()
        n = len(job.block_ids)
        self._counters.add(
            blocks_loaded=k,
            bytes_loaded=k * self.shard.transfers().block_bytes,
            load_failures=n - k,
        )
        with self._lock:
            job.failed = failed

    # -- reports -------------------------------------------------------------------------

    def finished(self, started: set[str]) -> set[str]:
        """Of the requests whose load started (`started`: newly given), those now over on
        this rank; their failed blocks go to `take_errors`."""
        loaded = set()
        with self._lock:
            self._wait |= started
            for r in self._wait:
                job = self._jobs.get(r)
                if job is None or job.failed is not None:  # unknown: nothing to wait for
                    loaded.add(r)
                    if job is not None:
                        self._errors |= job.failed or set()
                        del self._jobs[r]
            self._wait -= loaded
        return loaded

    def take_errors(self) -> set[int]:
        """Device blocks whose load failed since the last call."""
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors
