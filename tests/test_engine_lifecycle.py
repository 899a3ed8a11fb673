"""Request lifecycles through the engine's scheduler at their edges: preemption beside
async loads, an abort after a failed load was undone, counts across preemptions, prompts
of whole blocks. Each compares tokens with a run without connector where it can."""

from __future__ import annotations

import pytest
from memory_connector import cpu_in_front_of

from kvdist.engine.llm import LLM
from kvdist.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def _memory(store: str, **kwargs) -> dict:
    """The memory connector (tests/memory_connector.py) on `store`."""
    return {
        "module": "memory_connector",
        "scheduler_class": "MemoryScheduler",
        "worker_class": "MemoryWorker",
        "kwargs": {"store": store, **kwargs},
    }


def _tokens(prompts, params=GREEDY, **kw) -> list[list[int]]:
    """Tokens of an engine with a fresh device cache (`kw`: its settings)."""
    llm = LLM("tiny", num_blocks=kw.pop("num_blocks", 64), **kw)
    outs = llm.generate(prompts, params)
    llm.shutdown()
    return [o.output_token_ids for o in outs]


def _fill(store: str, prompts) -> None:
    """Put the prompts' blocks in the memory store."""
    llm = LLM("tiny", connector=_memory(store), num_blocks=64)
    llm.generate(prompts, GREEDY)
    llm.shutdown()


def _guard(max_steps: int):
    def on_step(llm, step):
        if step > max_steps:
            raise AssertionError(f"no end after {max_steps} steps: the engine is stuck")

    return on_step


def test_a_loaded_request_behind_a_preempted_one_still_runs() -> None:
    """7 blocks. L (65 tokens) loads its 5 blocks asynchronously while R (32 tokens, 2
    blocks) runs; R's first decode needs a third block, the only other holder is L (not
    running), so R preempts itself and goes back to the head of the queue, ahead of L,
    and finds no room: L holds it. L must still be scheduled (it holds its blocks), or
    nothing ever runs again. A failure is a hang, caught as too many steps."""
    long, short = list(range(1, 66)), list(range(300, 332))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    _fill("behind-preempted", [long])
    llm = LLM("tiny", connector=_memory("behind-preempted", async_load=True), num_blocks=7)
    outs = llm.generate([short, long], params, on_step=_guard(300))
    stats = llm.stats
    llm.shutdown()
    assert stats["preemptions"] > 0, "the scenario did not preempt"
    assert [o.output_token_ids for o in outs] == _tokens([short, long], params)
    assert llm.num_used_blocks() == 0


@pytest.mark.parametrize(
    "batched_tokens, abort_after_step",
    [(2048, 1), (24, 1), (24, 2), (24, 3)],  # whole prefill; aborted mid-recompute
)
def test_an_abort_after_an_undone_sync_load_saves_nothing_bad(
    batched_tokens: int, abort_after_step: int
) -> None:
    """`tiered` [cpu, memory] loads a prompt's blocks synchronously from the memory tier,
    whose first block fails: the step is undone, and the request aborted before it has
    recomputed what that step wrote. Those blocks hold the failed load and KV computed on
    it: the cpu tier must not keep them. A later request with the prefix, served by the
    cpu tier, then gets the tokens of a run without connector."""
    base = list(range(1, 65))
    full = base + list(range(200, 220))  # 5 full blocks + 4 tokens
    other = full[:80] + list(range(300, 325))  # the same 5 blocks, another tail
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    want = _tokens([other], params, enable_prefix_caching=False)[0]
    store = f"abort-undone-{batched_tokens}-{abort_after_step}"
    llm = LLM("tiny", connector=_memory(store), enable_prefix_caching=False)
    llm.generate([base + [250, 251, 252]], params)
    llm.shutdown()
    failing = _memory(store, fail_rank=0, fail_block_index=0)
    llm = LLM(
        "tiny",
        connector=cpu_in_front_of(failing),
        num_blocks=64,
        enable_prefix_caching=False,
        max_num_batched_tokens=batched_tokens,
    )

    def abort(llm, step):
        if step == abort_after_step:
            assert llm.stats["load_failures"] > 0, "the load did not fail"
            assert llm.abort_request("req-0")

    assert llm.generate([full], params, on_step=abort)[0].finish_reason == "abort"
    second = llm.generate([other], params)[0]
    llm.shutdown()
    assert second.output_token_ids == want


