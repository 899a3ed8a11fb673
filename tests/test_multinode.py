"""Multi-node launches run live, two "nodes" emulated on this host: one launcher process
per node, each with one local rank, meeting over TCP on 127.0.0.1 as they would between
hosts, with the shared-memory fast path off (`KVDIST_SHM=0`) since nodes share no memory.
The demo then runs at TP 2 across the two nodes: node 1 holds global rank 1 at local
rank 0, the disk cache directory chosen by rank 0 is used by both.

Launches whose nodes only MPI can tell apart (srun --mpi=pmi2 sets no MPI_LOCAL*) run
under one mpiexec through tests/mp/fake_node.py: each rank reports a fake host name, and
MPICH's MPIR_CVAR_NUM_CLIQUES splits MPI's node-local groups to match."""

from __future__ import annotations

import json
import sys

import pytest
from mp.jobs import REPO, free_port, job_env, mpiexec, mpiexec_flavour, run_job, run_jobs

TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")
FAKE_NODE = str(REPO / "tests" / "mp" / "fake_node.py")
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


def fake_nodes(n: int, nodes: int, *args: str, mpi_nodes: bool = True, **env: str):
    """`kvdist ARGS` on `n` ranks of one mpiexec, round robin over `nodes` fake hosts, with
    no MPI_LOCAL* variables (as under srun --mpi=pmi2) and the shm fast path off; MPI's
    node-local groups match the hosts when `mpi_nodes`, else MPI sees one node."""
    if mpiexec_flavour() != "mpich":
        pytest.skip("needs MPICH's mpiexec (MPIR_CVAR_NUM_CLIQUES fakes its nodes)")
    extra = dict(FAKE_NODES=str(nodes), FAKE_DROP_LOCAL="1", **env)
    if mpi_nodes:
        extra["MPIR_CVAR_NUM_CLIQUES"] = str(nodes)
    return run_job(mpiexec(n, FAKE_NODE, *args), job_env(KVDIST_SHM="0", **extra))


def test_mpi_without_local_variables_takes_local_ranks_from_mpi() -> None:
    """Four ranks on two (fake) nodes whose launcher set no local variables: each rank's
    local rank and size come from MPI's node-local group, so ranks 0 and 2 are local 0
    and 1 of 2 on one node, 1 and 3 on the other. A failure means each rank takes its
    global rank as its local one (rank 2 would pick cuda:2 on a node of two GPUs)."""
    job = fake_nodes(4, 2, "env", "--json", KVDIST_MASTER_ADDR="127.0.0.1")
    assert job.returncode == 0, job.output[-4000:]
    ranks = [json.loads(line) for line in job.output.splitlines() if line.startswith("{")]
    got = [(r["rank"], r["host"], r["local_rank"], r["local_world_size"]) for r in ranks]
    assert got == [
        (0, "fakenode0", 0, 2),
        (1, "fakenode1", 0, 2),
        (2, "fakenode0", 1, 2),
        (3, "fakenode1", 1, 2),
    ]


def test_ranks_on_other_hosts_are_never_sent_to_loopback() -> None:
    """Two ranks on two (fake) hosts that MPI takes for one node, with no local variables:
    local sizes would say one node; rank 0 must go by the gathered host identities and
    publish its host's address, not 127.0.0.1. Here that name resolves to 127.0.1.1 (a
    Debian /etc/hosts line), so every rank must stop with one line naming it and
    KVDIST_MASTER_ADDR (exit 2, no traceback). A failure means rank 0 published loopback
    (the job, all on this real host, succeeds; on real nodes the other ranks would dial
    their own loopback), or the error came as a traceback."""
    job = fake_nodes(2, 2, "env", mpi_nodes=False, FAKE_IP="127.0.1.1")
    assert job.returncode == 2, job.output[-4000:]
    assert "Traceback" not in job.output, job.output[-4000:]
    assert (
        "kvdist env: error: rank 0's host name 'fakenode0' resolves to the loopback address "
        "127.0.1.1, which ranks on other hosts cannot reach; set KVDIST_MASTER_ADDR"
    ) in job.output, job.output[-4000:]
