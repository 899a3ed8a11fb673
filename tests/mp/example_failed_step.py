"""examples/custom_connector.py after a failed step: a worker hook raises on the last rank
in a step that saves, so that rank stores nothing; a new engine in the same processes must
not answer hits on those blocks (the last rank's store lacks them), and loads what every
rank stored in later runs. Prints one line per engine on rank 0."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import custom_connector as cc  # noqa: E402

import kvdist  # noqa: E402
from kvdist.comm import abort_on_error, init_distributed  # noqa: E402


class FlakyWorker(cc.ProcessMemoryWorker):
    armed = True

    def start_load_kv(self, stream):
        last = self.ctx.rank == self.ctx.world_size - 1
        if FlakyWorker.armed and last and self.get_connector_meta()["saves"]:
            FlakyWorker.armed = False
            raise OSError("injected failure")
        super().start_load_kv(stream)


cc.FlakyWorker = FlakyWorker  # type: ignore[attr-defined]


def main() -> None:
    conn = kvdist.ConnectorConfig(
        module="custom_connector",
        scheduler_class="ProcessMemoryScheduler",
        worker_class="FlakyWorker",
    )
    prompts = [list(range(10, 110))]
    params = kvdist.SamplingParams(max_tokens=4)
    topo = init_distributed(device="cpu")
    with abort_on_error(topo.comm):
        reference = kvdist.LLM("tiny", topology=topo)
        want = reference.generate(prompts, params)[0].output_token_ids
        reference.shutdown()
        failed = kvdist.LLM("tiny", connector=conn, topology=topo)
        try:
            failed.generate(prompts, params)
            raise AssertionError("the injected failure did not fail the step")
        except kvdist.RemoteError:
            pass
        failed.shutdown()
        for name in ("after the failure", "again"):
            llm = kvdist.LLM("tiny", connector=conn, topology=topo)
            out = llm.generate(prompts, params)[0]
            llm.shutdown()
            if topo.rank == 0:
                same = out.output_token_ids == want
                print(f"{name}: loaded {out.num_external_tokens}, identical: {same}", flush=True)
    topo.close()


if __name__ == "__main__":
    main()
