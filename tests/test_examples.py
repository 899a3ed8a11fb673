"""The examples run as a reader would run them, at 1 and 2 ranks, and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mp.jobs import job_env, launch, run_job

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, ranks: int, *args: str) -> str:
    job = run_job(launch(ranks, str(ROOT / "examples" / script), *args), job_env(), 300)
    assert job.returncode == 0, job.output[-4000:]
    return job.output


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multirank)])
def test_custom_connector_example(ranks: int) -> None:
    """The one-file connector loads KV in a second engine and changes no token."""
    out = _run("custom_connector.py", ranks)
    assert "tokens loaded by the connector: 96 of 100, identical: True" in out, out
    # A whole number of blocks: the engine computes the last token, the connector must
    # still load the last block.
    assert "tokens loaded by the connector: 111 of 112, identical: True" in out, out


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multirank)])
def test_async_connector_example(ranks: int) -> None:
    """The asynchronous one-file connector: loads on a thread, saves filed on a thread with
    the finished requests held, hits only on blocks every rank filed. A second engine
    loads every block it can and changes no token (the first engine's shutdown waited for
    its held saves on every rank); a third, after the last rank lost three blocks, fails
    those loads without failing the step."""
    out = _run("async_connector.py", ranks)
    assert "tokens loaded asynchronously: 96 of 100, identical: True" in out, out
    assert "tokens loaded asynchronously: 111 of 112, identical: True" in out, out
    # Blocks lost on the last rank: their loads fail there, are reported done with their
    # blocks, and every rank computes them; the next engine misses on them (the worker
    # named them to its scheduler) and saves them again; the one after loads everything.
    lost = re.search(rf"with 3 blocks lost on rank {ranks - 1} \((\d+) failed block loads\): "
                     r"(\d+) tokens loaded, outputs identical: True", out)  # fmt: skip
    assert lost and int(lost[1]) > 0 and int(lost[2]) < 96 + 111, out
    assert re.search(r"next engine \(.*\): \d+ tokens loaded, outputs identical: True", out)
    assert "the one after: 207 tokens loaded, outputs identical: True" in out, out


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multirank)])
def test_persistence_example(ranks: int, tmp_path) -> None:
    """A restarted engine loads the shared prefix from disk; tokens are unchanged."""
    out = _run("persistence.py", ranks, str(tmp_path))
    lines = [ln for ln in out.splitlines() if ln.startswith("req-")]
    assert len(lines) == 4
    assert "320 loaded from disk +   0 on device" in lines[0], lines[0]
    assert all("320 on device" in ln for ln in lines[1:]), out  # loaded once, then shared
    assert all("same tokens: True" in ln for ln in lines), out


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multirank)])
def test_persistence_example_removes_the_cache_it_made(ranks: int, tmp_path) -> None:
    """Given no directory, the example makes a temporary one and removes it at the end
    (each run left one behind)."""
    env = {**job_env(), "TMPDIR": str(tmp_path)}
    job = run_job(launch(ranks, str(ROOT / "examples" / "persistence.py")), env, 300)
    assert job.returncode == 0, job.output[-4000:]
    assert job.output.count("same tokens: True") == 4, job.output
    assert not list(tmp_path.glob("kvdist-example-*"))


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multirank)])
def test_engine_integration_example(ranks: int) -> None:
    """An engine of its own drives the disk connector through the Coordinator: the second
    engine loads 92 of 99 prompt tokens, and every rank's KV (loaded and computed) is what
    computing it writes."""
    out = _run("engine_integration.py", ranks)
    assert "new engine, same cache: 7 tokens computed, 92 loaded" in out, out
    assert f"{3 * ranks} request shards checked, 0 mismatched" in out, out
    assert re.search(
        rf"ranks: {ranks} \((cpu|cuda)\); KV loaded on every rank matches recompute: True", out
    ), out


@pytest.mark.multirank
def test_engine_integration_example_with_a_replicated_kv_head() -> None:
    """One KV head over 2 ranks: both hold head 0, `ConnectorContext.for_rank` marks rank 1
    a replica, and the second engine still loads 92 tokens with every shard checked."""
    out = _run("engine_integration.py", 2, "--kv-heads", "1")
    assert "new engine, same cache: 7 tokens computed, 92 loaded" in out, out
    assert "6 request shards checked, 0 mismatched" in out, out


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multirank)])
def test_custom_connector_example_after_a_failed_step(ranks: int) -> None:
    """The one-file connector answers hits only on blocks every rank reported stored: after
    a step that failed on the last rank (which then stored nothing), a new engine in the
    same processes loads nothing and computes the same tokens; the one after it loads what
    that engine's steps stored."""
    job = run_job(
        launch(ranks, str(ROOT / "tests" / "mp" / "example_failed_step.py")), job_env(), 300
    )
    assert job.returncode == 0, job.output[-4000:]
    assert "after the failure: loaded 0, identical: True" in job.output, job.output[-4000:]
    assert "again: loaded 96, identical: True" in job.output, job.output[-4000:]


