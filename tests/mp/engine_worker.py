"""Run one engine scenario on every rank; rank 0 writes all ranks' observations as JSON.

Usage: mpiexec -n N python tests/mp/engine_worker.py [connectors:]SCENARIO|all OUT.json [DEVICE]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import connector_scenarios  # noqa: E402
import engine_scenarios  # noqa: E402

from kvdist.comm import abort_on_error, init_distributed  # noqa: E402


def main() -> None:
    name, out = sys.argv[1], sys.argv[2]
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    topo = init_distributed(device=device)
    with abort_on_error(topo.comm):
        # NAME, "all" (every engine scenario) or "connectors:NAME" / "connectors:all".
        module = engine_scenarios
        if name.startswith("connectors:"):
            module, name = connector_scenarios, name.split(":", 1)[1]
        known = {**module.SCENARIOS, **getattr(module, "ISOLATED", {})}
        names = sorted(module.SCENARIOS) if name == "all" else [name]
        result = {n: known[n](topo) for n in names}
        gathered = topo.comm.allgather_bytes(
            json.dumps(result).encode(), timeout_s=120, what="gather results"
        )
        if topo.rank == 0:
            ranks = [json.loads(g) for g in gathered]
            Path(out).write_text(json.dumps({n: [r[n] for r in ranks] for n in names}))
    topo.close()


if __name__ == "__main__":
    main()
