"""`kvdist bench <name>`: the benchmarks, each in its own module, imported when it runs.

Each benchmark module has `add_arguments(parser)` and `run(args)`; `run` executes on every
rank (launch the command under mpirun/torchrun for several ranks) and rank 0 prints the
result. A benchmark's arguments are parsed only when it runs, so `kvdist --help` and the
other commands never import it (or torch), and a benchmark whose module is missing fails
only when asked for.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any

from kvdist.cli.common import CommandParser
from kvdist.comm.launch_env import read_launch_env

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "coordination": (
        "kvdist.bench.coordination",
        "control-plane time, collectives and bytes per step: kvdist vs pickled-object broadcasts",
    ),
    "engine": (
        "kvdist.bench.engine",
        "end-to-end engine throughput and per-step overhead, with or without a connector",
    ),
    "multiturn": (
        "kvdist.bench.multiturn",
        "multi-turn conversations on a small device cache: TTFT without and with connectors",
    ),
    "transfer": ("kvdist.bench.transfer", "KV block transfers between device and host"),
    "disk": ("kvdist.bench.disk", "disk connector save and load bandwidth"),
    "cpu-pool": (
        "kvdist.bench.cpu_pool",
        "the cpu connector's slot placement once its pool is full: host copies per block",
    ),
    "shared-cache": (
        "kvdist.bench.shared_cache",
        "several engines on one disk cache directory: how its capacity holds",
    ),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` and one subcommand per benchmark on the `kvdist` subparsers."""
    parser = subparsers.add_parser("bench", help="run a benchmark (on every rank of a launch)")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (_, help_text) in BENCHMARKS.items():
        # The benchmark's own parser handles everything after its name, --help included.
        p = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        p.add_argument("bench_args", nargs=argparse.REMAINDER)
        p.set_defaults(func=_runner(name))
    return parser


def _runner(name: str):
    def run(args: argparse.Namespace) -> int:
        return run_benchmark(name, args.bench_args)

    return run


def load(name: str) -> Any:
    """The module of benchmark `name`; ValueError if it is unknown or not installed."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    module = BENCHMARKS[name][0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            raise ValueError(
                f"benchmark {name!r} is not available in this kvdist ({module} is missing)"
            ) from None
        raise


def run_benchmark(name: str, argv: list[str]) -> int:
    """Parse `argv` with benchmark `name`'s arguments and run it on this rank."""
    mod = load(name)
    parser = CommandParser(prog=f"kvdist bench {name}", description=BENCHMARKS[name][1])
    mod.add_arguments(parser)
    prints = getattr(mod, "PRINTS_RESULT", False)  # multi-rank benchmarks print on rank 0
    if not prints:
        parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if not prints:
        # One process: its result path is checked here, before it runs. The benchmarks
        # on every rank check theirs on rank 0 once the ranks are up (a path only rank 0's
        # host has must not stop the others before they start, leaving rank 0 waiting).
        if read_launch_env().world_size > 1:
            raise ValueError(
                f"kvdist bench {name} measures one process; run it without a launcher "
                "(one per GPU, if you want each measured)"
            )
        if args.out:
            check_output_path(args.out, "--out")
    result = mod.run(args)
    if not prints:
        text = json.dumps(result, indent=1)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    return 0


def check_output_path(path: str, flag: str) -> None:
    """Refuse, before a benchmark runs, a result file that could not be written after."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {str(parent)!r} does not exist")
    if not os.access(target if target.exists() else parent, os.W_OK):
        raise ValueError(f"{flag} {path}: not writable")
