"""`init_distributed`: the one function that starts communication.

It reads (or receives) the launch environment, picks the device, builds the control-plane
communicator and, at world size > 1, the torch.distributed group for tensor-parallel
all-reduces, and returns them in one frozen `Topology` that the rest of kvdist receives.

How torch.distributed finds rank 0:
- torchrun: MASTER_ADDR/MASTER_PORT from torchrun (through the elastic agent's store).
- mpiexec (either communicator kind): rank 0 opens a TCPStore on port 0 (the OS picks a
  free port and the store holds it, so no other process can take it between picking and
  binding) and broadcasts its address and port over MPI; no MASTER_* variables are
  needed, and two jobs on one node never collide on a fixed port.
- srun: over MPI when mpi4py is used, else MASTER_ADDR/MASTER_PORT from the job script.
"""

from __future__ import annotations

import atexit
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kvdist.comm.base import Communicator
from kvdist.comm.launch_env import LaunchEnv, default_comm_kind, read_launch_env
from kvdist.comm.local import LocalCommunicator
from kvdist.comm.shm import maybe_shared_memory

_MIN_CONTROL_GROUP_TIMEOUT = timedelta(minutes=30)
_SIZE_VARIABLE = {"mpich": "PMI_SIZE", "openmpi": "OMPI_COMM_WORLD_SIZE", "slurm": "SLURM_NTASKS"}


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Who this rank is and the handles it communicates with."""

    env: LaunchEnv
    """The launch environment this topology was built from."""
    comm: Communicator
    """Control-plane communicator (plan broadcast, report consensus)."""
    device: torch.device
    """Where this rank's model shard and KV cache live."""
    tp_group: dist.ProcessGroup | None
    """Group for tensor-parallel all-reduces; None at world size 1 and after `close()`."""
    tp_backend: str | None
    """Backend of `tp_group` ("nccl", "gloo"); None at world size 1."""
    owns_process_group: bool = False
    """True when init_distributed started torch.distributed, so close() destroys it."""

    @property
    def rank(self) -> int:
        """This rank, 0 <= rank < world_size."""
        return self.env.rank

    @property
    def world_size(self) -> int:
        """Number of tensor-parallel ranks."""
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        """Rank on this node (it picked the CUDA device)."""
        return self.env.local_rank

    def close(self) -> None:
        """Release the communicator and what init_distributed started (idempotent).

        The process group is destroyed and this topology's reference to it dropped, so the
        group's C++ threads stop now rather than during interpreter shutdown, where gloo
        can abort the process ("terminate called without an active exception")."""
        atexit.unregister(self.close)
        self.comm.close()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        object.__setattr__(self, "tp_group", None)


def init_distributed(
    *, env: LaunchEnv | None = None, device: str | None = None, tp_backend: str | None = None
) -> Topology:
    """Start communication for this process and return its `Topology`.

    `env` defaults to `read_launch_env()`; `device` to cuda:<local rank> when CUDA is
    available, else cpu; `tp_backend` to nccl on CUDA, gloo on CPU.
    """
    env = read_launch_env() if env is None else env
    kind = default_comm_kind(env)
    dev = _pick_device(env, device)
    if env.world_size == 1:
        if env.comm_override not in (None, "local"):
            warnings.warn(
                f"KVDIST_COMM={env.comm_override!r} has no effect at world size 1",
                stacklevel=2,
            )
        return Topology(
            env=env, comm=LocalCommunicator(), device=dev, tp_group=None, tp_backend=None
        )
    if kind == "local":
        raise ValueError(
            f"KVDIST_COMM='local' needs world size 1, but {env.launcher} started "
            f"{env.world_size} ranks"
        )
    if kind == "mpi" and env.launcher == "torchrun":
        raise ValueError(
            "KVDIST_COMM='mpi' needs an MPI launcher (mpiexec, srun), but this process was "
            "started by torchrun; unset KVDIST_COMM or launch with launch/mpirun.sh"
        )
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised in this process: close the Topology "
            "of the earlier init_distributed() (or destroy the caller's process group) first"
        )
    backend = tp_backend or ("nccl" if dev.type == "cuda" else "gloo")
    comm = _start_torch_distributed(env, kind, dev, backend)
    try:
        comm = maybe_shared_memory(comm, enabled=env.shm, timeout_s=env.timeout_s)
    except BaseException:
        comm.close()
        dist.destroy_process_group()
        raise
    topology = Topology(
        env=env,
        comm=comm,
        device=dev,
        tp_group=dist.group.WORLD,
        tp_backend=backend,
        owns_process_group=True,
    )
    # A script that never calls close() still releases the group before the interpreter
    # starts tearing down (atexit handlers run first; an engine registered later shuts
    # down before this runs).
    atexit.register(topology.close)
    return topology