@pytest.mark.parametrize("tail, batched_tokens", [(0, 2048), (40, 16)])
def test_num_external_tokens_counts_the_first_prefill_once(tail: int, batched_tokens: int) -> None:
    """12 blocks for three prompts whose first 4 blocks are in the store: they preempt
    one another and load again when re-admitted, after their first token (65-token
    prompts, 40 new tokens) or in the middle of a chunked prefill (105 tokens, 16 a
    step). A request's `num_external_tokens` is what the connector supplied to its first
    prefill; the engine's counter counts every load."""
    prompts = [
        list(range(1 + 100 * i, 66 + 100 * i)) + list(range(350 + 40 * i, 350 + 40 * i + tail))
        for i in range(3)
    ]
    params = SamplingParams(max_tokens=40 if not tail else 4, ignore_eos=True)
    store = f"ext-once-{tail}"
    _fill(store, [p[:65] for p in prompts])
    llm = LLM(
        "tiny",
        connector=_memory(store),
        num_blocks=12,
        enable_prefix_caching=False,
        max_num_batched_tokens=batched_tokens,
    )
    outs = llm.generate(prompts, params)
    stats = llm.stats
    llm.shutdown()
    assert stats["preemptions"] > 0, "the scenario did not preempt"
    assert [o.num_external_tokens for o in outs] == [64] * 3
    assert stats["external_tokens"] > 3 * 64, "re-admissions load again"
    assert [o.output_token_ids for o in outs] == _tokens(prompts, params)


def test_prefix_hit_tokens_counts_each_request_once() -> None:
    """10 blocks of 16 for three 105-token prompts whose first 2 blocks are in the device
    cache, prefilled 16 tokens a step: they preempt one another in their first prefill and,
    admitted again, find their own blocks too. The engine's `prefix_hit_tokens` is the sum
    of the requests' `num_cached_tokens` (what the prefill their first token waited for
    found); before, each admission added its hits, the shared prefix counted again for
    every re-admission."""
    shared = list(range(1, 33))
    prompts = [shared + list(range(40 + 120 * i, 113 + 120 * i)) for i in range(3)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    llm = LLM("tiny", num_blocks=10, max_num_batched_tokens=16)
    llm.generate([shared + [33]], params)  # the shared blocks in the device cache
    before = llm.stats["prefix_hit_tokens"]
    outs = llm.generate(prompts, params, on_step=_guard(500))
    stats = llm.stats
    llm.shutdown()
    assert stats["preemptions"] > 0, "the scenario did not preempt"
    cached = [o.num_cached_tokens for o in outs]
    assert min(cached) >= 32 and max(cached) > 32, "a re-admission must find its own blocks"
    assert stats["prefix_hit_tokens"] - before == sum(cached), (stats["prefix_hit_tokens"], cached)
    assert [o.output_token_ids for o in outs] == _tokens(prompts, params)


@pytest.mark.parametrize("async_load", [False, True])
def test_a_prompt_of_whole_blocks_loads_all_but_its_last_token(async_load: bool) -> None:
    """A 64-token prompt, all 4 blocks in the store: the engine keeps the last token to
    compute, so the connector loads 63 tokens, the last block in part, and the tokens are
    those of a run without connector (the test connector once rounded that block away)."""
    prompt = list(range(1, 65))
    _fill("whole-blocks", [prompt])
    llm = LLM("tiny", connector=_memory("whole-blocks", async_load=async_load), num_blocks=64)
    out = llm.generate([prompt], GREEDY)[0]
    llm.shutdown()
    assert out.num_external_tokens == 63
    assert out.output_token_ids == _tokens([prompt])[0]


def test_shutdown_hands_the_last_finished_ids_to_the_workers() -> None:
    """Requests that finish in the last step before `shutdown` (no save held) still reach
    the workers' get_finished, each once: the hook's contract, and a worker keeping
    per-request state frees it there."""
    llm = LLM("tiny", connector=_memory("last-finished"), num_blocks=64)
    outs = llm.generate([list(range(1, 30)), list(range(40, 70))], GREEDY)
    llm.shutdown()
    handed = [
        rid for call in llm.connector_worker.calls if call[0] == "get_finished" for rid in call[1]
    ]
    assert sorted(handed) == sorted(o.request_id for o in outs)


def test_a_request_aborted_while_loading_gives_the_connector_no_blocks() -> None:
    """An async load is in flight (rank 0 reports it 3 steps late) when its request is
    aborted: its blocks hold a partial load, so `request_finished` gets no block ids
    (nothing of it may be saved); the blocks are freed once the load is over, and the
    request after it gets the tokens of a run without connector."""
    prompts = [list(range(1, 66)), list(range(1, 65)) + [500, 501, 502]]
    _fill("abort-loading", [prompts[0]])
    llm = LLM(
        "tiny", connector=_memory("abort-loading", async_load=True), num_blocks=32,
        enable_prefix_caching=False,
    )  # fmt: skip
    llm.connector_worker.delay = 3

    def abort(llm, step):
        if step == 1:
            assert "req-0" in llm.scheduler.loading
            assert llm.abort_request("req-0")

    outs = llm.generate(prompts, GREEDY, on_step=abort)
    llm.shutdown()
    assert outs[0].finish_reason == "abort"
    finished = {c[1]: c[2] for c in llm.connector_scheduler.calls if c[0] == "finished"}
    assert finished["req-0"] == []
    assert finished["req-1"], "a request that ran hands its blocks over"
    assert outs[1].output_token_ids == _tokens([prompts[1]])[0]
    assert llm.num_used_blocks() == 0


def test_an_async_load_failure_reported_in_two_steps_counts_once() -> None:
    """The ranks of an async load report its failed blocks in steps of their own: the
    engine's load_failures counts each failed block of the load once (it counted every
    rank's report: twice at 2 ranks), and the load is cut at the first failed block."""
    from kvdist.api.types import Request, SchedulerOutput
    from kvdist.engine.scheduler import StepPlan
    from kvdist.engine.sequence import Sequence, Status

    llm = LLM("tiny", num_blocks=16)
    sched = llm.scheduler
    seq = Sequence(Request("r", list(range(64))), GREEDY, index=0)
    seq.status, seq.block_ids = Status.WAITING_FOR_LOAD, [3, 4, 5, 6]
    sched.loading["r"] = seq
    plan = StepPlan(SchedulerOutput(step=1), [], [], [])
    sched._apply_failures({5, 6}, plan)  # rank 0's report
    sched._apply_failures({5, 6}, plan)  # rank 1's, a step later
    sched._apply_failures({4}, plan)  # one more block, on one rank
    assert sched.counters["load_failures"] == 3
    assert seq.load_limit == 16  # block index 1
    # Expired (finished) while its load is still in flight: the same.
    seq.status = Status.FINISHED
    sched._apply_failures({3}, plan)
    sched._apply_failures({3}, plan)
    assert sched.counters["load_failures"] == 4
    del sched.loading["r"]
    llm.shutdown()


def test_an_on_step_that_raises_aborts_that_calls_requests() -> None:
    """Ctrl-C (or any exception) from `on_step` reaches the caller, and the call's requests
    are aborted: they used to stay queued, so that the next call ran them first, for
    nobody, its own requests waiting behind them."""
    llm = LLM("tiny", num_blocks=64, max_num_seqs=1)

    def interrupt(llm, step):
        if step == 2:
            raise KeyboardInterrupt("^C")

    long = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = [list(range(1, 40)), list(range(50, 90)), list(range(100, 140))]
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, long, on_step=interrupt)
    before = llm.stats["steps"]
    short = SamplingParams(max_tokens=2, ignore_eos=True)
    out = llm.generate([[1, 2, 3]], short)[0]
    assert out.output_token_ids == _tokens([[1, 2, 3]], short)[0]
    assert llm.stats["steps"] - before <= 3, llm.stats["steps"] - before  # not ~90
    llm.shutdown()


