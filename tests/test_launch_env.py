"""Launch-environment detection from fake environments: every launcher, the nesting order,
kvdist's own settings, and a ValueError naming the variable for every malformed value; then
what init_distributed makes of launch variables left over in a plain shell."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time

import pytest
from mp.jobs import free_port, job_env, run_job

from kvdist.comm import init_distributed
from kvdist.comm.launch_env import (
    DEFAULT_TIMEOUT_S,
    MAX_TIMEOUT_S,
    MIN_TIMEOUT_S,
    LaunchEnv,
    default_comm_kind,
    read_launch_env,
)

OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
TORCHRUN = {
    "RANK": "2",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29511",
    "TORCHELASTIC_RUN_ID": "abc",
}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "6",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_TASKS_PER_NODE": "2(x2),3",
}


def test_plain_process():
    """A failure means a plain `python` run would not be treated as world size 1."""
    env = read_launch_env({})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        "none",
        0,
        1,
        0,
        1,
    )
    assert env.timeout_s == DEFAULT_TIMEOUT_S and env.comm_override is None
    assert default_comm_kind(env) == "local"


def test_a_pmix_launch_without_rank_variables_is_refused():
    """PMIX_RANK alone (PRRTE's prterun): no world size to read. Taken for one process,
    every rank ran alone as rank 0 of 1; it must be a ValueError naming the variables.
    With Open MPI's or Slurm's variables beside it, those are read as ever."""
    with pytest.raises(ValueError, match=r"PMIX_RANK=1 is set, but none of OMPI_COMM_WORLD_RANK"):
        read_launch_env({"PMIX_RANK": "1"})
    assert read_launch_env(OPENMPI | {"PMIX_RANK": "1"}).launcher == "openmpi"
    assert read_launch_env(SLURM | {"PMIX_RANK": "0"}).launcher == "slurm"


def test_openmpi():
    """A failure means ranks started by Open MPI's mpirun get wrong ranks or devices."""
    env = read_launch_env(OPENMPI | {"MASTER_PORT": "1234"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        "openmpi",
        3,
        4,
        1,
        2,
    )
    # Under mpiexec a leftover MASTER_PORT is ignored: rank 0 picks a free port.
    assert env.master_addr is None and env.master_port is None
    assert default_comm_kind(env) == "mpi"


def test_mpich_hydra():
    """A failure means ranks started by MPICH's mpiexec (the pip `mpich` wheel) are misread;
    these are the variables `mpiexec -n 2 env` shows with MPICH 5."""
    env = read_launch_env(MPICH)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        "mpich",
        1,
        2,
        1,
        2,
    )
    assert default_comm_kind(env) == "mpi"


def test_mpich_without_local_variables_assumes_one_node():
    """A failure means an older Hydra (no MPI_LOCAL* variables) cannot be used at all, or
    that init_distributed is not told to ask MPI for the node (local_source None)."""
    env = read_launch_env({"PMI_RANK": "1", "PMI_SIZE": "3"})
    assert (env.local_rank, env.local_world_size, env.local_source) == (1, 3, None)


# What `srun -N 2 -n 8 --mpi=pmi2` gives global rank 5 (node 1, local 1): Slurm's pmi2
# plugin sets PMI_RANK/PMI_SIZE but no MPI_LOCAL*; srun sets its SLURM_* variables.
SRUN_PMI2 = {
    "PMI_RANK": "5",
    "PMI_SIZE": "8",
    "PMI_FD": "9",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "4(x2)",
}


def test_srun_pmi2_takes_the_node_from_slurm_variables():
    """Under srun --mpi=pmi2 the local rank and size come from SLURM_LOCALID and this
    node's count in SLURM_TASKS_PER_NODE. A failure means rank 5 of a 2-node job takes
    itself for local rank 5 of 8 on one node: the wrong CUDA device (or none)."""
    env = read_launch_env(SRUN_PMI2)
    assert (env.launcher, env.rank, env.world_size) == ("mpich", 5, 8)
    assert (env.local_rank, env.local_world_size) == (1, 4)
    assert env.local_source == "SLURM_LOCALID/SLURM_TASKS_PER_NODE"


def test_slurm_variables_of_another_task_are_not_used_for_mpi_ranks():
    """mpiexec (an older Hydra, no MPI_LOCAL*) inside an sbatch script: the SLURM_*
    variables describe the batch step, not this rank. A failure means every rank takes
    the batch step's local rank 0 (all on one CUDA device) instead of asking MPI."""
    batch_step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    env = read_launch_env({"PMI_RANK": "3", "PMI_SIZE": "4"} | batch_step)
    assert (env.local_rank, env.local_world_size, env.local_source) == (3, 4, None)
    # A launcher's own pair wins over srun's.
    env = read_launch_env(SRUN_PMI2 | {"MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"})
    assert (env.local_rank, env.local_world_size) == (2, 3)
    assert env.local_source == "MPI_LOCALRANKID/MPI_LOCALNRANKS"


def test_local_source_and_agent_per_launcher():
    """A failure means init_distributed cannot tell launcher-given local ranks from assumed
    ones, or a torchrun agent from bare RANK/WORLD_SIZE leftovers."""
    sources = {
        "openmpi": read_launch_env(OPENMPI).local_source,
        "torchrun": read_launch_env(TORCHRUN).local_source,
        "slurm": read_launch_env(SLURM).local_source,
        "bare": read_launch_env({"RANK": "0", "WORLD_SIZE": "2"}).local_source,
    }
    assert sources == {
        "openmpi": "OMPI_COMM_WORLD_LOCAL_RANK/OMPI_COMM_WORLD_LOCAL_SIZE",
        "torchrun": "LOCAL_RANK/LOCAL_WORLD_SIZE",
        "slurm": "SLURM_LOCALID/SLURM_TASKS_PER_NODE",
        "bare": None,
    }
    assert read_launch_env(TORCHRUN).elastic
    assert not read_launch_env({"RANK": "0", "WORLD_SIZE": "2"}).elastic
    assert read_launch_env(MPICH).rank_variables == ("PMI_RANK", "PMI_SIZE")
    assert read_launch_env({}).rank_variables is None


def test_torchrun():
    """A failure means torchrun workers get wrong ranks or cannot find rank 0's store."""
    env = read_launch_env(TORCHRUN)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        "torchrun",
        2,
        4,
        0,
        2,
    )
    assert (env.master_addr, env.master_port) == ("node0", 29511)
    assert default_comm_kind(env) == "torch"


