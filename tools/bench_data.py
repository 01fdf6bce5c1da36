"""Thin wrapper: same as `mm3d bench-data ...` (see `mm3d bench-data --help`): training clips/s per loader
worker, raw videos vs prepared shards, for every decoder."""

import sys

from mm3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-data", *sys.argv[1:]]))
