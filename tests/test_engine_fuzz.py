"""Random request lifecycles through the engine, against invariants and a run without
connector.

Each seed draws an engine (few blocks, so requests preempt one another; chunked prefill;
prefix caching on or off; a load-failure policy), a memory connector (sync or async loads
and saves, ranks reporting late, a failing block), a subset of prompts and aborts at
random steps. After every step the block manager's reference counts must equal the
blocks the scheduler's requests hold, and its cache map must be consistent. At the end no
block is in use; every request the connector was asked about got exactly one
`request_finished`, and every finished id reached the worker's `get_finished` once; every
request that ran to its length has the tokens of a run without connector, with no more
cached and loaded tokens than its prompt. A failure names its seed (`_draw(seed)` is what
it drew)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kvdist.engine.llm import LLM
from kvdist.engine.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
SEEDS = range(40)
STORE = "fuzz"


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    prompts = []
    for i in range(10):  # three shared prefixes of 1-4 blocks, each with its own tail
        shared = [1 + (i % 3) * 100 + k for k in range(rng.choice([16, 32, 48, 64]))]
        tail = [(300 + 37 * i + k) % 500 + 5 for k in range(rng.randrange(1, 30))]
        prompts.append(shared + tail)
    return prompts


PROMPTS = _prompts()


def _memory(**kwargs) -> dict:
    return {
        "module": "memory_connector",
        "scheduler_class": "MemoryScheduler",
        "worker_class": "MemoryWorker",
        "kwargs": {"store": STORE, **kwargs},
    }


@pytest.fixture(scope="module")
def reference() -> dict[tuple[int, ...], list[int]]:
    llm = LLM("tiny", num_blocks=256)
    outs = llm.generate(PROMPTS, PARAMS)
    llm.shutdown()
    fill = LLM("tiny", connector=_memory(), num_blocks=256)  # half the prompts stored
    fill.generate(PROMPTS[:5], PARAMS)
    fill.shutdown()
    return {tuple(p): o.output_token_ids for p, o in zip(PROMPTS, outs)}


def check_blocks(llm: LLM) -> None:
    """Reference counts are the blocks the requests hold; free means unreferenced; the
    prefix-cache map and its inverse agree."""
    sched, blocks = llm.scheduler, llm.blocks
    held: Counter[int] = Counter()
    seen: set[int] = set()
    for seq in [*sched.running, *sched.waiting, *sched.loading.values(), *sched.held.values()]:
        if id(seq) not in seen:  # a finished request may be both loading and held
            seen.add(id(seq))
            held.update(seq.block_ids)
    for b in range(blocks.num_blocks):
        assert blocks.ref_counts[b] == held[b], (
            f"block {b}: {blocks.ref_counts[b]} refs, {held[b]} holders"
        )
        assert (b in blocks.free_blocks) == (blocks.ref_counts[b] == 0), f"block {b}: free list"
    for h, b in blocks.hash_to_block.items():
        assert blocks.block_hash[b] == h, f"block {b}: cache map"


def _draw(seed: int) -> tuple[dict, dict, int, float, list[list[int]]]:
    rng = random.Random(seed)
    engine = {
        "num_blocks": rng.choice([8, 10, 14, 20]),
        "max_num_batched_tokens": rng.choice([7, 24, 64, 2048]),
        "enable_prefix_caching": rng.random() < 0.6,
        "max_num_seqs": rng.choice([1, 2, 4, 256]),
        "load_failure_policy": rng.choice(["recompute", "fail"]),
    }
    connector = {"async_load": rng.random() < 0.5, "async_save": rng.random() < 0.5}
    if rng.random() < 0.3:
        connector.update(fail_rank=0, fail_block_index=rng.randrange(0, 3))
    delay = rng.choice([0, 1, 3])
    abort_p = rng.choice([0, 0, 0.05, 0.2])
    return engine, connector, delay, abort_p, rng.sample(PROMPTS, rng.randrange(2, 8))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_lifecycles_keep_the_invariants(seed: int, reference) -> None:
    engine, connector, delay, abort_p, prompts = _draw(seed)
    rng = random.Random(seed + 1000)
    llm = LLM("tiny", connector=_memory(**connector), **engine)
    llm.connector_worker.delay = delay  # reports that many steps late

    def on_step(llm: LLM, step: int) -> None:
        check_blocks(llm)
        assert step < 1500, "no end after 1500 steps: the engine is stuck"
        if rng.random() < abort_p:
            llm.abort_request(f"req-{rng.randrange(llm._num_requests)}")

    outs = llm.generate(prompts, PARAMS, on_step=on_step)
    outs += llm.generate(prompts[:2], PARAMS, on_step=on_step)  # a second call, warm
    llm.shutdown()
    check_blocks(llm)
    assert llm.num_used_blocks() == 0, "blocks leaked"
    calls = llm.connector_scheduler.calls
    asked = {c[1] for c in calls if c[0] == "matched"}
    finished = Counter(c[1] for c in calls if c[0] == "finished")
    assert finished == Counter(dict.fromkeys(asked, 1)), "request_finished not once per request"
    handed = Counter(
        rid for c in llm.connector_worker.calls if c[0] == "get_finished" for rid in c[1]
    )
    assert handed == Counter(o.request_id for o in outs), "get_finished not once per request"
    for prompt, out in zip(prompts + prompts[:2], outs):
        if out.finish_reason != "length":
            assert out.finish_reason in ("abort", "error"), out
            continue
        assert out.output_token_ids == reference[tuple(prompt)], out.request_id
        assert out.num_cached_tokens + out.num_external_tokens <= len(prompt), out
