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
        if main:
            signal.signal(signal.SIGTERM, before)


def end_mpi_job_with(exc: BaseException) -> None:
    """This rank failed before starting MPI: under an MPI launcher, start MPI and end the
    job with `exc` (printed, naming this rank). Returns, doing nothing, outside an MPI
    launch of several ranks or where MPI cannot start."""
    if not any(v in os.environ for v in MPI_RANK_VARIABLES):
        return
    try:
        with mpi_start_up():
            from mpi4py import MPI
        world = MPI.COMM_WORLD
        if world.Get_size() < 2:
            return
    except Exception:
        return
    print(
        f"kvdist: rank {world.Get_rank()} failed before the ranks could start, ending the "
        f"job: {type(exc).__name__}: {exc}",
        file=sys.stderr,
        flush=True,
    )
    world.Abort(2)
