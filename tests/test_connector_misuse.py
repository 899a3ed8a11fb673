"""The engine against a connector that breaks its contract (tests/misbehaving_connector.py):
what it returns is checked and named, a stall on transfers it never reports ends with an
error instead of a hang, and its failures do not stop the engine's own cleanup."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import misbehaving_connector
import pytest
from mp.jobs import job_env, run_job

from kvdist.coordination.errors import ConnectorError, RemoteError
from kvdist.engine.llm import LLM
from kvdist.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)
PROMPTS = [list(range(3 + i, 60 + i)) for i in range(2)]


def _connector(mode: str) -> dict:
    return {
        "module": "misbehaving_connector",
        "scheduler_class": "MisbehavingScheduler",
        "worker_class": "MisbehavingWorker",
        "kwargs": {"mode": mode},
    }


def _llm(mode: str, **kw) -> LLM:
    return LLM("tiny", connector=_connector(mode), **kw)


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    llm = LLM("tiny")
    outs = llm.generate(PROMPTS, GREEDY)
    llm.shutdown()
    return [o.output_token_ids for o in outs]


def test_saves_never_reported_fill_the_cache_then_waiting_requests_fail(reference) -> None:
    """request_finished holds every request's blocks and no worker reports the save: once
    the held blocks fill the cache, a request that finds no room fails after
    the deadline (timeout_s) without a transfer reported, with an error naming the held
    requests and the ranks that did not report them (before, generate looped forever).
    What ran before is served."""
    llm = _llm("never_report_saves", num_blocks=8, timeout_s=1.0)
    outs = llm.generate(PROMPTS[:1], GREEDY)  # 4 blocks, held after
    assert [o.output_token_ids for o in outs] == reference[:1]
    outs = llm.generate(PROMPTS[1:], GREEDY)  # the 4 blocks left, held after
    assert [o.output_token_ids for o in outs] == reference[1:]
    t0 = time.monotonic()
    (out,) = llm.generate([list(range(200, 257))], GREEDY)  # no room, for good
    waited = time.monotonic() - t0
    assert out.finish_reason == "error", out
    assert "no room in the KV cache for 1 s (timeout_s): 8 blocks are held" in out.error
    assert "req-0 save: rank(s) 0 have not reported it" in out.error, out.error
    assert 1.0 <= waited < 30, waited
    assert llm.num_used_blocks() == 8  # held: the connector may still be reading them
    with pytest.raises(RemoteError, match=r"within 1s \(timeout_s\): req-0 save"):
        llm.shutdown()  # the saves never finish: named, after the deadline given here


def test_a_chunked_prefill_stuck_behind_held_blocks_fails_after_the_deadline() -> None:
    """The same with a token budget of 5: the new request needs a held block in the middle
    of its prefill, preempts itself, is admitted again and computes the same chunk, step
    after step. Each step schedules something, but none makes progress: it must still
    fail after timeout_s. Before, the stall count restarted at every step that scheduled
    anything, and generate looped forever (found in review)."""
    llm = _llm("never_report_saves", num_blocks=6, block_size=8, max_num_batched_tokens=5,
               timeout_s=1.0)  # fmt: skip
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    assert llm.generate([list(range(1, 17))], params)[0].finish_reason == "length"  # held
    t0 = time.monotonic()

    def bounded(engine, step):
        assert time.monotonic() - t0 < 60, "the stalled request never failed"

    (out,) = llm.generate([list(range(100, 130))], params, on_step=bounded)
    assert out.finish_reason == "error", out
    assert "no room in the KV cache for 1 s (timeout_s)" in out.error, out.error
    assert llm.scheduler.counters["preemptions"] > 0  # it did preempt itself meanwhile
    llm.shutdown(drain=False)


def _slow(every_s: float) -> dict:
    return {**_connector("slow_saves"), "kwargs": {"mode": "slow_saves", "every_s": every_s}}


def _shutdown_slow(llm: LLM) -> None:
    """Shut down an engine whose saves land slower than its deadline allows for the rest:
    the shutdown may fail, naming them, and must fail for nothing else."""
    try:
        llm.shutdown()
    except RemoteError as exc:
        assert "shutdown: transfers did not finish on every rank" in str(exc), exc


def test_a_request_waiting_on_saves_that_keep_landing_is_served() -> None:
    """8 one-block requests held for saves the workers report one every 0.4 s; a 4-block
    request waits 1.6 s for room, past the 1 s deadline, but a save lands every 0.4 s:
    each starts the deadline again, and the request is served."""
    llm = LLM("tiny", connector=_slow(0.4), num_blocks=8, timeout_s=1.0)
    llm.generate([[100 + i] * 10 for i in range(8)], GREEDY)
    (out,) = llm.generate([list(range(200, 257))], GREEDY)
    _shutdown_slow(llm)
    assert out.finish_reason == "length", out.error


def test_a_stall_ended_by_an_abort_does_not_fail_the_next_call() -> None:
    """A request waiting behind held blocks is aborted from on_step half a deadline in;
    the next call, a deadline later, starts its own count (the last call's used to fail
    it at once) and is served once the saves land."""
    llm = LLM("tiny", connector=_slow(0.3), num_blocks=8, timeout_s=1.0)
    llm.generate([[100 + i] * 10 for i in range(8)], GREEDY)
    t0 = time.monotonic()

    def give_up(engine: LLM, step: int) -> None:
        if time.monotonic() - t0 > 0.5:
            engine.abort_request("req-8")

    (aborted,) = llm.generate([list(range(200, 257))], GREEDY, on_step=give_up)
    time.sleep(1.1)
    (out,) = llm.generate([list(range(300, 310))], GREEDY)
    _shutdown_slow(llm)
    assert aborted.finish_reason == "abort", aborted
    assert out.finish_reason == "length", out.error


@pytest.mark.parametrize(
    "mode, message",
    [
        ("finished_returns_str", "MisbehavingScheduler.request_finished returned 'no'; it must"),
        ("layer_hooks_none", "MisbehavingWorker.needs_layer_hooks returned None; it must"),
    ],
)
def test_an_answer_of_the_wrong_type_is_named(mode: str, message: str) -> None:
    """A hook's answer of the wrong type fails the step on every rank, naming the
    connector's class and hook, rather than being read as true or false (needs_layer_hooks
    stubbed with `...` used to switch the per-layer hooks off without a word)."""
    llm = _llm(mode)
    with pytest.raises(RemoteError, match=message):
        llm.generate(PROMPTS, GREEDY)
    llm.shutdown()


def test_a_lookup_answer_of_the_wrong_type_fails_its_requests_alone() -> None:
    """get_num_new_matched_tokens answering 1.5 tokens is named, not read as 1: each
    request it answered so fails with that error, alone (before, the step failed)."""
    llm = _llm("float_answer")
    outs = llm.generate(PROMPTS, GREEDY)
    stats = llm.stats
    llm.shutdown()
    want = "MisbehavingScheduler.get_num_new_matched_tokens must return (int, bool), got (1.5"
    assert [o.finish_reason for o in outs] == ["error", "error"], outs
    assert all(o.error is not None and o.error.startswith(want) for o in outs), outs
    assert stats["lookup_failures"] == 2, stats


def test_numpy_scalars_are_answers_like_python_ones(reference) -> None:
    llm = _llm("numpy_answer")
    assert [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    llm.shutdown()


def test_a_worker_shutdown_that_raises_does_not_stop_the_cleanup() -> None:
    """The worker's shutdown raising: the scheduler's still runs, the engine still lets go
    of its model and cache, and the error raised names the hook."""
    misbehaving_connector.SHUTDOWNS.clear()
    llm = _llm("shutdown_raises")
    llm.generate(PROMPTS[:1], GREEDY)
    with pytest.raises(ConnectorError, match="MisbehavingWorker.shutdown raised OSError"):
        llm.shutdown()
    assert misbehaving_connector.SHUTDOWNS == ["worker", "scheduler"]
    assert not hasattr(llm, "kv_cache") and not hasattr(llm, "model")


def test_a_shutdown_whose_drain_and_worker_both_fail_raises_the_first(caplog) -> None:
    """The drain times out on saves never reported and the worker's shutdown raises too:
    the drain's error is raised, the worker's logged, the scheduler still shut down."""
    import logging

    misbehaving_connector.SHUTDOWNS.clear()
    conn = _connector("never_report_saves")
    conn["kwargs"]["shutdown_raises"] = True
    llm = LLM("tiny", connector=conn, timeout_s=1.0)
    llm.generate(PROMPTS[:1], GREEDY)
    with (
        caplog.at_level(logging.ERROR, logger="kvdist"),
        pytest.raises(RemoteError, match="shutdown: transfers did not finish"),
    ):
        llm.shutdown()
    assert "MisbehavingWorker.shutdown raised OSError" in caplog.text
    assert misbehaving_connector.SHUTDOWNS == ["worker", "scheduler"]


def test_generate_prints_the_outputs_before_a_shutdown_that_fails(tmp_path) -> None:
    """`kvdist generate` whose connector never reports its saves: the outputs are served,
    so they are printed; the shutdown that then waits for the saves fails after the
    deadline, naming them and the setting, and the command exits nonzero (before, every
    output was lost with it)."""
    kvdist = shutil.which("kvdist")
    assert kvdist, "the kvdist command is not installed"
    here = Path(__file__).parent
    cmd = [kvdist, "generate", "--prompt", "[[5, 6, 7, 8, 9], [9, 8, 7]]", "--max-tokens", "3"]
    cmd += ["--connector", "misbehaving_connector:MisbehavingScheduler:MisbehavingWorker"]
    cmd += ["--connector-kwargs", '{"mode": "never_report_saves"}']
    env = {**job_env(), "KVDIST_TIMEOUT_S": "2", "PYTHONPATH": str(here)}
    job = run_job(["bash", "-c", "exec " + shlex.join(cmd)], env, 120)
    assert job.returncode != 0, job.output[-4000:]
    assert "req-0: " in job.output and "[length, ttft" in job.output, job.output[-4000:]
    assert "within 2s (KVDIST_TIMEOUT_S): req-0 save" in job.output, job.output[-4000:]
