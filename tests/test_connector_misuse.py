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
    load_timeout_s, with an error naming the held requests and the ranks that did not
    report them (before, generate looped forever). What ran before is served."""
    llm = _llm("never_report_saves", num_blocks=8, load_timeout_s=1.0, timeout_s=2.0)
    outs = llm.generate(PROMPTS[:1], GREEDY)  # 4 blocks, held after
    assert [o.output_token_ids for o in outs] == reference[:1]
    outs = llm.generate(PROMPTS[1:], GREEDY)  # the 4 blocks left, held after
    assert [o.output_token_ids for o in outs] == reference[1:]
    t0 = time.monotonic()
    (out,) = llm.generate([list(range(200, 257))], GREEDY)  # no room, for good
    waited = time.monotonic() - t0
    assert out.finish_reason == "error", out
    assert "no room in the KV cache for 1 s (load_timeout_s): 8 blocks are held" in out.error
    assert "req-0 save: rank(s) 0 have not reported it" in out.error, out.error
    assert 1.0 <= waited < 30, waited
    assert llm.num_used_blocks() == 8  # held: the connector may still be reading them
    with pytest.raises(RemoteError, match=r"within 2s \(timeout_s\): req-0 save"):
        llm.shutdown()  # the saves never finish: named, after the deadline given here


@pytest.mark.parametrize(
    "mode, message",
    [
        ("finished_returns_str", "MisbehavingScheduler.request_finished returned 'no'; it must"),
        ("layer_hooks_none", "MisbehavingWorker.needs_layer_hooks returned None; it must"),
        ("float_answer", r"get_num_new_matched_tokens must return \(int, bool\), got \(1.5"),
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
