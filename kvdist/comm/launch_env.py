"""What the launcher told this process: the one place kvdist reads launch variables.

`read_launch_env()` returns a frozen `LaunchEnv`; everything else receives it (or the
`Topology` built from it) instead of looking at `os.environ`. Detection order matters
because launchers nest:

1. torchrun (`TORCHELASTIC_RUN_ID`): its workers inherit the SLURM/MPI variables of the
   agent that started them, which describe the agent, not the worker.
2. Open MPI (`OMPI_COMM_WORLD_*`).
3. MPICH / Hydra (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, `MPI_LOCALNRANKS`).
4. SLURM srun (`SLURM_PROCID`, `SLURM_NTASKS`, ...).
5. A bare `RANK` / `WORLD_SIZE` pair (env:// style, no elastic agent): reported as torchrun.
6. Otherwise one plain process.

kvdist's own settings: `KVDIST_COMM` (mpi | torch | local) overrides the communicator,
`KVDIST_TIMEOUT_S` is the control-plane deadline, `KVDIST_MASTER_ADDR` overrides the
address other ranks use to reach rank 0 for torch.distributed, `KVDIST_SHM` (1 | 0)
forces or turns off the shared-memory control plane for ranks on one host.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Launcher = Literal["mpich", "openmpi", "torchrun", "slurm", "none"]
CommKind = Literal["mpi", "torch", "local"]
COMM_KINDS: tuple[str, ...] = ("mpi", "torch", "local")
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    """The launch environment of this process, validated."""

    launcher: Launcher
    """Which launcher started this process ("none": a plain process, world size 1)."""
    rank: int
    """This process's rank in the job, 0 <= rank < world_size."""
    world_size: int
    """Number of ranks in the job."""
    local_rank: int
    """This process's rank among the ranks on its node (selects the CUDA device)."""
    local_world_size: int
    """Number of ranks on this node."""
    master_addr: str | None = None
    """Address of rank 0 for torch.distributed (MASTER_ADDR, or KVDIST_MASTER_ADDR which
    wins); None under MPI launchers, where rank 0 picks and broadcasts it."""
    master_port: int | None = None
    """Port of rank 0's store (MASTER_PORT); None under MPI launchers: a free one is picked."""
    comm_override: CommKind | None = None
    """KVDIST_COMM: force the control-plane communicator; None picks from the launcher."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """KVDIST_TIMEOUT_S: deadline of each control-plane collective, in seconds."""
    shm: bool | None = None
    """KVDIST_SHM: 1 forces the shared-memory control plane (ranks on one x86-64 host),
    0 turns it off; None (unset) uses it when every rank is on one such host."""


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Detect the launcher and read rank, sizes and kvdist settings from `environ`."""
    env = os.environ if environ is None else environ
    launch = _detect(env)
    return dataclasses.replace(
        launch,
        master_addr=_nonempty(env, "KVDIST_MASTER_ADDR") or launch.master_addr,
        comm_override=_comm_override(env),
        timeout_s=_timeout(env),
        shm=_flag(env, "KVDIST_SHM"),
    )


def _detect(env: Mapping[str, str]) -> LaunchEnv:
    if "TORCHELASTIC_RUN_ID" in env:
        return _torchrun(env, elastic=True)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _mpi(env, "openmpi")
    if "PMI_RANK" in env:
        return _mpi(env, "mpich")
    if "SLURM_PROCID" in env:
        return _slurm(env)
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torchrun(env, elastic=False)
    return LaunchEnv(launcher="none", rank=0, world_size=1, local_rank=0, local_world_size=1)


def default_comm_kind(env: LaunchEnv) -> CommKind:
    """The control-plane communicator for `env`: KVDIST_COMM if set, else by launcher."""
    if env.comm_override is not None:
        return env.comm_override
    if env.launcher in ("mpich", "openmpi"):
        return "mpi"
    if env.launcher == "slurm":
        # find_spec, not import: importing mpi4py.MPI would initialise MPI as a side effect.
        return "mpi" if importlib.util.find_spec("mpi4py") is not None else "torch"
    if env.launcher == "torchrun":
        return "torch"
    return "local"


