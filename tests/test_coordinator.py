"""The step protocol with ranks as threads (fast); tests/test_coordinator_mp.py runs the
same scenarios under mpiexec and torchrun."""

from __future__ import annotations

import threading

import pytest
from coordination_scenarios import SCENARIOS, check

from kvdist.comm.inprocess import InProcessGroup
from kvdist.comm.local import LocalCommunicator


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
