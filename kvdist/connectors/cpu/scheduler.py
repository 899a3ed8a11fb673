"""Rank-0 half of the `cpu` connector: owns the slot map that every rank's pool mirrors.

Meta sent to every rank each step (plain msgpack data):

    {"v": 1,
     "loads": [{"req": str, "block_ids": bytes, "slots": bytes}, ...],
     "saves": {"block_ids": bytes, "slots": bytes},
     "held": [request ids whose blocks are held for this step's saves]}

`block_ids` and `slots` are little-endian int32, pairwise: device block `block_ids[i]`
goes to / comes from pool slot `slots[i]`. Every rank applies the same saves to its pool
in the same order, so the map here always describes what every rank holds, and a hit
answered here is present on every rank: a save issued in one step is enqueued on each
rank's copy stream before any load issued in a later step. Slots that in-flight loads read
are pinned (eviction never reassigns them) until the request is scheduled or stops; a slot
is given to at most one save per step. A slot unmapped because a rank dropped its save
is freed even while a load reads it: a later save into it is enqueued on each rank's copy
stream after that load, so the load still reads what it found.

A rank that dropped a step's saves (`kvdist.connectors.dropped_saves`) reports their
slots (`{"v": 1, "dropped": bytes}`, int32 slots); `update_from_workers` unmaps them.

Saves never hold device blocks beyond the step (`wait_for_save` orders the engine after the
gather), so `request_finished` returns False, except for a request that finished in a step
that loaded it synchronously: the blocks that step computed are saved in the next one
(`SchedulerOutput.sync_load_req_ids`), so its blocks are held until then.
"""

from __future__ import annotations

from typing import Any

from kvdist.api.connector import ConnectorScheduler
from kvdist.api.types import ConnectorContext, Request, SchedulerOutput
from kvdist.connectors.cpu.settings import CpuSettings, num_slots
from kvdist.connectors.cpu.slots import SlotMap
from kvdist.connectors.settings import Counters, parse_settings
from kvdist.connectors.tracking import (
    META_VERSION,
    RequestTracker,
    TrackedRequest,
    check_report,
    earlier_blocks,
    pack_ids,
    touched_blocks,
    unpack_ids,
)


class CpuConnectorScheduler(ConnectorScheduler):
    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.settings = parse_settings(CpuSettings, ctx.kwargs, "cpu")
        self.slots = SlotMap(num_slots(self.settings, ctx))
        self._tracker = RequestTracker(ctx.block_size, ctx.num_blocks)
        self._loads: list[dict[str, Any]] = []
        self._finishing: list[tuple[TrackedRequest, int, int]] = []  # held, saved next meta
        self._counters = Counters()

    @property
    def stats(self) -> dict[str, float]:
        s = self._counters.snapshot()
        s["evictions"] += self.slots.evictions
        return s

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        return self._tracker.match(
            request,
            num_computed_tokens,
            lambda key: self.slots.get(key) is not None,
            load_async=self.settings.load_async,
        )

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        blocks = self._tracker.admit(request, block_ids, num_external_tokens)
        if blocks:
            slots = []
            for i in blocks:
                key = request.block_hashes[i]
                slot = self.slots.get(key)
                if slot is None:  # the map only changes in build_connector_meta
                    raise RuntimeError(
                        f"cpu connector: block {i} of {request.request_id!r} left the pool"
                    )
                slots.append(slot)
            self._tracker.pin(request.request_id, slots)
            self.slots.touch_chain([request.block_hashes[i] for i in blocks])
            self._loads.append(
                {
                    "req": request.request_id,
                    "block_ids": pack_ids([block_ids[i] for i in blocks]),
                    "slots": pack_ids(slots),
                }
            )
        found = len(blocks)
        self._counters.add(hits=found, misses=self._tracker.misses(request, found))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> dict[str, Any]:
        ids: list[int] = []
        slots: list[int] = []
        taken: set[int] = set()

        def busy(slot: int) -> bool:
            return slot in taken or self._tracker.is_pinned(slot)

        finishing, self._finishing = self._finishing, []
        for t, lo, hi in [*self._tracker.update(scheduler_output), *finishing]:
            for i in range(lo, hi):
                key = t.request.block_hashes[i]
                if self.slots.get(key) is not None:
                    continue
                # Not the blocks before this one, those of [lo, i) included: already in the
                # pool (loaded, or saved by another request), they are this block's prefix.
                slot = self.slots.allocate(key, busy, earlier_blocks(t, i))
                if slot is None:  # every slot is pinned, written this step, or this
                    break  # prefix's: so for the blocks after it too
                taken.add(slot)
                ids.append(t.block_ids[i])
                slots.append(slot)
            self.slots.touch_chain(touched_blocks(t, lo, hi, self.ctx.block_size))
        loads, self._loads = self._loads, []
        return {
            "v": META_VERSION,
            "loads": loads,
            "saves": {"block_ids": pack_ids(ids), "slots": pack_ids(slots)},
            "held": [t.request.request_id for t, _, _ in finishing],
        }

    def update_from_workers(self, worker_metas: list[Any]) -> None:
        """Unmap the slots some rank dropped a save into: their blocks are not in every
        pool (the next save of those blocks fills them again)."""
        dropped: set[int] = set()
        for rank, meta in enumerate(worker_metas):
            if meta is not None:
                dropped.update(unpack_ids(check_report(meta, "cpu", rank)["dropped"]))
        if dropped:
            self._counters.add(blocks_unmapped=self.slots.forget_slots(dropped))

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        if block_ids:
            # Its blocks' eviction order, whatever steps saved them: the last first.
            self.slots.touch_chain(request.block_hashes)
        unsaved = self._tracker.unsaved_at_finish(request.request_id, block_ids)
        if unsaved is None:
            return False
        self._finishing.append(unsaved)
        return True
