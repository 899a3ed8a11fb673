"""`python -m kvdist ...`: the `kvdist` command."""

import sys

from kvdist.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
