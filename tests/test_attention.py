"""Paged attention against a dense per-sequence reference, on batches that mix decodes,
whole prompts, chunks after cached context and padding-heavy groups."""

from __future__ import annotations

import random

import pytest
import torch

from kvdist.engine.model.attention import AttentionMetadata, PagedAttention, _group_prefills

HEADS, KV_HEADS, HD, BS, BLOCKS = 8, 2, 16, 4, 96


def _reference(q, keys, values, context: int) -> torch.Tensor:
    """q [n, H, D] at the last n positions of `context`; keys/values [context, KVH, D]."""
    n = q.shape[0]
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ k.transpose(1, 2) * HD**-0.5  # [H, n, ctx]
    query_pos = torch.arange(context - n, context)[:, None]
    scores = scores.masked_fill(torch.arange(context)[None, :] > query_pos, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).flatten(1)  # [n, H*D]


def _run(shapes: list[tuple[int, int]], seed: int = 0) -> None:
    """shapes: (cached tokens, new tokens) per sequence."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    # Unused slots hold NaN: padding must never reach an output.
    kv = torch.full((2, BLOCKS, BS, KV_HEADS, HD), float("nan"))
    free = list(range(BLOCKS))
    rng.shuffle(free)
    seqs, full_k, full_v = [], [], []
    for cached, new in shapes:
        total = cached + new
        blocks = [free.pop() for _ in range(-(-total // BS))]
        k, v = torch.randn(total, KV_HEADS, HD), torch.randn(total, KV_HEADS, HD)
        for pos in range(cached):  # the context already in the cache
            kv[0, blocks[pos // BS], pos % BS] = k[pos]
            kv[1, blocks[pos // BS], pos % BS] = v[pos]
        seqs.append((blocks, cached, new))
        full_k.append(k)
        full_v.append(v)
    meta = AttentionMetadata.build(seqs, BS)
    tokens = sum(new for _, new in shapes)
    q = torch.randn(tokens, HEADS, HD)
    k_new = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes)])
    v_new = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes)])
    out = PagedAttention(HEADS, KV_HEADS, HD)(q, k_new, v_new, kv, meta)
    start = 0
    for s, (cached, new) in enumerate(shapes):
        want = _reference(q[start : start + new], full_k[s], full_v[s], cached + new)
        torch.testing.assert_close(out[start : start + new], want, atol=1e-5, rtol=1e-5)
        start += new
    assert not out.isnan().any()


@pytest.mark.parametrize(
    "shapes",
    [
        [(7, 1), (13, 1), (0, 1)],  # decodes only (a one-token prompt among them)
        [(0, 12)],  # one whole prompt: causal, no mask
        [(0, 9), (0, 9), (0, 9)],  # equal whole prompts: one causal group
        [(0, 9), (0, 5), (7, 1), (13, 1)],  # prompts of different lengths and decodes
        [(8, 6), (3, 2), (0, 7), (21, 1)],  # chunks after cached context
        [(0, 40), (2, 2), (30, 3), (5, 1)],  # padding-heavy: several groups
    ],
)
def test_paged_attention_matches_dense_reference(shapes) -> None:
    _run(shapes)


def test_random_batches_match_dense_reference() -> None:
    rng = random.Random(7)
    for seed in range(20):
        n = rng.randint(1, 6)
        shapes = [
            (rng.choice([0, rng.randint(0, 30)]), rng.choice([1, rng.randint(1, 20)]))
            for _ in range(n)
        ]
        _run(shapes, seed)


def test_prefill_groups_bound_padding() -> None:
    # Similar sequences share one group; a short query beside a long one gets its own.
    assert _group_prefills([10, 9, 8], [10, 9, 8], [0, 1, 2]) == [[0, 1, 2]]
    assert _group_prefills([64, 2], [64, 100], [0, 1]) == [[0], [1]]
    meta = AttentionMetadata.build([([0, 1, 2], 0, 9), ([3, 4, 5], 0, 9), ([6], 2, 1)], 4)
    assert len(meta.prefill_groups) == 1 and meta.prefill_groups[0].mask is None
    assert meta.num_decode_tokens == 1
