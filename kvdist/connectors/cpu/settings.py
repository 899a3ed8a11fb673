"""Settings of the `cpu` connector, and the pool size every rank derives from them."""

from __future__ import annotations

from dataclasses import dataclass

from kvdist.api.types import ConnectorContext
from kvdist.connectors.settings import check_positive_int


@dataclass(frozen=True, kw_only=True)
class CpuSettings:
    capacity_bytes: int = 2 << 30
    """Host memory of this rank's pool (pinned when the KV cache is on a GPU)."""

    def __post_init__(self) -> None:
        check_positive_int("cpu", "capacity_bytes", self.capacity_bytes)


def slot_bytes(ctx: ConnectorContext) -> int:
    """Bytes of one pool slot: a block shard of the rank holding the most heads.

    Computed from values every rank shares, so every rank's pool has the same slot count
    and rank 0's slot map describes every pool."""
    heads = max(1, -(-ctx.num_kv_heads // ctx.world_size))
    return ctx.num_layers * 2 * ctx.block_size * heads * ctx.head_dim * ctx.element_size


def num_slots(settings: CpuSettings, ctx: ConnectorContext) -> int:
    n = settings.capacity_bytes // slot_bytes(ctx)
    if n < 1:
        raise ValueError(
            f"cpu connector: capacity_bytes={settings.capacity_bytes} holds no block; one "
            f"block takes {slot_bytes(ctx)} bytes per rank"
        )
    return n
