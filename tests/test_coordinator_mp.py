"""The coordinator scenarios of tests/coordination_scenarios.py with real ranks: under
mpiexec at 2 and 4 ranks and under torchrun at 2, checked on every rank's observations."""

from __future__ import annotations

import pytest
from coordination_scenarios import SCENARIOS, check
from mp.jobs import REPO, launch, run_job, scenario_env

pytestmark = pytest.mark.multirank
WORKER = str(REPO / "tests" / "mp" / "coordinator_worker.py")


@pytest.mark.parametrize("launcher,n", [("mpiexec", 2), ("mpiexec", 4), ("torchrun", 2)])
def test_coordinator_scenarios(launcher: str, n: int) -> None:
    """A failure names the scenario and the protocol rule it broke (see check())."""
    job = run_job(launch(n, WORKER, launcher=launcher), scenario_env())
    assert job.returncode == 0, job.output[-5000:]
    results = job.gathered()
    for name in SCENARIOS:
        check(name, results[name])
