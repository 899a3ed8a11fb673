"""examples/custom_connector.py with requests that finish in the step that loads them
(one token each): prompt A, then A + B (loads A, computes B, finishes at once), then A + B
again, which must load B too: the connector holds the second request for the saves it put
off until its load was known good. Prints each engine's loaded tokens on rank 0."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import kvdist  # noqa: E402
from kvdist.comm import abort_on_error, init_distributed  # noqa: E402


def main() -> None:
    conn = kvdist.ConnectorConfig(
        module="custom_connector",
        scheduler_class="ProcessMemoryScheduler",
        worker_class="ProcessMemoryWorker",
    )
    a = list(range(10, 58))
    ab = a + list(range(300, 348))
    topo = init_distributed(device="cpu")
    loaded = []
    with abort_on_error(topo.comm):
        for prompt in (a, ab, ab):
            llm = kvdist.LLM("tiny", connector=conn, topology=topo)
            loaded.append(llm.generate([prompt], kvdist.SamplingParams(max_tokens=1))[0])
            llm.shutdown()
    if topo.rank == 0:
        print("loaded:", [o.num_external_tokens for o in loaded], flush=True)
    topo.close()


if __name__ == "__main__":
    main()
