"""What the launcher told this process: the one place kvdist reads launch variables.

`read_launch_env()` returns a frozen `LaunchEnv`; everything else receives it (or the
`Topology` built from it) instead of looking at `os.environ`. Detection order matters
because launchers nest:

1. torchrun (`TORCHELASTIC_RUN_ID`): its workers inherit the SLURM/MPI variables of the
   agent that started them, which describe the agent, not the worker.
2. Open MPI (`OMPI_COMM_WORLD_*`).
3. MPICH / Hydra (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, `MPI_LOCALNRANKS`); also
   `srun --mpi=pmi2`, which sets `PMI_RANK`/`PMI_SIZE` but no `MPI_LOCAL*`.
4. SLURM srun (`SLURM_PROCID`, `SLURM_NTASKS`, ...).
5. A bare `RANK` / `WORLD_SIZE` pair (env:// style, no elastic agent): reported as torchrun.
6. Otherwise one plain process.

The local rank and size come from the launcher's own pair when it set both; under an MPI
launcher that did not (srun's PMI, older Hydra), from srun's `SLURM_LOCALID` and
`SLURM_TASKS_PER_NODE` when they describe the same rank; else nothing here knows them
(`local_source` is None) and `init_distributed` asks MPI for the node-local group.

kvdist's own settings: `KVDIST_COMM` (mpi | torch | local) overrides the communicator,
`KVDIST_TIMEOUT_S` is the control-plane deadline, `KVDIST_MASTER_ADDR` overrides the
address other ranks use to reach rank 0 for torch.distributed, `KVDIST_SHM` (1 | 0)
forces or turns off the shared-memory control plane for ranks on one host.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kvdist.comm.mpi_start import end_mpi_job_with

Launcher = Literal["mpich", "openmpi", "torchrun", "slurm", "none"]
CommKind = Literal["mpi", "torch", "local"]
COMM_KINDS: tuple[str, ...] = ("mpi", "torch", "local")
DEFAULT_TIMEOUT_S = 300.0
MIN_TIMEOUT_S = 1e-3
"""The smallest KVDIST_TIMEOUT_S (and deadline of any kind): torch's store, gloo and
process groups keep deadlines in whole milliseconds, and a shorter one becomes 0, which
torch reads as "fail at once" (a store's connect or wait: a traceback at start-up) or as
"no deadline at all" (a wait on a collective's work, which `TorchCommunicator` floors at
1 ms for that reason)."""
MAX_TIMEOUT_S = 1e6
"""The largest KVDIST_TIMEOUT_S (11.6 days): torch's store and gloo keep deadlines in
milliseconds and overflow or fail oddly far above it; a longer wait is never intended."""


def check_timeout(value: Any, name: str, *, text: str | None = None) -> float:
    """`value` as a deadline in seconds: a number in [MIN_TIMEOUT_S, MAX_TIMEOUT_S] (numpy
    scalars too, not a bool, not a str); otherwise a ValueError that names the setting,
    `name`, and the value (or `text`, what the user wrote, when `value` was parsed from
    it)."""
    try:
        seconds = float(value) if isinstance(value, numbers.Real) else math.nan
    except OverflowError:  # an int past a float's range
        seconds = math.inf
    if isinstance(value, bool) or not MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:
        shown = repr(value) if text is None else repr(text)
        raise ValueError(
            f"{name} must be a number of seconds in [{MIN_TIMEOUT_S:g}, {MAX_TIMEOUT_S:g}], "
            f"got {shown}"
        )
    return seconds


_RANK_VARIABLES: dict[str, tuple[str, str]] = {
    "mpich": ("PMI_RANK", "PMI_SIZE"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS"),
    "torchrun": ("RANK", "WORLD_SIZE"),
}


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
    local_source: str | None = None
    """Where local_rank and local_world_size came from ("MPI_LOCALRANKID/MPI_LOCALNRANKS",
    "SLURM_LOCALID/SLURM_TASKS_PER_NODE", "MPI node group", ...); None when no variable
    gave them and one node was assumed, which init_distributed corrects over MPI."""
    elastic: bool = False
    """Started by torchrun's elastic agent (TORCHELASTIC_RUN_ID). A bare RANK/WORLD_SIZE
    launch has no agent that vouches for the other ranks: they may be leftovers of one."""
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

    @property
    def rank_variables(self) -> tuple[str, str] | None:
        """The variables that gave rank and world_size (None for a plain process)."""
        return _RANK_VARIABLES.get(self.launcher)


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Detect the launcher and read rank, sizes and kvdist settings from `environ` (this
    process's environment by default: then, under an MPI launcher, a bad setting ends the
    job with its error, as the other ranks would wait for this one in MPI's start-up)."""
    env = os.environ if environ is None else environ
    try:
        launch = _detect(env)
        return dataclasses.replace(
            launch,
            master_addr=_nonempty(env, "KVDIST_MASTER_ADDR") or launch.master_addr,
            comm_override=_comm_override(env),
            timeout_s=timeout_from(env),
            shm=_flag(env, "KVDIST_SHM"),
        )
    except Exception as exc:
        if environ is None:
            end_mpi_job_with(exc)
        raise


def started_world_size(environ: Mapping[str, str] | None = None) -> int:
    """How many ranks a launcher started this process among, from the launchers' own rank
    variables alone, no kvdist setting read or checked (for commands that only need to
    know they run once): mpiexec's, torchrun's agent's, and an srun step's (not a plain
    process of an sbatch script, which has its allocation's variables too)."""
    env = os.environ if environ is None else environ
    launchers = ["mpich", "openmpi"]
    if "TORCHELASTIC_RUN_ID" in env:
        launchers.append("torchrun")
    if "SLURM_STEP_ID" in env:
        launchers.append("slurm")
    sizes = [env.get(_RANK_VARIABLES[name][1], "") for name in launchers]
    return max((int(n) for n in sizes if n.isdigit()), default=1)


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
    if "PMIX_RANK" in env:
        # A PMIx launcher (PRRTE's prterun) without Open MPI's, MPICH's or Slurm's rank
        # variables: taken for one process, every rank would run alone as rank 0 of 1.
        raise ValueError(
            f"PMIX_RANK={env['PMIX_RANK']} is set, but none of OMPI_COMM_WORLD_RANK, "
            "PMI_RANK, SLURM_PROCID or RANK: kvdist cannot tell this rank's world size from "
            "a PMIx launcher alone; launch with Open MPI's or MPICH's mpirun, srun or "
            "torchrun (launch/mpirun.sh, launch/torchrun.sh), or unset PMIX_RANK for one "
            "process"
        )
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
    given = [name for name in ("RANK", "WORLD_SIZE") if _nonempty(env, name)]
    if not elastic and len(given) == 1:
        # Half a pair is a leftover far more often than a launch: say so, not just "needed".
        (name,) = given
        other = "WORLD_SIZE" if name == "RANK" else "RANK"
        raise ValueError(
            f"{name}={env[name]!r} is set but {other} is not set: a launch by RANK and "
            f"WORLD_SIZE needs both on every rank; unset {name} to run one process"
        )
    rank = _int(env, "RANK")
    world_size = _int(env, "WORLD_SIZE", minimum=1)
    _check_below(env, "RANK", rank, "WORLD_SIZE", world_size)
    if elastic:  # torchrun always sets both: their absence is an error, not one node
        _int(env, "LOCAL_RANK")
        _int(env, "LOCAL_WORLD_SIZE", minimum=1)
    # A hand-rolled env:// launch may omit the local variables; assume one node.
    local_rank, local_world_size, source = _local_pair(
        env, rank, world_size, "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"
    )
    return LaunchEnv(
        launcher="torchrun",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        local_source=source,
        elastic=elastic,
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
    launcher_pair = _nonempty(env, lrank_v) and _nonempty(env, lsize_v)
    if not launcher_pair and _same_slurm_task(env, rank, world_size):
        # srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE but no MPI_LOCAL*; srun's own variables
        # say where this task is (only when they describe this rank: under an older Hydra
        # in an sbatch script they describe the batch step).
        local_rank, local_world_size, source = _slurm_local(env, world_size)
    else:
        local_rank, local_world_size, source = _local_pair(
            env, rank, world_size, lrank_v, lsize_v, size_v
        )
    # MASTER_ADDR/MASTER_PORT are ignored here on purpose: under mpiexec they are leftovers
    # of some other launch, and a fixed port collides between jobs; rank 0 picks a free one.
    return LaunchEnv(
        launcher=launcher,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        local_source=source,
    )


def _slurm(env) -> LaunchEnv:
    rank = _int(env, "SLURM_PROCID")
    world_size = _int(env, "SLURM_NTASKS", minimum=1)
    _check_below(env, "SLURM_PROCID", rank, "SLURM_NTASKS", world_size)
    local_rank, local_world_size, source = _slurm_local(env, world_size)
    return LaunchEnv(
        launcher="slurm",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        local_source=source,
        # Under srun with no mpi4py, torch.distributed needs these from the job script.
        master_addr=_nonempty(env, "MASTER_ADDR"),
        master_port=_port(env, "MASTER_PORT"),
    )


def _local_pair(
    env, rank: int, world_size: int, lrank_v: str, lsize_v: str, size_v: str
) -> tuple[int, int, str | None]:
    """A launcher's local rank and size variables; what is not set is taken as one node
    (local rank = rank, local size = world size) and the source is then None."""
    local_rank = _int(env, lrank_v, default=rank)
    local_world_size = _int(env, lsize_v, minimum=1, default=world_size)
    size_set = _nonempty(env, lsize_v) is not None
    one_node = f"the world size {size_v}={env.get(size_v)!r}, as {lsize_v} is not set"
    _check_below(
        env,
        lrank_v,
        local_rank,
        lsize_v,
        local_world_size,
        bound_from=None if size_set else one_node,
    )
    if size_set:
        _check_not_above_world(env, lsize_v, local_world_size, size_v, world_size)
    known = size_set and _nonempty(env, lrank_v) is not None
    return local_rank, local_world_size, f"{lrank_v}/{lsize_v}" if known else None


def _same_slurm_task(env, rank: int, world_size: int) -> bool:
    # Compared as text: under another launcher, malformed SLURM_* leftovers are no error.
    return (env.get("SLURM_PROCID", "").strip(), env.get("SLURM_NTASKS", "").strip()) == (
        str(rank),
        str(world_size),
    )


def _slurm_local(env, world_size: int) -> tuple[int, int, str | None]:
    local_rank = _int(env, "SLURM_LOCALID", default=0)
    bound_from: str | None = None
    if _nonempty(env, "SLURM_TASKS_PER_NODE"):
        size_var: str | None = "SLURM_TASKS_PER_NODE"
        local_world_size = _slurm_tasks_on_node(env)
        node = _nonempty(env, "SLURM_NODEID")
        bound_from = (
            f"the count of {f'node SLURM_NODEID={node!r}' if node else 'node 0'} in "
            f"SLURM_TASKS_PER_NODE={env['SLURM_TASKS_PER_NODE']!r}"
        )
    elif _nonempty(env, "SLURM_NTASKS_PER_NODE"):
        size_var = "SLURM_NTASKS_PER_NODE"
        local_world_size = _int(env, size_var, minimum=1)
    else:
        size_var, local_world_size = None, world_size
        bound_from = (
            f"the world size SLURM_NTASKS={env.get('SLURM_NTASKS')!r}, as neither "
            f"SLURM_TASKS_PER_NODE nor SLURM_NTASKS_PER_NODE is set"
        )
    _check_below(
        env, "SLURM_LOCALID", local_rank, size_var or "", local_world_size, bound_from=bound_from
    )
    if size_var is not None:
        _check_not_above_world(env, size_var, local_world_size, "SLURM_NTASKS", world_size)
    known = size_var is not None and _nonempty(env, "SLURM_LOCALID") is not None
    return local_rank, local_world_size, f"SLURM_LOCALID/{size_var}" if known else None


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


def _check_below(
    env, name: str, value: int, bound_name: str, bound: int, *, bound_from: str | None = None
) -> None:
    """Raise unless value < bound, quoting only variables that are set; `bound_from` says
    where `bound` came from when it is not simply the value of `bound_name`."""
    if value < bound:
        return
    if bound_from is not None:
        limit = f"{bound}, {bound_from}"
    elif _nonempty(env, bound_name) is not None:
        limit = f"{bound_name}={env[bound_name]!r}"
    else:
        limit = f"{bound} ({bound_name} is not set)"
    shown = f"{name}={env[name]!r}" if _nonempty(env, name) else f"{value} ({name} is not set)"
    raise ValueError(f"{shown} must be below {limit}")


def _check_not_above_world(env, lsize_v: str, local_world_size: int, size_v, world_size) -> None:
    if local_world_size > world_size:
        raise ValueError(
            f"{lsize_v}={env[lsize_v]!r} gives this node {local_world_size} ranks, more than "
            f"the world size {size_v}={env.get(size_v)!r}"
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


def timeout_from(env: Mapping[str, str]) -> float:
    """KVDIST_TIMEOUT_S of `env` (the default where unset); a ValueError naming it when it
    is not a number of seconds in range."""
    raw = env.get("KVDIST_TIMEOUT_S", "")
    if not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan  # not a number: named as such by the check
    return check_timeout(value, "KVDIST_TIMEOUT_S", text=raw)


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
