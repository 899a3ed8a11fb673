"""Paged attention in pure torch (CPU and CUDA) and the per-step metadata it reads.

A step is a flat batch of T new tokens from S sequences. Each sequence s owns
`query_start_loc[s+1] - query_start_loc[s]` consecutive tokens of the batch, at positions
`context_lens[s] - n_s .. context_lens[s] - 1`, and its KV lives in the blocks listed in
`block_tables[s]`. The same code covers a full prefill, a chunk in the middle of a prompt,
a prefill after a prefix-cache hit and a decode: attention always reads the K/V of the
whole context back from the paged cache, after this step's tokens were written there.

Both kinds of sequence are batched, so a step's kernel count does not grow with its number
of sequences (the reference engine is bound by kernel launches on a GPU):

- decodes (one new token each): their contexts are gathered into one padded tensor and
  attended in a single masked call;
- prefills and prefill chunks (several new tokens): padded to the longest query and the
  longest context of their group and attended in one call, with a mask that lets query i
  of a sequence see keys 0 .. context - new + i. Sequences whose padding would more than
  double the work go to a group of their own (`PrefillGroup`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# `enable_gqa` arrived in torch 2.5; on older torch the KV heads are repeated instead.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def attention_kernels():
    """The SDPA kernels the model may use (a context manager around the forward).

    Not cuDNN's: its attention spent 0.7-3.5 ms of host time per call on an H200 (torch
    2.11, shapes changing every step), 32 times a step for an 8B model, in an engine whose
    step time is set by its host time."""
    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


_PAD_WASTE = 2.0
"""A prefill group's padded attention may cost at most this many times its real work."""


