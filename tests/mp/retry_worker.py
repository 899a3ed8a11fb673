"""An engine whose connector settings every rank refuses, then the corrected one, in the
same processes. LLM() owns its topology here (nobody called init_distributed), so the
refused start must close what it started. Each rank writes OUT_DIR/rank<R>.json.

Usage: mpiexec -n 2 python tests/mp/retry_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import kvdist


def main() -> None:
    out = Path(sys.argv[1])
    seen = {}
    try:
        kvdist.LLM("tiny", connector={"name": "cpu", "kwargs": {"capacity_bytes": 0}}, device="cpu")
        seen["first"] = None
    except ValueError as exc:
        seen["first"] = str(exc)
    llm = kvdist.LLM(
        "tiny", connector={"name": "cpu", "kwargs": {"capacity_bytes": 1 << 20}}, device="cpu"
    )
    seen["tokens"] = llm.generate([[1, 2, 3]], kvdist.SamplingParams(max_tokens=2))[
        0
    ].output_token_ids
    llm.shutdown()
    (out / f"rank{llm.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
