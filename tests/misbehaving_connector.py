"""A connector that breaks its contract in one chosen way (`kwargs["mode"]`), for the
engine's checks of what connectors return and when they fail.

Modes: `never_report_saves` (request_finished holds every request's blocks, the workers
never report the save), `slow_saves` (the same, but the workers report one save every
`kwargs["every_s"]` seconds), `finished_returns_str` (request_finished answers "no"),
`layer_hooks_none` (needs_layer_hooks is a stub returning None), `numpy_answer`
(get_num_new_matched_tokens answers with numpy scalars), `float_answer` (answers 1.5
tokens), `shutdown_raises` (the worker's shutdown raises; the scheduler records its own;
also as `kwargs["shutdown_raises"]` beside another mode).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker

SHUTDOWNS: list[str] = []
"""Which halves' shutdown ran, in order (mode `shutdown_raises`)."""


class MisbehavingScheduler(ConnectorScheduler):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.mode = ctx.kwargs["mode"]

    def get_num_new_matched_tokens(self, request, num_computed_tokens) -> Any:
        if self.mode == "numpy_answer":
            return np.int64(0), np.bool_(False)
        if self.mode == "float_answer":
            return 1.5, False
        return 0, False

    def update_state_after_alloc(self, request, block_ids, num_external_tokens) -> None:
        pass

    def build_connector_meta(self, scheduler_output) -> Any:
        return None

    def request_finished(self, request, block_ids) -> Any:
        if self.mode in ("never_report_saves", "slow_saves"):
            return True
        if self.mode == "finished_returns_str":
            return "no"
        return False

    def shutdown(self) -> None:
        SHUTDOWNS.append("scheduler")


class MisbehavingWorker(ConnectorWorker):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.mode = ctx.kwargs["mode"]
        self.every_s = ctx.kwargs.get("every_s", 0.0)
        self.saving: list[str] = []
        self.last_report = time.monotonic()

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        if self.mode != "slow_saves":
            return super().get_finished(finished_gen_req_ids, started_loading_req_ids)
        self.saving += sorted(finished_gen_req_ids)
        if self.saving and time.monotonic() - self.last_report >= self.every_s:
            self.last_report = time.monotonic()
            return {self.saving.pop(0)}, set()
        return set(), set()

    def start_load_kv(self, stream) -> None:
        pass

    def needs_layer_hooks(self) -> Any:
        if self.mode == "layer_hooks_none":
            return None
        return super().needs_layer_hooks()

    def shutdown(self) -> None:
        SHUTDOWNS.append("worker")
        if self.mode == "shutdown_raises" or self.ctx.kwargs.get("shutdown_raises"):
            raise OSError("injected: flushing to the store failed")