@pytest.mark.parametrize("call", ["generate", "shutdown"])
def test_generate_or_shutdown_from_on_step_is_refused_by_name(call: str) -> None:
    """`generate` or `shutdown` called from `on_step` raises a RuntimeError saying so; the
    outer call raises it, its requests aborted, and the engine serves the next call. A
    failure means the nested call ran: a nested generate took the outer call's finished
    requests (the outer one then failed with a bare KeyError for a request id), a
    shutdown released the engine the outer call went on stepping ("operation forbidden
    on released memoryview object" at two ranks)."""
    llm = LLM("tiny", num_blocks=64)

    def nested(engine: LLM, step: int) -> None:
        if call == "generate":
            engine.generate([[1, 2, 3]], GREEDY)
        else:
            engine.shutdown()

    prompts = [list(range(1, 40)), list(range(50, 90))]
    with pytest.raises(RuntimeError, match=f"^{call} was called from generate's on_step"):
        llm.generate(prompts, GREEDY, on_step=nested)
    outs = llm.generate(prompts, GREEDY)
    assert [o.output_token_ids for o in outs] == _tokens(prompts)
    assert llm.num_used_blocks() == 0
    llm.shutdown()


def test_a_long_load_alone_is_polled_less_and_less_often() -> None:
    """A request whose async load takes 0.4 s, nothing else to run: the engine steps only
    to poll the transfer, at most every 2 ms once nothing completes (it stepped every
    0.5 ms, 800 empty steps, each with both collectives and every hook)."""
    prompt = list(range(1, 66))
    _fill("slow-load", [prompt])
    llm = LLM("tiny", connector=_memory("slow-load", async_load=True, load_seconds=0.4))
    before = llm.stats["steps"]
    out = llm.generate([prompt], GREEDY)[0]
    steps = llm.stats["steps"] - before
    llm.shutdown()
    assert out.num_external_tokens > 0 and out.output_token_ids == _tokens([prompt])[0]
    assert 10 < steps < 0.4 / 0.002 * 1.5, steps