def test_bare_env_style_launch_is_torchrun():
    """A failure means a hand-rolled RANK/WORLD_SIZE launch is treated as one process."""
    env = read_launch_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        "torchrun",
        1,
        2,
        1,
        2,
    )


def test_slurm_tasks_per_node():
    """A failure means srun tasks on uneven nodes ("2(x2),3") get the wrong local size."""
    env = read_launch_env(SLURM)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        "slurm",
        5,
        6,
        1,
        3,
    )
    env = read_launch_env(
        {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
        | {"SLURM_NTASKS_PER_NODE": "2"}
    )
    assert env.local_world_size == 2


def test_slurm_comm_kind_follows_mpi4py(monkeypatch):
    """A failure means srun jobs pick MPI without mpi4py (or torch despite having it)."""
    import importlib.util

    env = read_launch_env(SLURM)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mpi4py" else real(name, *a)
    )
    assert default_comm_kind(env) == "torch"
    monkeypatch.undo()
    assert default_comm_kind(env) == ("mpi" if real("mpi4py") else "torch")


def test_nesting_order():
    """torchrun inside srun/mpiexec: the workers inherit the agent's SLURM/PMI variables,
    which describe the agent; torchrun's must win. A failure means every worker of a
    torchrun-in-srun job thinks it is the same rank."""
    assert read_launch_env(SLURM | TORCHRUN).launcher == "torchrun"
    assert read_launch_env(MPICH | TORCHRUN).launcher == "torchrun"
    assert read_launch_env(SLURM | MPICH).launcher == "mpich"
    assert read_launch_env(OPENMPI | MPICH).launcher == "openmpi"


