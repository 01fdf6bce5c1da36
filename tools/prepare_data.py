"""Thin wrapper: same as `mm3d data ...` (synth, check, ...; see `mm3d data --help`)."""

import sys

from mm3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
