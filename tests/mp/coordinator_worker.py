"""Run every coordinator scenario on every rank with the real communicator; rank 0 prints
one JSON line with every rank's observations (tests/test_coordinator_mp.py checks them).

Usage: mpiexec -n N python tests/mp/coordinator_worker.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordination_scenarios import SCENARIOS  # noqa: E402

from kvdist.comm import abort_on_error, init_distributed  # noqa: E402


def main() -> None:
    topo = init_distributed(device="cpu")
    with abort_on_error(topo.comm):
        mine = {name: fn(topo.comm) for name, fn in sorted(SCENARIOS.items())}
        gathered = topo.comm.allgather_bytes(
            json.dumps(mine).encode(), timeout_s=60, what="gather results"
        )
        if topo.rank == 0:
            ranks = [json.loads(g) for g in gathered]
            print(json.dumps({name: [r[name] for r in ranks] for name in SCENARIOS}))
    topo.close()


if __name__ == "__main__":
    main()
