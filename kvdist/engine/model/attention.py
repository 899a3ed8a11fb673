"""Paged attention in pure torch (CPU and CUDA) and the per-step metadata it reads.

A step is a flat batch of T new tokens from S sequences. Each sequence s owns
`query_start_loc[s+1] - query_start_loc[s]` consecutive tokens of the batch, at positions
`context_lens[s] - n_s .. context_lens[s] - 1`, and its KV lives in the blocks listed in
`block_tables[s]`. The same code covers a full prefill, a chunk in the middle of a prompt,
a prefill after a prefix-cache hit and a decode: attention always reads the K/V of the
whole context back from the paged cache, after this step's tokens were written there.

Decodes (one new token each) are batched: their contexts are gathered into one padded
tensor and attended in a single masked call, so 64 concurrent decodes cost a handful of
kernels rather than 64 of each. Sequences with several new tokens are looped over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# `enable_gqa` arrived in torch 2.5; on older torch the KV heads are repeated instead.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass(frozen=True, kw_only=True)
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each one attends to."""

    slot_mapping: torch.Tensor
    """[T] int64: cache slot (block_id * block_size + offset) of each new token's K/V."""
    positions: torch.Tensor
    """[T] int64: position of each new token in its sequence (feed it to the model)."""
    query_start_loc: torch.Tensor
    """[S+1] int64: cumulative new-token counts; sequence s owns tokens [q[s], q[s+1])."""
    context_lens: torch.Tensor
    """[S] int64: tokens in the cache for each sequence after this step's writes."""
    block_tables: torch.Tensor
    """[S, max_blocks] int64: each sequence's block ids, padded with 0."""
    block_size: int
    """Tokens per KV block."""
    query_lens_cpu: tuple[int, ...]
    """Host copy of the new-token counts, so the prefill loop never syncs with the device."""
    context_lens_cpu: tuple[int, ...]
    """Host copy of `context_lens`."""
    num_prefill_tokens: int
    """Tokens of sequences with more than one new token (prefills and prefill chunks)."""
    num_decode_tokens: int
    """Sequences with exactly one new token (decodes), batched together."""
    decode_seq_idx: torch.Tensor
    """[D] int64: indices of the decode sequences."""
    decode_token_idx: torch.Tensor
    """[D] int64: batch index of each decode sequence's token."""
    decode_block_tables: torch.Tensor
    """[D, nb] int64: the decode sequences' block tables, cut to the longest one's blocks."""
    decode_mask: torch.Tensor
    """[D, nb * block_size] bool: which gathered slots hold each decode's context."""

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.num_prefill_tokens == 0

    @classmethod
    def build(
        cls,
        seqs: Sequence[tuple[Sequence[int], int, int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for a step computing, per sequence `(block_ids, computed_position,
        num_new_tokens)`, the tokens at positions [computed, computed + num_new).

        `block_ids` must cover every position up to `computed + num_new`. Tokens in the
        batch are ordered sequence by sequence, in the order given.
        """
        if not seqs:
            raise ValueError("AttentionMetadata.build needs at least one sequence")
        slots: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        decode_seqs: list[int] = []
        decode_tokens: list[int] = []
        for s, (block_ids, computed, num_new) in enumerate(seqs):
            end = computed + num_new
            if num_new < 1 or computed < 0:
                raise ValueError(
                    f"sequence {s}: need computed_position >= 0 and num_new_tokens >= 1, "
                    f"got {computed} and {num_new}"
                )
            if len(block_ids) * block_size < end:
                raise ValueError(
                    f"sequence {s}: {len(block_ids)} blocks of {block_size} tokens cannot "
                    f"hold {end} tokens"
                )
            if num_new == 1:
                decode_seqs.append(s)
                decode_tokens.append(len(slots))
            for pos in range(computed, end):
                slots.append(block_ids[pos // block_size] * block_size + pos % block_size)
            positions.extend(range(computed, end))
            query_lens.append(num_new)
            context_lens.append(end)
        max_blocks = max(len(b) for b, _, _ in seqs)
        table = [list(b) + [0] * (max_blocks - len(b)) for b, _, _ in seqs]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)

        def tensor(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        # Per step, not per layer: what the batched decode path gathers and masks.
        decode_lens = [context_lens[s] for s in decode_seqs]
        decode_blocks = -(-max(decode_lens, default=0) // block_size)
        decode_table = [table[s][:decode_blocks] for s in decode_seqs]
        gathered = torch.arange(decode_blocks * block_size, device=device)
        decode_mask = gathered[None, :] < tensor(decode_lens)[:, None]

        return cls(
            slot_mapping=tensor(slots),
            positions=tensor(positions),
            query_start_loc=tensor(starts),
            context_lens=tensor(context_lens),
            block_tables=tensor(table),
            block_size=block_size,
            query_lens_cpu=tuple(query_lens),
            context_lens_cpu=tuple(context_lens),
            num_prefill_tokens=len(slots) - len(decode_seqs),
            num_decode_tokens=len(decode_seqs),
            decode_seq_idx=tensor(decode_seqs),
            decode_token_idx=tensor(decode_tokens),
            decode_block_tables=tensor(decode_table).reshape(len(decode_seqs), decode_blocks),
            decode_mask=decode_mask,
        )


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """q [.., H, Lq, D], k/v [.., KVH, Lk, D] -> [.., H, Lq, D] (grouped-query)."""
    if q.shape[-3] == k.shape[-3]:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class PagedAttention(nn.Module):
    """Writes new K/V into one layer's cache, then attends over each sequence's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D], kv_layer [2, blocks, block_size, KVH, D] -> [T, H*D]."""
        k_cache, v_cache = kv_layer[0], kv_layer[1]
        flat = (-1, self.num_kv_heads, self.head_dim)
        k_cache.view(flat).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(flat).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        out = torch.empty_like(q)
        if meta.num_decode_tokens:
            out[meta.decode_token_idx] = self._decode(q, k_cache, v_cache, meta)
        if meta.num_prefill_tokens:
            start = 0
            for s, (n, ctx) in enumerate(zip(meta.query_lens_cpu, meta.context_lens_cpu)):
                if n > 1:
                    out[start : start + n] = self._prefill(
                        q[start : start + n], k_cache, v_cache, meta.block_tables[s], ctx
                    )
                start += n
        return out.flatten(1)

    def _gather(self, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """The tokens of blocks [.., nb] -> a fresh [.., nb * block_size, KVH, hd] tensor."""
        # index_select on the flat ids: ~3x faster than advanced indexing on CPU.
        blocks = cache.index_select(0, block_ids.flatten())
        return blocks.view(*block_ids.shape, -1, *cache.shape[2:]).flatten(-4, -3)

    def _prefill(self, q, k_cache, v_cache, block_row, ctx_len) -> torch.Tensor:
        n = q.shape[0]
        blocks = block_row[: -(-ctx_len // k_cache.shape[1])]
        # 4-D [1, heads, len, hd]: the fused CUDA kernels reject 3-D inputs.
        k = self._gather(k_cache, blocks)[:ctx_len].transpose(0, 1)[None]
        v = self._gather(v_cache, blocks)[:ctx_len].transpose(0, 1)[None]
        qh = q.transpose(0, 1)[None]
        if n == ctx_len:
            o = _sdpa(qh, k, v, is_causal=True, scale=self.scale)
        else:
            # Queries sit at the end of the context: query i sees keys 0 .. ctx_len-n+i.
            mask = torch.ones(n, ctx_len, dtype=torch.bool, device=q.device).tril(ctx_len - n)
            o = _sdpa(qh, k, v, attn_mask=mask, scale=self.scale)
        return o[0].transpose(0, 1)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        # Slots past a context's end (block-table padding, never-written or stale slots)
        # may hold anything, NaN included, and 0 * NaN is NaN: zero them, then mask them.
        # The gathered tensors are fresh copies, so this is done in place.
        drop = ~meta.decode_mask[:, :, None, None]
        k = self._gather(k_cache, meta.decode_block_tables).masked_fill_(drop, 0)
        v = self._gather(v_cache, meta.decode_block_tables).masked_fill_(drop, 0)
        qd = q[meta.decode_token_idx][:, :, None, :]  # [D, H, 1, hd]
        mask = meta.decode_mask[:, None, None, :]
        o = _sdpa(qd, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.scale)
        return o[:, :, 0, :]
