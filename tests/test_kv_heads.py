"""Which KV heads each rank holds, including more ranks than KV heads (heads replicated):
the split itself, the connector context built from it, and the model's q/k/v shards."""

from __future__ import annotations

import pytest
import torch

from kvdist import ConnectorContext
from kvdist.engine.model import TPInfo
from kvdist.engine.model.parallel import QKVParallelLinear
from kvdist.kv.layout import KVHeadShard, kv_head_shard


def test_fewer_ranks_than_heads_split_them_evenly():
    """8 heads over 4 ranks: two each, in rank order, no replicas."""
    assert [kv_head_shard(r, 4, 8) for r in range(4)] == [
        KVHeadShard(0, 2), KVHeadShard(2, 4), KVHeadShard(4, 6), KVHeadShard(6, 8)
    ]  # fmt: skip


def test_more_ranks_than_heads_replicate_each_head_on_consecutive_ranks():
    """2 heads over 8 ranks: ranks 0-3 hold head 0 and ranks 4-7 head 1 (the ranks whose
    query heads read it), replicas numbered 0-3 within each group. A failure means a
    rank's query heads would attend with another group's keys."""
    shards = [kv_head_shard(r, 8, 2) for r in range(8)]
    assert [(s.start, s.end) for s in shards] == [(0, 1)] * 4 + [(1, 2)] * 4
    assert [s.replica for s in shards] == [0, 1, 2, 3] * 2
    assert {s.replicas for s in shards} == {4}


@pytest.mark.parametrize("ranks,heads", [(3, 2), (4, 6), (6, 4)])
def test_uneven_splits_are_refused(ranks, heads):
    with pytest.raises(ValueError, match=rf"num_key_value_heads \({heads}\).*size \({ranks}\)"):
        kv_head_shard(0, ranks, heads)


def test_context_for_rank_fills_heads_and_replica():
    """`ConnectorContext.for_rank` gives the engine's split; only replica 0 writes."""
    common = dict(num_layers=2, block_size=4, head_dim=8, dtype=torch.float32,
                  device=torch.device("cpu"), model_namespace="m")  # fmt: skip
    ctxs = [ConnectorContext.for_rank(rank=r, world_size=4, num_kv_heads=2, **common)
            for r in range(4)]  # fmt: skip
    assert [(c.kv_head_start, c.kv_head_end, c.kv_replica) for c in ctxs] == [
        (0, 1, 0), (0, 1, 1), (1, 2, 0), (1, 2, 1)
    ]  # fmt: skip
    assert [c.writes_shared_kv for c in ctxs] == [True, False, True, False]
    assert all(c.kv_replicas == 2 and c.num_local_kv_heads == 1 for c in ctxs)
    plain = ConnectorContext.for_rank(rank=1, world_size=2, num_kv_heads=4, **common)
    assert (plain.kv_head_start, plain.kv_head_end, plain.kv_replicas) == (2, 4, 1)


def test_context_rejects_impossible_head_ranges():
    common = dict(rank=0, world_size=1, num_layers=1, block_size=4, num_kv_heads=4,
                  head_dim=8, dtype=torch.float32, device=torch.device("cpu"),
                  model_namespace="m")  # fmt: skip
    with pytest.raises(ValueError, match=r"\[2, 2\)"):
        ConnectorContext(kv_head_start=2, kv_head_end=2, **common)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        ConnectorContext(kv_head_start=0, kv_head_end=5, **common)
    with pytest.raises(ValueError, match="kv_replica"):
        ConnectorContext(kv_head_start=0, kv_head_end=4, kv_replicas=2, kv_replica=2, **common)


def test_qkv_shard_reads_the_replicated_kv_head_rows():
    """At TP 4 with 8 query heads and 2 KV heads, rank r's fused weight is its two query
    heads' rows, then the k and v rows of KV head r // 2. A failure means a replicated
    rank would load another head's keys or values."""
    hd, hidden = 4, 16
    q = torch.randn(8 * hd, hidden)
    k = torch.randn(2 * hd, hidden)
    v = torch.randn(2 * hd, hidden)
    for r in range(4):
        layer = QKVParallelLinear(hidden, hd, 8, 2, bias=False, tp=TPInfo(rank=r, size=4),
                                  dtype=torch.float32, device="cpu")  # fmt: skip
        for shard_id, src in (("q", q), ("k", k), ("v", v)):
            layer.weight_loader(layer.weight, src, shard_id)
        head = r // 2
        want = torch.cat([q[2 * r * hd : (2 * r + 2) * hd], k[head * hd : (head + 1) * hd],
                          v[head * hd : (head + 1) * hd]])  # fmt: skip
        assert torch.equal(layer.weight.data, want), f"rank {r}"
