"""Decode graphs' padded static-shape path (run eagerly here: capture needs CUDA) against
the eager path, and the runner's choice between them. The GPU tier checks the captured
graphs themselves (tests/test_gpu.py)."""

from __future__ import annotations

import random
import weakref

import pytest
import torch

from kvdist.api.connector import ConnectorWorker
from kvdist.api.step import RequestBatch, RequestData, SchedulerOutput
from kvdist.engine.decode_graphs import DecodeGraphs, batch_buckets, context_buckets
from kvdist.engine.llm import LLM
from kvdist.engine.model import TPInfo, build_preset
from kvdist.engine.model.attention import AttentionMetadata
from kvdist.engine.runner import LayerHooks, ModelRunner
from kvdist.engine.sampling import SamplingParams

BS, BLOCKS = 4, 480


@pytest.fixture(scope="module")
def model():
    return build_preset("tiny", tp=TPInfo(), dtype="float32")


def _cache(model, seed: int) -> torch.Tensor:
    """A KV cache of random values, with NaN in a few blocks no sequence owns."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (c.num_layers, 2, BLOCKS, BS, model.num_local_kv_heads, c.head_dim)
    kv = torch.randn(shape, generator=g)
    kv[:, :, BLOCKS - 8 :] = float("nan")  # never handed out below
    return kv


def _decode_batch(rng: random.Random, num_seqs: int, vocab: int, max_context: int):
    free = list(range(BLOCKS - 8))
    rng.shuffle(free)
    ids, seqs = [], []
    for _ in range(num_seqs):
        computed = rng.randrange(0, max_context)
        # Sometimes a block allocated ahead, past the one the new token goes in.
        blocks = [free.pop() for _ in range(computed // BS + 1 + rng.randrange(2))]
        ids.append(rng.randrange(vocab))
        seqs.append((blocks, computed, 1))
    return ids, seqs


def test_buckets() -> None:
    assert batch_buckets(256)[:12] == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96]
    assert batch_buckets(256)[-1] == 256
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(100)[-2:] == [96, 100]
    assert context_buckets(3) == [3]
    assert context_buckets(100) == [8, 16, 32, 64, 100]


@pytest.mark.parametrize("seed", range(6))
def test_padded_decode_matches_eager(model, seed: int) -> None:
    """Padded rows and padded context change neither the hidden states of the real rows
    nor any slot of the KV cache."""
    rng = random.Random(seed)
    num_seqs = rng.choice([1, 3, 5, 9, 17])
    ids, seqs = _decode_batch(rng, num_seqs, model.config.vocab_size, max_context=90)
    kv_eager, kv_padded = _cache(model, seed), _cache(model, seed)
    meta = AttentionMetadata.build(seqs, BS)
    want = model(torch.tensor(ids), meta.positions, meta, kv_eager)
    graphs = DecodeGraphs(
        model, kv_padded, block_size=BS, max_num_seqs=32, max_model_len=BS * 40, capture=False
    )
    got = graphs.run(ids, seqs)
    assert got is not None and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kv_padded, kv_eager, equal_nan=True, atol=2e-5, rtol=2e-5)
    assert not got.isnan().any()


def test_buffers_are_reused_across_steps(model) -> None:
    """A bucket's buffers hold the previous step's rows: a smaller step in the same bucket
    must not see them."""
    rng = random.Random(7)
    kv = _cache(model, 7)
    graphs = DecodeGraphs(
        model, kv, block_size=BS, max_num_seqs=32, max_model_len=BS * 40, capture=False
    )
    ids, seqs = _decode_batch(rng, 8, model.config.vocab_size, max_context=60)
    graphs.run(ids, seqs)
    ids, seqs = ids[:5], seqs[:5]  # same bucket (8 rows), fewer real ones
    kv_eager = kv.clone()
    meta = AttentionMetadata.build(seqs, BS)
    want = model(torch.tensor(ids), meta.positions, meta, kv_eager)
    torch.testing.assert_close(graphs.run(ids, seqs), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kv, kv_eager, equal_nan=True, atol=2e-5, rtol=2e-5)


def test_steps_no_bucket_holds_and_bad_rows(model) -> None:
    kv = _cache(model, 0)
    graphs = DecodeGraphs(
        model, kv, block_size=BS, max_num_seqs=4, max_model_len=BS * 40, capture=False
    )
    ids, seqs = _decode_batch(random.Random(0), 5, model.config.vocab_size, max_context=30)
    assert graphs.run(ids, seqs) is None  # more rows than max_num_seqs
    with pytest.raises(ValueError, match="one new token"):
        graphs.run([1], [([0, 1], 3, 2)])
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(model, kv, block_size=BS, max_num_seqs=4, max_model_len=64)


# -- the runner's choice -------------------------------------------------------------------
class _Worker(ConnectorWorker):
    def __init__(self, needs: bool) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.needs = needs
        self.layers: list[int] = []

    def start_load_kv(self, stream) -> None:
        pass

    def needs_layer_hooks(self) -> bool:
        return self.needs

    def wait_for_layer_load(self, layer_idx: int, stream) -> None:
        self.layers.append(layer_idx)


def _step(rows: list[tuple[str, list[int], list[int], int, int]], new: bool) -> SchedulerOutput:
    batch = RequestBatch(RequestData(*r) for r in rows)
    return (
        SchedulerOutput(1, new_requests=batch) if new else SchedulerOutput(2, cached_requests=batch)
    )


@pytest.mark.parametrize("needs_hooks", [False, True])
def test_runner_replays_decode_only_steps(model, needs_hooks: bool) -> None:
    """A prefill step runs eagerly; the decode step after it takes the graphs unless the
    connector needs its per-layer hooks; the logits are the eager runner's."""
    outs = {}
    for use_graphs in (False, True):
        kv = torch.zeros(_cache(model, 0).shape)
        graphs = None
        if use_graphs:
            graphs = DecodeGraphs(
                model, kv, block_size=BS, max_num_seqs=8, max_model_len=BS * 40, capture=False
            )
        runner = ModelRunner(model, kv, block_size=BS, device=torch.device("cpu"), graphs=graphs)
        worker = _Worker(needs_hooks)
        hooks = LayerHooks(worker, None)
        prompts = [("a", [5, 6, 7, 8, 9], [3, 4], 0, 5), ("b", [1, 2, 3], [10], 0, 3)]
        runner.apply_plan(_step(prompts, new=True))
        first = runner.execute(_step(prompts, new=True), hooks)
        assert not first.graph
        decode = [("a", [11], [], 5, 1), ("b", [12], [], 3, 1)]
        runner.apply_plan(_step(decode, new=False))
        second = runner.execute(_step(decode, new=False), hooks)
        assert second.graph == (use_graphs and not needs_hooks)
        # Hooks run in the steps that need them only.
        assert worker.layers == (list(range(model.config.num_layers)) * 2 if needs_hooks else [])
        outs[use_graphs] = second.logits
    torch.testing.assert_close(outs[True], outs[False], atol=2e-5, rtol=2e-5)


