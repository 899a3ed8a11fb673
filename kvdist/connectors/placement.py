"""Where a connector's helper threads and processes run: off the CPUs its rank is bound to.

Launchers may bind each rank to a few CPUs. Open MPI binds every rank to one core when it
starts two or fewer (on the lent H200 host, `launch/mpirun.sh -n 1` gave a rank the
affinity {0} of 16 CPUs). Threads and child processes inherit their creator's binding, so
a helper that checksums and writes records takes turns with the engine's thread on that
one core: there, one spinning child process doubled the time of a Python loop on the
rank's thread, and moved to the other CPUs it cost nothing
(`benchmarks/results/gpu/tiered_probe/`). That is what made the steps after the disk
tier's saves take 3-8x their host time under mpirun, while `kvdist bench disk`, run without
a launcher, saw nothing.

So every helper kvdist starts (IO threads, the disk writer process and its threads, the
disk index's background threads) moves to the online CPUs its rank is not bound to, when
the rank is bound to some of them. A rank free to run anywhere leaves its helpers where
they are: the kernel already spreads them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

_ONLINE = "/sys/devices/system/cpu/online"


MAX_CPUS = 1 << 16
"""CPU numbers a list may name: past any machine's (Linux's own limit is 8192), so a typo
such as `0-1000000000` is an error rather than a set of a billion numbers."""


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPUs of a kernel CPU list such as `0-3,8,10-11`; ValueError if malformed."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"bad CPU range {part!r} in {text!r}") from None
        if first < 0 or last < first or last >= MAX_CPUS:
            raise ValueError(f"bad CPU range {part!r} in {text!r} (CPUs 0 to {MAX_CPUS - 1})")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's form of a CPU list, runs as ranges: `{0, 1, 2, 3, 8}` -> `0-3,8`."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def online_cpus() -> frozenset[int]:
    """The machine's online CPUs (the kernel's list; the CPU count when it cannot be read)."""
    with contextlib.suppress(OSError, ValueError):
        with open(_ONLINE) as f:
            cpus = parse_cpu_list(f.read())
        if cpus:
            return cpus
    return frozenset(range(os.cpu_count() or 1))


def helper_cpus(bound: Iterable[int] | None = None) -> frozenset[int] | None:
    """The CPUs helpers should run on: every online CPU outside `bound` (default: this
    thread's affinity) when that is a strict subset of them; None when there is nothing to
    move away from (helpers stay where they are)."""
    if bound is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        bound = os.sched_getaffinity(0)
    mine = frozenset(bound)
    others = online_cpus() - mine
    return others if mine and others else None


def resolve_helper_cpus(spec: str, owner: str = "connector") -> frozenset[int] | None:
    """A connector's `io_cpus` setting as CPUs to move helpers to (None: leave them):
    `"auto"` (off the CPUs this thread is bound to, `helper_cpus()`), `"inherit"` (where
    the creating thread runs) or a CPU list such as `"8-15"`."""
    if spec == "auto":
        return helper_cpus()
    if spec == "inherit":
        return None
    cpus = parse_cpu_list(spec)
    if not cpus:
        raise ValueError(f"empty CPU list {spec!r}")
    online = online_cpus()
    if online and not cpus & online:
        raise ValueError(
            f"{owner}: io_cpus {spec!r} names no online CPU of this machine "
            f"(online: {format_cpu_list(online)})"
        )
    return cpus & online if online else cpus


def check_helper_cpus(owner: str, spec: object) -> None:
    """ValueError naming `owner` unless `spec` is a valid `io_cpus` setting."""
    ok = isinstance(spec, str)
    if ok and spec not in ("auto", "inherit"):
        try:
            ok = bool(parse_cpu_list(spec))  # type: ignore[arg-type]
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(
            f"{owner}: io_cpus must be 'auto', 'inherit' or a CPU list such as '8-15', got {spec!r}"
        )


def move_this_thread(cpus: Iterable[int] | None) -> bool:
    """Restrict the calling thread (and what it starts later) to `cpus`; False when `cpus`
    is None or the kernel refuses (another container's CPUs, say): the thread stays put."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, set(cpus))  # on Linux, 0 is the calling thread
    except OSError as exc:
        log.debug("cannot move helper thread to CPUs %s: %s", format_cpu_list(cpus), exc)
        return False
    return True


def helper_thread(
    target: Callable[..., Any], name: str, cpus: Iterable[int] | None, *args: Any
) -> threading.Thread:
    """A daemon thread (not started) that first moves itself to `cpus`, then runs
    `target(*args)`."""
    placed = frozenset(cpus) if cpus else None

    def run() -> None:
        move_this_thread(placed)
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)
