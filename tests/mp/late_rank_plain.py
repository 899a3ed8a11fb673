"""A script as the README's "Using the engine" writes it, with no abort_on_error around
it: `kvdist.LLM` makes its own topology, and rank 1 stops for longer than the deadline (run
with a short KVDIST_TIMEOUT_S) before `generate` (argv[1] "generate") or before
`shutdown` ("shutdown"). Rank 0's call raises the collective's timeout; the job must then
end, not wait in MPI's finalize for rank 1."""

from __future__ import annotations

import sys
import time

import kvdist

late_before = sys.argv[1]
llm = kvdist.LLM("tiny", device="cpu", num_blocks=64, dtype="float32")
if late_before == "generate" and llm.topology.rank == 1:
    time.sleep(60)
outs = llm.generate([[1, 2, 3, 4]], kvdist.SamplingParams(max_tokens=4))
if late_before == "shutdown" and llm.topology.rank == 1:
    time.sleep(60)
llm.shutdown()
