"""Eighth probe: how much CPU does a process launched by launch/mpirun.sh get? Prints its
affinity, then times a pure-Python loop on this thread while 0, 1 and 4 child processes
(which inherit the affinity) spin, and again with the children moved to the other CPUs."""

import os
import subprocess
import sys
import time

SPIN = "import time\nt = time.monotonic() + 3\nwhile time.monotonic() < t: pass\n"


def loop_s() -> float:
    t = time.perf_counter()
    x = 0
    for i in range(3_000_000):
        x += i
    return time.perf_counter() - t


def timed(children: int, move: bool) -> float:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(children)]
    if move:
        mine = os.sched_getaffinity(0)
        others = set(range(os.cpu_count() or 1)) - mine
        for p in procs:
            if others:
                os.sched_setaffinity(p.pid, others)
    time.sleep(0.3)
    s = min(loop_s() for _ in range(3))
    for p in procs:
        p.wait()
    return s


rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "?"))
print(
    f"rank {rank}: affinity {sorted(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs", flush=True
)
if rank in ("0", "?"):
    for n, move in ((0, False), (1, False), (4, False), (1, True), (4, True)):
        print(
            f"  {n} spinning children{' moved to other CPUs' if move else ''}: loop {timed(n, move) * 1e3:.0f} ms",
            flush=True,
        )
