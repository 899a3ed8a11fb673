"""Rank 1 is late, gone or failing, for tests/test_engine_mp.py:

    late_rank.py sleep     rank 1 stops for 30 s between two steps
    late_rank.py exit      rank 1 ends before generate
    late_rank.py forward   rank 1's forward raises in step 3
    late_rank.py owned     as sleep, in an engine that makes its own topology with
                           timeout_s=3 (run with a long KVDIST_TIMEOUT_S)

Run with a short KVDIST_TIMEOUT_S: the job must end with an error well within the 30 s.
"""

from __future__ import annotations

import sys
import time

from kvdist.comm import abort_on_error, init_distributed
from kvdist.engine.llm import LLM
from kvdist.engine.sampling import SamplingParams


def main() -> None:
    mode = sys.argv[1]
    if mode == "owned":  # the engine makes the topology, with its own deadline
        llm = LLM("tiny", device="cpu", num_blocks=64, dtype="float32", timeout_s=3)
        topo, mode = llm.topology, "sleep"
    else:
        topo = init_distributed(device="cpu")
        llm = None
    with abort_on_error(topo.comm):
        if llm is None:
            llm = LLM("tiny", topology=topo, num_blocks=64, dtype="float32")
        late = topo.rank == 1
        if mode == "exit" and late:
            return
        if mode == "forward" and late:
            real = llm.runner.execute

            def execute(out, hooks):
                if llm.coordinator.stats.steps == 2:  # the third step
                    raise RuntimeError("injected forward failure")
                return real(out, hooks)

            llm.runner.execute = execute  # type: ignore[method-assign]

        def on_step(_: LLM, step: int) -> None:
            if mode == "sleep" and late and step == 2:
                time.sleep(30)

        llm.generate([[1, 2, 3, 4, 5]] * 2, SamplingParams(max_tokens=8), on_step=on_step)
        print(f"rank {topo.rank}: generate returned", flush=True)
        llm.shutdown()
    topo.close()


if __name__ == "__main__":
    main()
