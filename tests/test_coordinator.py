"""The step protocol with ranks as threads (fast); tests/test_coordinator_mp.py runs the
same scenarios under mpiexec and torchrun."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import torch
from coordination_scenarios import SCENARIOS, ScriptedWorker, _error_of, check
from coordination_scenarios import _plan as scripted_plan

from kvdist.api.types import SchedulerOutput
from kvdist.comm.inprocess import InProcessGroup
from kvdist.comm.local import LocalCommunicator
from kvdist.coordination.coordinator import Coordinator
from kvdist.coordination.errors import RemoteError
from kvdist.wire.codec import Plan


def run_threads(world_size: int, fn, timeout: float = 60.0) -> list:
    comms = InProcessGroup(world_size).communicators()
    results: list = [None] * world_size
    errors: list = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(comms[rank])
        except BaseException as exc:  # surfaced below, with the rank
            errors.append((rank, exc))
            comms[rank].abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    assert not errors, errors
    return results


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(name: str, world_size: int) -> None:
    """Each scenario's gathered observations; a failure names the protocol rule broken."""
    check(name, run_threads(world_size, SCENARIOS[name]))


def test_local_communicator_runs_scenarios() -> None:
    """World size 1 without threads: the single-process backend behaves the same."""
    for name, fn in SCENARIOS.items():
        check(name, [fn(LocalCommunicator())])


