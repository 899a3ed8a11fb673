"""`kvdist bench`: see `kvdist.bench.cli`."""

from kvdist.bench.cli import add_parser

__all__ = ["add_parser"]
