"""Running a benchmark on every rank of a launch (mpirun, torchrun or one process)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def run_on_every_rank(
    device: str | None,
    work: Callable[[Any], dict[str, Any]],
    show: Callable[[dict[str, Any]], str],
    out: str | None,
) -> dict[str, Any]:
    """`work(topology)` on every rank; an exception on one rank ends them all. Rank 0 then
    prints `show(result)` and writes the result to `out` as JSON (when given). Returns the
    result on rank 0, {} elsewhere."""
    from kvdist.bench.cli import check_output_path
    from kvdist.cli.common import command_errors
    from kvdist.comm.setup import init_distributed

    topo = init_distributed(device=device)
    try:
        with command_errors(topo.comm, "bench"):
            if out and topo.rank == 0:  # the rank that writes it; a failure ends them all
                check_output_path(out, "--out")
            result = work(topo)
    finally:
        topo.close()
    if topo.rank != 0:
        return {}
    print(show(result), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result
