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
from collections.abc import Iterator

from kvdist.cli.common import USER_ERRORS
from kvdist.comm.mpi_start import devnull, end_mpi_job_with

# Subcommand modules, imported only when their command runs (torch is slow to import).
_COMMANDS = {
    "demo": "kvdist.cli.demo",
    "generate": "kvdist.cli.generate",
    "bench": "kvdist.cli.bench",
    "cache": "kvdist.cli.cache",
    "env": "kvdist.cli.env",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def unwind_on_sigterm(grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM (what `timeout`, `kill` and scancel send) unwinds the command like Ctrl-C,
    so its cleanup runs (the demo's temporary cache, the IO processes). Python runs the
    handler only once the main thread is back in Python code: one blocked in native code
    (a collective, a CUDA sync, MPI's start-up) would never see it and could no longer be
    stopped. So a watcher thread, woken by the signal at C level, ends the process after
    `grace_s`, and a second SIGTERM ends it at once."""
    global _grace_s
    _grace_s = grace_s
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _terminate)

    def watch() -> None:
        while signal.SIGTERM not in os.read(read_fd, 64):  # one byte per signal number
            pass
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="kvdist-sigterm", daemon=True).start()


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process at once
    # The watcher thread needs the GIL to end the process, which a main thread blocked in
    # native code while holding it (MPI's start-up, waiting for a rank that is gone) never
    # gives back. faulthandler's watchdog is a C thread: it ends the process regardless.
    faulthandler.dump_traceback_later(_grace_s + 5, exit=True, file=devnull())
    raise SystemExit(128 + signum)


_grace_s = TERM_GRACE_S  # as `unwind_on_sigterm` was given


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM during the block are acted on at its end. Raised in the middle
    of importing torch or numpy, their exception leaves a module half initialised (numpy
    without `numpy.ma`: every later use fails) or is swallowed by import code (the command
    runs on as if never signalled)."""
    got: list[int] = []

    def hold(signum: int, frame: object) -> None:
        got.append(signum)

    kinds = (signal.SIGINT, signal.SIGTERM)
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
