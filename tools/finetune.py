"""Thin wrapper: same as `mm3d finetune ...` (see `mm3d finetune --help`)."""

import sys

from mm3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
