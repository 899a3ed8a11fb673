"""`init_distributed`: the one function that starts communication.

It reads (or receives) the launch environment, picks the device, builds the control-plane
communicator and, at world size > 1, the torch.distributed group for tensor-parallel
all-reduces, and returns them in one frozen `Topology` that the rest of kvdist receives.

How torch.distributed finds rank 0:
- torchrun: MASTER_ADDR/MASTER_PORT from torchrun (through the elastic agent's store).
- mpiexec (either communicator kind): rank 0 opens a TCPStore on port 0 (the OS picks a
  free port and the store holds it, so no other process can take it between picking and
  binding) and broadcasts its address and port over MPI; no MASTER_* variables are
  needed, and two jobs on one node never collide on a fixed port. The address is
  127.0.0.1 when an allgather of host identities finds every rank on rank 0's host, else
  what rank 0's host name resolves to (or KVDIST_MASTER_ADDR); the launcher's local sizes
  cannot decide this, as srun's PMI does not set them.
- srun: over MPI when mpi4py is used, else MASTER_ADDR/MASTER_PORT from the job script.
- A bare RANK/WORLD_SIZE launch (no torchrun agent): MASTER_ADDR/MASTER_PORT; such
  variables are often leftovers in a shell, so the wait is announced on stderr and its
  failure names them.

Under MPI, a launcher that gave no local rank and size (srun's PMI without SLURM_*
variables, an older Hydra) gets them from MPI's node-local group, before the CUDA
device is picked from the local rank.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import os
import signal
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
from kvdist.comm.launch_env import LaunchEnv, check_timeout, default_comm_kind, read_launch_env
from kvdist.comm.local import LocalCommunicator
from kvdist.comm.mpi_start import end_mpi_job_with, mpi_start_up
from kvdist.comm.shm import maybe_shared_memory, same_host

_MIN_CONTROL_GROUP_TIMEOUT = timedelta(minutes=30)


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


_INITS = itertools.count()  # init_distributed calls in this process


def init_distributed(
    *, env: LaunchEnv | None = None, device: str | None = None, tp_backend: str | None = None
) -> Topology:
    """Start communication for this process and return its `Topology`.

    `env` defaults to `read_launch_env()`; `device` to cuda:<local rank> when CUDA is
    available, else cpu; `tp_backend` to nccl on CUDA, gloo on CPU.
    """
    try:
        env = read_launch_env() if env is None else env
        # A LaunchEnv replaced in code (an engine's timeout_s) skipped read_launch_env's
        # check.
        check_timeout(env.timeout_s, "timeout_s (KVDIST_TIMEOUT_S, or an engine's timeout_s)")
    except Exception as exc:
        end_mpi_job_with(exc)
        raise
    kind = default_comm_kind(env)
    if env.world_size == 1:
        dev = _pick_device(env, device)
        _tp_backend(tp_backend, dev)  # unused at world size 1, but a mistake all the same
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
            "torch.distributed is already initialised in this process: shut down the "
            "earlier kvdist.LLM (llm.shutdown()), or close the Topology of the earlier "
            "init_distributed(), or destroy the caller's process group, first"
        )
    uses_mpi = kind == "mpi" or env.launcher in ("mpich", "openmpi")
    # The device is picked before MPI starts (CUDA-aware MPI stacks want it so), unless
    # only MPI's node-local group can tell this rank's local rank.
    early = env.local_source is not None or not uses_mpi
    try:
        picked = _pick_device(env, device) if early else None
    except Exception as exc:
        if uses_mpi:
            end_mpi_job_with(exc)
        raise
    mpi_comm = _mpi_communicator(env) if uses_mpi else None
    try:
        if mpi_comm is not None:
            env = _with_node_group(env)
        dev = picked if picked is not None else _pick_device(env, device)
        backend = _tp_backend(tp_backend, dev)
        comm = _start_torch_distributed(env, kind, dev, backend, mpi_comm)
    except BaseException:
        if mpi_comm is not None:
            mpi_comm.close()
        raise
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
    env: LaunchEnv, kind: str, dev: torch.device, backend: str, mpi_comm
) -> Communicator:
    """Initialise the default process group (the TP group); return the control communicator
    (`mpi_comm` itself under KVDIST_COMM=mpi; the caller closes it if this raises)."""
    # Keys of this init apart from an earlier one's in the same processes (init, close,
    # init again): under torchrun the agent's store outlives both, and the new groups
    # would otherwise read the old groups' addresses. Every rank counts its inits alike
    # (an init that failed on some ranks only, before here, leaves them apart: they then
    # wait out the deadline in the next one).
    store = dist.PrefixStore(f"kvdist-init-{next(_INITS)}", _rendezvous(env, mpi_comm))
    # The TP group's collectives have the control plane's deadline too: rank 0 goes
    # from its plan broadcast straight into the forward, so a late or departed rank
    # is met there first (torch's default would wait 30 minutes). NCCL gets at least
    # a minute, for its first, lazily initialised, call.
    tp_timeout = env.timeout_s if backend == "gloo" else max(env.timeout_s, 60.0)
    with _groups_meet(env, f"the tensor-parallel group ({backend})"):
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("default_pg", store),
            rank=env.rank,
            world_size=env.world_size,
            device_id=dev if dev.type == "cuda" else None,
            timeout=timedelta(seconds=tp_timeout),
        )
    if kind == "mpi":
        assert mpi_comm is not None
        return mpi_comm
    if mpi_comm is not None:
        mpi_comm.close()  # it only carried rank 0's address
    from kvdist.comm.torch_dist import TorchCommunicator

    # gloo's own per-operation deadline must not fire before the caller's timeout_s.
    timeout = max(_MIN_CONTROL_GROUP_TIMEOUT, timedelta(seconds=2 * env.timeout_s))
    with _groups_meet(env, "the control-plane group (gloo)"):
        group = dist.new_group(backend="gloo", timeout=timeout)
    return TorchCommunicator(group, store=store)


@contextmanager
def _groups_meet(env: LaunchEnv, group: str) -> Iterator[None]:
    """A process group's start that timed out waiting for the other ranks (the store's
    wait, gloo's connections: under torchrun, the first place the ranks meet) as one
    line naming KVDIST_TIMEOUT_S, as a failed rendezvous is, not torch's traceback; NCCL
    finding ranks on one GPU as one line saying so; any other failure as it is."""
    start = time.monotonic()
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        if "Duplicate GPU detected" in str(exc):  # NCCL's words for ranks sharing a GPU
            shared = ValueError(
                f"rank {env.rank} of {env.world_size}: ranks of this node share one CUDA "
                f"device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                "give each rank its own, or pass device='cpu' (--device cpu on the command "
                "line)"
            )
            shared.one_line = True  # type: ignore[attr-defined]  # it says all
            raise shared from None
        waited = time.monotonic() - start
        if waited < 0.9 * env.timeout_s:
            raise
        torch_says = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        error = TimeoutError(
            f"rank {env.rank} of {env.world_size}: the ranks did not all start {group} "
            f"within {env.timeout_s:g}s ({torch_says}); are all ranks started, and none "
            f"slower to start than that? (KVDIST_TIMEOUT_S sets how long to wait)"
        )
        error.one_line = True  # type: ignore[attr-defined]  # it says all: no traceback
        raise error from None


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
    except BrokenPipeError:
        # The reader of this rank's output went away (`kvdist generate | head`): not a
        # failure to report; the job ends quietly.
        silence_stdout()
        comm.abort(1)
        raise
    except KeyboardInterrupt as e:
        _say(comm, f"{command}: interrupted")
        e.kvdist_reported = True  # type: ignore[attr-defined]
        _after_rank_0(comm, _INTERRUPT_GRACE_S)
        comm.abort(130)
        raise
    except SystemExit as e:
        if e.code in (None, 0):
            raise
        # An exit asked for (a SIGTERM unwinding, a command's exit code): no traceback.
        why = " (SIGTERM)" if e.code == 128 + signal.SIGTERM else ""
        _say(comm, f"{command}: exiting with code {e.code}{why}")
        if e.code == 128 + signal.SIGTERM:  # the launcher sent it to every rank
            _after_rank_0(comm, _TERM_GRACE_S)
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
        e.kvdist_reported = True  # type: ignore[attr-defined]  # if the abort returns
        comm.abort(code)
        raise


_SAY_PAUSE_S = 0.2
_INTERRUPT_GRACE_S = 10.0
_TERM_GRACE_S = 8.0  # within the command line's 10 s after a SIGTERM


def _after_rank_0(comm: Communicator, grace_s: float) -> None:
    """Every rank got the signal and is unwinding: rank 0 ends the job (an abort) once its
    own cleanup ran (a demo's temporary cache goes), and the others give it up to
    `grace_s` for that before ending the job themselves, rather than kill rank 0 midway. A
    rank 0 waiting in a collective in native code (the model's all-reduce, for a rank
    already unwinding) sees the signal only once that returns: the grace runs out first."""
    if comm.rank != 0 and comm.world_size > 1:
        comm.wait_for_abort(0, grace_s)


def _report(comm: Communicator, exc: BaseException) -> None:
    """Say `exc` with its traceback, or in one line when its message says all (a
    collective's timeout, another rank's error: `one_line` on its class)."""
    if getattr(exc, "one_line", False):
        _say(comm, f"{type(exc).__name__}: {exc}")
        return
    _say(comm, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def silence_stdout() -> None:
    """Point stdout at /dev/null, after its reader went away: nothing more (the
    interpreter's flush at exit included) raises BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _say(comm: Communicator, lines: str) -> None:
    prefix = f"[kvdist rank {comm.rank}/{comm.world_size}] "
    sys.stderr.write("".join(prefix + line + "\n" for line in lines.rstrip("\n").split("\n")))
    sys.stderr.flush()
    # The abort that follows may end the launcher before it forwarded these lines.
    time.sleep(_SAY_PAUSE_S)


def _tp_backend(tp_backend: str | None, dev: torch.device) -> str:
    if tp_backend is None:
        return "nccl" if dev.type == "cuda" else "gloo"
    if tp_backend not in ("nccl", "gloo"):
        raise ValueError(f"tp_backend {tp_backend!r}: expected nccl or gloo")
    if tp_backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"tp_backend 'nccl' needs a CUDA device, and the device is {dev}")
    return tp_backend


def _pick_device(env: LaunchEnv, device: str | None) -> torch.device:
    cuda = torch.cuda.is_available()
    try:
        dev = torch.device(device if device is not None else ("cuda" if cuda else "cpu"))
    except RuntimeError:
        raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N")
    if dev.type != "cuda":
        return dev
    if not cuda:
        raise ValueError(f"device={device!r} was requested, but CUDA is not available")
    if dev.index is None:
        count = torch.cuda.device_count()
        # One GPU visible under a CUDA_VISIBLE_DEVICES: the launcher may have bound one to
        # each rank. Otherwise ranks past the GPUs would share one, which NCCL refuses (a
        # traceback, after the rendezvous); every rank of the node decides this alike.
        bound = count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES", "") != ""
        if env.local_world_size > count and not bound:
            raise ValueError(
                f"{env.local_world_size} ranks on this node, but {count} CUDA device(s) "
                f"visible: start at most {count} rank(s) per node, or pass device='cpu' "
                "(--device cpu on the command line)"
            )
        dev = torch.device("cuda", env.local_rank if env.local_rank < count else 0)
    torch.cuda.set_device(dev)
    return dev


def _mpi_communicator(env: LaunchEnv):
    with mpi_start_up():
        from mpi4py import MPI

    from kvdist.comm.mpi import MPICommunicator

    world = MPI.COMM_WORLD
    if (world.Get_rank(), world.Get_size()) != (env.rank, env.world_size):
        rank_v, size_v = env.rank_variables or ("rank", "world size")
        said = (
            f"{rank_v}={env.rank} and {size_v}={env.world_size} make this rank {env.rank} of "
            f"{env.world_size}, but MPI.COMM_WORLD has rank {world.Get_rank()} of "
            f"{world.Get_size()}"
        )
        if env.launcher == "slurm" and world.Get_size() == 1:
            raise ValueError(
                f"{said}: this process was not started by srun, or by srun without "
                f"--mpi=pmi2 or --mpi=pmix (a plain process in an sbatch script inherits the "
                f"allocation's SLURM_* variables); start it with `srun --mpi=pmi2`, unset "
                f"{rank_v} and {size_v} to run one process, or set KVDIST_COMM=torch with "
                f"MASTER_ADDR and MASTER_PORT"
            )
        raise ValueError(
            f"{said}: mpi4py is linked against a different MPI than the mpiexec that started "
            f"this process ({MPI.Get_library_version().splitlines()[0].strip()})"
        )
    return MPICommunicator(world)


def _with_node_group(env: LaunchEnv) -> LaunchEnv:
    """`env` with the local rank and size of MPI's node-local group, when no launcher
    variable gave them (srun's PMI without SLURM_*, an older Hydra)."""
    from mpi4py import MPI

    # Every rank splits, whatever its own variables say: a split that only some ranks
    # made would leave them waiting in it (it has no deadline).
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_world_size = node.Get_rank(), node.Get_size()
    node.Free()
    if env.local_source is not None:
        return env
    return dataclasses.replace(
        env,
        local_rank=local_rank,
        local_world_size=local_world_size,
        local_source="MPI node group",
    )


def _rendezvous(env: LaunchEnv, mpi_comm) -> dist.Store:
    """A store shared by all ranks, hosted by rank 0 (or by the torchrun agent)."""
    timeout = timedelta(seconds=env.timeout_s)
    if mpi_comm is not None and env.launcher != "torchrun":
        return _store_over_mpi(env, mpi_comm, timeout)
    if env.master_addr is None or env.master_port is None:
        unset = f"(MASTER_ADDR={env.master_addr!r}, MASTER_PORT={env.master_port!r})"
        if env.launcher == "torchrun" and not env.elastic:
            rank_v, size_v = env.rank_variables or ("RANK", "WORLD_SIZE")
            raise ValueError(
                f"{rank_v}={env.rank} and {size_v}={env.world_size} are set but no launcher "
                f"started this process, and MASTER_ADDR and MASTER_PORT are not both set "
                f"{unset}: unset {rank_v} and {size_v} to run one process (leftovers of "
                f"another launch), or set MASTER_ADDR and MASTER_PORT on every rank"
            )
        mpi = (
            ", or use MPI (mpi4py, the ranks started by srun --mpi=pmi2, KVDIST_COMM unset)"
            if env.launcher == "slurm"
            else ""
        )
        raise ValueError(
            f"{env.launcher} started {env.world_size} ranks, but MASTER_ADDR and MASTER_PORT "
            f"are not both set {unset}; set them{mpi}"
        )
    where = f"{env.master_addr}:{env.master_port}"
    rank_v, size_v = env.rank_variables or ("rank", "world size")
    if env.launcher == "torchrun" and not env.elastic:
        # Nothing vouches that the other ranks exist: these may be a shell's leftovers.
        print(
            f"kvdist: rank {env.rank} waiting for {env.world_size} ranks at {where} "
            f"({rank_v}/{size_v} from the environment, no launcher agent found; unset them "
            f"to run one process)",
            file=sys.stderr,
            flush=True,
        )
    start = time.monotonic()
    try:
        url = f"tcp://{where}"
        store, _, _ = next(dist.rendezvous(url, env.rank, env.world_size, timeout=timeout))
    except dist.DistError as e:
        raise _rendezvous_failed(env, where, e, time.monotonic() - start) from None
    store.set_timeout(timeout)
    return store


def _rendezvous_failed(env: LaunchEnv, where: str, exc: Exception, waited_s: float) -> Exception:
    """The error for a failed MASTER_ADDR/MASTER_PORT rendezvous: what was waited for,
    which variables asked for it, and what to change."""
    rank_v, size_v = env.rank_variables or ("rank", "world size")
    torch_says = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    timed_out = waited_s >= 0.9 * env.timeout_s
    what = f"did not meet the other ranks within {env.timeout_s:g}s" if timed_out else "failed"
    head = (
        f"rank {env.rank} of {env.world_size}: the rendezvous at {where} (MASTER_ADDR/"
        f"MASTER_PORT) {what} ({torch_says})"
    )
    if env.elastic:
        advice = "torchrun started this rank: are all of its nodes started, with one MASTER_ADDR?"
    else:
        origin = (
            "no launcher agent found"
            if env.launcher == "torchrun"
            else "srun sets them, but so does sbatch for a plain process in its script"
        )
        advice = (
            f"{rank_v}={env.rank}, {size_v}={env.world_size}, MASTER_ADDR and MASTER_PORT came "
            f"from the environment ({origin}): if they are leftovers of another launch, unset "
            f"them to run one process; else start every rank with the same MASTER_ADDR/"
            f"MASTER_PORT"
        )
    message = f"{head}; {advice} (KVDIST_TIMEOUT_S sets how long to wait)"
    error = TimeoutError(message) if timed_out else RuntimeError(message)
    error.one_line = True  # type: ignore[union-attr]  # it says all: no traceback
    return error


def _store_over_mpi(env: LaunchEnv, mpi_comm, timeout: timedelta) -> dist.Store:
    what = "rendezvous address broadcast"
    # Host identities, not the launcher's local sizes (srun's PMI sets none), decide
    # whether loopback reaches rank 0; gathered on every rank, as collectives must be.
    one_host = same_host(mpi_comm, env.timeout_s, what="rendezvous host check")
    if env.rank == 0:
        # Rank 0 reports a failure through the broadcast, so every rank raises it at once
        # instead of the others waiting out the deadline; a setting to change stays a
        # ValueError on every rank (a command prints it in one line).
        try:
            addr = env.master_addr or _own_address(one_host)
            # Rank 0 reaches its own store over loopback (the store listens on every
            # address); the address set for the others is checked on its own, at once.
            store = dist.TCPStore(
                "127.0.0.1" if env.master_addr else addr, 0, env.world_size,
                is_master=True, timeout=timeout, wait_for_workers=False,
            )  # fmt: skip
            if env.master_addr:
                _check_master_addr(env.master_addr, store.port)
            message = f"ok {addr} {store.port}"
        except ValueError as e:
            message = f"setting {e}"
        except Exception as e:
            message = f"error rank 0 could not open the rendezvous store: {e}"
        mpi_comm.broadcast_bytes(message.encode(), timeout_s=env.timeout_s, what=what)
    else:
        message = mpi_comm.broadcast_bytes(None, timeout_s=env.timeout_s, what=what).decode()
    status, _, rest = message.partition(" ")
    if status == "setting":
        raise ValueError(rest)
    if status != "ok":
        raise RuntimeError(rest)
    if env.rank == 0:
        return store
    addr, port = rest.rsplit(" ", 1)
    return dist.TCPStore(addr, int(port), env.world_size, is_master=False, timeout=timeout)


_MASTER_ADDR_PROBE_S = 10.0


def _check_master_addr(addr: str, port: int) -> None:
    """Rank 0 connects to its rendezvous store at `addr`, which KVDIST_MASTER_ADDR names
    for the other ranks: a name that does not resolve or an address rank 0 cannot reach
    fails at once, naming the setting (the other ranks would otherwise wait out the
    deadline, then blame rank 0 for not arriving)."""
    fix = "set it to an address of rank 0's host that every rank reaches, or unset it"
    try:
        probe = socket.create_connection((addr, port), timeout=_MASTER_ADDR_PROBE_S)
    except socket.gaierror as e:
        raise ValueError(
            f"KVDIST_MASTER_ADDR={addr!r} does not resolve ({e.strerror}); {fix}"
        ) from None
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ValueError(
            f"KVDIST_MASTER_ADDR={addr!r}: rank 0 cannot reach its rendezvous store there "
            f"(port {port}: {why}); {fix}"
        ) from None
    probe.close()


def _own_address(one_host: bool) -> str:
    if one_host:
        return "127.0.0.1"  # loopback always works, whatever DNS says
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError as e:
        raise ValueError(
            f"cannot resolve rank 0's host name {host!r} ({e}) for ranks on other hosts to "
            f"reach rank 0; set KVDIST_MASTER_ADDR to rank 0's address"
        ) from None
    if addr.startswith("127."):
        raise ValueError(
            f"rank 0's host name {host!r} resolves to the loopback address {addr}, which ranks "
            f"on other hosts cannot reach; set KVDIST_MASTER_ADDR to an address of rank 0's "
            f"host that they can reach"
        )
    return addr
