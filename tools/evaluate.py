"""Thin wrapper: same as `mm3d evaluate ...` (see `mm3d evaluate --help`)."""

import sys

from mm3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
