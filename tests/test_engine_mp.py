"""The engine end to end at 2 and 4 ranks (mpiexec) and 2 ranks (torchrun): every
scenario of tests/engine_scenarios.py, checked on the observations of all ranks."""

from __future__ import annotations

import json
import sys
import time
from functools import cache
from pathlib import Path

import pytest
from mp.jobs import job_env, launch, run_job, scenario_env

HERE = Path(__file__).parent
WORKER = HERE / "mp" / "engine_worker.py"
pytestmark = pytest.mark.multirank


@cache
def run_all(launcher: str, n: int, tmp: str) -> dict:
    """Run every scenario once per (launcher, ranks); returns name -> per-rank results."""
    out = Path(tmp) / f"{launcher}-{n}.json"
    job = run_job(
        launch(n, str(WORKER), "all", str(out), launcher=launcher), scenario_env(), timeout_s=600
    )
    assert job.returncode == 0, job.output[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tmpdir_str(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("engine_mp"))


@pytest.fixture(scope="module")
def reference() -> dict:
    """World size 1, in this process: the tokens every TP size must reproduce."""
    sys.path.insert(0, str(HERE))
    from engine_scenarios import tp_tokens

    from kvdist.comm import init_distributed

    topo = init_distributed(device="cpu")
    return tp_tokens(topo)


CONFIGS = [("mpiexec", 2), ("mpiexec", 4), ("torchrun", 2)]


@pytest.mark.parametrize("launcher,n", CONFIGS)
def test_tokens_independent_of_tp(launcher, n, tmpdir_str, reference) -> None:
    """TP 2 and 4 give the tokens of TP 1, greedy and seeded sampling, on every rank."""
    for rank_result in run_all(launcher, n, tmpdir_str)["tp_tokens"]:
        assert rank_result["greedy"]["tokens"] == reference["greedy"]["tokens"]
        assert rank_result["sampled"]["tokens"] == reference["sampled"]["tokens"]
        assert rank_result["greedy"]["max_collectives"] <= 2


@pytest.mark.parametrize("launcher,n", CONFIGS)
def test_async_load_and_save_lifecycle(launcher, n, tmpdir_str) -> None:
    """Ranks report async transfers in different steps; the loaded run must produce the
    tokens of a run without connector, really load (external tokens), and leak nothing."""
    results = run_all(launcher, n, tmpdir_str)["async_lifecycle"]
    for r in results:
        assert r["second"]["tokens"] == r["base"]["tokens"]
        assert r["first"]["tokens"] == r["base"]["tokens"]
        assert r["second"]["external"][:4] == [32] * 4, r["second"]["external"]
        assert r["second"]["max_collectives"] <= 2
    assert all(results[0][k]["leaked"] == 0 for k in ("base", "first", "second"))


@pytest.mark.parametrize("launcher,n", CONFIGS[:2])
def test_load_failure_on_one_rank(launcher, n, tmpdir_str) -> None:
    """A load failing on the last rank only: recomputed (tokens as without connector) or,
    with policy fail, those requests end in error while the others are served."""
    results = run_all(launcher, n, tmpdir_str)["load_failure"]
    for r in results:
        for mode in ("sync", "async"):
            assert r[mode]["tokens"] == r["base"]["tokens"], mode
            assert r[mode]["external"][:4] == [16] * 4  # the block before the failed one
            failed = r[f"{mode}_fail"]
            assert failed["reasons"] == ["error"] * 4 + ["length"]
            assert failed["tokens"][4] == r["base"]["tokens"][4]
            # Both kinds of load say the same: the tokens before the failed block, and
            # which block failed.
            assert failed["external"][:4] == [16] * 4, (mode, failed["external"])
            for error in failed["errors"][:4]:
                assert "connector load failed at block index 1 of the request" in error, error
    rank0 = results[0]
    for mode in ("sync", "async"):
        assert rank0[mode]["recomputed"] > 0 and rank0[mode]["load_failures"] > 0
        # Every rank's stats hold rank 0's scheduler counters.
        assert all(r[mode]["counters"] == rank0[mode]["counters"] for r in results), mode
        assert rank0[mode]["leaked"] == 0 and rank0[f"{mode}_fail"]["leaked"] == 0


@pytest.mark.parametrize("launcher,n", CONFIGS)
def test_bad_inputs_keep_the_ranks_in_step(launcher, n, tmpdir_str) -> None:
    """A bad cache salt raises the same error on every rank; a large engine seed samples;
    prompts that differ between ranks are an error on every rank (before, rank 1 got rank
    0's results for its prompts), also in number, after which the ranks' request ids still
    agree; the next call gives every rank the same tokens (before, rank 0 alone raised, and
    the ranks' collectives no longer matched)."""
    results = run_all(launcher, n, tmpdir_str)["bad_inputs"]
    assert {r["raised"] for r in results} == {"a cache_salt must be a str or None, got 5"}
    assert len({json.dumps(r["sampled"]) for r in results}) == 1
    assert len(results[0]["sampled"]) == 4
    assert all(r["odd"] == ["length", "error"] for r in results), results
    others = list(range(1, n))
    differ = (
        f"generate was called with other prompts or parameters on rank(s) {others} than "
        "on rank 0: every rank must pass the same"
    )
    assert {r["differ"] for r in results} == {r["more"] for r in results} == {differ}
    # A call refused on every rank counts no request on any: the next call's ids agree
    # (before, ranks given more prompts ran ahead, and later calls failed on them alone).
    assert {json.dumps(r["ids"]) for r in results} == {'["req-3"]'}
    assert len({json.dumps(r["tokens"]) for r in results}) == 1


@pytest.mark.parametrize("launcher,n", CONFIGS)
def test_connector_settings_that_differ_between_ranks(launcher, n, tmpdir_str) -> None:
    """Settings the ranks must share fail every rank's LLM() with one error naming the
    setting; those a connector leaves out of its agreed settings (a disk tier's IO
    threads) may differ."""
    results = run_all(launcher, n, tmpdir_str)["settings_differ"]
    assert [r["ranks_on_host"] for r in results] == [n] * n  # one host: every rank on it
    cap = {r["cpu_capacity"] for r in results}
    assert cap == {
        "the connector 'cpu' has other settings on rank 1 than on rank 0: capacity_bytes is "
        "2097152 there and 1048576 on rank 0; every rank must pass the same settings (but "
        "those its ConnectorWorker.agreed_settings leaves out)"
    }, cap
    # The engine's start: every rank must load the same model and get the same blocks.
    other = {r["other_model"] for r in results}
    assert len(other) == 1 and other.pop().startswith(
        "rank(s) [1"
    ), other  # fmt: skip
    assert all("loaded another model than rank 0" in r["other_model"] for r in results)
    short = {r["short_memory"] for r in results}
    assert len(short) == 1 and "more than rank 1 has (1000 bytes: a test's small memory)" in (
        short.pop()
    )
    blocks = {r["num_blocks"] for r in results}
    assert (
        len(blocks) == 1
        and "num_blocks differs between ranks (unset on rank 0, 64 on rank 1" in blocks.pop()
    )
    order = {r["tier_order"] for r in results}
    assert len(order) == 1 and "tiers[0].kind is 'DiskConnectorWorker' there" in order.pop()
    assert len({json.dumps(r["io_threads"]) for r in results}) == 1
    assert isinstance(results[0]["io_threads"], list) and results[0]["io_threads"][0]
    # A path each rank finds its own directory under: every rank fails, naming it.
    named = {"unshared": "'disk'", "unshared_tier": "'tiered'"}
    prefix = {"unshared": "", "unshared_tier": "tier 1 (DiskConnectorWorker): "}
    for key in named:
        got = {r[key] for r in results}
        assert len(got) == 1, got
        text = got.pop()
        assert text.startswith(
            f"the connector {named[key]} needs every rank to use one and the same "
            f"{prefix[key]}cache directory kvcache/"
        ), text
        assert "but rank 1 finds another one than rank 0 (both on " in text, text


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_a_refused_start_leaves_the_process_ready_for_another(launcher, tmp_path) -> None:
    """LLM() owning its topology (the caller did not call init_distributed): a connector
    setting refused on every rank, then the corrected engine in the same processes. It
    used to fail saying torch.distributed was already initialised, with no handle to
    close it."""
    script = str(HERE / "mp" / "retry_worker.py")
    job = run_job(launch(2, script, str(tmp_path), launcher=launcher), job_env(), timeout_s=300)
    assert job.returncode == 0, job.output[-6000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for s in seen:
        assert s["first"] == "cpu connector: capacity_bytes must be a positive integer, got 0"
    assert seen[0]["tokens"] == seen[1]["tokens"] and len(seen[0]["tokens"]) == 2


@pytest.mark.parametrize("launcher,n", CONFIGS[:2])
def test_abort_during_async_save_keeps_blocks(launcher, n, tmpdir_str) -> None:
    """An aborted request's blocks stay held while its save is in flight on some rank,
    and are freed once every rank reported it."""
    rank0 = run_all(launcher, n, tmpdir_str)["abort_during_save"][0]
    assert rank0["reason"] == "abort"
    assert rank0["held_after_abort"] > 0 and rank0["pending_after_abort"] == ["save"]
    assert rank0["leaked"] == 0


@pytest.mark.parametrize("launcher,n", CONFIGS[:2])
def test_connector_call_order(launcher, n, tmpdir_str) -> None:
    """Hooks are called as DESIGN.md §1 says, on every rank."""
    results = run_all(launcher, n, tmpdir_str)["recording"]
    check_recording(results, world_size=n)


def check_recording(results: list[dict], world_size: int) -> None:
    num_layers = results[0]["num_layers"]
    per_layer = [x for i in range(num_layers) for x in (["before", i], ["after", i])]
    for rank, r in enumerate(results):
        calls = r["worker"]
        registers = [c for c in calls if c[0] == "register"]
        assert len(registers) == 1, "register_kv_caches must be called once per rank"
        assert registers[0][1][4] == 4 // world_size, "rank must hold only its KV heads"
        # Between two start_load calls: the per-layer hooks of one forward, in layer order.
        step_calls: list[list] = []
        for c in calls[1:]:
            if c[0] == "start_load":
                step_calls.append([])
            elif c[0] in ("before", "after"):
                step_calls[-1].append(c)
        assert all(s in ([], per_layer) for s in step_calls), "hooks out of layer order"
        assert sum(1 for s in step_calls if s) >= 5
        if rank != 0:
            assert r["scheduler"] is None, "the scheduler must exist on rank 0 only"
    sched = results[0]["scheduler"]
    metas = [c for c in sched if c[0] == "meta"]
    assert len(metas) == results[0]["steps"], "one build_connector_meta per step"
    allocs = [c for c in sched if c[0] == "alloc"]
    finished = [c for c in sched if c[0] == "finished"]
    rids = sorted({c[1] for c in allocs})
    assert len(allocs) == len(rids) == 5, "update_state_after_alloc once per request"
    assert sorted(c[1] for c in finished) == rids, "request_finished once per request"
    assert [c[3] for c in sorted(allocs)] == [32, 32, 32, 32, 0]
    # Positions and block deltas: each step continues where the last left off, and the
    # block table rebuilt from deltas is the one request_finished receives.
    tables: dict[str, list[int]] = {}
    next_pos: dict[str, int] = {}
    for _, _, entries in metas:
        for rid, pos, n_sched, _n_tok, new_blocks, is_new in entries:
            if is_new:
                alloc = next(c for c in allocs if c[1] == rid)
                assert pos == alloc[3], "connector tokens must not be scheduled for compute"
                tables[rid] = list(new_blocks)
            else:
                assert pos == next_pos[rid]
                tables[rid] += new_blocks
            next_pos[rid] = pos + n_sched
    for _, rid, block_ids in finished:
        assert tables[rid] == block_ids
    for rid, plen in zip(rids, results[0]["prompt_lens"]):
        assert next_pos[rid] == plen + 8 - 1  # every token but the last sampled one
    assert results[0]["leaked"] == 0


def test_connector_call_order_single_rank(tmp_path) -> None:
    """The same call-order checks at world size 1, in this process."""
    from engine_scenarios import recording

    from kvdist.comm import init_distributed

    check_recording([recording(init_distributed(device="cpu"))], world_size=1)


@pytest.mark.parametrize("launcher,n", [("mpiexec", 2), ("torchrun", 2)])
def test_a_hook_failing_on_one_rank_ends_every_rank_together(launcher, n, tmp_path) -> None:
    """Each worker hook raising on the last rank alone: every rank raises the same
    RemoteError naming that rank and the error, within seconds (not the 120 s deadline:
    the failing rank still ran the forward the others waited in); the processes then run
    a new engine normally."""
    out = tmp_path / "hooks.json"
    job = run_job(
        launch(n, str(WORKER), "hook_failures", str(out), launcher=launcher),
        scenario_env(),
        timeout_s=300,
    )
    assert job.returncode == 0, job.output[-6000:]
    results = json.loads(out.read_text())["hook_failures"]
    sys.path.insert(0, str(HERE))
    from engine_scenarios import HOOKS

    for hook in HOOKS:
        seen = [r[hook] for r in results]
        want = f"rank {n - 1} failed in step"
        for rank, s in enumerate(seen):
            assert s["raised"] == "RemoteError", (hook, rank, s)
            assert want in s["message"] and f"injected failure in {hook}" in s["message"], s
            # The hook is named by the engine, not only by this connector's own message.
            assert f"MemoryWorker.{hook} raised RuntimeError" in s["message"], s
            assert s["seconds"] < 60, (hook, rank, s["seconds"])
            # shutdown does not step the failed engine again (it used to drain through
            # the same connector, and raise the same error a second time)
            assert "shutdown" not in s, s
        assert len({s["message"] for s in seen}) == 1, (hook, seen)
    assert all(r["after"] == results[0]["after"] for r in results)


def test_a_failure_on_rank_0_after_the_exchange_reaches_every_rank(tmp_path) -> None:
    """Rank 0 failing after a step's report exchange (the others already past that step's
    collectives): every rank raises it, as a RemoteError from rank 0, within seconds."""
    out = tmp_path / "after.json"
    job = run_job(
        launch(2, str(WORKER), "after_step_failure", str(out)), scenario_env(), timeout_s=300
    )
    assert job.returncode == 0, job.output[-6000:]
    for rank, s in enumerate(json.loads(out.read_text())["after_step_failure"]):
        assert s["raised"] == "RemoteError", (rank, s)
        assert "rank 0 failed in step" in s["message"], s
        assert "injected failure after the exchange" in s["message"], s
        assert s["seconds"] < 60, (rank, s["seconds"])


def test_a_hook_failing_in_an_abort_between_steps_reaches_every_rank(tmp_path) -> None:
    """request_finished raising when rank 0 aborts a request from on_step (outside a
    step): every rank raises it, named, as a RemoteError from rank 0 within seconds. A
    failure means rank 0's caller alone saw it while the other ranks waited out the
    collective deadline."""
    out = tmp_path / "abort.json"
    job = run_job(
        launch(2, str(WORKER), "abort_hook_failure", str(out)), scenario_env(), timeout_s=300
    )
    assert job.returncode == 0, job.output[-6000:]
    for rank, s in enumerate(json.loads(out.read_text())["abort_hook_failure"]):
        assert s["raised"] == "RemoteError", (rank, s)
        assert "rank 0 failed in step" in s["message"], s
        assert ".request_finished raised RuntimeError: injected failure" in s["message"], s
        assert s["seconds"] < 60, (rank, s["seconds"])


def test_a_connector_failing_to_start_on_one_rank_fails_every_rank_at_once(tmp_path) -> None:
    """register_kv_caches raising on rank 1 alone: rank 1 raises its own error, rank 0 one
    naming rank 1, the hook and the error, within seconds; a new engine then serves."""
    out = tmp_path / "start.json"
    job = run_job(launch(2, str(WORKER), "start_failure", str(out)), scenario_env(), timeout_s=300)
    assert job.returncode == 0, job.output[-6000:]
    zero, one = json.loads(out.read_text())["start_failure"]
    assert one["raised"] == "ConnectionError" and "injected failure" in one["message"], one
    assert zero["raised"] == "RuntimeError", zero
    assert "did not start on rank(s) [1]" in zero["message"], zero
    assert (
        "MemoryWorker.register_kv_caches: ConnectionError: memory connector: injected"
        in (zero["message"])
    ), zero
    assert zero["seconds"] < 60 and one["seconds"] < 60, (zero, one)
    assert zero["after"] == one["after"] and zero["after"][0], (zero, one)


def test_a_failed_lookup_fails_its_request_alone_on_every_rank(tmp_path) -> None:
    """The connector's lookup raising, or answering malformed, for one request at TP 2:
    every rank returns that request as an error with the same text, naming the connector,
    the hook and what went wrong, and the others with the tokens of a run without
    connector, loaded from the store. Every rank's stats hold rank 0's counters, one
    lookup failure among them. A failure means the step failed on every rank and took the
    other requests with it (as it did), or the ranks disagree on the outcome."""
    out = tmp_path / "lookup.json"
    job = run_job(launch(2, str(WORKER), "lookup_failure", str(out)), scenario_env(), timeout_s=300)
    assert job.returncode == 0, job.output[-6000:]
    results = json.loads(out.read_text())["lookup_failure"]
    sys.path.insert(0, str(HERE))
    from engine_scenarios import LOOKUP_FAULTS

    messages = {
        "raise": "MemoryScheduler.get_num_new_matched_tokens raised LookupError: memory "
        "connector: injected lookup failure",
        "str": "MemoryScheduler.get_num_new_matched_tokens must return (int, bool), got 'x'",
    }
    base = results[0]["base"]
    for fault in LOOKUP_FAULTS:
        seen = [r[fault] for r in results]
        for rank, s in enumerate(seen):
            assert results[rank]["base"]["tokens"] == base["tokens"], rank
            assert s["reasons"][2] == "error" and s["tokens"][2] == [], (fault, rank, s)
            assert s["errors"][2] == messages[fault], (fault, rank, s["errors"])
            others = s["tokens"][:2] + s["tokens"][3:]
            assert others == base["tokens"], (fault, rank)
            assert s["reasons"][:2] + s["reasons"][3:] == base["reasons"], (fault, rank)
            assert s["errors"][:2] + s["errors"][3:] == [None] * 5, (fault, rank)
            # The others really loaded (the two full blocks of the shared prefix).
            assert s["external"] == [32, 32, 0, 32, 32, 0], (fault, rank, s["external"])
            assert s["counters"] == seen[0]["counters"], (fault, rank)
        assert seen[0]["counters"]["lookup_failures"] == 1, seen[0]["counters"]
        assert seen[0]["leaked"] == 0
        finished = seen[0]["finished"]
        rids = sorted(c[1] for c in finished)
        assert len(rids) == len(set(rids)) == 6, finished  # one request_finished each
        failed = [c for c in finished if c[1] == rids[2]]
        assert failed == [["finished", rids[2], []]], finished


@pytest.mark.parametrize("mode", ["sleep", "exit", "forward", "owned"])
def test_a_late_gone_or_failing_rank_ends_the_job_at_its_deadline(mode) -> None:
    """Rank 1 stops for 30 s, ends before generate, or fails in its forward. Rank 0 goes
    from its plan broadcast straight into the forward, where it meets rank 1 first: the
    tensor-parallel collectives have the control plane's deadline (3 s here; torch's
    default is 30 minutes, and the job waited out the sleep, or hung), and a forward that
    fails ends the job at once, with its message (it used to wait out the report
    exchange's deadline, then blame the healthy ranks)."""
    script = str(HERE / "mp" / "late_rank.py")
    start = time.monotonic()
    # "owned": the engine's own timeout_s=3 must reach its tensor-parallel group.
    deadline = "300" if mode == "owned" else "3"
    job = run_job(launch(2, script, mode), job_env(KVDIST_TIMEOUT_S=deadline), timeout_s=120)
    elapsed = time.monotonic() - start
    assert job.returncode != 0, job.output[-4000:]
    assert "generate returned" not in job.output, job.output[-4000:]
    assert elapsed < 25, (elapsed, job.output[-4000:])
    if mode == "forward":
        assert "rank 1 failed in the forward of step 3" in job.output, job.output[-4000:]
        assert "injected forward failure" in job.output
        assert "did not arrive" not in job.output, job.output[-4000:]
    elif mode in ("sleep", "owned"):  # rank 0 meets the late rank in its next forward
        assert "rank 0 failed in the forward of step 3" in job.output, job.output[-4000:]
        assert "late or gone" in job.output
    else:  # rank 0 waits for rank 1 in generate's check of its arguments
        assert "'generate arguments' timed out" in job.output, job.output[-4000:]
        assert "rank(s) [1] did not arrive" in job.output


@pytest.mark.parametrize(
    "launcher, late_before",
    [("mpiexec", "generate"), ("torchrun", "generate"), ("mpiexec", "shutdown")],
)
def test_a_plain_script_ends_after_a_collective_timeout(launcher, late_before) -> None:
    """The README's plain script (no abort_on_error) with rank 1 late past the deadline,
    before generate or before shutdown: rank 0's call raises the timeout naming rank 1,
    and its engine's shutdown ends the job, saying why (under MPI the processes used to
    wait in MPI's finalize for the late rank, and the shutdown tried to step again)."""
    script = str(HERE / "mp" / "late_rank_plain.py")
    cmd = launch(2, script, late_before, launcher=launcher)
    job = run_job(cmd, job_env(KVDIST_TIMEOUT_S="5"), 120)
    assert job.returncode != 0, job.output[-4000:]
    assert "rank(s) [1] did not arrive" in job.output, job.output[-4000:]
    assert "cannot run 'plan broadcast" not in job.output, job.output[-4000:]
    if launcher == "mpiexec":
        assert "a collective failed" in job.output, job.output[-4000:]
    assert job.seconds < 50, (job.seconds, job.output[-4000:])
