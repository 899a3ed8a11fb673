"""Rank-0 half of the `disk` connector: hit answers, save and load plans, eviction.

Meta sent to every rank each step (plain msgpack data):

    {"v": 1,
     "loads": [{"req": str, "block_ids": bytes, "hashes": bytes}, ...],
     "saves": [{"req": str, "block_ids": bytes, "hashes": bytes}, ...],
     "held": [request ids whose blocks `request_finished` held since the last meta]}

`block_ids`: little-endian int32 device block ids; `hashes`: the blocks' 16-byte keys,
concatenated, in the same order. Loads are asynchronous (the request waits until every rank
has them); a load names the blocks from the on-device hit onwards, in order. `held` tells
the workers which finished ids to report (the engine gives them every finished id, and a
report for one that was not held is an error); `request_finished(r)` comes before the meta
of the step whose `finished_req_ids` hold `r`, so `held` is never late.
"""

from __future__ import annotations

from typing import Any

from kvdist.api.connector import ConnectorScheduler
from kvdist.api.types import ConnectorContext, Request, SchedulerOutput
from kvdist.connectors.disk.index import DiskIndex
from kvdist.connectors.disk.record import RecordHeader, dtype_name, encode_header
from kvdist.connectors.disk.settings import DiskSettings
from kvdist.connectors.disk.store import namespace_id, prepare_namespace_dir
from kvdist.connectors.placement import resolve_helper_cpus
from kvdist.connectors.settings import Counters, parse_settings
from kvdist.connectors.tracking import (
    META_VERSION,
    RequestTracker,
    TrackedRequest,
    pack_hashes,
    pack_ids,
)


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
        self.ns_dir = prepare_namespace_dir(self.settings.path, ctx.model_namespace)
        self.namespace_id = namespace_id(ctx.model_namespace)
        self._index = DiskIndex(
            self.ns_dir,
            ctx.num_kv_heads,
            self.settings.capacity_bytes,
            pending_timeout_s=self.settings.pending_timeout_s,
            cpus=resolve_helper_cpus(self.settings.io_cpus, "disk connector"),
        )
        self._index.scan()
        if self.settings.rescan_s is not None:
            self._index.start_rescans(self.settings.rescan_s)
        self._tracker = RequestTracker(ctx.block_size)
        self._block_bytes = full_block_bytes(ctx)
        self._loads: list[dict[str, Any]] = []
        self._held: list[str] = []
        self._finishing: list[tuple[TrackedRequest, int, int]] = []  # saved next meta
        self._counters = Counters()

    @property
    def stats(self) -> dict[str, float]:
        s = self._counters.snapshot()
        s["evictions"] += self._index.evictions
        s["blocks_learnt"] = self._index.blocks_learnt
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
            for key in keys:
                self._index.touch(key)
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
        saves = []
        planned: set[bytes] = set()
        finishing, self._finishing = self._finishing, []
        for t, lo, hi in [*self._tracker.update(scheduler_output), *finishing]:
            ids, keys = [], []
            for i in range(lo, hi):
                key = t.request.block_hashes[i]
                if key in planned or not self._index.wants_save(key):
                    continue
                if not self._index.reserve(key, self._block_bytes, self._tracker.is_pinned):
                    continue  # full of pinned or in-flight blocks: skip rather than stall
                planned.add(key)
                ids.append(t.block_ids[i])
                keys.append(key)
            if keys:
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
        return {"v": META_VERSION, "loads": loads, "saves": saves, "held": held}

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        t = self._tracker.requests.get(request.request_id)
        # The blocks of a last step that loaded synchronously: saved in the next meta.
        unsaved = self._tracker.unsaved_at_finish(request.request_id, block_ids)
        if unsaved is not None:
            self._finishing.append(unsaved)
            unsaved[0].saves_issued = True
        # The workers cannot tell this scheduler when a save is done, so a request that
        # saved anything is held until every rank reports its saves done.
        if t is None or not t.saves_issued:
            return False
        self._held.append(request.request_id)
        return True

    def shutdown(self) -> None:
        self._index.close()