def test_needs_layer_hooks_default() -> None:
    class Plain(ConnectorWorker):
        def start_load_kv(self, stream) -> None:
            pass

    class Saves(Plain):
        def save_kv_layer(self, layer_idx, stream) -> None:
            pass

    assert not Plain(None).needs_layer_hooks()  # type: ignore[arg-type]
    assert Saves(None).needs_layer_hooks()  # type: ignore[arg-type]


def test_engine_tokens_with_padded_decode_steps() -> None:
    """The engine with the padded decode path (eager, on the CPU) gives the tokens of the
    plain eager engine, for prompts of different lengths finishing at different steps."""
    prompts = [list(range(3 + i, 3 + i + 7 * i + 2)) for i in range(6)]
    params = [SamplingParams(max_tokens=4 + 3 * i) for i in range(6)]
    tokens = {}
    for padded in (False, True):
        llm = LLM("tiny", dtype="float32", num_blocks=64, max_num_seqs=8, device="cpu")
        if padded:
            llm.graphs = llm.runner.graphs = DecodeGraphs(
                llm.model,
                llm.kv_cache,
                block_size=16,
                max_num_seqs=8,
                max_model_len=llm.max_model_len,
                capture=False,
            )
        outs = llm.generate(prompts, params)
        tokens[padded] = [o.output_token_ids for o in outs]
        graph_steps = llm.stats["cuda_graph_steps"]
        model = weakref.ref(llm.model)
        llm.shutdown()
        assert (graph_steps > 0) == padded
        assert model() is None  # the graphs do not keep the model alive after shutdown
    assert tokens[True] == tokens[False]


def test_a_failed_capture_names_the_shape_and_the_way_out(model, monkeypatch) -> None:
    kv = _cache(model, 0)
    graphs = DecodeGraphs(
        model, kv, block_size=BS, max_num_seqs=8, max_model_len=BS * 40, capture=False
    )
    graphs.capture = True  # as on CUDA, with the capture itself failing

    def out_of_memory(entry) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(graphs, "_capture", out_of_memory)
    ids, seqs = _decode_batch(random.Random(1), 3, model.config.vocab_size, max_context=20)
    with pytest.raises(RuntimeError, match=r"4 sequences over 8 blocks failed .*--eager"):
        graphs.run(ids, seqs)