def test_kvdist_settings():
    """A failure means KVDIST_COMM / KVDIST_TIMEOUT_S / KVDIST_MASTER_ADDR are ignored."""
    env = read_launch_env(
        MPICH
        | {"KVDIST_COMM": "Torch", "KVDIST_TIMEOUT_S": "2.5", "KVDIST_MASTER_ADDR": "10.0.0.1"}
    )
    assert (env.comm_override, env.timeout_s, env.master_addr) == ("torch", 2.5, "10.0.0.1")
    assert default_comm_kind(env) == "torch"
    assert read_launch_env(TORCHRUN | {"KVDIST_MASTER_ADDR": "10.0.0.2"}).master_addr == "10.0.0.2"
    assert read_launch_env({"KVDIST_COMM": ""}).comm_override is None
    assert [read_launch_env({"KVDIST_SHM": v}).shm for v in ("1", "off", "", "Yes")] == [
        True,
        False,
        None,
        True,
    ]


MALFORMED = [
    (MPICH | {"PMI_RANK": "one"}, "PMI_RANK='one' is not an integer"),
    (MPICH | {"PMI_RANK": "2"}, "PMI_RANK='2' must be below PMI_SIZE='2'"),
    (MPICH | {"PMI_RANK": "-1"}, "PMI_RANK='-1' must be >= 0"),
    (MPICH | {"PMI_SIZE": "0"}, "PMI_SIZE='0' must be >= 1"),
    (MPICH | {"MPI_LOCALRANKID": "2"}, "MPI_LOCALRANKID='2' must be below MPI_LOCALNRANKS='2'"),
    (
        MPICH | {"MPI_LOCALNRANKS": "3"},
        "MPI_LOCALNRANKS='3' gives this node 3 ranks, more than the world size PMI_SIZE='2'",
    ),
    ({"PMI_RANK": "0"}, "PMI_SIZE is not set"),
    (OPENMPI | {"OMPI_COMM_WORLD_SIZE": "x"}, "OMPI_COMM_WORLD_SIZE='x' is not an integer"),
    (OPENMPI | {"OMPI_COMM_WORLD_RANK": "4"}, "OMPI_COMM_WORLD_RANK='4' must be below"),
    (OPENMPI | {"OMPI_COMM_WORLD_LOCAL_RANK": "2.0"}, "OMPI_COMM_WORLD_LOCAL_RANK='2.0'"),
    (TORCHRUN | {"RANK": "4"}, "RANK='4' must be below WORLD_SIZE='4'"),
    (TORCHRUN | {"WORLD_SIZE": ""}, "WORLD_SIZE is not set"),
    (TORCHRUN | {"LOCAL_WORLD_SIZE": "two"}, "LOCAL_WORLD_SIZE='two' is not an integer"),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, "LOCAL_RANK is not set"),
    (TORCHRUN | {"MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    (TORCHRUN | {"MASTER_PORT": "70000"}, "MASTER_PORT='70000' is not a TCP port"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    # Half a pair (a leftover in a shell, a container's ENV): which one, and what to do.
    (
        {"WORLD_SIZE": "1"},
        "WORLD_SIZE='1' is set but RANK is not set: a launch by RANK and WORLD_SIZE needs "
        "both on every rank; unset WORLD_SIZE to run one process",
    ),
    ({"RANK": "3", "WORLD_SIZE": " "}, "RANK='3' is set but WORLD_SIZE is not set"),
    (SLURM | {"SLURM_PROCID": "6"}, "SLURM_PROCID='6' must be below SLURM_NTASKS='6'"),
    (SLURM | {"SLURM_TASKS_PER_NODE": "2(3)"}, "SLURM_TASKS_PER_NODE='2(3)' is malformed"),
    (SLURM | {"SLURM_NODEID": "3"}, "SLURM_NODEID='3' is out of range"),
    (
        SLURM | {"SLURM_LOCALID": "3"},
        "SLURM_LOCALID='3' must be below 3, the count of node SLURM_NODEID='2' in "
        "SLURM_TASKS_PER_NODE='2(x2),3'",
    ),
    (
        SRUN_PMI2 | {"SLURM_LOCALID": "4"},
        "SLURM_LOCALID='4' must be below 4, the count of node SLURM_NODEID='1'",
    ),
    (
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "5"},
        "SLURM_LOCALID='5' must be below 2, the world size SLURM_NTASKS='2', as neither "
        "SLURM_TASKS_PER_NODE nor SLURM_NTASKS_PER_NODE is set",
    ),
    (
        {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3"},
        "LOCAL_RANK='3' must be below 2, the world size WORLD_SIZE='2', as LOCAL_WORLD_SIZE "
        "is not set",
    ),
    ({"KVDIST_COMM": "nccl"}, "KVDIST_COMM='nccl' is not one of mpi, torch, local"),
    (
        {"KVDIST_TIMEOUT_S": "soon"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got 'soon'",
    ),
    (
        {"KVDIST_TIMEOUT_S": "0"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got '0'",
    ),
    (
        {"KVDIST_TIMEOUT_S": "-3"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got '-3'",
    ),
    (
        {"KVDIST_TIMEOUT_S": "inf"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got 'inf'",
    ),
    (
        {"KVDIST_TIMEOUT_S": "nan"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got 'nan'",
    ),
    (
        {"KVDIST_TIMEOUT_S": "1e10"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got '1e10'",
    ),
    (
        {"KVDIST_TIMEOUT_S": "1e14"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got '1e14'",
    ),
    # Below a millisecond: torch's deadlines would round to 0 ("at once", or "never").
    (
        {"KVDIST_TIMEOUT_S": "1e-9"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got '1e-9'",
    ),
    (
        {"KVDIST_TIMEOUT_S": "0.0009"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got '0.0009'",
    ),
    (
        {"KVDIST_TIMEOUT_S": "1000001"},
        "KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], got '1000001'",
    ),
    ({"KVDIST_SHM": "sometimes"}, "KVDIST_SHM='sometimes' is not a boolean"),
]


@pytest.mark.parametrize("environ,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_values_name_the_variable(environ, message):
    """A failure means a typo in a launch variable surfaces as a hang or a wrong rank
    instead of an error naming the variable and its value."""
    with pytest.raises(ValueError) as err:
        read_launch_env(environ)
    assert message in str(err.value)


def test_reads_os_environ_by_default(monkeypatch):
    """A failure means read_launch_env() ignores the real process environment."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("KVDIST_TIMEOUT_S", "7")
    env = read_launch_env()
    assert (env.launcher, env.world_size, env.timeout_s) == ("torchrun", 3, 7.0)


def test_a_bound_that_is_not_set_is_not_quoted_as_set():
    """The audit's case: SLURM_LOCALID=5 with SLURM_NTASKS_PER_NODE unset was reported as
    "must be below SLURM_NTASKS_PER_NODE=2", sending the user after a variable that is
    not there. A failure means a message quotes a variable the environment lacks."""
    with pytest.raises(ValueError) as err:
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "5"})
    assert "SLURM_NTASKS_PER_NODE=" not in str(err.value)
    assert "SLURM_NTASKS='2'" in str(err.value)


def test_the_largest_and_smallest_timeouts_are_accepted():
    """The maximum and the minimum themselves are allowed (the checks are not off by one,
    and not vacuous: the MALFORMED cases above are refused). A failure means a documented
    value is refused."""
    assert (MIN_TIMEOUT_S, MAX_TIMEOUT_S) == (1e-3, 1e6)
    assert read_launch_env({"KVDIST_TIMEOUT_S": "1e6"}).timeout_s == MAX_TIMEOUT_S
    assert read_launch_env({"KVDIST_TIMEOUT_S": "0.001"}).timeout_s == MIN_TIMEOUT_S


def test_init_distributed_refuses_a_timeout_set_in_code_above_the_maximum():
    """A LaunchEnv replaced in code (the engine's timeout_s) skips read_launch_env's check.
    A failure means a huge deadline reaches torch's store and gloo, which overflow."""
    env = dataclasses.replace(read_launch_env({"RANK": "0", "WORLD_SIZE": "2"}), timeout_s=1e10)
    with pytest.raises(
        ValueError,
        match=r"timeout_s \(KVDIST_TIMEOUT_S, or an engine's timeout_s\) must be a number of seconds in \[0.001, 1e\+06\]",
    ):
        init_distributed(env=env, device="cpu")


# --- launch variables left over in a plain shell ------------------------------------------

BARE = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "KVDIST_TIMEOUT_S": "1"}


@pytest.mark.parametrize("rank", ["0", "1"])
def test_leftover_rank_variables_announce_the_wait_and_name_themselves(rank, capsys):
    """RANK/WORLD_SIZE/MASTER_* left in a shell, no other rank anywhere: before waiting,
    the rank says on stderr what it waits for and why; when the deadline passes it raises
    a TimeoutError naming the variables and the address, not torch's bare store error.
    Rank 0 hosts the store (it waits for clients), rank 1 connects to nothing. A failure
    means a plain `python` in such a shell hangs for 300 s without a word and then shows
    a traceback that names nothing to unset."""
    port = free_port()
    env = read_launch_env(BARE | {"RANK": rank, "MASTER_PORT": str(port)})
    start = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        init_distributed(env=env, device="cpu")
    assert time.monotonic() - start < 30
    where = f"127.0.0.1:{port}"
    said = capsys.readouterr().err
    assert (
        f"kvdist: rank {rank} waiting for 2 ranks at {where} (RANK/WORLD_SIZE from the "
        "environment, no launcher agent found; unset them to run one process)"
    ) in said
    message = str(err.value)
    assert f"rendezvous at {where}" in message and "within 1s" in message
    assert f"RANK={rank}, WORLD_SIZE=2, MASTER_ADDR and MASTER_PORT came from the" in message
    assert "unset them to run one process" in message


def test_a_torchrun_agent_is_not_announced(capsys):
    """Under torchrun (TORCHELASTIC_RUN_ID) the agent started every rank: no notice, and a
    failed rendezvous does not call the variables leftovers. A failure means every
    torchrun job prints a warning per rank (the notice above is not unconditional)."""
    agent = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    env = read_launch_env(BARE | agent | {"RANK": "1", "MASTER_PORT": str(free_port())})
    with pytest.raises(TimeoutError) as err:
        init_distributed(env=env, device="cpu")
    assert "waiting for" not in capsys.readouterr().err
    assert "torchrun started this rank" in str(err.value)
    assert "leftovers" not in str(err.value)


def test_a_timeout_below_a_millisecond_is_a_usage_error_of_the_command():
    """`KVDIST_TIMEOUT_S=1e-9 kvdist env`: one line naming the setting, exit code 2. A
    failure means the value is taken (torch then rounds the deadlines to 0 ms: its store
    fails at once with a traceback in a job of several ranks, its process groups read it
    as no deadline)."""
    cmd = [sys.executable, "-m", "kvdist.cli.main", "env"]
    job = run_job(cmd, job_env(KVDIST_TIMEOUT_S="1e-9"), 60)
    assert job.returncode == 2, job.output[-4000:]
    assert job.output.strip() == (
        "kvdist env: error: KVDIST_TIMEOUT_S must be a number of seconds in [0.001, 1e+06], "
        "got '1e-9'"
    ), job.output[-4000:]


def test_ranks_that_do_not_meet_in_torchruns_store_fail_in_one_line(monkeypatch):
    """Under torchrun the rendezvous is a connect to the agent's store, which is up at
    once: the ranks first wait for one another in the process group's start. Rank 0 of 2
    alone, with the agent's store (hosted here) and KVDIST_TIMEOUT_S=1: a TimeoutError
    in one line (`one_line`) naming the group and KVDIST_TIMEOUT_S, as a failed
    rendezvous is. A failure means torch's DistStoreError or gloo's RuntimeError went out
    as a traceback (it did for any KVDIST_TIMEOUT_S too short for the ranks to start, and
    for a rank slower to start than the deadline)."""
    import torch.distributed as dist

    agent = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    agent_env = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    env = read_launch_env(BARE | agent_env | {"RANK": "0", "MASTER_PORT": str(agent.port)})
    start = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        init_distributed(env=env, device="cpu")
    assert time.monotonic() - start < 30
    assert not dist.is_initialized()
    message = str(err.value)
    assert getattr(err.value, "one_line", False), message
    assert message.startswith(
        "rank 0 of 2: the ranks did not all start the tensor-parallel group (gloo) within 1s ("
    ), message
    assert message.endswith("(KVDIST_TIMEOUT_S sets how long to wait)"), message


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py")
def test_slurm_variables_in_a_plain_process_say_it_was_not_started_by_srun():
    """A plain `python` in an sbatch script inherits SLURM_PROCID/SLURM_NTASKS, and MPI
    then has a world of one: `kvdist env` must end at once with one line (exit 2) saying
    the process was not started by srun and what to do. A failure means the user is told
    mpi4py is linked against a different MPI, or gets a traceback."""
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    job = run_job([sys.executable, "-m", "kvdist.cli.main", "env"], job_env(**slurm), 60)
    assert job.returncode == 2, job.output[-4000:]
    assert "Traceback" not in job.output, job.output[-4000:]
    assert "MPI.COMM_WORLD has rank 0 of 1: this process was not started by srun" in job.output
    for advice in ("srun --mpi=pmi2", "unset SLURM_PROCID and SLURM_NTASKS", "KVDIST_COMM=torch"):
        assert advice in job.output, advice
    assert "different MPI" not in job.output


@pytest.mark.parametrize(
    ("gpus", "local_ranks", "visible", "want"),
    [
        (2, 2, None, ["cuda:0", "cuda:1"]),
        (1, 1, None, ["cuda:0"]),
        (1, 2, "3", ["cuda:0", "cuda:0"]),  # a launcher bound one GPU to each rank
        (1, 2, None, "2 ranks on this node, but 1 CUDA device"),
        (1, 2, "", "2 ranks on this node, but 1 CUDA device"),
        (2, 4, None, "4 ranks on this node, but 2 CUDA device"),
        (2, 4, "0,1", "4 ranks on this node, but 2 CUDA device"),
    ],
)
def test_the_device_picked_for_each_local_rank(monkeypatch, gpus, local_ranks, visible, want):
    """device=None on a CUDA machine: each local rank its own GPU. More ranks on a node
    than GPUs (unless each rank sees one GPU of its own, under a CUDA_VISIBLE_DEVICES) is
    an error on every rank alike, naming both counts and device='cpu'; before, the ranks
    past the GPUs shared one and NCCL failed with a traceback after the rendezvous, or
    only those ranks failed while the others waited."""
    import torch

    from kvdist.comm import setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    got = []
    for local in range(local_ranks):
        env = LaunchEnv(
            launcher="openmpi", rank=local, world_size=local_ranks, local_rank=local,
            local_world_size=local_ranks,
        )  # fmt: skip
        try:
            got.append(str(setup._pick_device(env, None)))
        except ValueError as exc:
            got.append(str(exc))
    if isinstance(want, list):
        assert got == want
    else:
        assert all(want in g and "device='cpu'" in g for g in got), got