def test_engine_integration_example_sends_a_planning_error_to_every_rank() -> None:
    """The example engine's rank 0 publishes a plan carrying the error when planning
    raises (here the connector's build_connector_meta), so that every rank raises it
    rather than waiting out the deadline for a plan."""
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import engine_integration as ex
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from kvdist import Coordinator, RemoteError
    from kvdist.comm.local import LocalCommunicator

    class Broken:
        def build_connector_meta(self, so):
            raise OSError("disk gone")

        def get_num_new_matched_tokens(self, request, computed):
            return 0, False

        def update_state_after_alloc(self, request, blocks, n):
            pass

    plan = ex.planned(ex.Scheduler(Broken(), [[1, 2, 3]]))
    assert plan.error == "OSError: disk gone", plan
    coordinator = Coordinator(LocalCommunicator(), None, timeout_s=10)
    with pytest.raises(RemoteError, match="disk gone"):
        coordinator.publish_plan(plan)


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multirank)])
def test_custom_connector_example_saves_what_a_request_computed_as_it_loaded(ranks) -> None:
    """A request finishing in the step that loaded it (one token) is held for the saves
    its connector puts off until the load is known good on every rank: a third engine
    loads all but the last token of the second prompt (it used to load only its first
    half, the blocks computed in the load step never saved)."""
    script = str(ROOT / "tests" / "mp" / "example_finish_on_load.py")
    job = run_job(launch(ranks, script), job_env(), 300)
    assert job.returncode == 0, job.output[-4000:]
    assert "loaded: [0, 48, 95]" in job.output, job.output[-4000:]


