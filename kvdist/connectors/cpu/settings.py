"""Settings of the `cpu` connector, and the pool size every rank derives from them."""

from __future__ import annotations

from dataclasses import dataclass

from kvdist.api.types import ConnectorContext
from kvdist.connectors.settings import int_setting
from kvdist.kv.layout import host_memory_bytes


@dataclass(frozen=True, kw_only=True)
class CpuSettings:
    capacity_bytes: int = 2 << 30
    """Host memory of this rank's pool (pinned when the KV cache is on a GPU)."""
    load_async: bool = False
    """False: a hit is loaded in the step that schedules its request, and the step's first
    layer waits for the blocks (the copy runs at PCIe speed, ~2 ms per 100 MB, far less
    than a step). True: the load runs beside the step and the request is scheduled once
    every rank finished it, a step or more later."""

    def __post_init__(self) -> None:
        capacity = int_setting("cpu", "capacity_bytes", self.capacity_bytes)
        object.__setattr__(self, "capacity_bytes", capacity)
        if not isinstance(self.load_async, bool):
            raise ValueError(f"cpu connector: load_async must be a bool, got {self.load_async!r}")


def slot_bytes(ctx: ConnectorContext) -> int:
    """Bytes of one pool slot: a block shard of the rank holding the most heads.

    Computed from values every rank shares, so every rank's pool has the same slot count
    and rank 0's slot map describes every pool."""
    heads = max(1, -(-ctx.num_kv_heads // ctx.world_size))
    return ctx.num_layers * 2 * ctx.block_size * heads * ctx.head_dim * ctx.element_size


def num_slots(settings: CpuSettings, ctx: ConnectorContext) -> int:
    host = host_memory_bytes()
    if host is not None and settings.capacity_bytes * ctx.ranks_on_host > host:
        on_host = (
            f" on each of the {ctx.ranks_on_host} ranks on this host, "
            f"{settings.capacity_bytes * ctx.ranks_on_host} bytes in all,"
            if ctx.ranks_on_host > 1
            else ""
        )
        raise ValueError(
            f"cpu connector: capacity_bytes={settings.capacity_bytes}{on_host} is more than "
            f"this host's memory ({host} bytes); it is the pool of each rank"
        )
    n = settings.capacity_bytes // slot_bytes(ctx)
    if n < 1:
        raise ValueError(
            f"cpu connector: capacity_bytes={settings.capacity_bytes} holds no block; one "
            f"block takes {slot_bytes(ctx)} bytes per rank"
        )
    return n
