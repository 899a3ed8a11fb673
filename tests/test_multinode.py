"""Multi-node launches run live, two "nodes" emulated on this host: one launcher process
per node, each with one local rank, meeting over TCP on 127.0.0.1 as they would between
hosts, with the shared-memory fast path off (`KVDIST_SHM=0`) since nodes share no memory.
The demo then runs at TP 2 across the two nodes: node 1 holds global rank 1 at local
rank 0, the disk cache directory chosen by rank 0 is used by both."""

from __future__ import annotations

import json
import sys

import pytest
from mp.jobs import REPO, free_port, job_env, run_jobs

TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")
DEMO = ["demo", "--prompts", "4", "--prefix-len", "96", "--suffix-len", "8", "--max-tokens", "4"]

pytestmark = pytest.mark.multirank


def two_nodes(cmd: list[str], node_env, timeout_s: float = 300):
    """Run `cmd` once per node with `node_env(node)` added to the job environment."""
    jobs = [(cmd, job_env(KVDIST_SHM="0", **node_env(node))) for node in range(2)]
    results = run_jobs(jobs, timeout_s)
    for node, job in enumerate(results):
        assert job.returncode == 0, f"node {node}:\n{job.output[-4000:]}"
    return results


def test_torchrun_on_two_nodes() -> None:
    """`NNODES=2 NODE_RANK=i MASTER_ADDR MASTER_PORT launch/torchrun.sh` on each node (the
    README's multi-node line): every rank sees the right global and local rank, and the
    demo's outputs are identical across its two runs. A failure means the static
    rendezvous, the launch-environment reading or a cross-node path is broken."""
    port = str(free_port())

    def env(node: int) -> dict[str, str]:
        return dict(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)

    node0, _ = two_nodes([TORCHRUN_SH, "-n", "1", "kvdist", "env", "--json"], env)
    ranks = [json.loads(line) for line in node0.output.splitlines() if line.startswith("{")]
    assert [(r["rank"], r["world_size"], r["local_rank"]) for r in ranks] == [
        (0, 2, 0),
        (1, 2, 0),
    ]
    assert {(r["launcher"], r["transport"], r["local_world_size"]) for r in ranks} == {
        ("torchrun", "torch", 1)
    }

    port = str(free_port())
    node0, _ = two_nodes([TORCHRUN_SH, "-n", "1", "kvdist", *DEMO], env)
    assert "kvdist demo: 2 rank(s)" in node0.output
    assert "outputs identical: True" in node0.output


def test_slurm_tasks_on_two_nodes() -> None:
    """Two tasks as `srun -N 2 -n 2` starts them (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
    SLURM_NODEID, SLURM_TASKS_PER_NODE), with MASTER_ADDR/MASTER_PORT from the job script
    and the torch control plane (under a real srun with mpi4py, MPI would carry it): the
    demo runs at TP 2 and its outputs are identical."""
    port = str(free_port())

    def env(node: int) -> dict[str, str]:
        return dict(
            SLURM_PROCID=str(node),
            SLURM_NTASKS="2",
            SLURM_LOCALID="0",
            SLURM_NODEID=str(node),
            SLURM_TASKS_PER_NODE="1(x2)",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            KVDIST_COMM="torch",
        )

    node0, _ = two_nodes([sys.executable, "-m", "kvdist.cli.main", *DEMO], env)
    assert "kvdist demo: 2 rank(s)" in node0.output
    assert "outputs identical: True" in node0.output
