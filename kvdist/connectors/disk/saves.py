"""The disk connector's saves on one rank: gather a step's blocks, write one record each.

After the forward, the step's blocks are gathered in one batch into a staging buffer and
copied to one pooled host buffer (the engine may reuse the device blocks once the gather
ran). The rank's IO process (`writer_process`; its own interpreter, so checksums and
writes never take the GIL from the engine's thread), else IO threads of this process,
then checksum and write one record per block, in tasks of a few MB. A request's save is
over on this rank once every block of it was written or failed; a failed write is logged
once and counted, and the request completes without that block. Which blocks were
stored (and of those, which found their record there already: another engine saved the
block at the same moment) and which were not (failed or skipped), and the bytes still
waiting, are taken by `take_outcomes` for rank 0's scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from kvdist.connectors.disk import staging
from kvdist.connectors.disk.io_pool import STAMP, WRITE, IOPool
from kvdist.connectors.disk.shard import RankShard
from kvdist.connectors.disk.store import stamp_chain
from kvdist.connectors.disk.writer_process import DISK_FULL, Done, write_blocks
from kvdist.connectors.settings import Counters
from kvdist.connectors.tracking import unpack_hashes, unpack_ids
from kvdist.kv.hashing import HASH_BYTES
from kvdist.kv.pinned import HostLease
from kvdist.kv.transfer import SaveBatch

log = logging.getLogger(__name__)

_MAX_OUTCOMES = 1 << 18  # block keys kept for the next report, per kind (4 MiB of keys)


class SaveOutcomes(NamedTuple):
    """What became of this rank's saves since the last `DiskSaver.take_outcomes`."""

    stored: list[bytes]
    not_stored: list[bytes]
    """Failed or skipped."""
    there: list[bytes]
    """Of `stored`, those whose record was there already (`record.Written.created`)."""
    backlog: int
    """Bytes still waiting to be written."""
    full: bool
    """Some write found no room."""


class _NoHostBuffer(Exception):
    """The host memory to stage a step's saves in could not be had."""


@dataclass
class SaveStep:
    """One step's saves: each block's request and key, and the host buffer they go through."""

    reqs: list[str]
    keys: list[bytes]
    lease: HostLease
    batch: SaveBatch
    counts: dict[str, int]  # request -> its blocks in this step
    remaining: int = 0
    rows: list[memoryview] = field(default_factory=list)
    synced: bool = False  # the copy to `lease` is complete (checked once per step)
    sync_lock: threading.Lock = field(default_factory=threading.Lock)