@dataclass(frozen=True, kw_only=True)
class PrefillGroup:
    """Prefilling sequences attended together: P sequences padded to Lq queries and
    Lk = nb * block_size keys."""

    token_idx: torch.Tensor
    """[P, Lq] int64: batch index of each padded query (padding repeats the last token)."""
    out_rows: torch.Tensor
    """[N] int64: the rows of the flattened [P * Lq] output that are real queries."""
    out_tokens: torch.Tensor
    """[N] int64: the batch index of each of those rows."""
    block_tables: torch.Tensor
    """[P, nb] int64: the sequences' block tables, cut to the longest context's blocks."""
    kv_pad: torch.Tensor
    """[P, Lk, 1, 1] bool: the gathered slots past each sequence's context."""
    mask: torch.Tensor | None
    """[P, 1, Lq, Lk] bool: which keys each query sees; None when every sequence is a whole
    prompt of exactly Lq tokens, attended causally without a mask."""

    @classmethod
    def build(
        cls,
        starts: list[int],
        query_lens: list[int],
        context_lens: list[int],
        tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> PrefillGroup:
        lq, lk_tokens = max(query_lens), max(context_lens)
        nb = -(-lk_tokens // block_size)
        i64 = torch.int64
        out_rows = torch.cat(
            [torch.arange(p * lq, p * lq + n, dtype=i64) for p, n in enumerate(query_lens)]
        )
        out_tokens = torch.cat(
            [torch.arange(s, s + n, dtype=i64) for s, n in zip(starts, query_lens)]
        )
        n = torch.tensor(query_lens, dtype=i64).to(device)
        ctx = torch.tensor(context_lens, dtype=i64).to(device)
        i = torch.arange(lq, device=device)
        j = torch.arange(nb * block_size, device=device)
        token_idx = torch.tensor(starts, dtype=i64).to(device)[:, None] + torch.minimum(
            i[None, :], (n - 1)[:, None]
        )
        mask = None
        if any(q != lq or c != lq for q, c in zip(query_lens, context_lens)):
            # Query i of a sequence sits at position context - new + i. Padded queries sit
            # past the context and see some real keys, so no row is all masked (no NaN).
            query_pos = (ctx - n)[:, None] + i[None, :]
            mask = (j[None, None, :] <= query_pos[:, :, None])[:, None]
        return cls(
            token_idx=token_idx,
            out_rows=out_rows.to(device),
            out_tokens=out_tokens.to(device),
            block_tables=torch.tensor([t[:nb] for t in tables], dtype=i64).to(device),
            kv_pad=(j[None, :] >= ctx[:, None])[:, :, None, None],
            mask=mask,
        )


def _group_prefills(
    query_lens: list[int], context_lens: list[int], seqs: list[int]
) -> list[list[int]]:
    """Split prefilling sequences into groups whose padded work stays within `_PAD_WASTE`
    of their real work (queries x keys), longest queries first."""
    groups: list[list[int]] = []
    for s in sorted(seqs, key=lambda s: -query_lens[s]):
        g = groups[-1] if groups else None
        if g is not None:
            members = g + [s]
            padded = len(members) * query_lens[g[0]] * max(context_lens[m] for m in members)
            real = sum(query_lens[m] * context_lens[m] for m in members)
            if padded <= _PAD_WASTE * real:
                g.append(s)
                continue
        groups.append([s])
    return groups


@dataclass(frozen=True, kw_only=True)
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each one attends to."""

    slot_mapping: torch.Tensor
    """[T] int64: cache slot (block_id * block_size + offset) of each new token's K/V."""
    positions: torch.Tensor
    """[T] int64: position of each new token in its sequence (feed it to the model)."""
    query_start_loc: torch.Tensor
    """[S+1] int64: cumulative new-token counts; sequence s owns tokens [q[s], q[s+1])."""
    block_size: int
    """Tokens per KV block."""
    num_prefill_tokens: int
    """Tokens of sequences with more than one new token (prefills and prefill chunks)."""
    prefill_groups: tuple[PrefillGroup, ...]
    """Those sequences, in groups attended one call each."""
    num_decode_tokens: int
    """Sequences with exactly one new token (decodes), batched together."""
    decode_token_idx: torch.Tensor
    """[D] int64: batch index of each decode sequence's token."""
    decode_block_tables: torch.Tensor
    """[D, nb] int64: the decode sequences' block tables, cut to the longest one's blocks."""
    decode_mask: torch.Tensor
    """[D, 1, 1, nb * block_size] bool: which gathered slots hold each decode's context."""
    decode_pad: torch.Tensor
    """[D, nb * block_size, 1, 1] bool: the gathered slots past each decode's context."""

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
        prefill_seqs: list[int] = []
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
            else:
                prefill_seqs.append(s)
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
        decode_valid = gathered[None, :] < tensor(decode_lens)[:, None]
        prefill_groups = tuple(
            PrefillGroup.build(
                [starts[s] for s in g],
                [query_lens[s] for s in g],
                [context_lens[s] for s in g],
                [table[s] for s in g],
                block_size,
                device,
            )
            for g in _group_prefills(query_lens, context_lens, prefill_seqs)
        )

        return cls(
            slot_mapping=tensor(slots),
            positions=tensor(positions),
            query_start_loc=tensor(starts),
            block_size=block_size,
            num_prefill_tokens=len(slots) - len(decode_seqs),
            prefill_groups=prefill_groups,
            num_decode_tokens=len(decode_seqs),
            decode_token_idx=tensor(decode_tokens),
            decode_block_tables=tensor(decode_table).reshape(len(decode_seqs), decode_blocks),
            decode_mask=decode_valid[:, None, None, :],
            decode_pad=~decode_valid[:, :, None, None],
        )


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, expand_kv: bool = False, **kwargs
) -> torch.Tensor:
    """q [.., H, Lq, D], k/v [.., KVH, Lk, D] -> [.., H, Lq, D] (grouped-query).

    `expand_kv` repeats the KV heads rather than asking SDPA for grouped-query attention,
    so that a masked call can run the memory-efficient kernel (the H200 profiles in
    benchmarks/results show it does); with grouped heads SDPA may take the math kernel,
    which materialises every score."""
    if q.shape[-3] == k.shape[-3]:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if _SDPA_HAS_GQA and not expand_kv:
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

        if not meta.prefill_groups:  # decodes only: the batch is the decodes, in order
            return self._decode(q, k_cache, v_cache, meta).flatten(1)
        out = torch.empty_like(q)
        if meta.num_decode_tokens:
            qd = q.index_select(0, meta.decode_token_idx)
            out[meta.decode_token_idx] = self._decode(qd, k_cache, v_cache, meta)
        for group in meta.prefill_groups:
            out.index_copy_(0, group.out_tokens, self._prefill(q, k_cache, v_cache, group))
        return out.flatten(1)

    def _gather(self, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """The tokens of blocks [.., nb] -> a fresh [.., nb * block_size, KVH, hd] tensor."""
        # index_select on the flat ids: ~3x faster than advanced indexing on CPU.
        blocks = cache.index_select(0, block_ids.flatten())
        return blocks.view(*block_ids.shape, -1, *cache.shape[2:]).flatten(-4, -3)

    def _prefill(self, q, k_cache, v_cache, group: PrefillGroup) -> torch.Tensor:
        """One group's padded attention -> [N, H, hd], the rows of its real queries."""
        p, lq = group.token_idx.shape
        qp = q.index_select(0, group.token_idx.flatten()).view(p, lq, *q.shape[1:])
        k = self._gather(k_cache, group.block_tables)
        v = self._gather(v_cache, group.block_tables)
        if group.mask is None:
            # Whole prompts of Lq tokens: causal, keys past Lq are not read.
            o = _sdpa(
                qp.transpose(1, 2),
                k[:, :lq].transpose(1, 2),
                v[:, :lq].transpose(1, 2),
                is_causal=True,
                scale=self.scale,
            )
        else:
            # Slots past a context may hold anything (see _decode): zero them.
            k, v = k.masked_fill_(group.kv_pad, 0), v.masked_fill_(group.kv_pad, 0)
            o = _sdpa(
                qp.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=group.mask,
                scale=self.scale,
                expand_kv=q.is_cuda,
            )
        return o.transpose(1, 2).reshape(p * lq, *q.shape[1:]).index_select(0, group.out_rows)

    def _decode(self, qd, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """qd [D, H, hd]: the decodes' queries -> [D, H, hd]."""
        # Slots past a context's end (block-table padding, never-written or stale slots)
        # may hold anything, NaN included, and 0 * NaN is NaN: zero them, then mask them.
        # The gathered tensors are fresh copies, so this is done in place.
        k = self._gather(k_cache, meta.decode_block_tables).masked_fill_(meta.decode_pad, 0)
        v = self._gather(v_cache, meta.decode_block_tables).masked_fill_(meta.decode_pad, 0)
        # Grouped-query attention without repeating K/V: the query heads sharing a KV
        # head become that head's queries ([D, KVH, group, hd]), all at the same position,
        # so one masked call of plain multi-head attention serves them.
        d = qd.shape[0]
        qd = qd.view(d, self.num_kv_heads, -1, self.head_dim)
        o = F.scaled_dot_product_attention(
            qd, k.transpose(1, 2), v.transpose(1, 2), attn_mask=meta.decode_mask, scale=self.scale
        )
        return o.reshape(d, self.num_heads, self.head_dim)
