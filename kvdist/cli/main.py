"""The `kvdist` command: demo, generate, bench, cache, env."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from kvdist.cli.common import USER_ERRORS, CommandParser
from kvdist.comm.mpi_start import devnull, end_mpi_job_with

if TYPE_CHECKING:
    from kvdist.comm.base import Communicator

# Subcommand modules, imported only when their command runs (torch is slow to import).
_COMMANDS = {
    "demo": "kvdist.cli.demo",
    "generate": "kvdist.cli.generate",
    "bench": "kvdist.cli.bench",
    "cache": "kvdist.cli.cache",
    "env": "kvdist.cli.env",
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="kvdist", description="KV-cache connectors across tensor-parallel ranks"
    )
    parser.add_argument("--version", action="version", version=f"kvdist {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def _version() -> str:
    # From the installed metadata: importing kvdist itself would import torch.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvdist")
    except PackageNotFoundError:
        return "(not installed)"


# Commands that import torch (and numpy) once they run.
_NEEDS_TORCH = ("demo", "generate", "bench", "env")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unwind_on_sigterm()
    try:
        if args.command in _NEEDS_TORCH:
            with deferred_signals():
                import torch  # noqa: F401  (see deferred_signals)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        # Ctrl-C: one line, not a traceback from every rank and IO process.
        if not getattr(exc, "kvdist_reported", False):
            print(f"kvdist {args.command}: interrupted", file=sys.stderr)
        if args.command in _NEEDS_TORCH:  # the commands whose ranks start MPI
            end_mpi_job_with(exc, 130)
        return 130
    except SystemExit as exc:
        # A SIGTERM unwinding (`_terminate`), before MPI started: end the job there too.
        if exc.code == 128 + signal.SIGTERM and args.command in _NEEDS_TORCH:
            end_mpi_job_with(exc, exc.code)
        raise
    except BrokenPipeError:
        # The reader went away (`kvdist cache ls | head`): not an error of ours.
        from kvdist.comm.setup import silence_stdout

        silence_stdout()
        return 1
    except USER_ERRORS as exc:
        # A user mistake: one line, no traceback (abort_on_error may have said it already).
        # Commands check what may differ between ranks, such as files, once the ranks are
        # set up, so no rank is left waiting for another to start.
        if not getattr(exc, "kvdist_reported", False):
            print(f"kvdist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not getattr(exc, "one_line", False):
            raise
        # A message that says all (a collective's timeout, the ranks not meeting at start,
        # another rank's error): one line; abort_on_error, where it ran, said it already.
        if not getattr(exc, "kvdist_reported", False):
            print(f"kvdist {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


TERM_GRACE_S = 10.0
"""Seconds a SIGTERM leaves the command to unwind before the process ends regardless."""


END_ASKED = signal.SIGUSR2
"""The signal by which a rank passes a SIGTERM it got on to rank 0 (`sigterm_to_rank_0`):
not SIGTERM itself, which, when the launcher sent it to rank 0 too, would be rank 0's
second and end it at once, midway through its cleanup."""


def unwind_on_sigterm(grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM (what `timeout`, `kill` and scancel send) unwinds the command like Ctrl-C,
    so its cleanup runs (the demo's temporary cache, the IO processes). Python runs the
    handler only once the main thread is back in Python code: one blocked in native code
    (a collective, a CUDA sync, MPI's start-up) would never see it and could no longer be
    stopped. So a watcher thread, woken by the signal at C level, ends the process after
    `grace_s`, and a second SIGTERM ends it at once. `END_ASKED` (another rank's SIGTERM,
    passed on) unwinds it as a first SIGTERM does."""
    global _grace_s, _ending
    _grace_s = grace_s
    _ending = False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(END_ASKED, _end_asked)

    def watch() -> None:
        # One byte per signal number.
        while not {signal.SIGTERM, END_ASKED}.intersection(os.read(read_fd, 64)):
            pass
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="kvdist-sigterm", daemon=True).start()


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process at once
    if _begin_ending():
        return  # another rank's SIGTERM, passed on, came first: already unwinding
    if _to_rank_0 is not None and _to_rank_0():
        # Rank 0 ends the job once its cleanup ran (within the grace); this rank goes on
        # until then: unwinding now, it would leave rank 0 waiting in a collective for it
        # (the model's all-reduce, in native code, where rank 0 would never see a signal).
        return
    raise SystemExit(128 + signum)


def _end_asked(signum: int, frame: object) -> None:
    if not _begin_ending():
        raise SystemExit(128 + signal.SIGTERM)


def _begin_ending() -> bool:
    """Arm the end of the process after the grace; True when it was armed already."""
    global _ending
    if _ending:
        return True
    _ending = True
    # The watcher thread needs the GIL to end the process, which a main thread blocked in
    # native code while holding it (MPI's start-up, waiting for a rank that is gone) never
    # gives back. faulthandler's watchdog is a C thread: it ends the process regardless.
    faulthandler.dump_traceback_later(_grace_s + 5, exit=True, file=devnull())
    return False


@contextlib.contextmanager
def sigterm_to_rank_0(comm: Communicator) -> Iterator[None]:
    """While the block runs, a SIGTERM to a rank other than 0 is passed on to rank 0 (as
    `END_ASKED`) where the rank can signal it (`Communicator.pid_of`: ranks that share
    memory): rank 0 unwinds, runs its cleanup (the demo's temporary cache) and ends the
    job, and this rank goes on until then. A launcher sends a SIGTERM to every rank, but
    one sent to a single rank otherwise left rank 0 waiting for it until the job's abort
    killed rank 0 before its cleanup. Nothing changes where `unwind_on_sigterm` was not
    set up (its handler is rank 0's too: every rank runs the same command)."""
    global _to_rank_0
    if comm.rank == 0 or signal.getsignal(signal.SIGTERM) is not _terminate:
        yield
        return

    def forward() -> bool:
        try:
            pid = comm.pid_of(0)
            if pid is None:
                return False
            os.kill(pid, END_ASKED)
        except (OSError, ValueError):  # gone, or the communicator closed meanwhile
            return False
        return True

    _to_rank_0 = forward
    try:
        yield
    finally:
        _to_rank_0 = None


_grace_s = TERM_GRACE_S  # as `unwind_on_sigterm` was given
_ending = False  # a SIGTERM (or END_ASKED) is being acted on
_to_rank_0: Callable[[], bool] | None = None  # set by `sigterm_to_rank_0`


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM during the block are acted on at its end. Raised in the middle
    of importing torch or numpy, their exception leaves a module half initialised (numpy
    without `numpy.ma`: every later use fails) or is swallowed by import code (the command
    runs on as if never signalled)."""
    got: list[int] = []

    def hold(signum: int, frame: object) -> None:
        got.append(signum)

    kinds = (signal.SIGINT, signal.SIGTERM, END_ASKED)
    before = {int(s): signal.signal(s, hold) for s in kinds}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if got:
            handler = before[got[0]]
            if callable(handler):
                handler(got[0], None)
            else:  # the default action, or ignored: as if it came now
                os.kill(os.getpid(), got[0])


if __name__ == "__main__":
    sys.exit(main())
