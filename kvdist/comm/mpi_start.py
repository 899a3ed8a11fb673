"""Starting MPI without leaving ranks stuck in its start-up.

Importing `mpi4py.MPI` runs MPI_Init, which holds the GIL and, under MPICH, waits (spinning)
for every rank of the job. Two ways a job used to hang there for good:

- a rank that fails before it starts MPI (a bad `KVDIST_TIMEOUT_S`, a local rank with no
  GPU) exits, and the others wait for it forever: such a rank now starts MPI and ends the
  job with its error (`end_mpi_job_with`);
- a SIGTERM cannot stop a rank waiting there, since a Python handler (the command line's)
  runs only once the main thread is back in Python: during the start-up SIGTERM has its
  default action, ending the process at once (`mpi_start_up`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

MPI_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
"""Set for each rank by MPI launchers (MPICH's Hydra and `srun --mpi=pmi2`, Open MPI,
PMIx)."""


@contextmanager
def mpi_start_up() -> Iterator[None]:
    """Around the first import of `mpi4py.MPI`: a SIGTERM meanwhile ends the process."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL) if main else None
    try:
        yield
    finally:
        if before is not None:  # None: a handler installed from C, which stays replaced
            signal.signal(signal.SIGTERM, before)


def end_mpi_job_with(exc: BaseException, code: int = 2) -> None:
    """This rank failed, or was interrupted (`KeyboardInterrupt`, a SIGTERM's
    `SystemExit`), before starting MPI: under a live MPI launch of several ranks, say so
    and start MPI only to end the job with exit code `code` (the other ranks may already
    wait in MPI's start-up, for this one). Returns, doing nothing, when MPI already
    started in this process (nobody waits for it in the start-up then), outside an MPI
    launch, or where MPI cannot start."""
    if "mpi4py.MPI" in sys.modules or not _launched_by_mpi():
        return
    if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not _ranks_start_mpi():
        return  # nobody waits in MPI's start-up for this rank
    # Said first: an MPI that cannot start may end the process in C.
    rank = next((os.environ[v] for v in MPI_RANK_VARIABLES if v in os.environ), "?")
    if isinstance(exc, KeyboardInterrupt):
        what, why = "was interrupted", ""
    elif isinstance(exc, SystemExit):
        what, why = "was told to end (SIGTERM)", ""
    else:
        what, why = "failed", f": {type(exc).__name__}: {exc}"
    print(
        f"kvdist: rank {rank} {what} before the ranks could start, ending the job{why}",
        file=sys.stderr,
        flush=True,
    )
    # MPI's start-up waits for every rank, holding the GIL, deaf to signals: a rank that
    # already left would keep this one there for ever. faulthandler's watchdog (a C
    # thread) ends the process after the control plane's deadline, as for a collective.
    faulthandler.dump_traceback_later(_deadline_s(), exit=True, file=devnull())
    try:
        with mpi_start_up():
            from mpi4py import MPI
        world = MPI.COMM_WORLD
        if world.Get_size() < 2:
            return
    except Exception:
        return
    sys.stderr.flush()
    remove_mpich_segments()  # MPI has started: its segments would outlive the abort
    world.Abort(code)
    os._exit(code)  # MPICH's MPI_Abort at times returns: the error is not reported again


def _deadline_s() -> float:
    """How long a rank ending the job waits for the others in MPI's start-up: the control
    plane's deadline, KVDIST_TIMEOUT_S (its default where unset or not a number)."""
    from kvdist.comm.launch_env import DEFAULT_TIMEOUT_S, timeout_from

    try:
        return timeout_from(os.environ)
    except ValueError:  # the job is ending anyway: the error is reported elsewhere
        return DEFAULT_TIMEOUT_S


@functools.cache
def devnull() -> int:
    """Where faulthandler's watchdog writes its (unwanted) traceback: a descriptor, kept
    open for the process's life (a file object would be reported unclosed at exit)."""
    return os.open(os.devnull, os.O_WRONLY)


def _ranks_start_mpi() -> bool:
    """Whether the job's ranks start MPI (and may be waiting in its start-up): several
    ranks, and no KVDIST_COMM that puts the control plane elsewhere."""
    env = os.environ
    size = env.get("PMI_SIZE") or env.get("OMPI_COMM_WORLD_SIZE")
    if size is not None and size.strip().isdigit() and int(size) < 2:
        return False
    return env.get("KVDIST_COMM", "").strip().lower() in ("", "mpi")


def _launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process and is there to talk to: its rank
    variable and its process-manager connection (a stale PMI_RANK, in a child of a rank,
    would make MPI_Init fail or wait)."""
    env = os.environ
    if not any(v in env for v in MPI_RANK_VARIABLES):
        return False
    if "PMI_PORT" in env or any(k.startswith("PMIX_SERVER_URI") for k in env):
        return True
    try:
        os.fstat(int(env["PMI_FD"]))
    except (KeyError, ValueError, OSError):
        return False
    return True


def remove_mpich_segments() -> None:
    """Unlink the shared-memory segments MPICH mapped for this job. It removes them at
    MPI_Finalize, not at MPI_Abort, so every aborted job would leave a few MB in /dev/shm.
    The job is ending: its processes keep their mappings, and no new process attaches."""
    try:
        with open("/proc/self/maps") as f:
            paths = {
                line.split(maxsplit=5)[5].strip()
                for line in f
                if "/dev/shm/mpich_shm_" in line and not line.rstrip().endswith("(deleted)")
            }
    except (OSError, IndexError):
        return
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