def _torchrun(env, *, elastic: bool) -> LaunchEnv:
    rank = _int(env, "RANK")
    world_size = _int(env, "WORLD_SIZE", minimum=1)
    _check_below(env, "RANK", rank, "WORLD_SIZE", world_size)
    if elastic:
        local_rank = _int(env, "LOCAL_RANK")
        local_world_size = _int(env, "LOCAL_WORLD_SIZE", minimum=1)
    else:
        # A hand-rolled env:// launch may omit the local variables; assume one node.
        local_rank = _int(env, "LOCAL_RANK", default=rank)
        local_world_size = _int(env, "LOCAL_WORLD_SIZE", minimum=1, default=world_size)
    _check_local(env, "LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world_size, world_size)
    return LaunchEnv(
        launcher="torchrun",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=_nonempty(env, "MASTER_ADDR"),
        master_port=_port(env, "MASTER_PORT"),
    )


def _mpi(env, launcher: Launcher) -> LaunchEnv:
    if launcher == "openmpi":
        names = ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE")
        rank_v, size_v, lrank_v, lsize_v = ("OMPI_COMM_WORLD_" + n for n in names)
    else:
        rank_v, size_v, lrank_v, lsize_v = (
            "PMI_RANK",
            "PMI_SIZE",
            "MPI_LOCALRANKID",
            "MPI_LOCALNRANKS",
        )
    rank = _int(env, rank_v)
    world_size = _int(env, size_v, minimum=1)
    _check_below(env, rank_v, rank, size_v, world_size)
    # Older Hydra and srun's PMI do not set the local variables; then assume one node.
    local_rank = _int(env, lrank_v, default=rank)
    local_world_size = _int(env, lsize_v, minimum=1, default=world_size)
    _check_local(env, lrank_v, local_rank, lsize_v, local_world_size, world_size)
    # MASTER_ADDR/MASTER_PORT are ignored here on purpose: under mpiexec they are leftovers
    # of some other launch, and a fixed port collides between jobs; rank 0 picks a free one.
    return LaunchEnv(
        launcher=launcher,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
    )


def _slurm(env) -> LaunchEnv:
    rank = _int(env, "SLURM_PROCID")
    world_size = _int(env, "SLURM_NTASKS", minimum=1)
    _check_below(env, "SLURM_PROCID", rank, "SLURM_NTASKS", world_size)
    local_rank = _int(env, "SLURM_LOCALID", default=0)
    if _nonempty(env, "SLURM_TASKS_PER_NODE"):
        local_world_size = _slurm_tasks_on_node(env)
        size_var = "SLURM_TASKS_PER_NODE"
    else:
        local_world_size = _int(env, "SLURM_NTASKS_PER_NODE", minimum=1, default=world_size)
        size_var = "SLURM_NTASKS_PER_NODE"
    _check_local(env, "SLURM_LOCALID", local_rank, size_var, local_world_size, world_size)
    return LaunchEnv(
        launcher="slurm",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        # Under srun with no mpi4py, torch.distributed needs these from the job script.
        master_addr=_nonempty(env, "MASTER_ADDR"),
        master_port=_port(env, "MASTER_PORT"),
    )


_SLURM_TPN = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _slurm_tasks_on_node(env) -> int:
    """Tasks on this node from SLURM_TASKS_PER_NODE, e.g. "2(x3),1" and SLURM_NODEID."""
    raw = env["SLURM_TASKS_PER_NODE"]
    per_node: list[int] = []
    for part in raw.split(","):
        m = _SLURM_TPN.match(part.strip())
        if m is None:
            raise ValueError(
                f"SLURM_TASKS_PER_NODE={raw!r} is malformed: expected entries like '2' or "
                f"'2(x3)' separated by commas"
            )
        per_node += [int(m.group(1))] * int(m.group(2) or 1)
    node = _int(env, "SLURM_NODEID", default=0)
    if node >= len(per_node):
        raise ValueError(
            f"SLURM_NODEID={env.get('SLURM_NODEID')!r} is out of range for SLURM_TASKS_PER_NODE={raw!r} "
            f"({len(per_node)} nodes)"
        )
    if per_node[node] < 1:
        raise ValueError(f"SLURM_TASKS_PER_NODE={raw!r} gives no tasks to node {node}")
    return per_node[node]


def _nonempty(env, name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _int(env, name: str, *, minimum: int = 0, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if default is not None:
            return default
        raise ValueError(f"{name} is not set, but the launch environment needs it")
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _check_below(env, name: str, value: int, bound_name: str, bound: int) -> None:
    if value >= bound:
        raise ValueError(
            f"{name}={env.get(name, value)!r} must be below {bound_name}={env.get(bound_name, bound)!r}"
        )


def _check_local(env, lrank_v, local_rank, lsize_v, local_world_size, world_size) -> None:
    _check_below(env, lrank_v, local_rank, lsize_v, local_world_size)
    if local_world_size > world_size:
        raise ValueError(
            f"{lsize_v}={env.get(lsize_v, local_world_size)!r} exceeds the world size {world_size}"
        )


def _port(env, name: str) -> int | None:
    if _nonempty(env, name) is None:
        return None
    port = _int(env, name, minimum=1)
    if port > 65535:
        raise ValueError(f"{name}={env[name]!r} is not a TCP port (1..65535)")
    return port


def _comm_override(env) -> CommKind | None:
    raw = env.get("KVDIST_COMM", "")
    value = raw.strip().lower()
    if not value:
        return None
    if value not in COMM_KINDS:
        raise ValueError(f"KVDIST_COMM={raw!r} is not one of {', '.join(COMM_KINDS)}")
    return value  # type: ignore[return-value]


def _timeout(env) -> float:
    raw = env.get("KVDIST_TIMEOUT_S", "")
    if not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"KVDIST_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"KVDIST_TIMEOUT_S={raw!r} must be a positive, finite number of seconds")
    return value


def _flag(env, name: str) -> bool | None:
    raw = env.get(name, "")
    value = raw.strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (1 or 0)")
