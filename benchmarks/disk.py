"""Disk connector save/load vs sequential disk bandwidth; see kvdist/bench/disk.py.

python benchmarks/disk.py [--quick] [--fsync] [--dir DIR] [--out results.json]
"""

import sys

from kvdist.bench.cli import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark("disk", sys.argv[1:]))