def _start_torch_distributed(
    env: LaunchEnv, kind: str, dev: torch.device, backend: str
) -> Communicator:
    """Initialise the default process group (the TP group); return the control communicator."""
    uses_mpi = kind == "mpi" or env.launcher in ("mpich", "openmpi")
    mpi_comm = _mpi_communicator(env) if uses_mpi else None
    try:
        store = _rendezvous(env, mpi_comm)
        # The TP group's collectives have the control plane's deadline too: rank 0 goes
        # from its plan broadcast straight into the forward, so a late or departed rank
        # is met there first (torch's default would wait 30 minutes). NCCL gets at least
        # a minute, for its first, lazily initialised, call.
        tp_timeout = env.timeout_s if backend == "gloo" else max(env.timeout_s, 60.0)
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("default_pg", store),
            rank=env.rank,
            world_size=env.world_size,
            device_id=dev if dev.type == "cuda" else None,
            timeout=timedelta(seconds=tp_timeout),
        )
    except BaseException:
        if mpi_comm is not None:
            mpi_comm.close()
        raise
    if kind == "mpi":
        assert mpi_comm is not None
        return mpi_comm
    if mpi_comm is not None:
        mpi_comm.close()  # it only carried rank 0's address
    from kvdist.comm.torch_dist import TorchCommunicator

    # gloo's own per-operation deadline must not fire before the caller's timeout_s.
    timeout = max(_MIN_CONTROL_GROUP_TIMEOUT, timedelta(seconds=2 * env.timeout_s))
    return TorchCommunicator(dist.new_group(backend="gloo", timeout=timeout), store=store)


@contextmanager
def abort_on_error(
    comm: Communicator,
    code: int = 1,
    *,
    user_errors: tuple[type[BaseException], ...] = (),
    command: str = "kvdist",
) -> Iterator[None]:
    """Print any exception with this rank's number and end every rank of the job.

    Without it, a rank that raises just exits while the others wait in a collective until
    their deadline (and MPI_Finalize at exit may never return). Exceptions of the types in
    `user_errors` (a command line's bad input) print as one line, `{command}: error: ...`,
    without a traceback, and end the job with exit code 2.
    """
    try:
        yield
    except SystemExit as e:
        if e.code in (None, 0):
            raise
        _report(comm, e)
        comm.abort(e.code if isinstance(e.code, int) else code)
        raise
    except BaseException as e:
        if user_errors and isinstance(e, user_errors):
            if comm.world_size == 1:
                print(f"{command}: error: {e}", file=sys.stderr, flush=True)
            else:
                _say(comm, f"{command}: error: {e}")
            # An MPI abort may return: the command line need not say it again.
            e.kvdist_reported = True  # type: ignore[attr-defined]
            comm.abort(2)
            raise
        _report(comm, e)
        comm.abort(code)
        raise


_SAY_PAUSE_S = 0.2


