"""`kvdist env`: what launcher, rank, communicator and backends each rank detected.

Every rank builds its report line; the lines are gathered with the control-plane
communicator and rank 0 prints them in rank order (one line per rank), so output from
several ranks never interleaves. Each rank also runs one all-reduce over the
tensor-parallel group, so a line that says `tp_allreduce=ok` proves that group works.
Run as `kvdist env` or `python -m kvdist.cli.env`, under any launcher.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import socket
import sys
from typing import TYPE_CHECKING

from kvdist.cli.common import CommandParser, command_errors
from kvdist.comm.launch_env import COMM_KINDS, read_launch_env
from kvdist.connectors.placement import format_cpu_list, helper_cpus, online_cpus

if TYPE_CHECKING:  # torch and the process groups load when the command runs
    from kvdist.comm.setup import Topology


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `env` on the `kvdist` command's subparsers."""
    parser = subparsers.add_parser(
        "env", help="show the launcher, ranks, communicator and backends detected"
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print one line per rank (from rank 0, in rank order); returns the exit code."""
    from kvdist.comm.setup import init_distributed

    env = read_launch_env()
    if args.comm is not None:
        env = dataclasses.replace(env, comm_override=args.comm)
    topo = init_distributed(env=env, device=args.device, tp_backend=args.tp_backend)
    try:
        with command_errors(topo.comm, "env"):
            report = _report(topo)
            line = json.dumps(report) if args.json else _format(report)
            lines = topo.comm.allgather_bytes(
                line.encode(), timeout_s=env.timeout_s, what="kvdist env report"
            )
            if topo.rank == 0:
                print("\n".join(b.decode() for b in lines), flush=True)
    finally:
        topo.close()
    return 0


def _report(topo: Topology) -> dict:
    import torch

    return {
        "rank": topo.rank,
        "world_size": topo.world_size,
        "local_rank": topo.local_rank,
        "local_world_size": topo.env.local_world_size,
        "host": socket.gethostname(),
        "launcher": topo.env.launcher,
        "comm": topo.comm.name,
        "transport": getattr(topo.comm, "base", topo.comm).name,
        "mpi": _mpi_library_version(),
        "torch": torch.__version__,
        "tp_backend": topo.tp_backend,
        "tp_allreduce": _tp_check(topo),
        "device": str(topo.device),
        "cuda": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        **_cpus(),
    }


def _cpus() -> dict[str, str]:
    """The CPUs this rank may run on, and where connector helpers go (a launcher that binds
    the rank to a few CPUs leaves the rest to them; see kvdist.connectors.placement)."""
    if not hasattr(os, "sched_getaffinity"):
        return {}
    mine = os.sched_getaffinity(0)
    helpers = helper_cpus(mine)
    return {
        "cpus": f"{format_cpu_list(mine)} of {len(online_cpus())}",
        "helper_cpus": format_cpu_list(helpers) if helpers else "the rank's",
    }


def _format(report: dict) -> str:
    r = report
    head = f"[rank {r['rank']}/{r['world_size']}] local={r['local_rank']}/{r['local_world_size']}"
    rest = {
        k: v
        for k, v in r.items()
        if k not in ("rank", "world_size", "local_rank", "local_world_size")
    }
    return " ".join(
        [head] + [f"{k}={json.dumps(v) if ' ' in str(v) else v}" for k, v in rest.items()]
    )


def _tp_check(topo: Topology) -> str:
    if topo.tp_group is None:
        return "n/a"
    import torch
    import torch.distributed as dist

    t = torch.ones(1, device=topo.device)
    dist.all_reduce(t, group=topo.tp_group)
    return "ok" if int(t.item()) == topo.world_size else f"wrong sum {t.item()}"


def _mpi_library_version() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return None
    if "mpi4py.MPI" not in sys.modules:
        # Asking for the version must not start MPI (a singleton MPI job under torchrun);
        # MPI allows this query before MPI_Init.
        import mpi4py

        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
    from mpi4py import MPI

    first = MPI.Get_library_version().strip().splitlines()[0]
    return " ".join(first.split(",")[0].split())


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    parser.add_argument(
        "--comm",
        choices=COMM_KINDS,
        default=None,
        help="override the communicator (as KVDIST_COMM)",
    )
    parser.add_argument(
        "--tp-backend",
        default=None,
        choices=["nccl", "gloo"],
        help="nccl or gloo (default: nccl on CUDA)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per rank")


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="kvdist env", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
