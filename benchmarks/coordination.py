"""The coordination benchmark (`kvdist bench coordination`) as a script.

    launch/mpirun.sh -n 2 python benchmarks/coordination.py --json part.json
    python benchmarks/coordination.py report part*.json --json out.json --md out.md

`benchmarks/run_coordination.sh` runs the whole matrix and writes benchmarks/results/.
"""

import sys

from kvdist.bench.coordination import main

if __name__ == "__main__":
    sys.exit(main())
