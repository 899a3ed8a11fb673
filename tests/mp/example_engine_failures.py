"""examples/engine_integration.py with its `disk` connector made to fail.

`lookup`: rank 0's lookup raises for r1 and answers malformed for r2, in both engines; each
fails alone, the others are served and loaded, and every request gets one
request_finished. Prints one line per engine on rank 0.

`hook`: the last rank's start_load_kv raises in the second engine's first step with a
load; that rank still runs its forward (whose all-reduces the others wait in), and every
rank raises the hook's error together. Prints one line per rank.

`forward`: the last rank's forward raises in the second engine, before its first
all-reduce; that rank raises at once, and abort_on_error ends the job.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import engine_integration as ex  # noqa: E402

from kvdist import RemoteError  # noqa: E402
from kvdist.comm import abort_on_error, init_distributed  # noqa: E402

finished: Counter[str] = Counter()
engines = 0


def start_connector(config, ctx, kv, comm, timeout_s):
    global engines
    engines += 1
    sched, worker = real_start(config, ctx, kv, comm, timeout_s)
    if MODE == "lookup" and sched is not None:
        lookup, request_finished = sched.get_num_new_matched_tokens, sched.request_finished

        def flaky_lookup(request, num_computed_tokens):
            if request.request_id == "r1":
                raise OSError("index unreadable")
            if request.request_id == "r2":
                return "many"
            return lookup(request, num_computed_tokens)

        def counted_finish(request, block_ids):
            finished[request.request_id] += 1
            return request_finished(request, block_ids)

        sched.get_num_new_matched_tokens = flaky_lookup
        sched.request_finished = counted_finish
    if MODE == "hook" and engines == 2 and ctx.rank == ctx.world_size - 1:
        start_load = worker.start_load_kv

        def failing_start(stream):
            if worker.get_connector_meta() and worker.get_connector_meta().get("loads"):
                raise OSError("injected failure")
            start_load(stream)

        worker.start_load_kv = failing_start
    return sched, worker


def failing_write(self, layer, *args):
    if engines == 2 and self.ctx.rank == self.ctx.world_size - 1:
        raise RuntimeError("injected forward failure")
    real_write(self, layer, *args)


real_write = ex.Runner._write
if sys.argv[1] == "forward":
    ex.Runner._write = failing_write  # type: ignore[method-assign]
real_start = ex.start_connector
ex.start_connector = start_connector
MODE = sys.argv[1]


def main() -> None:
    topo = init_distributed()
    with abort_on_error(topo.comm), ex.shared_cache_dir(topo) as cache_dir:
        for name in ("fresh", "new"):
            try:
                r = ex.run_engine(topo, cache_dir)
            except RemoteError as exc:
                print(f"rank {topo.rank}: {name} engine: RemoteError: {exc}", flush=True)
                continue
            if topo.rank == 0:
                print(
                    f"{name} engine: {r['computed']} computed, {r['loaded']} loaded, "
                    f"{r['mismatched']} mismatched, failed: {sorted(r['failed'].items())}, "
                    f"request_finished: {sorted(finished.items())}",
                    flush=True,
                )
                finished.clear()
    topo.close()


if __name__ == "__main__":
    main()
