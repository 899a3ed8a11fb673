"""The paged KV cache layout shared by the engine and every connector.

One tensor per rank, shape `(num_layers, 2, num_blocks, block_size, num_local_kv_heads,
head_dim)`: index 0 of the second axis is K, 1 is V. A block's shard for one layer,
`kv[layer, :, block]`, is two contiguous fragments of `block_size * heads * head_dim`
elements; `kv[:, :, block_ids]` gathers a set of blocks for every layer in one call.

Which KV heads a rank holds (`kv_head_shard`): with fewer ranks than KV heads, each rank
holds an equal, contiguous share; with more, each KV head is replicated on
`world_size // num_kv_heads` consecutive ranks, the ranks whose query heads read it (as
in vLLM). Replicas compute bit-identical KV, so storage shared by the ranks needs only one
of them (`kv_replica == 0`) to write it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvdist.api.types import ConnectorContext


def kv_cache_shape(ctx: ConnectorContext, num_blocks: int) -> tuple[int, ...]:
    return (ctx.num_layers, 2, num_blocks, ctx.block_size, ctx.num_local_kv_heads, ctx.head_dim)


def allocate_kv_cache(ctx: ConnectorContext, num_blocks: int) -> torch.Tensor:
    return torch.zeros(kv_cache_shape(ctx, num_blocks), dtype=ctx.dtype, device=ctx.device)


def kv_cache_room(ctx: ConnectorContext) -> tuple[int | None, str]:
    """The bytes this rank's KV cache may take, and where they are, for an error to name:
    on a GPU, its free memory (with what torch's allocator holds unused); on the CPU, the
    host's memory shared by the host's ranks. None where the system does not say."""
    if ctx.device.type == "cuda":
        free = torch.cuda.mem_get_info(ctx.device)[0]
        unused = torch.cuda.memory_reserved(ctx.device) - torch.cuda.memory_allocated(ctx.device)
        return free + unused, f"{ctx.device}'s free memory"
    host = host_memory_bytes()
    if host is None:
        return None, "this host's memory"
    ranks = ctx.ranks_on_host
    each = f", shared by its {ranks} ranks" if ranks > 1 else ""
    return host // ranks, f"this host's memory{each}"


def host_memory_bytes() -> int | None:
    """Physical memory of this host (None where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class KVHeadShard:
    """The KV heads one rank holds."""

    start: int
    """First KV head of this rank."""
    end: int
    """One past its last KV head."""
    replicas: int = 1
    """Ranks that hold these same heads (1 unless there are more ranks than KV heads)."""
    replica: int = 0
    """This rank's index among them; replica 0 writes what the replicas share."""


def kv_head_shard(rank: int, world_size: int, num_kv_heads: int) -> KVHeadShard:
    """This rank's KV heads in a `world_size`-way tensor-parallel split of `num_kv_heads`.

    Raises `ValueError` unless one of the two numbers divides the other."""
    if num_kv_heads < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need num_kv_heads >= 1 and 0 <= rank < world_size, got num_kv_heads="
            f"{num_kv_heads}, rank={rank}, world_size={world_size}"
        )
    if num_kv_heads % world_size == 0:
        per = num_kv_heads // world_size
        return KVHeadShard(rank * per, (rank + 1) * per)
    if world_size % num_kv_heads == 0:
        replicas = world_size // num_kv_heads
        head = rank // replicas
        return KVHeadShard(head, head + 1, replicas, rank % replicas)
    raise ValueError(
        f"num_key_value_heads ({num_kv_heads}) and the tensor-parallel size ({world_size}) "
        "must divide one another: each rank holds an equal share of the KV heads, or one "
        "KV head replicated on an equal number of ranks"
    )