def _report(comm: Communicator, exc: BaseException) -> None:
    _say(comm, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def _say(comm: Communicator, lines: str) -> None:
    prefix = f"[kvdist rank {comm.rank}/{comm.world_size}] "
    sys.stderr.write("".join(prefix + line + "\n" for line in lines.rstrip("\n").split("\n")))
    sys.stderr.flush()
    # The abort that follows may end the launcher before it forwarded these lines.
    time.sleep(_SAY_PAUSE_S)


def _pick_device(env: LaunchEnv, device: str | None) -> torch.device:
    cuda = torch.cuda.is_available()
    try:
        dev = torch.device(device if device is not None else ("cuda" if cuda else "cpu"))
    except RuntimeError:
        raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not cuda:
        raise ValueError(f"device={device!r} was requested, but CUDA is not available")
    if dev.index is None:
        count = torch.cuda.device_count()
        if env.local_rank < count:
            dev = torch.device("cuda", env.local_rank)
        elif count == 1:
            # The launcher bound one GPU to each rank (CUDA_VISIBLE_DEVICES per rank).
            dev = torch.device("cuda", 0)
        else:
            raise ValueError(
                f"local rank {env.local_rank} has no CUDA device of its own ({count} visible): "
                f"start at most {count} ranks per node, or pass device='cpu'"
            )
    torch.cuda.set_device(dev)
    return dev


def _mpi_communicator(env: LaunchEnv):
    from mpi4py import MPI

    from kvdist.comm.mpi import MPICommunicator

    world = MPI.COMM_WORLD
    if (world.Get_rank(), world.Get_size()) != (env.rank, env.world_size):
        var = _SIZE_VARIABLE.get(env.launcher, "the launcher's world size")
        raise ValueError(
            f"{env.launcher} reports rank {env.rank} of {env.world_size} ({var}), but "
            f"MPI.COMM_WORLD has rank {world.Get_rank()} of {world.Get_size()}: mpi4py is "
            f"linked against a different MPI than the mpiexec that started this process "
            f"({MPI.Get_library_version().splitlines()[0].strip()})"
        )
    return MPICommunicator(world)


def _rendezvous(env: LaunchEnv, mpi_comm) -> dist.Store:
    """A store shared by all ranks, hosted by rank 0 (or by the torchrun agent)."""
    timeout = timedelta(seconds=env.timeout_s)
    if mpi_comm is not None and env.launcher != "torchrun":
        return _store_over_mpi(env, mpi_comm, timeout)
    if env.master_addr is None or env.master_port is None:
        raise ValueError(
            f"{env.launcher} started {env.world_size} ranks, but MASTER_ADDR and MASTER_PORT "
            f"are not both set (MASTER_ADDR={env.master_addr!r}, MASTER_PORT="
            f"{env.master_port!r}); set them, or use MPI (KVDIST_COMM=mpi with mpi4py)"
        )
    url = f"tcp://{env.master_addr}:{env.master_port}"
    store, _, _ = next(dist.rendezvous(url, env.rank, env.world_size, timeout=timeout))
    store.set_timeout(timeout)
    return store


def _store_over_mpi(env: LaunchEnv, mpi_comm, timeout: timedelta) -> dist.Store:
    what = "rendezvous address broadcast"
    if env.rank == 0:
        # Rank 0 reports a failure through the broadcast, so every rank raises it at once
        # instead of the others waiting out the deadline.
        try:
            addr = env.master_addr or _own_address(env)
            store = dist.TCPStore(
                addr, 0, env.world_size, is_master=True, timeout=timeout, wait_for_workers=False
            )
            message = f"ok {addr} {store.port}"
        except Exception as e:
            message = f"error rank 0 could not open the rendezvous store: {e}"
        mpi_comm.broadcast_bytes(message.encode(), timeout_s=env.timeout_s, what=what)
    else:
        message = mpi_comm.broadcast_bytes(None, timeout_s=env.timeout_s, what=what).decode()
    status, _, rest = message.partition(" ")
    if status != "ok":
        raise RuntimeError(rest)
    if env.rank == 0:
        return store
    addr, port = rest.rsplit(" ", 1)
    return dist.TCPStore(addr, int(port), env.world_size, is_master=False, timeout=timeout)


def _own_address(env: LaunchEnv) -> str:
    if env.local_world_size == env.world_size:
        return "127.0.0.1"  # one node: loopback always works, whatever DNS says
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError as e:
        raise ValueError(
            f"cannot resolve this host's name {host!r} ({e}) for ranks on other nodes to "
            f"reach rank 0; set KVDIST_MASTER_ADDR to rank 0's address"
        ) from None
    if addr.startswith("127."):
        raise ValueError(
            f"this host's name {host!r} resolves to the loopback address {addr}, which ranks "
            f"on other nodes cannot reach; set KVDIST_MASTER_ADDR to rank 0's address"
        )
    return addr
