"""Prefix KV that survives an engine restart: the flow of `kvdist demo`, step by step.

python examples/persistence.py [CACHE_DIR]
launch/mpirun.sh -n 2 python examples/persistence.py /tmp/kv

Without CACHE_DIR, a temporary directory is used and removed at the end.
"""

from __future__ import annotations

import shutil
import sys
import tempfile

import kvdist
from kvdist.comm import abort_on_error, init_distributed


def main() -> None:
    topo = init_distributed(device="cpu")
    with abort_on_error(topo.comm):
        # 1. Every rank uses the same directory (give one on a shared filesystem for
        #    several nodes; here rank 0 makes a temporary one and tells the others).
        path = sys.argv[1] if len(sys.argv) > 1 else None
        made = None
        if path is None:
            made = tempfile.mkdtemp(prefix="kvdist-example-") if topo.rank == 0 else None
            path = topo.comm.broadcast_bytes(
                made and made.encode(), timeout_s=60, what="dir"
            ).decode()
        try:
            restart_with_cache(topo, path)
            topo.comm.barrier(timeout_s=60, what="every rank done with the cache")
        finally:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
    topo.close()


def restart_with_cache(topo, path: str) -> None:
    disk = {"name": "disk", "kwargs": {"path": path}}
    system = list(range(100, 100 + 320))  # a long shared prefix (20 blocks of 16)
    prompts = [system + [7, 8, 9, i] for i in range(4)]
    params = kvdist.SamplingParams(max_tokens=12)

    # 2. A first engine computes the prompts and saves their full blocks to disk.
    llm = kvdist.LLM("tiny", connector=disk, topology=topo)
    cold = llm.generate(prompts, params)
    llm.shutdown()  # returns once every rank's saves are on disk

    # 3. A new engine (think: after a restart) loads those blocks instead.
    llm = kvdist.LLM("tiny", connector=disk, topology=topo)
    warm = llm.generate(prompts, params)
    llm.shutdown()

    if topo.rank == 0:
        for c, w in zip(cold, warm):
            # The first request loads the shared prefix; the others wait for that load
            # and then find it in the device prefix cache.
            print(
                f"{w.request_id}: {w.num_external_tokens:3d} loaded from disk + "
                f"{w.num_cached_tokens:3d} on device of "
                f"{len(w.prompt_token_ids)} prompt tokens, TTFT {c.ttft_s * 1e3:6.1f} ms -> "
                f"{w.ttft_s * 1e3:6.1f} ms, same tokens: {c.output_token_ids == w.output_token_ids}"
            )


if __name__ == "__main__":
    main()
