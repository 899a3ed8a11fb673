"""Disk connector save/load vs sequential disk bandwidth; see kvdist/bench/disk.py.

python benchmarks/disk.py [--quick] [--fsync] [--dir DIR] [--out results.json]
"""

import argparse
import json
import sys

from kvdist.bench.disk import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = parser.parse_args()
    text = json.dumps(run(args), indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text, file=sys.stdout)
