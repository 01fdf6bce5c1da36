"""Thin wrapper: torch's attention kernel, fp32 vs bf16, forward and backward (see mm3d.bench.attention_timings)."""

import sys

from mm3d.bench import attention_main

if __name__ == "__main__":
    sys.exit(attention_main(sys.argv[1:]))
