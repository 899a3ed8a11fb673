"""The disk connector's loads on one rank: read and verify records, copy the good prefix.

A request's blocks are read through the rank's load buffers (`staging.LoadBuffers`), a
buffer's worth (a chunk) at a time; chunks that find every buffer in use wait in a queue,
first come first served, and start as buffers come back. A chunk's records are read in
tasks of a few MB, by the rank's IO process when it has one (`writer_process`; its own
interpreter, so reading and checksumming never take the GIL from the engine's thread) and
otherwise by IO threads of this process. A block whose record of exactly this rank's heads
is missing may still be covered by records of other head ranges (a cache written at
another tensor-parallel degree): those are assembled on this process's IO threads. When a
chunk's reads are over, its blocks before the request's first unusable one are copied to
the device and the buffer goes back. That block and the blocks after it are reported as
load errors (`take_errors`); chunks wholly after it are not read at all.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvdist.connectors.disk import staging
from kvdist.connectors.disk.io_pool import READ, IOPool
from kvdist.connectors.disk.record import (
    CorruptRecord,
    RecordError,
    RecordIOError,
    UnreadableRecord,
    read_record,
)
from kvdist.connectors.disk.shard import RankShard
from kvdist.connectors.disk.store import (
    block_dir,
    cover,
    discard_record,
    list_records,
    record_io_failed,
    record_used,
)
from kvdist.connectors.disk.writer_process import MISSING, Done
from kvdist.connectors.settings import Counters
from kvdist.connectors.tracking import unpack_hashes, unpack_ids
from kvdist.kv.pinned import HostLease

log = logging.getLogger(__name__)


@dataclass
class LoadJob:
    """One request's load: its blocks and their keys."""

    req: str
    block_ids: list[int]
    keys: list[bytes]
    ready: torch.cuda.Event | None
    chunks: int  # not over yet
    first_bad: int
    failed: set[int] | None = None  # set once the job is over
    unusable: list[bytes] = field(default_factory=list)
    """Keys of the blocks whose records could not be read (the first of each task's)."""


@dataclass
class Chunk:
    """Blocks `[lo, hi)` of a job, read through one load buffer (row `j - lo` holds block
    `j`)."""

    job: LoadJob
    lo: int
    hi: int
    lease: HostLease | None = None
    rows: list[memoryview] = field(default_factory=list)
    remaining: int = 0


