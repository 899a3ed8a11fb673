"""A test connector that keeps KV shards in process memory and records every hook call.

It moves real data (so a wrong block id or head range changes the generated tokens), can
make loads and saves asynchronous with a different reporting delay on each rank, and can
fail loads on one rank. Settings (ConnectorConfig kwargs):

- store: name of the in-memory store to use (engines with the same name share it)
- async_load / async_save: report transfers through get_finished (else loads are sync)
- delay_per_rank: rank r reports a transfer r * delay_per_rank steps after it was handed
- load_seconds: async loads are reported that many seconds (wall time) after they started
- fail_rank / fail_block_index: on that rank, the load of that block index (of the
  loaded range) fails: the block is filled with garbage and reported in the load errors
- record_path: where each rank writes its recorded calls (JSON) at shutdown
- never_report_saves: async saves are never reported done (a stuck transfer)
- never_report_loads_rank: that rank never reports its async loads done (a stuck load)
- lookup_fault / lookup_marker: get_num_new_matched_tokens, for a prompt holding the
  token `lookup_marker`, raises ("raise") or answers malformed (a key of `BAD_ANSWERS`)
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import torch

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
from kvdist.api.types import ConnectorContext, Request, SchedulerOutput

STORES: dict[str, dict[tuple[int, bytes], torch.Tensor]] = defaultdict(dict)
SAVED_HASHES: dict[str, set[bytes]] = defaultdict(set)
BAD_ANSWERS: dict[str, Any] = {"negative": (-1, False), "str": "x", "zero_async": (0, True)}
"""Malformed get_num_new_matched_tokens answers, by `lookup_fault`."""


def cpu_in_front_of(tier: dict[str, Any]) -> dict[str, Any]:
    """A `tiered` connector config: a 64 MiB `cpu` tier, then `tier`."""
    cpu = {"name": "cpu", "kwargs": {"capacity_bytes": 64 << 20}}
    return {"name": "tiered", "kwargs": {"tiers": [cpu, tier]}}


_KEYS = {
    "store",
    "async_load",
    "async_save",
    "delay_per_rank",
    "load_seconds",
    "fail_rank",
    "fail_block_index",
    "record_path",
    "never_report_saves",
    "never_report_loads_rank",
    "raise_in",
    "raise_rank",
    "lookup_fault",
    "lookup_marker",
}


def _settings(ctx: ConnectorContext) -> dict[str, Any]:
    unknown = set(ctx.kwargs) - _KEYS
    if unknown:
        raise ValueError(f"memory connector: unknown kwargs {sorted(unknown)}")
    return {
        "store": "default",
        "async_load": False,
        "async_save": False,
        "delay_per_rank": 0,
        "load_seconds": 0.0,  # async loads are reported this long after they started
        "fail_rank": None,
        "fail_block_index": 0,
        "record_path": None,
        "never_report_saves": False,
        "never_report_loads_rank": None,
        "raise_in": None,  # a worker hook that raises on rank `raise_rank`, once it has
        "raise_rank": None,  # loads or saves to do (its first busy step)
        "lookup_fault": None,
        "lookup_marker": None,
        **ctx.kwargs,
    }


class MemoryScheduler(ConnectorScheduler):
    def __init__(self, ctx: ConnectorContext):
        super().__init__(ctx)
        self.s = _settings(ctx)
        self.saved = SAVED_HASHES[self.s["store"]]
        self.bs = ctx.block_size
        self.requests: dict[str, Request] = {}
        self.tables: dict[str, list[int]] = {}
        self.start_block: dict[str, int] = {}
        self.next_save_block: dict[str, int] = {}
        self.pending_loads: list[list[Any]] = []
        self.had_saves: set[str] = set()
        self.calls: list[list[Any]] = []

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        self.calls.append(["matched", request.request_id, num_computed_tokens])
        fault = self.s["lookup_fault"]
        if fault is not None and self.s["lookup_marker"] in request.prompt_token_ids:
            if fault == "raise":
                raise LookupError("memory connector: injected lookup failure")
            return BAD_ANSWERS[fault]
        start = num_computed_tokens // self.bs
        n = 0
        for h in request.block_hashes[start:]:
            if h not in self.saved:
                break
            n += 1
        self.start_block[request.request_id] = start
        return n * self.bs, bool(self.s["async_load"]) and n > 0

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ):
        rid = request.request_id
        self.calls.append(["alloc", rid, list(block_ids), num_external_tokens])
        self.requests[rid] = request
        start = self.start_block[rid]
        end = start + -(-num_external_tokens // self.bs)  # the last block may be partial
        self.next_save_block[rid] = end
        if num_external_tokens:
            self.pending_loads.append([rid, block_ids[start:end], request.block_hashes[start:end]])

    def build_connector_meta(self, scheduler_output: SchedulerOutput):
        self.calls.append(
            [
                "meta",
                scheduler_output.step,
                [
                    [
                        r.request_id,
                        r.computed_position,
                        r.num_scheduled_tokens,
                        len(r.new_tokens),
                        list(r.new_block_ids),
                        i < len(scheduler_output.new_requests),
                    ]
                    for i, r in enumerate(scheduler_output.all_requests())
                ],
            ]
        )
        saves = []
        for r in scheduler_output.new_requests:
            self.tables[r.request_id] = list(r.new_block_ids)
        for r in scheduler_output.cached_requests:
            self.tables[r.request_id] += r.new_block_ids
        unsure = set(scheduler_output.sync_load_req_ids)  # rolled back if a load fails
        for r in scheduler_output.all_requests():
            if r.request_id in unsure:
                continue  # saved in its next step, once its load is known good
            req = self.requests[r.request_id]
            full = (r.computed_position + r.num_scheduled_tokens) // self.bs
            first = self.next_save_block.get(r.request_id, 0)
            if full > first:
                table = self.tables[r.request_id]
                hashes = req.block_hashes[first:full]
                saves.append([r.request_id, table[first:full], hashes])
                self.saved.update(hashes)
                self.had_saves.add(r.request_id)
                self.next_save_block[r.request_id] = full
        meta = {"loads": self.pending_loads, "saves": saves}
        self.pending_loads = []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        rid = request.request_id
        self.calls.append(["finished", rid, list(block_ids)])
        self.tables.pop(rid, None)
        self.next_save_block.pop(rid, None)
        return bool(self.s["async_save"]) and rid in self.had_saves

    def shutdown(self) -> None:
        if self.s["record_path"]:
            with open(f"{self.s['record_path']}.scheduler.json", "w") as f:
                json.dump(self.calls, f)


class MemoryWorker(ConnectorWorker):
    def __init__(self, ctx: ConnectorContext):
        super().__init__(ctx)
        self.s = _settings(ctx)
        self.store = STORES[self.s["store"]]
        self.kv: torch.Tensor | None = None
        self.step = 0
        self.calls: list[list[Any]] = []
        self.delay = ctx.rank * int(self.s["delay_per_rank"])
        self.saving: set[str] = set()
        self.due_saves: dict[int, set[str]] = defaultdict(set)
        self.due_loads: dict[int, set[str]] = defaultdict(set)
        self.timed_loads: dict[str, float] = {}  # with load_seconds: request -> when done
        self.loaded_this_step: set[str] = set()
        self.errors: set[int] = set()
        self.stats = {"blocks_loaded": 0, "blocks_saved": 0}

    def register_kv_caches(self, kv_cache: torch.Tensor) -> None:
        if self.s["raise_in"] == "register_kv_caches" and self.ctx.rank == self.s["raise_rank"]:
            raise ConnectionError("memory connector: injected failure in register_kv_caches")
        self.calls.append(["register", list(kv_cache.shape)])
        self.kv = kv_cache

    def _maybe_raise(self, hook: str, meta: Any) -> None:
        """The injected failure: hook `raise_in` on rank `raise_rank`, in a step with
        transfers (the forward of such a step runs on every rank)."""
        if hook != self.s["raise_in"] or self.ctx.rank != self.s["raise_rank"]:
            return
        if meta and (meta["loads"] or meta["saves"]):
            raise RuntimeError(f"memory connector: injected failure in {hook}")

    def bind_connector_meta(self, meta: Any) -> None:
        self._maybe_raise("bind_connector_meta", meta)
        super().bind_connector_meta(meta)

    def start_load_kv(self, stream) -> None:
        self.step += 1
        self.calls.append(["start_load", self.step])
        self._maybe_raise("start_load_kv", self.get_connector_meta())
        assert self.kv is not None
        for rid, block_ids, hashes in self.get_connector_meta()["loads"]:
            for i, (b, h) in enumerate(zip(block_ids, hashes)):
                if self.s["fail_rank"] == self.ctx.rank and i == self.s["fail_block_index"]:
                    self.kv[:, :, b] = 1e3  # garbage: must never reach an output
                    self.errors.add(b)
                    continue
                self.kv[:, :, b] = self.store[(self.ctx.rank, h)]
                self.stats["blocks_loaded"] += 1
            self.loaded_this_step.add(rid)

    def wait_for_layer_load(self, layer_idx: int, stream) -> None:
        self.calls.append(["before", layer_idx])
        if layer_idx == 1:
            self._maybe_raise("wait_for_layer_load", self.get_connector_meta())

    def save_kv_layer(self, layer_idx: int, stream) -> None:
        self.calls.append(["after", layer_idx])

    def wait_for_save(self, stream) -> None:
        assert self.kv is not None
        self._maybe_raise("wait_for_save", self.get_connector_meta())
        for rid, block_ids, hashes in self.get_connector_meta()["saves"]:
            for b, h in zip(block_ids, hashes):
                self.store[(self.ctx.rank, h)] = self.kv[:, :, b].clone()
                self.stats["blocks_saved"] += 1
            self.saving.add(rid)

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        self.calls.append(
            ["get_finished", sorted(finished_gen_req_ids), sorted(started_loading_req_ids)]
        )
        if self.s["async_save"] and not self.s["never_report_saves"]:
            for rid in finished_gen_req_ids & self.saving:
                self.due_saves[self.step + self.delay].add(rid)
        self.saving -= finished_gen_req_ids
        now = time.monotonic()
        for rid in started_loading_req_ids:
            assert rid in self.loaded_this_step
            if self.s["load_seconds"]:
                self.timed_loads[rid] = now + self.s["load_seconds"]
            elif self.s["never_report_loads_rank"] != self.ctx.rank:
                self.due_loads[self.step + self.delay].add(rid)
        self.loaded_this_step.clear()
        saved = set().union(*[v for k, v in self.due_saves.items() if k <= self.step])
        loaded = set().union(*[v for k, v in self.due_loads.items() if k <= self.step])
        for rid in [r for r, t in self.timed_loads.items() if t <= now]:
            loaded.add(rid)
            del self.timed_loads[rid]
        for d in (self.due_saves, self.due_loads):
            for k in [k for k in d if k <= self.step]:
                del d[k]
        return saved, loaded

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self.errors = self.errors, set()
        return out

    def shutdown(self) -> None:
        if self.s["record_path"]:
            with open(f"{self.s['record_path']}.rank{self.ctx.rank}.json", "w") as f:
                json.dump(self.calls, f)
