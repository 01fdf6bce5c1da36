"""Thin wrapper: same as `mm3d pretrain ...` (see `mm3d pretrain --help`)."""

import sys

from mm3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
