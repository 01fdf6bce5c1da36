"""Thin wrapper: same as `mm3d bench ...` (see `mm3d bench --help`)."""

import sys

from mm3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
