"""The engine in one process: scheduling policies must not change tokens, bad requests
fail alone, and misuse gives clear errors."""

from __future__ import annotations

import gc
import hashlib
import logging
import time
import weakref

import pytest
from memory_connector import MemoryWorker, cpu_in_front_of

import kvdist
from kvdist.engine.llm import LLM
from kvdist.engine.sampling import SamplingParams
from kvdist.kv.hashing import DEFAULT_SEED, HASH_BYTES, root_hash

PROMPTS = [list(range(5 + i, 60 + 3 * i)) for i in range(6)]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def _memory(kwargs: dict) -> dict:
    """The memory connector (tests/memory_connector.py) with these settings."""
    return {
        "module": "memory_connector",
        "scheduler_class": "MemoryScheduler",
        "worker_class": "MemoryWorker",
        "kwargs": kwargs,
    }


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    llm = LLM("tiny", num_blocks=256)
    outs = llm.generate(PROMPTS, GREEDY)
    llm.shutdown()
    return [o.output_token_ids for o in outs]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_batched_tokens": 7},  # every prompt in chunks, across block boundaries
        {"max_num_seqs": 1},  # one request at a time
        {"enable_prefix_caching": False},
        {"block_size": 4},
    ],
)
def test_scheduling_does_not_change_tokens(kwargs, reference) -> None:
    """Chunked prefill, batch limits, prefix caching and block size are invisible in the
    output; a difference means a position, block or mask is wrong somewhere."""
    llm = LLM("tiny", num_blocks=kwargs.pop("num_blocks", 512), **kwargs)
    outs = llm.generate(PROMPTS, GREEDY)
    llm.shutdown()
    assert [o.output_token_ids for o in outs] == reference
    assert llm.num_used_blocks() == 0


def test_preemption_recomputes_and_matches(reference) -> None:
    """With too few blocks for every request at once, requests are preempted and
    recomputed; tokens are unchanged and no block leaks."""
    llm = LLM("tiny", num_blocks=12, block_size=16)
    outs = llm.generate(PROMPTS, GREEDY)
    stats = llm.stats
    llm.shutdown()
    assert stats["preemptions"] > 0, "the test did not exercise preemption"
    assert [o.output_token_ids for o in outs] == reference
    assert llm.num_used_blocks() == 0


def test_queue_time_is_the_wait_before_admission() -> None:
    """With one request running at a time, each later request waits for the ones before
    it: its queue time grows with its place in line, and stays within its TTFT. A failure
    means `queue_s` does not measure the wait before admission, which the multi-turn
    benchmark subtracts to time loads and prefills alone."""
    llm = LLM("tiny", num_blocks=256, max_num_seqs=1)
    outs = llm.generate(PROMPTS[:4], GREEDY)
    llm.shutdown()
    queues = [o.queue_s for o in outs]
    assert queues[0] < queues[1] < queues[2] < queues[3], queues
    assert all(0 <= o.queue_s <= o.ttft_s for o in outs)
    # The fourth waited for three whole requests (~30 steps) before its own prefill (one
    # step): longer than that prefill even when a host hiccup lands on it (a factor of 3
    # here failed once on a busy 2-core machine).
    assert outs[3].queue_s > outs[3].ttft_s - outs[3].queue_s


def test_prefix_cache_hits_on_device() -> None:
    """A repeated prompt reuses its full blocks from the device cache."""
    llm = LLM("tiny", num_blocks=64)
    first = llm.generate([PROMPTS[0]], GREEDY)[0]
    second = llm.generate([PROMPTS[0]], GREEDY)[0]
    llm.shutdown()
    assert second.num_cached_tokens == (len(PROMPTS[0]) - 1) // 16 * 16 > 0
    assert second.output_token_ids == first.output_token_ids


def test_bad_requests_fail_alone(reference) -> None:
    """Each bad request gets an error result naming its problem; the others are served
    exactly as if alone."""
    llm = LLM("tiny", num_blocks=256, max_model_len=128)
    bad = [[], [7, 99999], list(range(200))]
    prompts = [PROMPTS[0], *bad[:3], PROMPTS[1]]
    params = [GREEDY] * len(prompts)
    params.append(SamplingParams(max_tokens=0))
    prompts.append(PROMPTS[2])
    outs = llm.generate(prompts, params)
    llm.shutdown()
    assert [o.finish_reason for o in outs] == [
        "length",
        "error",
        "error",
        "error",
        "length",
        "error",
    ]
    assert "empty prompt" in outs[1].error
    assert "99999" in outs[2].error and "vocabulary" in outs[2].error
    assert "200 tokens" in outs[3].error and "128" in outs[3].error
    assert "max_tokens" in outs[5].error
    assert outs[0].output_token_ids == reference[0]
    assert outs[4].output_token_ids == reference[1]


def test_bad_sampling_params_fail_alone(reference) -> None:
    """Sampling params that would crash the sampler for the whole batch (NaN or tiny
    temperatures, a seed past int64, wrong types) fail their own request, naming the
    field, also a text prompt the tokenizer rejects; the engine stays usable."""
    llm = LLM("tiny", num_blocks=256)
    bad = {
        "temperature": SamplingParams(temperature=float("nan")),
        "temperature ": SamplingParams(temperature=1e-45),
        "temperature  ": SamplingParams(temperature="0.5"),  # type: ignore[arg-type]
        "top_p": SamplingParams(top_p="1"),  # type: ignore[arg-type]
        "seed": SamplingParams(temperature=1.0, seed=2**64),
        "stop_token_ids": SamplingParams(stop_token_ids=None),  # type: ignore[arg-type]
        "max_tokens": SamplingParams(max_tokens=True),
        "ignore_eos": SamplingParams(ignore_eos="no"),  # type: ignore[arg-type]
    }
    prompts = [PROMPTS[0]] * len(bad) + ["\ud800 unencodable", PROMPTS[0], PROMPTS[1]]
    params = [*bad.values(), GREEDY, GREEDY, GREEDY]
    outs = llm.generate(prompts, params)
    for field_name, out in zip(bad, outs):
        assert out.finish_reason == "error", (field_name, out)
        assert f"SamplingParams.{field_name.strip()}" in out.error, out.error
    assert outs[len(bad)].finish_reason == "error" and outs[len(bad)].error
    assert [o.output_token_ids for o in outs[-2:]] == reference[:2]
    again = llm.generate([PROMPTS[0]], GREEDY)[0]  # nothing was left behind
    llm.shutdown()
    assert again.output_token_ids == reference[0]