def test_timeout_names_missing_rank() -> None:
    """A rank that never arrives makes the others fail naming it, instead of hanging."""
    from kvdist.comm.base import CollectiveTimeout

    comms = InProcessGroup(3).communicators()
    seen: list = []

    def body(rank: int) -> None:
        if rank == 2:
            return  # never joins
        try:
            comms[rank].allgather_bytes(b"x", timeout_s=0.5, what="report exchange (step 9)")
        except CollectiveTimeout as exc:
            seen.append(str(exc))

    threads = [threading.Thread(target=body, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 2
    assert all("report exchange (step 9)" in s and "[2]" in s for s in seen), seen


def test_a_rank_waiting_for_a_plan_names_the_step() -> None:
    """Rank 0 publishes step 1, then never comes back: rank 1's timeout says it waited
    for the plan after step 1 (it has no plan to read the step from)."""
    from coordination_scenarios import ScriptedWorker, _plan

    from kvdist.comm.base import CollectiveTimeout
    from kvdist.coordination.coordinator import Coordinator

    def body(comm):
        coord = Coordinator(comm, ScriptedWorker(comm.rank), timeout_s=0.5)
        plan = coord.publish_plan(_plan(1) if comm.rank == 0 else None)
        coord.exchange_reports(plan)
        if comm.rank == 0:
            return None
        try:
            coord.publish_plan(None)
        except CollectiveTimeout as exc:
            return str(exc)
        return None

    results = run_threads(2, body)
    assert "plan broadcast (after 1)" in results[1], results


def test_a_rank_that_failed_says_why_when_the_report_exchange_times_out() -> None:
    """Rank 1 failed in step 1 (its connector hook raised) and reports it; rank 0 never
    comes to the exchange (in an engine, it waits in the forward's tensor-parallel
    all-reduce that rank 1 left out). Rank 1's timeout names its own error: it used to
    name only the missing rank, and the cause was printed nowhere."""
    from coordination_scenarios import ScriptedWorker, _plan

    from kvdist.comm.base import CollectiveTimeout
    from kvdist.coordination.coordinator import Coordinator

    def body(comm):
        coord = Coordinator(comm, ScriptedWorker(comm.rank), timeout_s=0.5)
        plan = coord.publish_plan(_plan(1) if comm.rank == 0 else None)
        if comm.rank == 0:
            return None
        try:
            coord.exchange_reports(plan, error=OSError("disk gone"))
        except CollectiveTimeout as exc:
            return str(exc)
        return None

    results = run_threads(2, body)
    assert "report exchange (step 1)" in results[1], results
    assert "this rank's error: OSError: disk gone" in results[1], results
    assert "[0]" in results[1], results


def _coordinator(worker=None, **kwargs):
    from kvdist.coordination.coordinator import Coordinator

    return Coordinator(LocalCommunicator(), worker, timeout_s=5, **kwargs)


def _plan(step: int, **kwargs):
    from kvdist.api.types import SchedulerOutput
    from kvdist.wire.codec import Plan

    return Plan(step=step, scheduler_output=SchedulerOutput(step=step), **kwargs)


def test_hooks_out_of_order_are_refused() -> None:
    """exchange_reports twice for one plan, before any plan, or with another step's
    plan, and publish_plan twice without an exchange, are each a ProtocolError. A failure
    means get_finished is handed the same ids twice, or a step's reports are skipped."""
    from kvdist.coordination.errors import ProtocolError

    coord = _coordinator()
    with pytest.raises(ProtocolError, match="no plan is published"):
        coord.exchange_reports(_plan(1))
    plan = coord.publish_plan(_plan(1))
    with pytest.raises(ProtocolError, match="reports of step 1 were not exchanged"):
        coord.publish_plan(_plan(2))
    with pytest.raises(ProtocolError, match="plan of step 7, but the published plan is step 1"):
        coord.exchange_reports(_plan(7))
    coord.exchange_reports(plan)
    with pytest.raises(ProtocolError, match="no plan is published"):
        coord.exchange_reports(plan)
    stop = coord.publish_plan(_plan(2, stop=True))  # the stop plan has no exchange
    assert stop.stop
    coord.exchange_reports(coord.publish_plan(_plan(3)))
    assert coord.stats.steps == 2


def test_coordinator_refuses_work_after_a_failed_step() -> None:
    """After a step failed on every rank (here the worker refused the metadata), the
    coordinator refuses further steps by name, and the bind error does not leak into a
    later exchange. A failure means a coordinator is reused with request state the
    ranks may no longer agree on."""
    from coordination_scenarios import ScriptedWorker

    from kvdist.coordination.errors import ProtocolError, RemoteError

    coord = _coordinator(ScriptedWorker(0, refuse_bind=True))
    plan = coord.publish_plan(_plan(1, connector_meta={"x": 1}))
    assert coord.bind_error is not None
    with pytest.raises(RemoteError, match="refuses this metadata"):
        coord.exchange_reports(plan)
    assert coord.bind_error is None
    with pytest.raises(ProtocolError, match=r"stopped at step 1 \(rank 0: .*create a new one"):
        coord.publish_plan(_plan(2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout_s": "5"}, ValueError, r"timeout_s must be a number of seconds in \[0.001, "),
        ({"timeout_s": 1e-9}, ValueError, r"in \[0.001, 1e\+06\], got 1e-09"),
        ({"timeout_s": -1.0}, ValueError, "timeout_s must be a number of seconds"),
        ({"timeout_s": True}, ValueError, "timeout_s must be a number of seconds"),
        ({"timeout_s": float("inf")}, ValueError, "timeout_s must be a number of seconds"),
        ({"timeout_s": 10**400}, ValueError, "timeout_s must be a number of seconds"),
        ({"num_blocks": 0}, ValueError, "num_blocks must be a positive int"),
        ({"num_blocks": 8.0}, TypeError, "num_blocks must be a positive int"),
    ],
)
def test_coordinator_arguments_are_checked(kwargs, error, match) -> None:
    """A timeout that is not a number of seconds within the limits, or a bad block count,
    is refused when the coordinator is built; a numpy integer is a block count. A failure
    means a TypeError or OverflowError deep in the first collective."""
    import numpy as np

    from kvdist.coordination.coordinator import Coordinator

    args = {"timeout_s": 5, **kwargs}
    with pytest.raises(error, match=match):
        Coordinator(LocalCommunicator(), None, **args)
    assert (
        Coordinator(LocalCommunicator(), None, timeout_s=5, num_blocks=np.int64(8)).num_blocks == 8
    )
    assert Coordinator(LocalCommunicator(), None, timeout_s=np.float32(2.5)).timeout_s == 2.5


def test_coordinator_refuses_a_scheduler_as_worker() -> None:
    """Passing something that is not a ConnectorWorker (a scheduler, say) as the worker
    is a TypeError naming it. A failure means an AttributeError at the first step."""
    from kvdist.coordination.coordinator import Coordinator

    with pytest.raises(TypeError, match="must be a kvdist.ConnectorWorker or None, got object"):
        Coordinator(LocalCommunicator(), object(), timeout_s=5)  # type: ignore[arg-type]


def test_get_finished_returning_a_string_names_the_worker_and_rank() -> None:
    """A str where a set of ids belongs (every character would be an id): the error names
    the worker class and the rank, as the other get_finished errors do."""
    coord = Coordinator(
        LocalCommunicator(), ScriptedWorker(0, finished_returns=("a", set())), timeout_s=5
    )
    plan = coord.publish_plan(scripted_plan(1))
    with pytest.raises(RemoteError, match="ScriptedWorker.get_finished on rank 0 must return sets"):
        coord.exchange_reports(plan)


@pytest.mark.parametrize("kind", ["load", "save"])
@pytest.mark.parametrize("second_report_step", [2, 3])
def test_an_id_started_again_right_after_its_release_completes_again(kind, second_report_step):
    """A transfer under an id whose last one completed the step before (an engine reusing a
    request id at once) completes again once every rank reports it. It used to be dropped
    as a repeat of the first report: the request waited for ever, its blocks held."""

    def body(comm):
        reports = {1: {"x"}, second_report_step: {"x"}}
        worker = ScriptedWorker(comm.rank, **{f"{kind}s": reports})
        coord = Coordinator(comm, worker, timeout_s=10)
        if kind == "load":
            plans = [scripted_plan(1, loading=["x"]), scripted_plan(2, loading=["x"])]
        else:
            # The id finished again (reused at once): each finish starts one save.
            plans = [
                scripted_plan(1, finished=["x"], saving=["x"]),
                scripted_plan(2, finished=["x"], saving=["x"]),
            ]
        plans += [scripted_plan(s) for s in range(3, 5)]
        done = []
        for p in plans:
            got = coord.publish_plan(p if comm.rank == 0 else None)
            worker.start_load_kv(None)
            c = coord.exchange_reports(got)
            done.append(c.loads_done if kind == "load" else c.saves_done)
        return done, coord.pending_transfers

    want: list[list[str]] = [["x"], [], [], []]
    want[second_report_step - 1] = ["x"]
    for done, pending in run_threads(2, body):
        assert done == want and pending == 0, (done, pending)


@pytest.mark.parametrize(
    "make",
    [lambda b: {b}, lambda b: b, lambda b: np.int64(b), lambda b: torch.tensor([b])],
    ids=["set", "int", "numpy", "tensor"],
)
@pytest.mark.parametrize("block", [0, 3])
def test_a_failed_block_0_counts_whatever_it_is_returned_in(make, block):
    """Block 0 alone (falsy as an int, a numpy integer or a one-element tensor) used to be
    dropped: a failed load went unreported and its blocks were used as if loaded."""

    class Failing(ScriptedWorker):
        def get_block_ids_with_load_errors(self):
            return make(block)

    coord = Coordinator(LocalCommunicator(), Failing(0), timeout_s=5, num_blocks=16)
    plan = coord.publish_plan(scripted_plan(1, loading=["L"]))
    assert coord.exchange_reports(plan).failed_blocks == {block}


def test_failed_blocks_as_a_tensor_of_several_are_read():
    class Failing(ScriptedWorker):
        def get_block_ids_with_load_errors(self):
            return torch.tensor([5, 0, 2])

    coord = Coordinator(LocalCommunicator(), Failing(0), timeout_s=5, num_blocks=16)
    assert coord.exchange_reports(coord.publish_plan(scripted_plan(1))).failed_blocks == {0, 2, 5}


@pytest.mark.parametrize("step", [np.int64(1), 2**64], ids=["numpy", "huge"])
def test_a_step_that_does_not_encode_fails_every_rank_together(step):
    """The error plan used to copy the step that failed to encode, failed again, and
    rank 0 raised alone while the others waited out the deadline."""

    def body(comm):
        coord = Coordinator(comm, ScriptedWorker(comm.rank), timeout_s=5)
        plan = Plan(step=step, scheduler_output=SchedulerOutput(step=1))
        return _error_of(
            lambda: coord.exchange_reports(coord.publish_plan(plan if comm.rank == 0 else None))
        )

    for got in run_threads(2, body):
        assert got["type"] == "RemoteError", got
        assert "rank 0 failed in step 1" in got["error"], got


@pytest.mark.parametrize(
    "second, names",
    [
        ({"loading": ["L"]}, r"starts an async load of request\(s\) \['L'\] \(loading_req_ids\)"),
        ({"loading": ["M", "M"]}, r"names request\(s\) \['M'\] twice in loading_req_ids"),
        ({"finished": ["S"], "saving": ["S", "S"]}, r"\['S'\] twice in saving_req_ids"),
    ],
)
def test_a_transfer_started_twice_fails_every_rank_before_the_broadcast(second, names):
    """A load started again while in flight, or one id twice in a step's list: rank 0's
    plan checks refuse it, every rank raises it, and the coordinator stays stopped. It
    used to be broadcast, raise from each rank's tracker, and leave the step open, so that
    the next call named the wrong problem."""

    def body(comm):
        coord = Coordinator(comm, ScriptedWorker(comm.rank), timeout_s=10)
        coord.exchange_reports(
            coord.publish_plan(scripted_plan(1, loading=["L"]) if comm.rank == 0 else None)
        )
        plan = scripted_plan(2, **second) if comm.rank == 0 else None
        first = _error_of(lambda: coord.exchange_reports(coord.publish_plan(plan)))
        after = _error_of(lambda: coord.publish_plan(scripted_plan(3) if comm.rank == 0 else None))
        return first, after

    for first, after in run_threads(2, body):
        assert first["type"] == "RemoteError" and "rank 0 failed in step 2" in first["error"]
        assert re.search(names, first["error"]), first
        assert "this coordinator stopped at step 2" in after["error"], after


def test_a_rank_that_failed_before_it_knew_the_step_is_not_said_to_be_in_step_minus_1():
    assert str(RemoteError(1, -1, "cannot decode plan: x")) == (
        "rank 1 failed reading a plan: cannot decode plan: x"
    )
    assert str(RemoteError(0, 3, "y")) == "rank 0 failed in step 3: y"


def test_an_error_text_with_undecodable_bytes_reaches_every_rank() -> None:
    """A hook failing on one rank with a message naming a path of undecodable bytes (held
    as surrogates, which msgpack refuses): every rank raises with that message, escaped.
    Before, the report carried only the encoding error in its place."""

    class Fails(ScriptedWorker):
        def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
            if self.rank == 1:
                raise ValueError("cannot read /cache/\udcff")
            return super().get_finished(finished_gen_req_ids, started_loading_req_ids)

    def body(comm):
        coord = Coordinator(comm, Fails(comm.rank), timeout_s=10)
        plan = coord.publish_plan(scripted_plan(1) if comm.rank == 0 else None)
        return _error_of(lambda: coord.exchange_reports(plan))

    here, there = run_threads(2, body)[::-1]  # rank 1, which had it; rank 0
    assert here["type"] == there["type"] == "RemoteError", (here, there)
    assert "raised ValueError: cannot read /cache/\udcff" in here["error"], here
    assert "raised ValueError: cannot read /cache/\\udcff" in there["error"], there
