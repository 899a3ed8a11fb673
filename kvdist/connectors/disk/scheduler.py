"""Rank-0 half of the `disk` connector: hit answers, save and load plans, eviction.

Meta sent to every rank each step (plain msgpack data):

    {"v": 1,
     "loads": [{"req": str, "block_ids": bytes, "hashes": bytes}, ...],
     "saves": [{"req": str, "block_ids": bytes, "hashes": bytes}, ...],
     "held": [request ids whose blocks `request_finished` held since the last meta],
     "stamp": [[request id, hashes of its blocks on disk], ...],  (requests finished
                                                                 since the last meta)
     "drain": [request ids]}  (only when some: requests that stopped while loading)

`block_ids`: little-endian int32 device block ids; `hashes`: the blocks' 16-byte keys,
concatenated, in the same order. Loads are asynchronous (the request waits until every rank
has them); a load names the blocks from the on-device hit onwards, in order. `held` tells
the workers which finished ids to report (the engine gives them every finished id, and a
report for one that was not held is an error); `request_finished(r)` comes before the meta
of the step whose `finished_req_ids` hold `r`, so `held` is never late. `stamp`: each
writing rank sets the file times of its records of those blocks, first block newest
(`store.stamp_chain`), once its writes of the request's blocks are over: the order this
index evicts in (a prefix's last blocks first) then survives a restart and holds for
`kvdist cache evict`, which know only file times. `drain`: requests that stopped while
their loads may still be reading; the blocks those read are not evicted until every
rank reported them over (`load_drains`).

The workers report back which blocks they stored and the bytes they still have to write
(`save_reports`): a block is complete once every writing rank stored it, and may be saved
again once every one reported and some did not. The step's saves are skipped on every
rank together when they would take a rank's backlog past `max_save_backlog_bytes` (as
the rank itself would), so no block is left incomplete by a rank deciding alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kvdist.api.connector import ConnectorScheduler
from kvdist.api.types import ConnectorContext, Request, SchedulerOutput
from kvdist.connectors.disk.index import DiskIndex
from kvdist.connectors.disk.load_drains import LoadDrains
from kvdist.connectors.disk.record import RecordHeader, dtype_name, encode_header
from kvdist.connectors.disk.save_reports import SaveReports
from kvdist.connectors.disk.settings import DiskSettings
from kvdist.connectors.disk.store import namespace_id, prepare_namespace_dir
from kvdist.connectors.placement import resolve_helper_cpus
from kvdist.connectors.settings import Counters, parse_settings
from kvdist.connectors.tracking import (
    META_VERSION,
    RequestTracker,
    TrackedRequest,
    earlier_blocks,
    pack_hashes,
    pack_ids,
    touched_blocks,
)

log = logging.getLogger(__name__)


def full_block_bytes(ctx: ConnectorContext) -> int:
    """Bytes of one block on disk, every rank's record together (header estimate included)."""
    payload = ctx.num_layers * 2 * ctx.block_size * ctx.num_kv_heads * ctx.head_dim
    header = RecordHeader(
        key=bytes(16),
        ns=bytes(8),
        dtype=dtype_name(ctx.dtype),
        num_layers=ctx.num_layers,
        block_size=ctx.block_size,
        num_kv_heads=ctx.num_kv_heads,
        head_start=ctx.num_kv_heads,
        head_end=ctx.num_kv_heads,
        head_dim=ctx.head_dim,
        payload_bytes=1 << 40,
        crc32=1 << 31,
    )
    return payload * ctx.element_size + len(encode_header(header)) * ctx.world_size