def _step_limit(n: int):
    def on_step(llm: LLM, step: int) -> None:
        assert step < n, f"generate still running after {n} steps"

    return on_step


def test_a_request_the_cache_cannot_hold_fails_alone() -> None:
    """A request whose prompt and answer need more KV blocks than the cache has fails
    with an error naming the sizes, instead of waiting for room forever (or preempting
    itself over and over); the others are served."""
    llm = LLM("tiny", num_blocks=4)
    long, short = list(range(1, 101)), [1, 2, 3]
    answer = SamplingParams(max_tokens=60, ignore_eos=True)
    outs = llm.generate([long, list(range(1, 41)), short], [GREEDY, answer, GREEDY],
                        on_step=_step_limit(200))  # fmt: skip
    llm.shutdown()
    assert [o.finish_reason for o in outs] == ["error", "error", "length"], outs
    assert "KV blocks" in outs[0].error and "the cache has 4" in outs[0].error


def test_async_loads_waiting_for_room_do_not_starve_each_other() -> None:
    """Two requests loading asynchronously, each fitting the cache alone but not both:
    the first admitted holds every block of its prompt, the second waits without any,
    and both finish (before, each held part of what it needed and waited forever)."""
    conn = _memory({"store": "starve", "async_load": True})
    prompts = [list(range(1, 66)), list(range(100, 165))]  # 65 tokens: 5 blocks each
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    first = LLM("tiny", connector=conn, num_blocks=64)
    want = [o.output_token_ids for o in first.generate(prompts, params)]
    first.shutdown()
    llm = LLM("tiny", connector=conn, num_blocks=8, enable_prefix_caching=False)
    outs = llm.generate(prompts, params, on_step=_step_limit(300))
    llm.shutdown()
    assert [o.output_token_ids for o in outs] == want
    assert all(o.num_external_tokens > 0 for o in outs), outs


def test_string_prompts_use_the_tokenizer() -> None:
    """The tiny preset has a byte-level tokenizer: text in, text out."""
    llm = LLM("tiny", num_blocks=64)
    out = llm.generate("hello world", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    llm.shutdown()
    assert out.prompt_token_ids and len(out.output_token_ids) == 4
    assert isinstance(out.text, str)


def test_sampling_is_seeded() -> None:
    """The same seed gives the same tokens; another seed other tokens."""
    llm = LLM("tiny", num_blocks=64)
    p = PROMPTS[3]
    a = llm.generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=1))[0]
    b = llm.generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=1))[0]
    c = llm.generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=2))[0]
    llm.shutdown()
    assert a.output_token_ids == b.output_token_ids != c.output_token_ids


def test_misuse_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=2 but 1 rank"):
        LLM("tiny", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="unknown connector 'nope'"):
        LLM("tiny", connector="nope", num_blocks=16)
    with pytest.raises(ValueError, match="unknown"):
        LLM("tiny", connector={"name": "cpu", "kwargs": {"capacity": 1}}, num_blocks=16)
    with pytest.raises(ValueError, match="load_failure_policy"):
        LLM("tiny", load_failure_policy="ignore")
    with pytest.raises(ValueError, match="block_size"):
        LLM("tiny", block_size=12)
    llm = LLM("tiny", num_blocks=16)
    llm.shutdown()
    llm.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 2]])


def test_public_names() -> None:
    """The contract of DESIGN.md §2 is importable from kvdist."""
    for name in (
        "ConnectorScheduler",
        "ConnectorWorker",
        "ConnectorContext",
        "Request",
        "SchedulerOutput",
        "RequestData",
        "ConnectorConfig",
        "LLM",
        "SamplingParams",
        "RequestOutput",
        "register_connector",
    ):
        assert hasattr(kvdist, name), name


def test_shutdown_waits_for_saves_within_the_deadline() -> None:
    """shutdown() drains in-flight saves; one that never finishes ends in a clear error
    after the collective deadline instead of hanging."""
    from kvdist.coordination.errors import RemoteError

    conn = _memory({"store": "stuck", "async_save": True, "never_report_saves": True})
    llm = LLM("tiny", connector=conn, num_blocks=64, timeout_s=1.0)
    llm.generate([PROMPTS[0]], GREEDY)
    assert llm.num_used_blocks() > 0, "the unfinished save must hold the blocks"
    with pytest.raises(RemoteError, match="did not finish on every rank within 1s"):
        llm.shutdown()


def test_a_loaded_request_runs_though_a_chunked_prefill_needs_its_blocks() -> None:
    """A request whose async load is done waits for a turn holding its blocks, while a
    request in chunked prefill (a budget of 3 tokens) needs one of them. The second
    preempts itself; it must wait behind the loaded one. Before, it went back first in
    line, was admitted again in the same step with the whole budget, and preempted itself
    again at the next, for ever (found in review: 145 preemptions in 300 steps)."""
    loaded, long = list(range(1, 22)), list(range(100, 138))
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    ref = LLM("tiny", num_blocks=256, block_size=8)
    want = [o.output_token_ids for o in ref.generate([loaded, long], params)]
    ref.shutdown()
    fill = LLM("tiny", connector=_memory({"store": "loaded-waits"}), num_blocks=64, block_size=8)
    fill.generate([loaded], params)
    fill.shutdown()
    llm = LLM(
        "tiny",
        connector=_memory({"store": "loaded-waits", "async_load": True}),
        num_blocks=7,
        block_size=8,
        max_num_batched_tokens=3,
    )
    llm.connector_worker.delay = 3  # the load is reported 3 steps after it starts

    def bounded(engine, step):
        assert step < 300, f"livelock: {engine.scheduler.counters['preemptions']} preemptions"

    outs = llm.generate([loaded, long], params, on_step=bounded)
    assert [o.output_token_ids for o in outs] == want
    assert llm.stats["external_tokens"] > 0  # the load did supply tokens
    llm.shutdown()


