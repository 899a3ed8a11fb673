"""Per-rank half of the `cpu` connector: a host pool of block slots, mirrored on every rank.

All copies run on one side stream (see `kvdist.kv.transfer`), step after step in the order
the metas come (within a step, in slot order: one copy per run of slots), which is what
keeps every rank's pool equal to rank 0's slot map. By default a step's
loads are in place before its first layer runs (`wait_for_layer_load`); with `load_async`
they are reported through `get_finished` once their copy is done. A step's saves are
gathered in one batch after the forward (`wait_for_save`), not layer by layer: the
reference engine is bound by how fast it issues kernels, and 32 layers of gathers and
events cost more step time than overlapping them with the layers saves. Saves hold nothing
(see the scheduler). The saves of a step whose `wait_for_save` never came are dropped
(`kvdist.connectors.dropped_saves`): their slots are reported to rank 0, which unmaps
them, and until a save fills them again a load from one fails (rank 0 may have planned
one before it learnt).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvdist.api.connector import ConnectorWorker
from kvdist.api.types import ConnectorContext
from kvdist.connectors.cpu.settings import CpuSettings, num_slots, slot_bytes
from kvdist.connectors.dropped_saves import DroppedSaves
from kvdist.connectors.settings import Counters, parse_settings
from kvdist.connectors.tracking import META_VERSION, check_meta, pack_ids, unpack_ids
from kvdist.kv.transfer import BlockTransfer, LoadBatch, SaveBatch, check_kv_cache


class CpuConnectorWorker(ConnectorWorker):
    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.settings = parse_settings(CpuSettings, ctx.kwargs, "cpu")
        self.num_slots = num_slots(self.settings, ctx)
        self.pool: torch.Tensor | None = None
        self._xfer: BlockTransfer | None = None
        self._in_flight: list[SaveBatch] = []
        self._loads: dict[str, LoadBatch] = {}  # async loads, until reported
        self._load_wait: set[str] = set()
        self._step_load: LoadBatch | None = None  # this step's loads, when synchronous
        self._held: set[str] = set()  # finished requests whose blocks this step saves
        self._counters = Counters()
        self._dropped = DroppedSaves("cpu", ctx.rank, self._counters)
        self._unfilled: set[int] = set()  # slots whose save was dropped: loads from them fail
        self._load_errors: set[int] = set()  # device blocks loaded from such slots
        self._dropped_slots: list[int] = []  # not reported to rank 0 yet

    def agreed_settings(self) -> dict[str, Any]:
        """Every setting: rank 0 plans slots of the pool every rank holds, and loads as
        every rank waits for them."""
        return {**dataclasses.asdict(self.settings), "num_slots": self.num_slots}

    @property
    def stats(self) -> dict[str, float]:
        return self._counters.snapshot()

    def register_kv_caches(self, kv_cache: torch.Tensor) -> None:
        check_kv_cache(kv_cache, self.ctx)
        self._xfer = BlockTransfer(kv_cache)
        shape = (self.num_slots, *self._xfer.block_shape)
        try:
            self.pool = torch.empty(shape, dtype=kv_cache.dtype, pin_memory=kv_cache.is_cuda)
        except (RuntimeError, MemoryError) as exc:  # torch's allocation failures
            raise MemoryError(
                f"cpu connector (rank {self.ctx.rank}): cannot allocate its "
                f"{'pinned ' if kv_cache.is_cuda else ''}host pool of "
                f"{self.num_slots * slot_bytes(self.ctx)} bytes "
                f"(capacity_bytes={self.settings.capacity_bytes}): {exc}"
            ) from exc

    def bind_connector_meta(self, meta: Any) -> None:
        self._drop_unsaved("at the next step")
        meta = check_meta(meta, "cpu")
        super().bind_connector_meta(meta)
        self._step_load = None
        self._held.update(meta.get("held", ()))

    def start_load_kv(self, stream: torch.cuda.Stream | None) -> None:
        meta = self.get_connector_meta()
        if not meta or not meta["loads"]:
            return
        xfer, pool = self._ready()
        ids: list[int] = []
        slots: list[int] = []
        for load in meta["loads"]:
            ids += unpack_ids(load["block_ids"])
            slots += unpack_ids(load["slots"])
        ids, slots = _by_slot(ids, slots)
        if self._unfilled:  # loaded all the same; the engine computes these again
            self._load_errors.update(b for b, s in zip(ids, slots) if s in self._unfilled)
        batch = xfer.load(ids, pool, slots)
        batch.start(stream)
        if self.settings.load_async:
            for load in meta["loads"]:
                self._loads[load["req"]] = batch
        else:
            self._step_load = batch
        self._counters.add(
            blocks_loaded=len(ids),
            bytes_loaded=len(ids) * xfer.block_bytes,
            load_copies=batch.host_copies,
        )

    def needs_layer_hooks(self) -> bool:
        return self._step_load is not None  # only a synchronous load waits, at layer 0

    def wait_for_layer_load(self, layer_idx: int, stream: torch.cuda.Stream | None) -> None:
        # The first layer waits for every layer's blocks: the rows are copied to the device
        # before any is scattered, so waiting layer by layer would gain little, and the
        # engine issues its kernels faster than the GPU runs them only without per-layer
        # events (no CUDA graphs).
        if self._step_load is not None:
            self._step_load.wait(stream)
            self._step_load = None

    def wait_for_save(self, stream: torch.cuda.Stream | None) -> None:
        batch = self._save_batch()
        if batch is None:
            return
        batch.commit(stream)
        batch.release_blocks(stream)
        self._in_flight = [b for b in self._in_flight if not b.done()] + [batch]
        n = batch.num_blocks
        self._counters.add(
            blocks_saved=n,
            bytes_saved=n * self._ready()[0].block_bytes,
            save_copies=batch.host_copies,
        )

    def _save_batch(self) -> SaveBatch | None:
        taken = self._take_saves()
        if taken is None:
            return None
        ids, slots = taken
        xfer, pool = self._ready()
        if self._unfilled:
            self._unfilled.difference_update(slots)
        return xfer.save(ids, pool, slots)

    def _drop_unsaved(self, when: str) -> None:
        """Drop the saves of a step whose `wait_for_save` never came; their slots fail
        loads until filled (`kvdist.connectors.dropped_saves`)."""
        taken = self._take_saves()
        if taken is None:
            return
        slots = taken[1]
        self._unfilled.update(slots)
        self._dropped_slots += slots
        self._dropped.note(len(slots), when)

    def _take_saves(self) -> tuple[list[int], list[int]] | None:
        """This step's saves not yet made or dropped, as (device blocks, slots), marked
        consumed: each is made, or dropped, once."""
        meta = self.get_connector_meta()
        if not meta or not meta["saves"]["block_ids"]:
            return None
        saves = meta["saves"]
        self._meta = {**meta, "saves": {"block_ids": b"", "slots": b""}}
        return _by_slot(unpack_ids(saves["block_ids"]), unpack_ids(saves["slots"]))

    def build_worker_meta(self) -> dict[str, Any] | None:
        """The slots whose saves this rank dropped since the last report (rank 0 unmaps
        them: `CpuConnectorScheduler.update_from_workers`); None when there are none."""
        if not self._dropped_slots:
            return None
        slots, self._dropped_slots = self._dropped_slots, []
        return {"v": META_VERSION, "dropped": pack_ids(slots)}

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        if errors:
            self._counters.add(load_failures=len(errors))
        return errors

    def get_finished(
        self, finished_gen_req_ids: set[str], started_loading_req_ids: set[str]
    ) -> tuple[set[str], set[str]]:
        self._load_wait |= started_loading_req_ids
        loaded = set()
        for r in self._load_wait:
            batch = self._loads.get(r)
            if batch is None or batch.done():
                loaded.add(r)
                self._loads.pop(r, None)
        self._load_wait -= loaded
        # Saves hold no device blocks past wait_for_save: a held request (its last step's
        # blocks saved in this one) is saved once given as finished, after wait_for_save.
        saved = self._held & finished_gen_req_ids
        self._held -= saved
        return saved, loaded

    def shutdown(self) -> None:
        self._drop_unsaved("at shutdown")
        for save in self._in_flight:
            save.synchronize()
        for load in self._loads.values():
            load.synchronize()
        self._in_flight.clear()
        self._loads.clear()
        self._step_load = None
        # The pool (pinned on a GPU) and, through the transfers, the KV cache go with the
        # engine's last reference to them.
        self.pool = self._xfer = None

    def _ready(self) -> tuple[BlockTransfer, torch.Tensor]:
        if self._xfer is None or self.pool is None:
            raise RuntimeError("cpu connector: register_kv_caches() must come before transfers")
        return self._xfer, self.pool


def _by_slot(block_ids: list[int], slots: list[int]) -> tuple[list[int], list[int]]:
    """The `(device block, slot)` pairs in slot order: each run of consecutive slots is
    then one host copy. The scheduler's map hands them out otherwise: a request's blocks
    are evicted last first, so the slots a request saved into ascending come back to the
    next one descending, and loads list each request's blocks in chain order. In slot
    order a pool that has turned over makes half the copies (`kvdist bench cpu-pool`)."""
    if len(slots) < 2:
        return block_ids, slots
    pairs = sorted(zip(slots, block_ids))
    return [b for _, b in pairs], [s for s, _ in pairs]
