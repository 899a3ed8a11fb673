"""The paged KV cache layout shared by the engine and every connector.

One tensor per rank, shape `(num_layers, 2, num_blocks, block_size, num_local_kv_heads,
head_dim)`: index 0 of the second axis is K, 1 is V. A block's shard for one layer,
`kv[layer, :, block]`, is two contiguous fragments of `block_size * heads * head_dim`
elements; `kv[:, :, block_ids]` gathers a set of blocks for every layer in one call.
"""

from __future__ import annotations

import torch

from kvdist.api.types import ConnectorContext


def kv_cache_shape(ctx: ConnectorContext, num_blocks: int) -> tuple[int, ...]:
    return (ctx.num_layers, 2, num_blocks, ctx.block_size, ctx.num_local_kv_heads, ctx.head_dim)


def block_shard_shape(ctx: ConnectorContext) -> tuple[int, ...]:
    """Shape of one block of this rank's shard, all layers: (layers, 2, block, heads, dim)."""
    return (ctx.num_layers, 2, ctx.block_size, ctx.num_local_kv_heads, ctx.head_dim)


def allocate_kv_cache(ctx: ConnectorContext, num_blocks: int) -> torch.Tensor:
    return torch.zeros(kv_cache_shape(ctx, num_blocks), dtype=ctx.dtype, device=ctx.device)
