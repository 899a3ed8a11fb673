"""The `kvdist` command: demo, generate, bench, cache, env."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from kvdist.cli.common import USER_ERRORS

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
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (what `timeout`, `kill` and scancel send) unwinds like Ctrl-C, so the
    # commands' cleanup runs: the demo's temporary cache, the IO processes.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`kvdist cache ls | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except USER_ERRORS as exc:
        # A user mistake: one line, no traceback (abort_on_error may have said it already).
        # Commands check what may differ between ranks, such as files, once the ranks are
        # set up, so no rank is left waiting for another to start.
        if not getattr(exc, "kvdist_reported", False):
            print(f"kvdist {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
