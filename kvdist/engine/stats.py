"""Per-step timing of the engine, split into model work and everything around it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


@dataclass
class EngineStats:
    steps: int = 0
    step_seconds: float = 0.0
    model_seconds: float = 0.0
    """Forward pass and logits, excluding connector hook time; on a GPU, with the time
    rank 0 waits for them on the device before sampling (graphs and kernels run
    asynchronously, so the host's own time would leave the device's out)."""
    hook_seconds: float = 0.0
    """In the connector worker's step hooks: `start_load_kv`, the per-layer hooks and
    `wait_for_save` (host time: on a GPU, copies they queue run later)."""
    graph_steps: int = 0
    """Steps whose forward took the decode-graph path (`ForwardResult.graph`)."""
    recent_overhead: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    recent_step: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def record_step(
        self,
        seconds: float,
        result: Any,
        connector_seconds: float = 0.0,
        device_wait_seconds: float = 0.0,
    ) -> None:
        model, hooks = device_wait_seconds, connector_seconds
        if result is not None:
            hooks += result.hook_seconds
            model += result.forward_seconds - result.hook_seconds
            self.graph_steps += result.graph
        self.steps += 1
        self.step_seconds += seconds
        self.model_seconds += model
        self.hook_seconds += hooks
        self.recent_step.append(seconds)
        self.recent_overhead.append(seconds - model)

    def as_dict(self) -> dict[str, float]:
        over = list(self.recent_overhead)
        return {
            "engine_steps": self.steps,
            "step_seconds": self.step_seconds,
            "model_seconds": self.model_seconds,
            "hook_seconds": self.hook_seconds,
            "cuda_graph_steps": self.graph_steps,
            "overhead_seconds": self.step_seconds - self.model_seconds,
            "overhead_fraction": (self.step_seconds - self.model_seconds) / self.step_seconds
            if self.step_seconds
            else 0.0,
            "overhead_median_us": percentile(over, 50) * 1e6,
            "overhead_p99_us": percentile(over, 99) * 1e6,
            "step_median_us": percentile(list(self.recent_step), 50) * 1e6,
        }