class DiskSaver:
    """Writes the saves a step's metadata names; reports each held request once its
    blocks are over on this rank."""

    def __init__(
        self,
        shard: RankShard,
        io: IOPool,
        counters: Counters,
        *,
        fsync: bool,
        max_backlog_bytes: int | None = None,
    ) -> None:
        self.shard = shard
        self._io = io
        self._counters = counters
        self._fsync = fsync
        self._max_backlog = max_backlog_bytes
        self.backlog_bytes = 0
        """Bytes of gathered blocks not yet written (or failed)."""
        self._skip_logged = False
        self._lock = threading.Lock()
        self._outstanding: dict[str, int] = {}  # request -> block writes not over
        self._stamp_after: dict[str, list[str]] = {}  # request -> its chain's records
        self._held: set[str] = set()  # ids the scheduler held, not given as finished yet
        self._wait: set[str] = set()  # held ids given as finished, not reported yet
        self._error_logged = False
        self._full = False  # a write found no room since the last report
        # Keys written / failed or skipped since `take_outcomes` (bounded, in case an
        # engine never asks: the oldest go first).
        self._stored: deque[bytes] = deque(maxlen=_MAX_OUTCOMES)
        self._not_stored: deque[bytes] = deque(maxlen=_MAX_OUTCOMES)
        self._there: deque[bytes] = deque(maxlen=_MAX_OUTCOMES)

    def hold(self, req_ids: list[str]) -> None:
        """Requests whose blocks the scheduler holds until their save is reported."""
        with self._lock:
            self._held.update(req_ids)

    # -- starting ------------------------------------------------------------------------

    def start(self, saves: list[dict[str, Any]], stream: torch.cuda.Stream | None) -> None:
        """Gather the blocks of each save of a step's metadata (`req`, `block_ids`,
        `hashes`) after `stream`'s work, then write them in the background; or skip them
        all when they would take the backlog past its bound."""
        if self._skip(saves):
            return
        try:
            step = self._gather(saves)
        except _NoHostBuffer as exc:  # saves are optional: the step's blocks are not saved
            keys = [k for save in saves for k in unpack_hashes(save["hashes"])]
            with self._lock:
                self._not_stored += keys
            self._counters.add(save_failures=len(keys))
            if keys:
                self._log_failure(keys[0], str(exc))
            return
        step.batch.commit(stream)
        step.batch.release_blocks(stream)
        with self._lock:
            for req, n in step.counts.items():
                self._outstanding[req] = self._outstanding.get(req, 0) + n
            step.remaining = len(step.keys)
            self.backlog_bytes += len(step.keys) * self.shard.transfers().block_bytes
        block_bytes = self.shard.transfers().block_bytes
        ranges = staging.task_ranges(len(step.keys), block_bytes)
        process = self.shard.usable_process(step.lease.shared)
        if process is not None:
            assert step.lease.shared is not None
            for lo, hi in ranges:
                process.write(
                    step.lease.shared, block_bytes, list(range(lo, hi)), step.keys[lo:hi],
                    self.shard.own_header(), self.shard.ns_dir, self.shard.name,
                    fsync=self._fsync, wait=lambda: self._wait_for_copy(step),
                    done=self._done_for(step, lo, hi), label=self.shard.ctx.model_namespace,
                )  # fmt: skip
            return
        step.rows = staging.byte_rows(step.lease.tensor)
        for lo, hi in ranges:
            self._io.submit(WRITE, self._write_blocks, step, lo, hi)

    def stamp(self, chains: list[list[Any]]) -> None:
        """Order the file times of finished requests' blocks on disk (`store.stamp_chain`),
        each chain given as `[request id, packed hashes]` (first block first), once the
        request's own writes on this rank are over: a record written after its stamp would
        be newer than the blocks before it. (A chain block another request is writing may
        still land after it; that request's own stamp orders it again.)"""
        now = []
        with self._lock:
            for req, packed in chains:
                paths = [self.shard.own_path(k) for k in unpack_hashes(packed)]
                if self._outstanding.get(req, 0) > 0:
                    self._stamp_after[req] = paths
                else:
                    now.append(paths)
        for paths in now:
            self._stamp_now(paths)

    def _stamp_now(self, paths: list[str]) -> None:
        process = self.shard.process
        if process is not None and process.stamp(paths):
            return
        try:
            self._io.submit(STAMP, stamp_chain, paths)
        except RuntimeError:  # the IO threads are draining (shutdown): this is one of them
            stamp_chain(paths)

    def drop(self, saves: list[dict[str, Any]]) -> int:
        """Make none of `saves` (a step whose `wait_for_save` never came): their blocks
        are reported not stored. Returns how many blocks they named."""
        keys = [k for save in saves for k in unpack_hashes(save["hashes"])]
        with self._lock:
            self._not_stored += keys
        return len(keys)

    def _skip(self, saves: list[dict[str, Any]]) -> bool:
        """Whether this step's saves would take the backlog past its bound (a step alone
        larger than the bound is still saved when nothing waits)."""
        if self._max_backlog is None:
            return False
        n = sum(len(save["hashes"]) // HASH_BYTES for save in saves)
        with self._lock:
            waiting = self.backlog_bytes
            if not waiting or waiting + n * self.shard.transfers().block_bytes <= self._max_backlog:
                return False
            for save in saves:
                self._not_stored += unpack_hashes(save["hashes"])
        self._counters.add(saves_skipped=n)
        if not self._skip_logged:
            self._skip_logged = True
            log.warning(
                "disk connector (rank %d): %d bytes of saves wait to be written, past "
                "max_save_backlog_bytes=%d: this step's %d blocks are not saved (the disk "
                "writes slower than the engine saves; later skips are only counted in "
                "stats['saves_skipped'])",
                self.shard.ctx.rank, waiting, self._max_backlog, n,
            )  # fmt: skip
        return True

    def _gather(self, saves: list[dict[str, Any]]) -> SaveStep:
        reqs, ids, keys = [], [], []
        counts: dict[str, int] = {}
        for save in saves:
            k = unpack_hashes(save["hashes"])
            ids += unpack_ids(save["block_ids"])
            keys += k
            reqs += [save["req"]] * len(k)
            counts[save["req"]] = counts.get(save["req"], 0) + len(k)
        xfer = self.shard.transfers()
        try:
            lease = xfer.host_buffer(len(ids))
        except (OSError, MemoryError, RuntimeError) as exc:  # RuntimeError: torch's
            raise _NoHostBuffer(
                f"no host buffer to stage the step's saves in ({type(exc).__name__}: {exc})"
            ) from exc
        try:
            batch = xfer.save(ids, lease.tensor)
        except BaseException:
            lease.release()
            raise
        return SaveStep(reqs, keys, lease, batch, counts)

    # -- writing -------------------------------------------------------------------------

    def _done_for(self, step: SaveStep, lo: int, hi: int) -> Done:
        def done(written: list[int] | None, error: str | None, seconds: float) -> None:
            if written is None:  # the IO process did not run it (gone, or never got the
                # buffer): written here instead, from the same staging buffer
                self._io.submit(WRITE, self._write_blocks, step, lo, hi)
                return
            self._writes_done(step, lo, hi, written, error, seconds)

        return done

    @staticmethod
    def _wait_for_copy(step: SaveStep) -> None:
        """Block until the step's blocks are in its host buffer (the first caller waits)."""
        with step.sync_lock:
            if not step.synced:
                step.batch.synchronize()
                step.synced = True

    def _write_blocks(self, step: SaveStep, lo: int, hi: int) -> None:
        """Write blocks `[lo, hi)` of `step` from this process, one record each."""
        t0 = time.perf_counter()
        try:
            self._wait_for_copy(step)
        except Exception as exc:  # the copy failed: nothing to write
            failed = f"{type(exc).__name__}: {exc}"
            self._writes_done(step, lo, hi, [0] * (hi - lo), failed, time.perf_counter() - t0)
            return
        sh = self.shard
        with step.sync_lock:  # the IO process's tasks never needed them
            if not step.rows:
                step.rows = staging.byte_rows(step.lease.tensor)
        written, error = write_blocks(
            sh.ns_dir, sh.name, sh.own_header(), step.keys[lo:hi], step.rows[lo:hi], self._fsync,
            sh.ctx.model_namespace,
        )  # fmt: skip
        self._writes_done(step, lo, hi, written, error, time.perf_counter() - t0)

    def _writes_done(
        self,
        step: SaveStep,
        lo: int,
        hi: int,
        written: list[int],
        error: str | None,
        seconds: float,
    ) -> None:
        """Blocks `[lo, hi)` of `step` are over: `written[i]` bytes of block `lo + i` (0:
        its write failed, `error` says why; negated: its record was there already)."""
        failed = [step.keys[lo + i] for i, n in enumerate(written) if not n]
        self._counters.add(
            io_seconds=seconds,
            blocks_saved=len(written) - len(failed),
            bytes_saved=sum(abs(n) for n in written),
            save_failures=len(failed),
        )
        if failed:
            self._log_failure(failed[0], error or "not written")
        stamps = []
        with self._lock:
            if failed and error is not None and error.startswith(DISK_FULL):
                self._full = True
            for i, n in enumerate(written):
                (self._stored if n else self._not_stored).append(step.keys[lo + i])
                if n < 0:
                    self._there.append(step.keys[lo + i])
            for j in range(lo, hi):
                req = step.reqs[j]
                self._outstanding[req] -= 1
                if self._outstanding[req] == 0 and req in self._stamp_after:
                    stamps.append(self._stamp_after.pop(req))
            step.remaining -= hi - lo
            self.backlog_bytes -= (hi - lo) * self.shard.transfers().block_bytes
            last = step.remaining == 0
        if last:
            step.lease.release()
        for paths in stamps:
            self._stamp_now(paths)

    def _log_failure(self, key: bytes, error: str) -> None:
        with self._lock:
            first, self._error_logged = not self._error_logged, True
        if first:
            log.warning(
                "disk connector (rank %d): saving block %s under %s failed: %s; the request "
                "completes without it. Later save errors are only counted in "
                "stats['save_failures'].",
                self.shard.ctx.rank, key.hex(), self.shard.ns_dir, error,
            )  # fmt: skip

    # -- reports -------------------------------------------------------------------------

    def take_outcomes(self) -> SaveOutcomes:
        """What became of the saves since the last call."""
        with self._lock:
            taken = SaveOutcomes(
                list(self._stored),
                list(self._not_stored),
                list(self._there),
                self.backlog_bytes,
                self._full,
            )
            self._stored.clear()
            self._not_stored.clear()
            self._there.clear()
            self._full = False
            return taken

    def finished(self, finished_gen_req_ids: set[str]) -> set[str]:
        """Of the held requests given as finished (now or before), those whose blocks are
        all over on this rank. Ids never held were not async saves and are not reported."""
        with self._lock:
            held = finished_gen_req_ids & self._held
            self._held -= held
            self._wait |= held
            saved = {r for r in self._wait if self._outstanding.get(r, 0) == 0}
            self._wait -= saved
            for r in saved:
                self._outstanding.pop(r, None)
        return saved
