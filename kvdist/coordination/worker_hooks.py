"""One rank's connector worker hooks in a step, for the engine's forward.

A worker hook that raises on one rank must not stop that rank's forward: the other ranks
would wait for it in the forward's tensor-parallel collectives until their deadline, and
every rank would end with a timeout that does not say why. `WorkerHooks` calls the hooks
through `call_hook`, keeps the first error, and leaves the worker out for the rest of the
step; the engine runs its forward as usual and passes `error` to
`Coordinator.exchange_reports`, where every rank raises it together.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from kvdist.api.connector import ConnectorWorker
from kvdist.coordination.errors import ConnectorError, call_bool_hook, call_hook


class WorkerHooks:
    """The step hooks of `worker` (None: no connector, every call does nothing), called
    with `stream` (the forward's CUDA stream, None on the CPU). Per step:
    `begin(coordinator.bind_error)`, `start_load_kv()`, the forward (around each layer
    `wait_for_layer_load(i)` and `save_kv_layer(i)` when `needs_layer_hooks()`), then
    `wait_for_save()` unless the forward raised; `error` goes to `exchange_reports`."""

    def __init__(self, worker: ConnectorWorker | None, stream: torch.cuda.Stream | None = None):
        self.worker = worker
        self.stream = stream
        self.error: BaseException | None = None
        """The step's first hook error (a `ConnectorError`), or what `begin` was given;
        once set, the worker is not called again until the next `begin`."""
        self.seconds = 0.0
        """Time spent in the hooks, every step together."""

    def begin(self, error: BaseException | None = None) -> None:
        """Start a step; `error` (the coordinator's `bind_error`) leaves the worker out."""
        self.error = error

    def start_load_kv(self) -> None:
        self._call("start_load_kv", self.stream)

    def needs_layer_hooks(self) -> bool:
        """Whether this step's forward calls the per-layer hooks (asked once per step)."""
        return self._call("needs_layer_hooks", call=call_bool_hook) is True

    def wait_for_layer_load(self, layer_idx: int) -> None:
        self._call("wait_for_layer_load", layer_idx, self.stream)

    def save_kv_layer(self, layer_idx: int) -> None:
        self._call("save_kv_layer", layer_idx, self.stream)

    def wait_for_save(self) -> None:
        """After a forward that did not raise (also in a step without one): a step whose
        forward raised may have half-written blocks, and its saves must be dropped."""
        self._call("wait_for_save", self.stream)

    def _call(self, hook: str, *args: Any, call: Callable[..., Any] = call_hook) -> Any:
        if self.worker is None or self.error is not None:
            return None
        t = time.perf_counter()
        try:
            return call(self.worker, hook, *args)
        except ConnectorError as exc:
            self.error = exc
            return None
        finally:
            self.seconds += time.perf_counter() - t