def test_a_long_recompute_beside_held_blocks_is_not_a_stall() -> None:
    """A request recomputing what a failed synchronous load gave up, 2 tokens a step for
    longer than timeout_s, while another request's save holds blocks: it makes progress
    every step and must be served. In review, the stall deadline (counting steps that
    went no further than a request had got, the rolled-back step included) failed it
    with "no room in the KV cache" in a cache mostly free."""
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    prompt = list(range(1, 481))  # 60 blocks of 8
    fill = LLM("tiny", connector=_memory({"store": "recompute"}), num_blocks=128, block_size=8)
    fill.generate([prompt], params)
    fill.shutdown()
    kwargs = {"store": "recompute", "fail_rank": 0, "fail_block_index": 0}
    conn = _memory({**kwargs, "async_save": True, "never_report_saves": True})
    llm = LLM("tiny", connector=conn, num_blocks=128, block_size=8, max_num_batched_tokens=2,
              timeout_s=0.5)  # fmt: skip
    llm.generate([list(range(300, 340))], params)
    assert llm.scheduler.held  # its save never reported: blocks held throughout
    t0 = time.monotonic()
    # 5 ms a step: the 240 steps of the recompute take longer than the deadline.
    (out,) = llm.generate([prompt], params, on_step=lambda engine, step: time.sleep(0.005))
    assert out.finish_reason == "length", out.error
    assert llm.scheduler.counters["load_failures"] == 1
    assert time.monotonic() - t0 > 0.5
    llm.shutdown(drain=False)


def test_a_chunked_prefill_that_preempts_itself_every_other_step_is_a_stall() -> None:
    """The cache is full of blocks held by a save that is never reported; a request in
    chunked prefill needs one of them: it computes a chunk, preempts itself at the next
    step, hits its own cached blocks and computes the chunk again, step after step. Half
    its steps find room, and the stall deadline must still run through them: the request
    fails with "no room in the KV cache" after timeout_s. A failure (the step limit)
    means the count restarted at every step with room and generate never returned."""
    conn = _memory({"store": "self-preempt", "async_save": True, "never_report_saves": True})
    llm = LLM("tiny", connector=conn, num_blocks=12, block_size=8, max_num_batched_tokens=3,
              timeout_s=0.3)  # fmt: skip
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    llm.generate([list(range(300, 356))], params)
    assert llm.num_used_blocks() == 8  # held for the save: 4 blocks left, it needs 7
    (out,) = llm.generate([list(range(400, 450))], params, on_step=_step_limit(3000))
    assert out.finish_reason == "error" and "no room in the KV cache" in out.error, out
    llm.shutdown(drain=False)


def test_an_async_load_that_never_finishes_fails_its_request_alone() -> None:
    """The connector's async load of A's prefix is never reported: after `load_timeout_s`
    A ends with an error naming the rank that did not report, B (no hit) is served as
    usual, and generate returns instead of stepping forever. C, sharing A's prefix, waited
    for A's load: it looks its blocks up again once A gave up (its own load stalls and
    fails the same way). A's blocks stay held (the load may still write them); shutdown
    then fails after its deadline, naming A's load."""
    from kvdist.coordination.errors import RemoteError

    store = "never-loaded"
    prompt_a, prompt_b = list(range(1, 70)), list(range(300, 340))
    filler = LLM("tiny", connector=_memory({"store": store}), num_blocks=64)
    filler.generate([prompt_a], GREEDY)
    filler.shutdown()
    conn = _memory({"store": store, "async_load": True, "never_report_loads_rank": 0})
    llm = LLM("tiny", connector=conn, num_blocks=64, load_timeout_s=0.3, timeout_s=1.0)
    plain = LLM("tiny", num_blocks=64)
    want_b = plain.generate([prompt_b], GREEDY)[0].output_token_ids
    plain.shutdown()
    start = time.monotonic()
    prompt_c = prompt_a[:64] + [400, 401]
    a, b, c = llm.generate([prompt_a, prompt_b, prompt_c], GREEDY)
    assert time.monotonic() - start < 30
    assert c.finish_reason == "error" and "async load did not finish" in c.error, c
    assert a.finish_reason == "error" and a.output_token_ids == [], a
    assert "async load did not finish within 0.3 s" in a.error, a.error
    assert "rank(s) 0 have not reported it" in a.error, a.error
    assert b.finish_reason == "length" and b.output_token_ids == want_b, b
    assert llm.num_used_blocks() >= 4, "the load in flight must hold A's blocks"
    with pytest.raises(RemoteError, match="req-0 load: rank\\(s\\) 0 have not reported it"):
        llm.shutdown()


def test_a_request_aborted_before_admission_is_finished_for_the_connector() -> None:
    """A request the connector was asked about (get_num_new_matched_tokens) but that found
    no room, then aborted while waiting, still gets its one request_finished (with no
    blocks): connectors free what they keep per request there."""
    conn = _memory({"store": "no-room"})
    llm = LLM("tiny", connector=conn, num_blocks=8)
    big, small = list(range(1, 100)), list(range(200, 260))  # 7 and 4 of the 8 blocks

    def on_step(llm: LLM, step: int) -> None:
        if step == 1:
            assert llm.abort_request("req-1")

    outs = llm.generate([big, small], SamplingParams(max_tokens=2), on_step=on_step)
    calls = llm.connector_scheduler.calls
    llm.shutdown()
    assert [o.finish_reason for o in outs][1] == "abort"
    asked = [c for c in calls if c[1] == "req-1"]
    assert asked[0][0] == "matched" and not any(c[0] == "alloc" for c in asked), asked
    assert asked[-1] == ["finished", "req-1", []], asked
    assert sum(c[0] == "finished" for c in asked) == 1


MARKER = 499
"""A token none of PROMPTS holds: the memory connector's lookup fails for a prompt with it."""


