"""Tensor-parallel linear layers, the embedding and the LM head.

Megatron-style: column-parallel layers split their output features over the ranks and
need no communication; row-parallel layers split their input features and all-reduce
the partial sums. A decoder layer therefore costs two all-reduces (o_proj, down_proj).

Every parameter carries `weight_loader(param, src[, shard_id])`. `src` is either a full
torch tensor or a safetensors slice (`safe_open(...).get_slice(name)`): the loader indexes
it with only this rank's rows or columns, so a rank reads just its shard from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kvdist.kv.layout import kv_head_shard


@dataclass(frozen=True, kw_only=True)
class TPInfo:
    """This rank's place in the tensor-parallel group."""

    rank: int = 0
    """Rank within the tensor-parallel group."""
    size: int = 1
    """Number of ranks in the group."""
    group: Any = None
    """`torch.distributed` ProcessGroup for the model's collectives; None means the
    default group (or no communication at all when `size == 1`)."""

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(
                f"TPInfo needs 0 <= rank < size, got rank={self.rank} size={self.size}"
            )

    def split(self, total: int, what: str) -> tuple[int, int]:
        """[start, end) of this rank's equal share of `total` items; ValueError if uneven."""
        if total % self.size:
            raise ValueError(
                f"{what} ({total}) is not divisible by the tensor-parallel size ({self.size}); "
                f"pick a tensor_parallel_size that divides {total}"
            )
        per = total // self.size
        return self.rank * per, (self.rank + 1) * per


def _take(src: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows/columns [start, start+length) of `src` along `dim`, reading only those."""
    if isinstance(src, torch.Tensor):
        return src.narrow(dim, start, length)
    index = (slice(None),) * dim + (slice(start, start + length),)
    return src[index]


def _take_all(src: Any) -> torch.Tensor:
    return src if isinstance(src, torch.Tensor) else src[:]


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    assert dst.shape == src.shape, f"shard shape {tuple(src.shape)} != {tuple(dst.shape)}"
    dst.copy_(src)  # casts dtype and moves device in one go


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: Any, loader: Any) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


def _all_reduce(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    if tp.size > 1:
        dist.all_reduce(x, group=tp.group)
    return x


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), W split by output rows; each rank returns its slice of y."""

    def __init__(
        self, input_size: int, output_size: int, *, bias: bool, tp: TPInfo, dtype, device
    ) -> None:
        super().__init__()
        self.tp = tp
        start, end = tp.split(output_size, "output features")
        self.shard_start, self.shard_size = start, end - start
        self.weight = _param((end - start, input_size), dtype, device, self.weight_loader)
        self.bias = _param((end - start,), dtype, device, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, src: Any) -> None:
        _copy(param.data, _take(src, 0, self.shard_start, self.shard_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up of the MLP).

    Each rank's weight is [its gate rows; its up rows], loaded per HF tensor by shard id.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], *, bias: bool, tp: TPInfo, dtype, device
    ) -> None:
        for size in output_sizes:
            tp.split(size, "intermediate_size")
        self.output_sizes = list(output_sizes)
        super().__init__(
            input_size, sum(output_sizes), bias=bias, tp=tp, dtype=dtype, device=device
        )

    def weight_loader(self, param: nn.Parameter, src: Any, shard_id: int = 0) -> None:  # type: ignore[override]
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        shard = _take(src, 0, self.tp.rank * size, size)
        _copy(param.data.narrow(0, offset, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; each rank gets whole heads.

    Rank r holds query heads [r*H/tp, (r+1)*H/tp) and KV heads [r*KVH/tp, (r+1)*KVH/tp),
    which keeps each query head on the rank of the KV head its GQA group reads. With more
    ranks than KV heads, rank r holds the one KV head its query heads read, replicated on
    tp/KVH ranks (`kvdist.kv.layout.kv_head_shard`).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        tp: TPInfo,
        dtype,
        device,
    ) -> None:
        tp.split(num_heads, "num_attention_heads")
        kv = kv_head_shard(tp.rank, tp.size, num_kv_heads)
        self.head_dim = head_dim
        self.num_local_heads = num_heads // tp.size
        self.kv_head_start = kv.start
        self.num_local_kv_heads = kv.end - kv.start
        # Built as a column-parallel layer over the rows each rank holds: its q heads and
        # its K and V heads (replicated KV heads count once per rank that holds them).
        total = tp.size * (self.num_local_heads + 2 * self.num_local_kv_heads) * head_dim
        super().__init__(hidden_size, total, bias=bias, tp=tp, dtype=dtype, device=device)

    @property
    def q_size(self) -> int:
        return self.num_local_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_local_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, src: Any, shard_id: str = "q") -> None:  # type: ignore[override]
        if shard_id == "q":
            size, offset, start = self.q_size, 0, self.tp.rank * self.q_size
        else:
            size, start = self.kv_size, self.kv_head_start * self.head_dim
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
        shard = _take(src, 0, start, size)
        _copy(param.data.narrow(0, offset, size), shard)


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b), W split by input columns; partial sums are all-reduced."""

    def __init__(
        self, input_size: int, output_size: int, *, bias: bool, tp: TPInfo, dtype, device
    ) -> None:
        super().__init__()
        self.tp = tp
        start, end = tp.split(input_size, "input features")
        self.shard_start, self.shard_size = start, end - start
        self.weight = _param((output_size, end - start), dtype, device, self.weight_loader)
        # The bias is added once, after the reduction, so every rank holds all of it.
        self.bias = _param((output_size,), dtype, device, self.bias_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, src: Any) -> None:
        _copy(param.data, _take(src, 1, self.shard_start, self.shard_size))

    def bias_loader(self, param: nn.Parameter, src: Any) -> None:
        _copy(param.data, _take_all(src))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _all_reduce(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias


class ReplicatedEmbedding(nn.Module):
    """The token embedding, whole on every rank.

    Simplest correct choice: a lookup needs no collective (a vocab-parallel embedding would
    add an all-reduce per step), at a cost of vocab*hidden per rank (1 GiB for Llama-3-8B
    in bf16), which is small next to the KV cache.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype, device) -> None:
        super().__init__()
        self.weight = _param((vocab_size, hidden_size), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, src: Any) -> None:
        _copy(param.data, _take_all(src))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class ParallelLMHead(nn.Module):
    """Vocab-parallel output projection; rank 0 gets the full float32 logits.

    Each rank scores its ceil(V/tp) slice of the vocabulary (the last slice zero-padded),
    then `dist.gather` collects the slices on group rank 0 only: the sampler runs there,
    and the other ranks would have no use for a [N, V] tensor. They get None.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, tp: TPInfo, dtype, device) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)
        self.shard_start = tp.rank * self.shard_size
        self.num_rows = max(0, min(self.shard_size, vocab_size - self.shard_start))
        self.weight = _param((self.shard_size, hidden_size), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, src: Any) -> None:
        param.data.zero_()
        if self.num_rows:
            _copy(param.data[: self.num_rows], _take(src, 0, self.shard_start, self.num_rows))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(hidden, self.weight).float()
        if self.tp.size == 1:
            return logits
        parts = (
            [torch.empty_like(logits) for _ in range(self.tp.size)] if self.tp.rank == 0 else None
        )
        dst = 0 if self.tp.group is None else dist.get_global_rank(self.tp.group, 0)
        dist.gather(logits, parts, dst=dst, group=self.tp.group)
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]
