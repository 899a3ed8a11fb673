"""Per-rank half of the `disk` connector: reads and writes this rank's shard of blocks.

Saves (`kvdist.connectors.disk.saves`): after the forward, the step's blocks are gathered
in one batch and written by the rank's IO process (`writer_process`, else IO threads of
this process), one record per block. Loads (`kvdist.connectors.disk.loads`): records are
read and verified into a host buffer, ahead of any queued writes, and when a request's
reads are over its verified prefix of blocks is copied to the device in one batch. A block
that fails (missing shard, truncated, corrupt, other layout) is never copied to the
device; it and the blocks after it are reported through `get_block_ids_with_load_errors`.

A rank reads the heads it holds from whichever records hold them, so a cache written at
one tensor-parallel degree is read at any other. With more ranks than KV heads, the ranks
holding one head hold the same bytes: only the first of them (`ctx.writes_shared_kv`)
writes, and the others report their saves done at once (the request still completes only
once the writer's save is).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from kvdist.api.connector import ConnectorWorker
from kvdist.api.types import ConnectorContext
from kvdist.connectors.disk.io_pool import IOPool
from kvdist.connectors.disk.loads import DiskLoader
from kvdist.connectors.disk.record import RecordError, dtype_itemsize, dtype_name
from kvdist.connectors.disk.saves import DiskSaver
from kvdist.connectors.disk.settings import DiskSettings
from kvdist.connectors.disk.shard import RankShard
from kvdist.connectors.disk.staging import LoadBuffers
from kvdist.connectors.disk.store import directory_id, prepare_namespace_dir
from kvdist.connectors.disk.writer_process import WriterProcess
from kvdist.connectors.dropped_saves import DroppedSaves
from kvdist.connectors.placement import resolve_helper_cpus
from kvdist.connectors.settings import Counters, parse_settings
from kvdist.connectors.tracking import META_VERSION, check_meta, pack_hashes
from kvdist.kv.pinned import HostBufferPool
from kvdist.kv.transfer import BlockTransfer, check_kv_cache

log = logging.getLogger(__name__)


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
        read_only = self.settings.read_only
        ns_dir = prepare_namespace_dir(self.settings.path, ctx.model_namespace, read_only=read_only)
        self.shard = RankShard.of(ctx, ns_dir, read_only=read_only)
        self._directory = (
            f"cache directory {ns_dir}",
            directory_id(ns_dir, create=not read_only),
        )
        # Helpers run off the CPUs this rank is bound to (kvdist.connectors.placement).
        self._cpus = resolve_helper_cpus(self.settings.io_cpus, "disk connector")
        self._io = IOPool(self.settings.io_threads, f"kvdist-disk-r{ctx.rank}", cpus=self._cpus)
        self._counters = Counters()
        self._counters.add(saves_skipped=0)  # always in stats
        self._dropped = DroppedSaves("disk", ctx.rank, self._counters)
        self._loader = DiskLoader(self.shard, self._io, self._counters)
        self._saver = DiskSaver(
            self.shard, self._io, self._counters, fsync=self.settings.fsync,
            max_backlog_bytes=self.settings.max_save_backlog_bytes,
        )  # fmt: skip
        self._staging: dict[str, float] = {}
        self._reported_backlog = 0

    def agreed_settings(self) -> dict[str, Any]:
        """The settings but those of this rank's own IO (threads, CPUs, staging memory,
        the IO process, fsync), which may differ between ranks."""
        local = {"io_threads", "io_cpus", "staging_bytes", "writer_process", "fsync"}
        return {k: v for k, v in dataclasses.asdict(self.settings).items() if k not in local}

    def shared_storage(self) -> dict[str, str]:
        """The namespace directory: rank 0 plans loads and evictions from the records it
        sees there, so every rank must read and write the same one."""
        name, ident = self._directory
        return {} if ident is None else {name: ident}

    @property
    def stats(self) -> dict[str, float]:
        out = {**self._counters.snapshot(), **self._staging_stats()}
        process = self.shard.process
        if process is not None:  # 0 once it died: this rank's IO runs on its threads
            out["io_process_alive"] = float(process.alive)
        return out

    def _staging_stats(self) -> dict[str, float]:
        """Staging buffers allocated so far, reserved ones too (after shutdown: as they
        were then)."""
        pools = self._pools()
        if pools:
            self._staging = {
                "staging_allocations": sum(p.allocations for p in pools),
                "staging_bytes": sum(p.allocated_bytes for p in pools),
            }
        return self._staging

    def _pools(self) -> list[HostBufferPool]:
        """The host pools saves and loads stage through (once the cache is registered)."""
        if self.shard.xfer is None or self.shard.loads is None:
            return []
        return [self.shard.xfer.host_pool, self.shard.loads.pool]

    def register_kv_caches(self, kv_cache: torch.Tensor) -> None:
        check_kv_cache(kv_cache, self.ctx)
        # The IO process reads into and writes from staging buffers in shared memory.
        separate = self.settings.writer_process
        staging_bytes = self.settings.staging_bytes
        saves = HostBufferPool(pin=kv_cache.is_cuda, shared=separate)
        xfer = BlockTransfer(kv_cache, host_pool=saves)
        loads = LoadBuffers(
            HostBufferPool(pin=kv_cache.is_cuda, shared=separate, round_up=False),
            xfer.block_shape,
            kv_cache.dtype,
            budget_bytes=staging_bytes,
            block_bytes=xfer.block_bytes,
        )
        if staging_bytes and kv_cache.is_cuda:  # host memory is cheap to fault, not to pin
            saves.reserve(staging_bytes, 1)
            loads.reserve()
        self.shard.xfer, self.shard.loads = xfer, loads
        if separate and self.shard.process is None:
            try:
                process = WriterProcess(
                    self.settings.io_threads, f"kvdist-disk-writer-r{self.ctx.rank}", self._cpus
                )
            except OSError as exc:
                log.warning(
                    "disk connector (rank %d): cannot start the IO process (%s); this rank "
                    "reads and writes its records from threads of its own",
                    self.ctx.rank, exc,
                )  # fmt: skip
            else:
                self.shard.process = process
                for pool in self._pools():
                    pool.on_free = process.forget
                    for buf in pool.shared_buffers():  # the reserved ones
                        process.share(buf)

    def bind_connector_meta(self, meta: Any) -> None:
        self._drop_unsaved("at the next step")
        meta = check_meta(meta, "disk")
        super().bind_connector_meta(meta)
        self._saver.hold(meta["held"])
        self._loader.drain(meta.get("drain", ()))

    def start_load_kv(self, stream: torch.cuda.Stream | None) -> None:
        meta = self.get_connector_meta()
        if meta and meta["loads"]:
            self._loader.start(meta["loads"], stream)

    def wait_for_save(self, stream: torch.cuda.Stream | None) -> None:
        saves, stamps = self._take_saves()
        if self.ctx.writes_shared_kv:  # else a rank of the same heads writes them
            if saves:
                self._saver.start(saves, stream)
            if stamps:  # after the saves: a finished request's last blocks may be among them
                self._saver.stamp(stamps)

    def get_finished(
        self, finished_gen_req_ids: set[str], started_loading_req_ids: set[str]
    ) -> tuple[set[str], set[str]]:
        saved = self._saver.finished(finished_gen_req_ids)
        return saved, self._loader.finished(started_loading_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._loader.take_errors()

    def build_worker_meta(self) -> dict[str, Any] | None:
        """Which blocks this rank stored and did not store since the last step, which it
        failed to load (`lost`: its record was unusable), the bytes of its saves still
        waiting, whether a save found the filesystem full (`full`, only when so;
        `scheduler.DiskConnectorScheduler.update_from_workers`), and which stored blocks
        found their record there already (`there`, only when some did), and which loads
        of stopped requests rank 0 asked about are over (`loads_over`, only when some);
        None when none of that changed."""
        out = self._saver.take_outcomes()
        lost = self._loader.take_lost()
        drained = self._loader.take_drained()
        if (
            not out.stored
            and not out.not_stored
            and not lost
            and not drained
            and out.backlog == self._reported_backlog
        ):
            return None
        self._reported_backlog = out.backlog
        meta = {
            "v": META_VERSION,
            "stored": pack_hashes(out.stored),
            "not_stored": pack_hashes(out.not_stored),
            "lost": pack_hashes(lost),
            "backlog": out.backlog,
        }
        if out.full:  # a write found the filesystem full: rank 0 makes room
            meta["full"] = True
        if out.there:  # another engine saved them at the same moment: not this one's bytes
            meta["there"] = pack_hashes(out.there)
        if drained:  # rank 0 may evict what they read
            meta["loads_over"] = drained
        return meta

    def _drop_unsaved(self, when: str) -> None:
        """Drop the saves (and file-time stamps) of a step whose `wait_for_save` never
        came, reporting the blocks not stored (`kvdist.connectors.dropped_saves`)."""
        saves, _ = self._take_saves()
        if self.ctx.writes_shared_kv and saves:
            self._dropped.note(self._saver.drop(saves), when)

    def _take_saves(self) -> tuple[list[Any], list[Any]]:
        """This step's saves and file-time stamps not yet made or dropped, marked
        consumed: each is made, or dropped, once."""
        meta = self.get_connector_meta()
        if not meta or not (meta["saves"] or meta.get("stamp")):
            return [], []
        self._meta = {**meta, "saves": [], "stamp": []}
        return meta["saves"], meta.get("stamp") or []

    def shutdown(self) -> None:
        self._drop_unsaved("at shutdown")
        if self.shard.loads is not None:
            self._loader.close()  # loads still queued fail; those reading finish below
        if self.shard.process is not None:
            self.shard.process.shutdown()
        self._io.shutdown()
        self._staging_stats()  # kept past the pools
        # Every lease is back: unpin and free the buffers.
        if self.shard.loads is not None:
            self.shard.loads.close()
        if self.shard.xfer is not None:
            self.shard.xfer.host_pool.trim()
        # The KV cache (through the transfers) goes with the engine's last reference to it.
        self.shard.xfer = self.shard.loads = None