class DiskLoader:
    """Reads the loads a step's metadata names; reports them once over on this rank."""

    def __init__(self, shard: RankShard, io: IOPool, counters: Counters) -> None:
        self.shard = shard
        self._io = io
        self._counters = counters
        self._lock = threading.Lock()
        self._jobs: dict[str, LoadJob] = {}
        self._queue: deque[Chunk] = deque()  # chunks waiting for a load buffer
        self._wait: set[str] = set()  # started-loading ids given, not reported yet
        self._errors: set[int] = set()
        self._lost: list[bytes] = []  # keys of unreadable records, for rank 0's index
        self._drain: set[str] = set()  # stopped requests rank 0 waits for (`load_drains`)
        self._closing = False  # no chunk starts from now on

    # -- starting ------------------------------------------------------------------------

    def start(self, loads: list[dict[str, Any]], stream: torch.cuda.Stream | None) -> None:
        """Start reading each load of a step's metadata (`req`, `block_ids`, `hashes`)."""
        xfer = self.shard.transfers()
        per = self.shard.load_buffers().rows
        for load in loads:
            ids, keys = unpack_ids(load["block_ids"]), unpack_hashes(load["hashes"])
            # Scatter only after the compute stream's earlier work on these blocks.
            spans = [(lo, min(lo + per, len(ids))) for lo in range(0, len(ids), per)]
            job = LoadJob(load["req"], ids, keys, xfer.mark(stream), len(spans), len(ids))
            with self._lock:
                self._jobs[job.req] = job
                self._queue.extend(Chunk(job, lo, hi) for lo, hi in spans)
            if not spans:
                self._job_over(job)
        self._pump()

    def close(self) -> None:
        """Start no more chunks (the worker is shutting down): the queued ones fail, so
        every job ends and every buffer comes back once the chunks already reading end."""
        with self._lock:
            self._closing = True
        self._pump()

    def _pump(self) -> None:
        """Start queued chunks while load buffers are free."""
        buffers = self.shard.load_buffers()
        while True:
            with self._lock:
                if not self._queue:
                    return
                chunk = self._queue[0]
                if self._closing:
                    chunk.job.first_bad = min(chunk.job.first_bad, chunk.lo)
                skip = chunk.lo >= chunk.job.first_bad  # an earlier block failed: no use
                if not skip and not buffers.claim():
                    return  # every buffer is busy: a chunk ending calls this again
                self._queue.popleft()
            if skip:
                self._chunk_over(chunk)
                continue
            try:
                lease, rows = buffers.acquire(chunk.hi - chunk.lo)
            except Exception:
                log.exception("disk connector: no host buffer for a load; its blocks miss")
                with self._lock:
                    chunk.job.first_bad = min(chunk.job.first_bad, chunk.lo)
                self._chunk_over(chunk)
                continue
            chunk.lease, chunk.rows = lease, rows
            chunk.remaining = chunk.hi - chunk.lo
            block_bytes = self.shard.transfers().block_bytes
            for lo, hi in staging.task_ranges(chunk.hi - chunk.lo, block_bytes):
                try:
                    self._submit(chunk, chunk.lo + lo, chunk.lo + hi)
                except Exception:  # e.g. the IO threads stopped: those blocks fail
                    log.exception("disk connector: a load task could not start")
                    self._task_over(chunk, chunk.lo + lo, chunk.lo + hi, chunk.lo + lo, 0.0)

    def _submit(self, chunk: Chunk, lo: int, hi: int) -> None:
        sh, job = self.shard, chunk.job
        assert chunk.lease is not None
        shared = chunk.lease.shared
        process = sh.usable_process(shared)
        if process is None:
            self._io.submit(READ, self._read_blocks, chunk, lo, hi)
            return
        assert shared is not None
        keys = job.keys[lo:hi]
        paths = [sh.own_path(k) for k in keys]
        process.read(
            shared, sh.transfers().block_bytes, list(range(lo - chunk.lo, hi - chunk.lo)),
            paths, keys, sh.own_header(), read_only=sh.read_only,
            done=self._read_by_process(chunk, lo, hi),
        )  # fmt: skip

    # -- reading -------------------------------------------------------------------------

    def _read_by_process(self, chunk: Chunk, lo: int, hi: int) -> Done:
        def done(got: list[int] | None, error: str | None, seconds: float) -> None:
            if got is None:  # the IO process is gone: read these blocks here
                self._io.submit(READ, self._read_blocks, chunk, lo, hi)
                return
            bad = next((lo + i for i, n in enumerate(got) if n == 0), len(chunk.job.keys))
            if error is not None:
                log.debug("disk connector: %s unusable: %s", chunk.job.req, error)
            missing = [lo + i for i, n in enumerate(got) if n == MISSING and lo + i < bad]
            if missing:  # other head ranges may cover them: assembled here
                self._io.submit(READ, self._read_missing, chunk, lo, hi, missing, bad, seconds)
            else:
                self._task_over(chunk, lo, hi, bad, seconds)

        return done

    def _read_missing(
        self, chunk: Chunk, lo: int, hi: int, missing: list[int], bad: int, seconds: float
    ) -> None:
        t0 = time.perf_counter()
        for j in missing:
            if not self._read_or_log(chunk, j):
                bad = min(bad, j)
                break
        self._task_over(chunk, lo, hi, bad, seconds + time.perf_counter() - t0)

    def _read_blocks(self, chunk: Chunk, lo: int, hi: int) -> None:
        """Read blocks `[lo, hi)` of `chunk`'s job in order on this thread, up to the
        first unusable one."""
        t0 = time.perf_counter()
        bad = len(chunk.job.keys)  # none of this task's blocks failed
        for j in range(lo, hi):
            if j >= chunk.job.first_bad:  # racy read: a later block may still be read needlessly
                break
            if not self._read_or_log(chunk, j):
                bad = j
                break
        self._task_over(chunk, lo, hi, bad, time.perf_counter() - t0)

    def _read_or_log(self, chunk: Chunk, j: int) -> bool:
        key = chunk.job.keys[j]
        assert chunk.lease is not None
        try:
            self._read_into(key, chunk.rows[j - chunk.lo], chunk.lease, j - chunk.lo)
            return True
        except RecordError as exc:
            log.debug("disk connector: block %s unusable: %s", key.hex(), exc)
        except Exception:
            log.exception("disk connector: unexpected error reading block %s", key.hex())
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
        except (CorruptRecord, UnreadableRecord) as exc:
            discard_record(own, exc, keep=sh.read_only)  # the block misses from now on
            raise
        except RecordIOError as exc:
            record_io_failed(own, exc)
            raise
        except RecordError:
            if os.path.exists(own):
                raise  # there, but unusable
        else:
            record_used(own, read_only=sh.read_only)
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
            except (CorruptRecord, UnreadableRecord) as exc:
                discard_record(rec.path, exc, keep=sh.read_only)
                raise
            except RecordIOError as exc:
                record_io_failed(rec.path, exc)
                raise
            if payload is not None:
                src = torch.frombuffer(payload, dtype=torch.uint8).view(ctx.dtype).view(want.shape)
                lo, hi = max(s, rec.head_start), min(e, rec.head_end)
                lease.tensor[j][:, :, :, lo - s : hi - s].copy_(
                    src[:, :, :, lo - rec.head_start : hi - rec.head_start]
                )
            record_used(rec.path, read_only=sh.read_only)

    # -- finishing -----------------------------------------------------------------------

    def _task_over(self, chunk: Chunk, lo: int, hi: int, bad: int, seconds: float) -> None:
        """Blocks `[lo, hi)` of `chunk` are read, up to `bad` (the first unusable one)."""
        job = chunk.job
        with self._lock:
            if lo <= bad < hi:  # block `bad`'s read failed (blocks after it were not read)
                job.unusable.append(job.keys[bad])
            job.first_bad = min(job.first_bad, bad)
            chunk.remaining -= hi - lo
            last = chunk.remaining == 0
        self._counters.add(io_seconds=seconds, load_io_seconds=seconds)
        if last:
            self._chunk_over(chunk)

    def _chunk_over(self, chunk: Chunk) -> None:
        """Copy the chunk's blocks before its job's first unusable one to the device, give
        its buffer back and start the chunks waiting for one."""
        job, lease = chunk.job, chunk.lease
        if lease is not None:
            try:
                k = min(chunk.hi, job.first_bad) - chunk.lo
                if k > 0:
                    ids = job.block_ids[chunk.lo : chunk.lo + k]
                    batch = self.shard.transfers().load(ids, lease.tensor)
                    batch.start(job.ready)
                    batch.synchronize()
            except Exception:
                log.exception("disk connector: copying loaded blocks to the device failed")
                with self._lock:
                    job.first_bad = min(job.first_bad, chunk.lo)
            finally:
                chunk.lease = None
                self.shard.load_buffers().give_back((lease, chunk.rows))
        with self._lock:
            job.chunks -= 1
            last = job.chunks == 0
        if last:
            self._job_over(job)
        if lease is not None:
            self._pump()

    def _job_over(self, job: LoadJob) -> None:
        """Every chunk of the job is over: the blocks from its first unusable one failed."""
        k, n = job.first_bad, len(job.block_ids)
        self._counters.add(
            blocks_loaded=k,
            bytes_loaded=k * self.shard.transfers().block_bytes,
            load_failures=n - k,
        )
        with self._lock:
            job.failed = set(job.block_ids[k:])

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
                        self._lost += job.unusable
                        del self._jobs[r]
            self._wait -= loaded
        return loaded

    def drain(self, request_ids: Iterable[str]) -> None:
        """Rank 0 asks when these stopped requests' loads are over (`take_drained`)."""
        with self._lock:
            self._drain.update(request_ids)

    def take_drained(self) -> list[str]:
        """Of the requests `drain` named, those with no load reading on this rank now
        (over, or none started: a load of the metadata that named them started first)."""
        if not self._drain:  # every step: mostly none
            return []
        with self._lock:
            over = [
                r
                for r in self._drain
                if (job := self._jobs.get(r)) is None or job.failed is not None
            ]
            self._drain.difference_update(over)
        return sorted(over)

    def take_errors(self) -> set[int]:
        """Device blocks whose load failed since the last call."""
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def take_lost(self) -> list[bytes]:
        """The keys of the blocks whose records could not be read since the last call
        (reported with the failed device blocks; removed, when corrupt): rank 0's index
        must stop taking them for stored. Blocks that failed only because an earlier one
        did, or for want of a buffer, are not among them: their records are fine."""
        with self._lock:
            lost, self._lost = self._lost, []
        return lost