def _check_a_failed_lookup_fails_alone(fault: str, message: str, reference, caplog) -> None:
    """The memory connector's lookup fails (`fault`) for one prompt of four, whose blocks
    after the first call are device prefix hits. Twice, the second call on the same engine:
    that request ends with finish_reason "error" and an error naming the connector, the
    hook and `message`, logged once; the others give the tokens of a run without
    connector. Every request gets exactly one request_finished, the failed one with no
    blocks and no update_state_after_alloc. The failed one leaves nothing behind: no
    blocks, no queue entry, no prefix hits counted."""
    bad = PROMPTS[1] + [MARKER]  # PROMPTS[1]'s 3 full blocks: device hits once computed
    prompts = [PROMPTS[0], bad, PROMPTS[1], PROMPTS[2]]
    conn = _memory({"store": f"lookup-{fault}", "lookup_fault": fault, "lookup_marker": MARKER})
    llm = LLM("tiny", connector=conn, num_blocks=256)
    with caplog.at_level(logging.WARNING, logger="kvdist"):
        first = llm.generate(prompts, GREEDY)
        second = llm.generate(prompts, GREEDY)  # the engine serves on, with prefix hits
    calls = llm.connector_scheduler.calls
    stats = llm.stats
    sched = llm.scheduler
    left = (sched.waiting, sched.running, sched.loading, sched.held, sched._loading_hashes)
    used = llm.num_used_blocks()
    llm.shutdown()
    want = [reference[0], [], reference[1], reference[2]]
    for outs in (first, second):
        assert [o.finish_reason for o in outs] == ["length", "error", "length", "length"], outs
        assert [o.output_token_ids for o in outs] == want
        failed = outs[1]
        assert failed.error is not None and failed.error.startswith(
            "MemoryScheduler.get_num_new_matched_tokens "
        ), failed.error
        assert message in failed.error, failed.error
        assert (failed.num_cached_tokens, failed.num_external_tokens) == (0, 0), failed
        logged = [r for r in caplog.records if failed.request_id in r.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.WARNING, logged
        assert message in logged[0].getMessage()
    # Proves the prefix-hit check below can fail: the failed request would have hit too.
    assert second[2].num_cached_tokens == 48, second[2]
    assert stats["prefix_hit_tokens"] == sum(o.num_cached_tokens for o in first + second)
    assert stats["lookup_failures"] == 2, stats
    for out in first + second:
        rid = out.request_id
        finished = [c for c in calls if c[0] == "finished" and c[1] == rid]
        assert len(finished) == 1, (rid, finished)
        if out.finish_reason == "error":
            assert finished[0][2] == [], finished
            assert not any(c[0] == "alloc" and c[1] == rid for c in calls), rid
    assert used == 0 and not any(left), (used, left)


def test_a_lookup_that_raises_fails_its_request_alone(reference, caplog) -> None:
    """get_num_new_matched_tokens raising for one request fails that request alone. A
    failure means one connector error about one request took down the step, the whole
    generate call and the engine (as it did), or left something of that request behind."""
    _check_a_failed_lookup_fails_alone(
        "raise", "raised LookupError: memory connector: injected lookup failure", reference, caplog
    )


@pytest.mark.parametrize(
    "fault, message",
    [
        ("negative", "returned -1 tokens (< 0)"),
        ("str", "must return (int, bool), got 'x'"),
        ("zero_async", "answered (0, True) for request 'req-"),
    ],
)
def test_a_malformed_lookup_answer_fails_its_request_alone(
    fault, message, reference, caplog
) -> None:
    """The same for an answer that is not a valid (tokens, async): that request fails with
    an error naming what is wrong, and the others are served."""
    _check_a_failed_lookup_fails_alone(fault, message, reference, caplog)


@pytest.mark.parametrize("hook", ["update_state_after_alloc", "request_finished"])
def test_a_hook_raising_after_the_lookup_still_fails_the_step(hook) -> None:
    """Only the lookup fails its request alone. update_state_after_alloc raising (the
    connector may have recorded a load or save into blocks that would be freed and
    reused), or the request_finished of a request whose lookup failed raising, fails the
    step, and generate raises naming the hook."""
    from kvdist.coordination.errors import RemoteError

    fault = "raise" if hook == "request_finished" else None
    conn = _memory({"store": f"after-lookup-{hook}", "lookup_fault": fault, "lookup_marker": 1})
    llm = LLM("tiny", connector=conn, num_blocks=64)

    def refuse(*args):
        raise RuntimeError(f"injected failure in {hook}")

    setattr(llm.connector_scheduler, hook, refuse)
    with pytest.raises(RemoteError, match=f"MemoryScheduler.{hook} raised RuntimeError"):
        llm.generate([[1, 2, 3]], GREEDY)
    llm.shutdown()


def test_shutdown_releases_the_model_and_cache() -> None:
    """After shutdown the engine no longer keeps the model (and through it the
    tensor-parallel group) or the KV cache alive. A failure means the group can live into
    interpreter shutdown, where gloo may abort the process, and the memory is not freed."""
    llm = LLM("tiny", num_blocks=64)
    llm.generate([PROMPTS[0]], GREEDY)
    model, cache = weakref.ref(llm.model), weakref.ref(llm.kv_cache)
    llm.shutdown()
    assert model() is None and cache() is None
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([PROMPTS[0]], GREEDY)


def test_cache_salt_separates_prefix_caches() -> None:
    """Requests share cached blocks only with requests of the same salt; the empty salt
    is one, not the absence of one."""
    llm = LLM("tiny", num_blocks=64)
    p = PROMPTS[0]
    llm.generate([p], GREEDY, cache_salt="tenant-a")
    other, same = llm.generate([p, p], GREEDY, cache_salt=["tenant-b", "tenant-a"])
    llm.shutdown()
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens > 0
    assert other.output_token_ids == same.output_token_ids
    # The empty salt is a salt of its own, not the absence of one.
    llm = LLM("tiny", num_blocks=64)
    llm.generate([p], GREEDY, cache_salt="")
    unsalted = llm.generate([p], GREEDY)[0]
    llm.shutdown()
    assert unsalted.num_cached_tokens == 0


def test_unsalted_block_hashes_are_stable() -> None:
    """The root of unsalted requests is what it was when disk caches were first written
    (blake2b of seed, namespace and the salt separator): changing it would turn every
    existing cache into misses. Salted roots differ from it and from each other, the
    empty salt included."""
    ns = "model|float32|bs16|layout1"
    h = hashlib.blake2b(DEFAULT_SEED, digest_size=HASH_BYTES)
    h.update(ns.encode() + b"\x00salt\x00")
    assert root_hash(ns) == h.digest()
    roots = {root_hash(ns, s) for s in (None, "", "a", "\x01a")}
    assert len(roots) == 4


class _SlowHooksWorker(MemoryWorker):
    """Sleeps 2 ms in every step hook and per-layer hook."""

    def start_load_kv(self, stream) -> None:
        time.sleep(0.002)
        super().start_load_kv(stream)

    def wait_for_layer_load(self, layer_idx, stream) -> None:
        time.sleep(0.002)
        super().wait_for_layer_load(layer_idx, stream)

    def save_kv_layer(self, layer_idx, stream) -> None:
        time.sleep(0.002)
        super().save_kv_layer(layer_idx, stream)

    def wait_for_save(self, stream) -> None:
        time.sleep(0.002)
        super().wait_for_save(stream)


def test_stats_split_connector_hooks_from_the_model() -> None:
    """`hook_seconds` holds the connector worker's hooks, and `model_seconds` excludes them."""
    conn = _memory({"store": "slow-hooks"})
    llm = LLM("tiny", connector=conn, num_blocks=64)
    llm.connector_worker.__class__ = _SlowHooksWorker
    llm.hooks.worker = llm.connector_worker
    llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True))
    st = llm.stats
    llm.shutdown()
    layers = llm.model_config.num_layers
    # Steps that ran the forward: 2 step hooks and 2 per layer, 2 ms each.
    forwards = 3
    assert st["hook_seconds"] >= forwards * (2 + 2 * layers) * 0.002
    assert st["model_seconds"] < st["step_seconds"] - st["hook_seconds"] + 1e-9


