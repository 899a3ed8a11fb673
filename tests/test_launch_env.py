"""Launch-environment detection from fake environments: every launcher, the nesting order,
kvdist's own settings, and a ValueError naming the variable for every malformed value."""

from __future__ import annotations

import pytest

from kvdist.comm.launch_env import DEFAULT_TIMEOUT_S, default_comm_kind, read_launch_env

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
    """A failure means an older Hydra (no MPI_LOCAL* variables) cannot be used at all."""
    env = read_launch_env({"PMI_RANK": "1", "PMI_SIZE": "3"})
    assert (env.local_rank, env.local_world_size) == (1, 3)


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
    (MPICH | {"MPI_LOCALNRANKS": "3"}, "MPI_LOCALNRANKS='3' exceeds the world size 2"),
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
    (SLURM | {"SLURM_PROCID": "6"}, "SLURM_PROCID='6' must be below SLURM_NTASKS='6'"),
    (SLURM | {"SLURM_TASKS_PER_NODE": "2(3)"}, "SLURM_TASKS_PER_NODE='2(3)' is malformed"),
    (SLURM | {"SLURM_NODEID": "3"}, "SLURM_NODEID='3' is out of range"),
    (SLURM | {"SLURM_LOCALID": "3"}, "SLURM_LOCALID='3' must be below SLURM_TASKS_PER_NODE"),
    ({"KVDIST_COMM": "nccl"}, "KVDIST_COMM='nccl' is not one of mpi, torch, local"),
    ({"KVDIST_TIMEOUT_S": "soon"}, "KVDIST_TIMEOUT_S='soon' is not a number"),
    ({"KVDIST_TIMEOUT_S": "0"}, "KVDIST_TIMEOUT_S='0' must be a positive"),
    ({"KVDIST_TIMEOUT_S": "-3"}, "KVDIST_TIMEOUT_S='-3' must be a positive"),
    ({"KVDIST_TIMEOUT_S": "inf"}, "KVDIST_TIMEOUT_S='inf' must be a positive, finite"),
    ({"KVDIST_TIMEOUT_S": "nan"}, "KVDIST_TIMEOUT_S='nan' must be a positive, finite"),
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
