"""Scattered-block save/load vs contiguous pinned copies; see kvdist/bench/transfer.py.

python benchmarks/transfer.py [--quick] [--out results.json]
"""

import sys

from kvdist.bench.cli import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark("transfer", sys.argv[1:]))