def test_stats_count_the_wait_for_the_device_as_model_time() -> None:
    """On a GPU rank 0 waits for the logits before sampling: that wait is the forward's,
    not engine overhead (and a step with no forward records none)."""
    from kvdist.engine.runner import ForwardResult
    from kvdist.engine.stats import EngineStats

    st = EngineStats()
    st.record_step(
        0.010, ForwardResult(None, forward_seconds=0.004, hook_seconds=0.001), 0.0, 0.003
    )
    st.record_step(0.002, None)
    d = st.as_dict()
    assert d["model_seconds"] == pytest.approx(0.003 + 0.003)
    assert d["overhead_seconds"] == pytest.approx(0.012 - 0.006)
    assert d["hook_seconds"] == pytest.approx(0.001)


@pytest.mark.parametrize("connector", ["tiered", "memory"])
def test_a_failed_sync_load_leaves_nothing_of_its_step_saved(connector) -> None:
    """A synchronous load of 4 blocks fails on block 0, so the engine rolls the step back
    and computes the prompt again. Nothing that step put in the blocks (the garbage load,
    block 4 computed on top of it) may be saved: neither by the loading connector itself
    nor by the cpu tier of a `tiered` connector, which writes through what the other tier
    loads. A second prompt sharing the first's 5 blocks, served from the cache, must give
    the tokens of a run without connector. A failure means a cache hit served KV from a
    rolled-back step."""
    store = f"rollback-{connector}"
    base = list(range(1, 65))  # 4 blocks of 16
    full = base + list(range(200, 220))  # 5 full blocks, and 4 tokens
    other = full[:80] + list(range(300, 325))  # the same 5 blocks, then its own tokens
    plain = LLM("tiny", num_blocks=64, enable_prefix_caching=False)
    want = [o.output_token_ids for o in plain.generate([full, other], GREEDY)]
    plain.shutdown()
    filler = LLM("tiny", connector=_memory({"store": store}), enable_prefix_caching=False)
    filler.generate([base + [250, 251, 252]], GREEDY)  # the memory store holds blocks 0-3
    filler.shutdown()
    failing = _memory({"store": store, "fail_rank": 0, "fail_block_index": 0})
    tiered = cpu_in_front_of(failing)
    llm = LLM(
        "tiny",
        connector=tiered if connector == "tiered" else failing,
        num_blocks=64,
        enable_prefix_caching=False,
    )
    first = llm.generate([full], GREEDY)[0]
    assert first.finish_reason == "length" and first.output_token_ids == want[0], first
    assert llm.stats["load_failures"] >= 1, llm.stats
    if connector == "memory":  # the same store, its loads no longer failing
        llm.shutdown()
        llm = LLM("tiny", connector=_memory({"store": store}), enable_prefix_caching=False)
    second = llm.generate([other], GREEDY)[0]
    llm.shutdown()
    assert second.num_external_tokens == 80, second  # all 5 blocks from the cache
    assert second.output_token_ids == want[1]


def test_every_tier_is_asked_before_it_is_told() -> None:
    """`tiered` [cpu, memory]: the second time a prompt comes, the cpu tier has every block.
    The memory tier, which keeps state from its lookup (as a connector may), must still be
    asked before `update_state_after_alloc`, and the tokens must not change. A failure
    means a tier's hooks came out of the order the connector API promises (before, the
    memory tier raised KeyError and the engine failed the step)."""
    prompt = list(range(1, 1 + 16 * 4 + 3))
    tiers = [{"name": "cpu", "kwargs": {"capacity_bytes": 64 << 20}}, _memory({"store": "ask"})]
    llm = LLM(
        "tiny",
        connector={"name": "tiered", "kwargs": {"tiers": tiers}},
        num_blocks=64,
        enable_prefix_caching=False,
    )
    first, again = (llm.generate([prompt], GREEDY)[0] for _ in range(2))
    memory = llm.connector_scheduler.tiers[1]
    llm.shutdown()
    assert again.num_external_tokens == 64 and again.output_token_ids == first.output_token_ids
    assert [c[0] for c in memory.calls if c[0] in ("matched", "alloc")] == ["matched", "alloc"] * 2


@pytest.mark.parametrize("name", ["cpu", "disk", "tiered"])
def test_shutdown_lets_the_kv_cache_and_host_pools_go(name, tmp_path) -> None:
    """After `shutdown` no connector keeps the KV cache (through its transfers) or its host
    pool: the engine's promise that their memory is freed. A failure means an engine that
    was shut down still pins gigabytes of host memory and holds the device cache."""
    cpu = {"name": "cpu", "kwargs": {"capacity_bytes": 16 << 20}}
    disk = {"name": "disk", "kwargs": {"path": str(tmp_path)}}
    conn = {
        "cpu": cpu,
        "disk": disk,
        "tiered": {"name": "tiered", "kwargs": {"tiers": [cpu, disk]}},
    }
    llm = LLM("tiny", connector=conn[name], num_blocks=64)
    llm.generate([list(range(1, 40))], GREEDY)
    cache = weakref.ref(llm.kv_cache)
    tiers = getattr(llm.connector_worker, "tiers", [llm.connector_worker])
    pools = [weakref.ref(t.pool) for t in tiers if getattr(t, "pool", None) is not None]
    llm.shutdown()
    gc.collect()
    assert cache() is None
    assert all(p() is None for p in pools)
    if name != "cpu":  # the staging figures outlive the pools
        assert llm.stats["connector_staging_allocations"] > 0


def test_after_a_failed_step_the_engine_refuses_work_and_shuts_down_cleanly() -> None:
    """A connector hook raising fails the step and `generate`. The engine's parts are out
    of step with one another after that: a later `generate` must say so instead of
    running, and `shutdown` must not step the failed engine again (before, it drained
    through the same connector and raised the same error a second time)."""
    conn = _memory({"store": "failed-step", "raise_in": "wait_for_save", "raise_rank": 0})
    llm = LLM("tiny", connector=conn, num_blocks=64)
    with pytest.raises(Exception, match="injected failure in wait_for_save") as first:
        llm.generate(PROMPTS[:2], GREEDY)
    with pytest.raises(RuntimeError, match="unusable after a failed step") as later:
        llm.generate(PROMPTS[:1], GREEDY)
    assert "injected failure in wait_for_save" in str(later.value), (first.value, later.value)
    t0 = time.monotonic()
    llm.shutdown()  # raises nothing
    assert time.monotonic() - t0 < 10
    fresh = LLM("tiny", num_blocks=64)  # the process is fine: a new engine serves
    assert fresh.generate(PROMPTS[:1], GREEDY)[0].finish_reason == "length"
    fresh.shutdown()


