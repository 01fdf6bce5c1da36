"""Thin wrapper: decode speed and frame agreement of each video backend (see mm3d.video.benchdecode)."""

import sys

from mm3d.video.benchdecode import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