class DiskConnectorScheduler(ConnectorScheduler):
    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.settings = parse_settings(DiskSettings, ctx.kwargs, "disk")
        cap, block = self.settings.capacity_bytes, full_block_bytes(ctx)
        if cap is not None and cap < block:
            raise ValueError(
                f"disk connector: capacity_bytes={cap} holds no block (one takes {block} "
                "bytes on disk: every rank's shard, with its record's header); raise it, or "
                "leave it unset for no bound"
            )
        self.ns_dir = prepare_namespace_dir(
            self.settings.path, ctx.model_namespace, read_only=self.settings.read_only
        )
        self.namespace_id = namespace_id(ctx.model_namespace)
        self._index = DiskIndex(
            self.ns_dir,
            ctx.num_kv_heads,
            self.settings.capacity_bytes,
            pending_timeout_s=self.settings.pending_timeout_s,
            cpus=resolve_helper_cpus(self.settings.io_cpus, "disk connector"),
            read_only=self.settings.read_only,
        )
        self._index.scan()
        if self.settings.rescan_s is not None:
            self._index.start_rescans(self.settings.rescan_s)
        self._tracker = RequestTracker(ctx.block_size, ctx.num_blocks)
        self._drains = LoadDrains(ctx.world_size, self._tracker)
        self._block_bytes = full_block_bytes(ctx)
        self._loads: list[dict[str, Any]] = []
        self._held: list[str] = []
        self._finishing: list[tuple[TrackedRequest, int, int]] = []  # saved next meta
        self._stamping: list[tuple[str, list[bytes]]] = []  # finished chains, next meta
        self._reports = SaveReports(ctx, self._index, give_up_s=self.settings.pending_timeout_s)
        self._index.in_flight = self._reports.awaits  # pending while a rank still writes
        self._skip_logged = False
        self._counters = Counters()
        self._counters.add(
            saves_skipped_all_ranks=0,
            blocks_stored_all_ranks=0,
            blocks_not_stored=0,
            disk_full_reports=0,
        )

    @property
    def stats(self) -> dict[str, float]:
        s = self._counters.snapshot()
        s["evictions"] += self._index.evictions - self._index.evictions_taken_back
        s["trims_deferred"] = self._index.trims_deferred
        s["evictions_already_gone"] = self._index.evictions_already_gone
        s["bytes_accounted"] = self._index.total_bytes
        s["blocks_learnt"] = self._index.blocks_learnt
        s["others_growth_bytes"] = self._index.others_growth
        return s

    @property
    def index(self) -> DiskIndex:
        return self._index

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        return self._tracker.match(request, num_computed_tokens, self._index.probe)

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        blocks = self._tracker.admit(request, block_ids, num_external_tokens)
        if blocks:
            keys = [request.block_hashes[i] for i in blocks]
            self._index.touch_chain(keys)
            self._tracker.pin(request.request_id, keys)
            self._loads.append(
                {
                    "req": request.request_id,
                    "block_ids": pack_ids([block_ids[i] for i in blocks]),
                    "hashes": pack_hashes(keys),
                }
            )
        found = len(blocks)
        self._counters.add(hits=found, misses=self._tracker.misses(request, found))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> dict[str, Any]:
        # Other engines' writes and evictions, when a background re-read found some.
        self._index.apply_rescan(self._tracker.is_pinned)
        # Within capacity (a restart with a smaller one), and room on a filesystem found full.
        self._index.keep_within_limit(self._tracker.is_pinned)
        self._reports.expire()
        self._drains.expire(self._give_up_s())
        finishing, self._finishing = self._finishing, []
        # The blocks worth saving, first: whether the step saves at all depends on them.
        wanted: list[tuple[TrackedRequest, list[int]]] = []
        planned: set[bytes] = set()
        for t, lo, hi in [*self._tracker.update(scheduler_output), *finishing]:
            if self.settings.read_only:
                continue  # the requests are tracked (for loads); nothing is saved
            picks = []
            for i in range(lo, hi):
                key = t.request.block_hashes[i]
                computed = i >= t.first_computed
                if key not in planned and self._index.wants_save(key, computed=computed):
                    planned.add(key)
                    picks.append(i)
            if picks:
                wanted.append((t, picks))
        if wanted and self._backlog_full(len(planned)):
            wanted = []
        saves = []

        def keep(key: bytes) -> bool:  # not evicted to make room: in use, or saved now
            return key in planned or self._tracker.is_pinned(key)

        for t, picks in wanted:
            ids, keys = [], []
            for i in picks:
                key = t.request.block_hashes[i]
                earlier = earlier_blocks(t, i)

                # Nor the blocks before this one, on disk between its picks too: this
                # block's prefix.
                def keep_here(k: bytes, earlier: Callable[[bytes], bool] = earlier) -> bool:
                    return keep(k) or earlier(k)

                if not self._index.reserve(key, self._block_bytes, keep_here):
                    continue  # full of pinned, in-flight or this prefix's blocks: skip it
                ids.append(t.block_ids[i])
                keys.append(key)
            if keys:
                self._index.touch_chain(
                    touched_blocks(t, picks[0], picks[-1] + 1, self.ctx.block_size)
                )
                self._reports.planned(keys)
                t.saves_issued = True
                saves.append(
                    {
                        "req": t.request.request_id,
                        "block_ids": pack_ids(ids),
                        "hashes": pack_hashes(keys),
                    }
                )
        loads, self._loads = self._loads, []
        held, self._held = self._held, []
        meta = {
            "v": META_VERSION,
            "loads": loads,
            "saves": saves,
            "held": held,
            "stamp": self._take_stamps(),
        }
        drain = self._drains.take_new()
        if drain:
            meta["drain"] = drain
        return meta

    def _give_up_s(self) -> float:
        """How long a report is waited for (`SaveReports.expire`'s rule)."""
        return self.settings.pending_timeout_s * (10 if self._reports.active else 1)

    def _take_stamps(self) -> list[list[Any]]:
        """The chains finished since the last meta, each up to its first block not on disk
        (the blocks after it cannot be loaded: no order to keep)."""
        stamps = []
        for req, keys in self._stamping:
            n = 0
            while n < len(keys) and keys[n] in self._index:
                n += 1
            if n:
                stamps.append([req, pack_hashes(keys[:n])])
        self._stamping = []
        return stamps

    def _backlog_full(self, num_blocks: int) -> bool:
        """Whether saving `num_blocks` more would take some rank's reported backlog past
        `max_save_backlog_bytes` (the rule each worker applies: a step larger than the
        bound is still saved by a rank with nothing waiting). Then the step saves nothing,
        on any rank."""
        bound = self.settings.max_save_backlog_bytes
        if bound is None:
            return False
        # Every rank's shard of a block is the same size (kvdist.kv.layout.kv_head_shard).
        late = self._reports.ranks_behind(num_blocks * self.ctx.block_shard_bytes, bound)
        if not late:
            return False
        self._counters.add(saves_skipped_all_ranks=num_blocks)
        if not self._skip_logged:
            self._skip_logged = True
            log.warning(
                "disk connector: saves wait to be written past max_save_backlog_bytes=%d "
                "(bytes by rank: %s): this step's %d blocks are not saved, on any rank (the "
                "disk writes slower than the engine saves; later skips are only counted in "
                "stats['saves_skipped_all_ranks'])",
                bound, late, num_blocks,
            )  # fmt: skip
        return True

    def update_from_workers(self, worker_metas: list[Any]) -> None:
        """Account the blocks each rank stored or did not store, and its backlog."""
        known = self._reports.not_shared
        complete, incomplete = self._reports.apply(worker_metas)  # checks them all first
        for rank, meta in enumerate(worker_metas):
            if meta is not None:
                self._drains.over(rank, meta.get("loads_over", ()))
        self._counters.add(blocks_stored_all_ranks=complete, blocks_not_stored=incomplete)
        if self._reports.not_shared and not known:
            log.error(
                "disk connector: every rank reported the first blocks stored under %s, but "
                "rank 0 finds none of them whole there: the ranks do not share this "
                "directory (a copy of it on each node?), so no block they write is ever a "
                "hit. Put the cache on a filesystem every node mounts; identical copies "
                "serve only with read_only=true", self.ns_dir,
            )  # fmt: skip
        if self._reports.full_ranks:
            self._counters.add(disk_full_reports=1)
            first = self._index.keep_free_bytes is None
            self._index.found_full(self._tracker.is_pinned)
            if first:
                log.warning(
                    "disk connector: saves on rank(s) %s found the filesystem under %s full; "
                    "from now on the cache keeps %d bytes free there, evicting its least "
                    "recently used blocks (it takes at most %d bytes now; "
                    "stats['disk_full_reports'] counts such reports)",
                    self._reports.full_ranks, self.ns_dir, self._index.keep_free_bytes,
                    self._index.limit_bytes,
                )  # fmt: skip

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        t = self._tracker.requests.get(request.request_id)
        # Stopped while loading: the ranks may still be reading its blocks.
        self._drains.stopped(request.request_id)
        # The blocks of a last step that loaded synchronously: saved in the next meta.
        unsaved = self._tracker.unsaved_at_finish(request.request_id, block_ids)
        if unsaved is not None:
            self._finishing.append(unsaved)
            unsaved[0].saves_issued = True
        # A request that saved anything is held until every rank reports its saves done:
        # the engine must not reuse the blocks while they are read.
        if t is not None and block_ids and not self.settings.read_only:
            # Its blocks' eviction order, whatever steps saved them: the last first; and
            # on disk too, for a restart (`stamp`).
            self._index.touch_chain(request.block_hashes)
            self._stamping.append((request.request_id, list(request.block_hashes)))
        if t is None or not t.saves_issued:
            return False
        self._held.append(request.request_id)
        return True

    def shutdown(self) -> None:
        self._index.close()