@pytest.mark.parametrize("connector", ["cpu", "tiered"])
def test_a_request_finishing_in_its_sync_load_step_still_saves_that_step(connector, tmp_path):
    """A prompt of 5 blocks whose first 4 the cpu connector holds: they load synchronously
    and block 4 is computed in the same step, which is also the request's last (one output
    token). Block 4 may only be saved once the load is known good, after that step: the
    connector holds the finished request's blocks and saves it in the next step. A third
    run must find all 5 blocks. A failure means blocks of such a step are never saved (a
    prefill-only request warming the cache would warm nothing past its hit)."""
    cpu = {"name": "cpu", "kwargs": {"capacity_bytes": 64 << 20}}
    disk = {"name": "disk", "kwargs": {"path": str(tmp_path)}}
    conn = cpu if connector == "cpu" else {"name": "tiered", "kwargs": {"tiers": [cpu, disk]}}
    llm = LLM("tiny", connector=conn, num_blocks=64, enable_prefix_caching=False)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    base = list(range(1, 65))  # 4 blocks
    full = base + list(range(200, 220))  # 5 full blocks, and 4 tokens
    llm.generate([base + [250]], one)
    second = llm.generate([full], one)[0]
    third = llm.generate([full], one)[0]
    llm.shutdown()
    assert second.num_external_tokens == 64, second
    assert third.num_external_tokens == 80, third
    assert third.output_token_ids == second.output_token_ids


def test_a_request_failed_by_its_load_saves_nothing() -> None:
    """load_failure_policy="fail": a synchronous load failing on block 0 fails the request.
    Its blocks hold garbage (the load) and KV computed on top of it, so `request_finished`
    gets no block ids and the cpu tier of `tiered` saves none of its 5 blocks. A failure
    means a failed request's KV reached the cache."""
    store = "failed-by-load"
    base = list(range(1, 65))
    full = base + list(range(200, 220))
    filler = LLM("tiny", connector=_memory({"store": store}), enable_prefix_caching=False)
    filler.generate([base + [250]], GREEDY)
    filler.shutdown()
    failing = _memory({"store": store, "fail_rank": 0, "fail_block_index": 0})
    llm = LLM(
        "tiny",
        connector=cpu_in_front_of(failing),
        num_blocks=64,
        enable_prefix_caching=False,
        load_failure_policy="fail",
    )
    out = llm.generate([full], SamplingParams(max_tokens=1, ignore_eos=True))[0]
    llm.generate([list(range(300, 310))], GREEDY)  # more steps: nothing left to save
    slots = llm.connector_scheduler.tiers[0].slots
    hashes = kvdist.kv.hashing.block_hashes(full, 16, llm.namespace)
    stats = llm.stats
    llm.shutdown()
    assert out.finish_reason == "error", out
    assert "connector load failed at block index 0 of the request" in out.error, out
    # The failed load supplied nothing: neither the request nor the engine counts it.
    assert out.num_external_tokens == 0 and stats["external_tokens"] == 0, (out, stats)
    assert [slots.get(h) for h in hashes] == [None] * 5


def test_a_call_that_raises_queues_nothing_and_bad_inputs_fail_alone() -> None:
    """Whole-call mistakes (a cache salt of the wrong type, sampling params as a dict)
    raise before anything is queued, on every rank alike: the next call runs only its own
    requests. A bad prompt or bad params fail their request alone, naming the problem;
    token ids as a tuple, a numpy array or a tensor are one prompt."""
    import numpy as np
    import torch

    llm = LLM("tiny", num_blocks=64)
    with pytest.raises(TypeError, match="a cache_salt must be a str or None, got 5"):
        llm.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(max_tokens=50), cache_salt=["s", 5])
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        llm.generate([[1, 2, 3]], {"max_tokens": 3})
    steps = llm.stats["steps"]
    (out,) = llm.generate([[7, 8]], SamplingParams(max_tokens=2))
    assert len(out.output_token_ids) == 2 and llm.stats["steps"] - steps <= 3
    want = llm.generate([[1, 2, 3]], GREEDY)[0].output_token_ids
    for prompt in ((1, 2, 3), np.array([1, 2, 3]), torch.tensor([1, 2, 3]), [np.int64(1), 2, 3]):
        outs = llm.generate(prompt, GREEDY)
        assert [o.output_token_ids for o in outs] == [want], prompt
    bad = llm.generate(
        [[True, 2], [1, 2, 3], [4, 5]],
        [GREEDY, SamplingParams(max_tokens=2, stop_token_ids=[-5]), GREEDY],
    )
    assert "prompt token 0 is True" in bad[0].error
    assert "stop_token_ids" in bad[1].error
    assert bad[2].finish_reason == "length"
    from fractions import Fraction

    for t in (np.float32(0.5), Fraction(1, 2)):  # validated, then sampled as a float
        (warm,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=t))
        assert warm.finish_reason == "length", warm.error
    # numpy integers are numbers like Python's in the params too, with the same result.
    seeded = {"temperature": 0.7, "ignore_eos": True}
    plain = SamplingParams(max_tokens=3, seed=4, stop_token_ids=[9], **seeded)
    numpy = SamplingParams(
        max_tokens=np.int64(3), seed=np.int64(4), stop_token_ids=[np.int64(9)], **seeded
    )
    a, b = (llm.generate([[5, 6, 7]], p)[0] for p in (plain, numpy))
    assert b.error is None and b.output_token_ids == a.output_token_ids, (a, b)
    # A flat list with a bad id is one prompt, and the error names the id.
    (flat,) = llm.generate([1, 2.5], GREEDY)
    assert flat.error == "prompt token 1 is 2.5 (float), not an int", flat
    llm.shutdown()


@pytest.mark.parametrize("dtype", ["torch.int32", "torch.float8_e4m3fn", "torch.float64"])
def test_a_dtype_the_model_cannot_run_in_is_refused(dtype) -> None:
    """A torch dtype the model does not run in is refused at construction, as its name is
    (it was taken, and the first step failed, leaving the engine unusable)."""
    import torch

    with pytest.raises(ValueError, match=f"dtype {dtype} is not supported"):
        LLM("tiny", dtype=getattr(torch, dtype.removeprefix("torch.")))


