"""Thin wrapper: same as `mm3d visualize ...` (see `mm3d visualize --help`)."""

import sys

from mm3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["visualize", *sys.argv[1:]]))