def test_engine_integration_example_fails_a_request_alone_when_its_lookup_fails() -> None:
    """The example engine's rank 0, as kvdist.LLM: a connector lookup that raises (r1) or
    answers malformed (r2) fails that request alone, with an error naming the connector
    and the hook; the other request is served, every request gets exactly one
    request_finished (the failed ones with no blocks), and each is listed finished in a
    plan. A failure means one bad request takes down the step (the example used to raise
    out of planning, failing every rank)."""
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import engine_integration as ex
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from kvdist import Coordinator
    from kvdist.comm.local import LocalCommunicator

    class Flaky:
        def __init__(self):
            self.finished: list[tuple[str, list[int]]] = []

        def get_num_new_matched_tokens(self, request, computed):
            if request.request_id == "r1":
                raise OSError("index unreadable")
            return "many" if request.request_id == "r2" else (0, False)

        def update_state_after_alloc(self, request, blocks, n):
            pass

        def build_connector_meta(self, so):
            return None

        def request_finished(self, request, block_ids):
            self.finished.append((request.request_id, block_ids))
            return False

    connector = Flaky()
    scheduler = ex.Scheduler(connector, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    coordinator = Coordinator(LocalCommunicator(), None, timeout_s=10)
    scheduled, finished = [], []
    while True:
        plan = coordinator.publish_plan(ex.planned(scheduler))
        if plan.stop:
            break
        scheduled += plan.scheduler_output.new_requests.request_ids
        finished += plan.scheduler_output.finished_req_ids
        scheduler.after_step(coordinator.exchange_reports(plan))
    assert scheduled == ["r0"], scheduled
    assert sorted(finished) == ["r0", "r1", "r2"], finished
    assert sorted(connector.finished) == [("r0", [0]), ("r1", []), ("r2", [])]
    assert scheduler.failed == {
        "r1": "Flaky.get_num_new_matched_tokens raised OSError: index unreadable",
        "r2": "Flaky.get_num_new_matched_tokens must return (int, bool), got 'many'",
    }, scheduler.failed
    assert sorted(scheduler.free) == list(range(ex.NUM_BLOCKS))  # nothing left allocated


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multirank)])
def test_engine_integration_example_serves_the_others_when_a_lookup_fails(ranks) -> None:
    """The same through the example's whole loop with the disk connector: in both engines
    r1 and r2 fail alone, r0 is computed, then loaded by the second engine with every
    rank's KV checked, and each request gets one request_finished per engine."""
    script = str(ROOT / "tests" / "mp" / "example_engine_failures.py")
    job = run_job(launch(ranks, script, "lookup"), job_env(), 300)
    assert job.returncode == 0, job.output[-4000:]
    failed = (
        "failed: [('r1', 'DiskConnectorScheduler.get_num_new_matched_tokens raised OSError: "
        "index unreadable'), ('r2', \"DiskConnectorScheduler.get_num_new_matched_tokens must "
        "return (int, bool), got 'many'\")], request_finished: [('r0', 1), ('r1', 1), ('r2', 1)]"
    )
    assert f"fresh engine: 33 computed, 0 loaded, 0 mismatched, {failed}" in job.output, job.output
    assert f"new engine: 1 computed, 32 loaded, 0 mismatched, {failed}" in job.output, job.output


@pytest.mark.multirank
def test_engine_integration_example_raises_a_rank_s_hook_error_on_every_rank() -> None:
    """The last rank's start_load_kv raises in the second engine: that rank leaves the
    connector out but still runs its forward, whose all-reduce rank 0 waits in, and every
    rank raises the hook's error together, at once. A failure (a CollectiveTimeout after
    the 60 s deadline) means a rank left its forward when a hook raised."""
    script = str(ROOT / "tests" / "mp" / "example_engine_failures.py")
    job = run_job(launch(2, script, "hook"), job_env(KVDIST_TIMEOUT_S="60"), 150)
    assert job.returncode == 0, job.output[-4000:]
    assert "fresh engine: 99 computed, 0 loaded, 0 mismatched" in job.output, job.output
    for rank in (0, 1):
        want = (
            f"rank {rank}: new engine: RemoteError: rank 1 failed in step 1: ConnectorError: "
            "DiskConnectorWorker.start_load_kv raised OSError: injected failure"
        )
        assert want in job.output, job.output[-4000:]
    assert job.seconds < 45, job.seconds


@pytest.mark.multirank
def test_engine_integration_example_ends_the_job_when_a_rank_s_forward_raises() -> None:
    """The last rank's forward raises before its first all-reduce in the second engine:
    that rank raises at once and the job ends with its message. A failure (a job ended by
    the 60 s deadline) means the rank waited in the report exchange while the others
    waited for it in the all-reduce."""
    script = str(ROOT / "tests" / "mp" / "example_engine_failures.py")
    job = run_job(launch(2, script, "forward"), job_env(KVDIST_TIMEOUT_S="60"), 150)
    assert job.returncode != 0, job.output[-4000:]
    assert "fresh engine: 99 computed, 0 loaded, 0 mismatched" in job.output, job.output
    assert "[kvdist rank 1/2] RuntimeError: injected forward failure" in job.output, job.output
    assert job.seconds < 45, (job.seconds, job.output[-4000:])