def test_sizes_the_memory_or_the_context_cannot_hold_are_refused() -> None:
    """A KV cache larger than the host's memory is a `ValueError` naming `num_blocks` (it
    was an allocator's traceback); so is a block larger than the model's context (two
    such blocks took gigabytes past the memory budget)."""
    too_many = r"num_blocks=1000000000 needs \d+ bytes of KV cache per rank, more than rank 0"
    with pytest.raises(ValueError, match=too_many):
        LLM("tiny", num_blocks=10**9)
    with pytest.raises(ValueError, match="block_size=1048576 is more than the model's context"):
        LLM("tiny", block_size=1 << 20)


def test_a_max_model_len_past_the_context_is_lowered_with_a_warning(caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="kvdist"):
        llm = LLM("tiny", max_model_len=10**6)
    assert llm.max_model_len == llm.model_config.max_position_embeddings
    assert "max_model_len=1000000 is past the model's context" in caplog.text
    llm.shutdown()


def test_engine_settings_are_checked_and_a_large_seed_samples() -> None:
    with pytest.raises(ValueError, match="seed must be an int"):
        LLM("tiny", seed="x")
    with pytest.raises(ValueError, match="max_model_len must be > 1"):
        LLM("tiny", max_model_len=0)
    with pytest.raises(ValueError, match="num_blocks must be an int"):
        LLM("tiny", num_blocks=3.5)
    with pytest.raises(ValueError, match="seed must be an int, got None"):
        LLM("tiny", seed=None)
    with pytest.raises(ValueError, match="timeout_s must be a number of seconds"):
        LLM("tiny", timeout_s="5")
    # A string would be true: "false" kept prefix caching on.
    with pytest.raises(
        ValueError, match="enable_prefix_caching must be True or False, got 'false'"
    ):
        LLM("tiny", enable_prefix_caching="false")
    with pytest.raises(ValueError, match="cuda_graphs must be True or False, got 'no'"):
        LLM("tiny", cuda_graphs="no")
    with pytest.raises(ValueError, match="kv_cache_memory_bytes must be > 0"):
        LLM("tiny", kv_cache_memory_bytes=0)
    # Less than two blocks' worth: refused, where the cache was silently given two.
    with pytest.raises(ValueError, match=r"kv_cache_memory_bytes gives rank 0 10 bytes, 0 KV"):
        LLM("tiny", kv_cache_memory_bytes=10)
    # Above the maximum, torch's store and gloo would overflow: refused as the engine is built.
    with pytest.raises(
        ValueError, match=r"load_timeout_s must be a number of seconds in \[0.001, "
    ):
        LLM("tiny", load_timeout_s=1e9)
    # Below a millisecond, torch's deadlines (the engine's TP group's) would round to 0.
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds in \[0.001, "):
        LLM("tiny", timeout_s=1e-9)
    llm = LLM("tiny", num_blocks=64, seed=2**62)  # request seeds derived from it fit
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.8))
    assert out.finish_reason == "length", out.error
    llm.shutdown()


def test_a_request_that_fits_the_cache_exactly_is_served() -> None:
    """16 prompt tokens and 17 new ones at block size 16 take 32 KV slots (the last token
    sampled is never computed): 2 blocks, which a 2-block cache holds."""
    llm = LLM("tiny", num_blocks=2, block_size=16)
    (out,) = llm.generate([list(range(1, 17))], SamplingParams(max_tokens=17, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.output_token_ids) == 17, out.error
    (out,) = llm.generate([list(range(1, 17))], SamplingParams(max_tokens=18, ignore_eos=True))
    assert out.finish_reason == "error" and "need 3 KV blocks" in out.error
    llm.shutdown()


def test_stop_ids_of_generation_config_stop_generation(tmp_path) -> None:
    """An instruct checkpoint lists an extra stop id only in generation_config.json (Llama
    3's <|eot_id|>): generation stops there, as it does at config.json's eos."""
    import json

    from kvdist.engine.model import write_checkpoint

    ckpt = write_checkpoint("tiny", tmp_path / "tiny")
    llm = LLM(str(ckpt), num_blocks=64)
    free = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))[0].output_token_ids
    llm.shutdown()
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], free[2]]
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(ckpt), num_blocks=64)
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))
    assert out.output_token_ids == free[:3] and out.finish_reason == "stop", out
    llm.shutdown()


def test_a_corrupt_disk_record_is_saved_again_by_the_engine_that_found_it(tmp_path) -> None:
    """An engine whose disk load finds a corrupt record (removed by the worker) recomputes
    the block and saves it again in the same generate call, and only it (the blocks after
    it were not loaded, but their records are fine), so the next engine loads every
    block. A failure means the scheduler's index kept the block as stored (the loaded
    blocks are not offered for saving) and the cache stayed broken for the next engine,
    or that intact blocks were written again."""
    import glob

    disk = {"name": "disk", "kwargs": {"path": str(tmp_path / "kv")}}
    prompts = [list(range(3, 72))]  # four full blocks and a partial one

    def engine() -> LLM:
        return LLM("tiny", connector=disk, enable_prefix_caching=False)

    first = engine()
    want = first.generate(prompts, GREEDY)[0].output_token_ids
    keys = kvdist.block_hashes(prompts[0], 16, first.namespace)
    first.shutdown()
    (record,) = glob.glob(str(tmp_path / "kv" / "*" / "*" / keys[1].hex() / "*.kvb"))
    with open(record, "r+b") as f:  # one byte of block 1's payload
        f.seek(-5, 2)
        byte = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([byte[0] ^ 1]))
    second = engine()
    out = second.generate(prompts, GREEDY)[0]
    stats = second.stats
    second.shutdown()
    assert out.output_token_ids == want
    assert stats["load_failures"] >= 1 and stats["connector_blocks_saved"] == 1, stats
    third = engine()
    again = third.generate(prompts, GREEDY)[0]
    third.shutdown()
    assert again.output_token_ids == want
    assert again.num_external_tokens == 64, again


