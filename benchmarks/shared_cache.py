"""Several engines on one disk cache directory; see kvdist/bench/shared_cache.py.

python benchmarks/shared_cache.py [--engines 1,1,2] [--capacity 1M] [--rescan-s 0.2]
                                  [--duration-s 30] [--out results.json]
"""

import sys

from kvdist.bench.cli import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark("shared-cache", sys.argv[1:]))
