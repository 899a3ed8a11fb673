"""Runs `kvdist ARGS...` under cProfile on every rank, timing the garbage collector too;
writes PROF_DIR/prof_<tag>_r<rank>.out and .gc.json (a diagnostic for probe.sh)."""

import cProfile
import gc
import json
import os
import sys
import time

from kvdist.cli.main import main

rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
base = os.path.join(os.environ["PROF_DIR"], f"prof_{os.environ['PROF_TAG']}_r{rank}")
pauses: list[tuple[int, float]] = []
_t = [0.0]


def _gc(phase, info):
    if phase == "start":
        _t[0] = time.perf_counter()
    else:
        pauses.append((info["generation"], time.perf_counter() - _t[0]))


gc.callbacks.append(_gc)
prof = cProfile.Profile()
try:
    rc = prof.runcall(main, sys.argv[1:])
finally:
    prof.dump_stats(base + ".out")
    by_gen = {g: [s for gg, s in pauses if gg == g] for g in (0, 1, 2)}
    with open(base + ".gc.json", "w") as f:
        json.dump(
            {
                g: {"n": len(v), "total_s": sum(v), "max_s": max(v, default=0)}
                for g, v in by_gen.items()
            },
            f,
        )
sys.exit(rc)