@pytest.mark.parametrize("name", ["disk", "tiered"])
def test_a_forward_that_fails_halfway_leaves_nothing_in_the_cache(tmp_path, name) -> None:
    """The forward of a prefill step raises after its first layer (a device fault, say):
    the step's blocks hold half-written KV, and `generate` raises `ForwardError`. The
    engine is shut down and a new one opens the same disk cache: it must find none of
    the prompt's blocks (the step's saves were dropped, not made at shutdown from those
    blocks), and answer as an engine with no connector does."""
    disk = {"name": "disk", "kwargs": {"path": str(tmp_path / "kv")}}
    cpu = {"name": "cpu", "kwargs": {"capacity_bytes": 1 << 22}}
    conn = disk if name == "disk" else {"name": "tiered", "kwargs": {"tiers": [cpu, disk]}}
    prompts = [list(range(3, 72))]  # four full blocks and a partial one
    reference = LLM("tiny")
    want = reference.generate(prompts, GREEDY)[0].output_token_ids
    reference.shutdown()

    first = LLM("tiny", connector=conn)
    layer = first.model.model.layers[1]

    def fault(*args, **kwargs):
        raise RuntimeError("simulated device fault")

    layer.forward = fault
    with pytest.raises(kvdist.ForwardError, match="simulated device fault"):
        first.generate(prompts, GREEDY)
    worker = first.connector_worker
    first.shutdown()
    dropped = sum(v for k, v in worker.stats.items() if k.endswith("saves_dropped"))
    assert dropped == 4 * (1 + (name == "tiered")), worker.stats  # the 4 full blocks
    second = LLM("tiny", connector=conn)
    out = second.generate(prompts, GREEDY)[0]
    second.shutdown()
    assert out.num_external_tokens == 0, out
    assert out.output_token_ids == want


def test_sampling_numbers_too_large_for_a_float_fail_naming_the_field() -> None:
    """A temperature or top_p too large for a float (a huge int or Fraction) fails its
    request with the error naming the field, as any other bad value does; a failure here
    means the check's float conversion raised OverflowError ("int too large to convert
    to float"), which names no field."""
    from fractions import Fraction

    llm = LLM("tiny", num_blocks=64)
    bad = {
        "temperature": SamplingParams(temperature=10**400),
        "temperature ": SamplingParams(temperature=Fraction(10**400, 3)),
        "top_p": SamplingParams(top_p=10**400),
    }
    outs = llm.generate([[1, 2, 3]] * (len(bad) + 1), [*bad.values(), GREEDY])
    llm.shutdown()
    for name, out in zip(bad, outs):
        assert out.finish_reason == "error", (name, out)
        assert f"SamplingParams.{name.strip()}" in out.error, out.error
    assert outs[-1].finish_reason == "length"


def test_a_list_of_scalar_tensors_is_one_prompt() -> None:
    """`list(tensor)` (0-d tensors) or a list of 0-d numpy arrays is one flat prompt of
    token ids, like a list of numpy integers; a failure means each id was taken for a
    prompt of its own, every one failing with "a prompt must be a str or a list of ints"."""
    import numpy as np
    import torch

    llm = LLM("tiny", num_blocks=64)
    want = llm.generate([[1, 2, 3]], GREEDY)[0].output_token_ids
    for prompt in (list(torch.tensor([1, 2, 3])), [np.array(1), np.array(2), np.array(3)]):
        outs = llm.generate(prompt, GREEDY)
        assert [(o.error, o.output_token_ids) for o in outs] == [(None, want)], prompt
    llm.shutdown()


def test_a_list_with_neither_ids_nor_prompts_is_refused_naming_its_first_item() -> None:
    """`[None, None]` holds no token id and no prompt: whether it is one prompt of bad ids
    or two bad prompts cannot be told, so the call raises, naming prompts[0] and its type,
    before anything is queued. A failure means it was taken for one prompt (an error
    output "prompt token 0 is None") or the next call ran requests of this one. Beside it,
    lists that say what they are keep their answers: `[1, None]` is one prompt, `[[1],
    None]` two (the bad one fails alone), `[[]]` one empty prompt, `[]` no prompts, and a
    bare None is no list."""
    llm = LLM("tiny", num_blocks=64)
    refused = r"prompts\[0\] is {} \({}\), and no item is a token id or a prompt"
    for prompts, shown in (
        ([None, None], ("None", "NoneType")),
        ((None,), ("None", "NoneType")),
        ([object(), None], ("<object object at .*>", "object")),
    ):
        with pytest.raises(TypeError, match=refused.format(*shown)):
            llm.generate(prompts, GREEDY)
    with pytest.raises(TypeError, match="a list of them, got NoneType"):
        llm.generate(None, GREEDY)
    outs = {
        "one": llm.generate([1, None], GREEDY),
        "two": llm.generate([[1], None], GREEDY),
        "empty": llm.generate([[]], GREEDY),
        "none": llm.generate([], GREEDY),
    }
    llm.shutdown()
    errors = {k: [o.error for o in v] for k, v in outs.items()}
    assert errors == {
        "one": ["prompt token 1 is None (NoneType), not an int"],
        "two": [None, "a prompt must be a str or a list of ints, got NoneType"],
        "empty": ["empty prompt"],
        "none": [],
    }, errors
    # The refused calls numbered no requests: the first one served is the engine's first.
    assert outs["one"][0].request_id == "req-0", outs["one"]


def test_a_top_p_below_float32s_range_samples_the_top_token() -> None:
    """A top_p in (0, 1] too small for float32 (1e-300 compares as 0 there) keeps the most
    likely token, as any tiny top_p does: the request samples greedily and the others in
    its batch are served. A failure means no token was kept, and multinomial's "invalid
    multinomial distribution" failed the step, and the engine, for every request."""
    llm = LLM("tiny", num_blocks=64)
    want = llm.generate([[1, 2, 3], [4, 5, 6]], GREEDY)
    tiny = SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.0, top_p=1e-300)
    outs = llm.generate([[1, 2, 3], [4, 5, 6]], [tiny, GREEDY])
    llm.shutdown()
    assert [(o.error, o.output_token_ids) for o in outs] == [
        (None, o.output_token_ids) for o in want
    ], (outs, want)


def test_a_bool_tensor_among_token_ids_fails_its_prompt() -> None:
    """A 0-d bool tensor in a prompt (`list(torch.tensor([True, False]))`) fails the
    prompt as a Python or numpy bool does, and as the whole bool tensor does, naming the
    token; the other prompts are served. A failure means torch's `__index__` made it
    token 1 or 0 and the prompt was served as if the caller had given those ids."""
    import torch

    llm = LLM("tiny", num_blocks=64)
    outs = llm.generate(
        [list(torch.tensor([True, False])), [torch.tensor(True), 3], torch.tensor([True]), [1, 2]],
        GREEDY,
    )
    llm.shutdown()
    assert [o.error for o in outs] == ["prompt token 0 is True (bool), not an int"] * 3 + [None]
    assert outs[3].finish_reason == "length"
