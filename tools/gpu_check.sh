#!/usr/bin/env bash
# The GPU check of the performance issue, for a lent GPU machine whose Python already has torch.
# Fits in 10 minutes on one GPU; everything it measures lands in one folder ($OUT, default ./gpu_check):
#   install.log   what was installed, and what could not be had (skipped, with the reason)
#   tests.log     the fast test suite on CUDA (-m "not slow"), in parallel when pytest-xdist is there
#   gpu_check.json  `mm3d bench-suite --suite gpu`: VideoMAE small/base bf16 batch 32 vs Hugging Face,
#                 Point-MAE small batch 128 fp32/bf16 (and compiled) vs the official code when
#                 $MM3D_POINTMAE_ROOT names a checkout, the point ops at B=128
#
#   bash tools/gpu_check.sh                         # on the GPU machine
#   bash tools/gpu_check.sh --device cpu --tiny     # the same path on a CPU, tiny variants (a minute)
# Options: --device cuda|cpu, --tiny, --no-install, --no-tests, --out DIR. Environment: PYTHON, WHEELS
# (a folder of wheels to install missing packages from, for machines without an index), MM3D_POINTMAE_ROOT.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda; TINY=""; INSTALL=1; TESTS=1; OUT=${OUT:-gpu_check}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=--tiny; shift ;;
    --no-install) INSTALL=0; shift ;;
    --no-tests) TESTS=0; shift ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
say() { echo "gpu_check [$(( $(date +%s) - START ))s]: $*"; }

say "torch: $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' 2>&1)"
if [ "$DEVICE" = cuda ] && ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  say "no CUDA device visible to torch: nothing to check on a GPU (use --device cpu for the CPU path)"; exit 1
fi

# -- install: mm3d without touching torch, then each missing package (from $WHEELS, else the index) ----
if [ "$INSTALL" = 1 ]; then
  {
    $PY -m pip install --no-deps -q -e . && echo "installed mm3d (editable, --no-deps)"
    # pip name:import name
    for pair in timm:timm einops:einops safetensors:safetensors pyyaml:yaml tqdm:tqdm numpy:numpy pillow:PIL \
                h5py:h5py scikit-learn:sklearn matplotlib:matplotlib tensorboard:tensorboard av:av decord:decord \
                webdataset:webdataset wids:wids braceexpand:braceexpand open3d:open3d pytest:pytest \
                pytest-xdist:xdist transformers:transformers triton:triton torchcodec:torchcodec; do
      pkg=${pair%%:*}; mod=${pair##*:}
      $PY -c "import $mod" 2>/dev/null && continue
      if [ -n "${WHEELS:-}" ] && $PY -m pip install -q --no-index --find-links "$WHEELS" "$pkg" 2>/dev/null; then
        echo "installed $pkg from $WHEELS"
      elif $PY -m pip install -q "$pkg" 2>/dev/null; then
        echo "installed $pkg"
      else
        echo "SKIPPED $pkg: not installed and not installable here (what needs it is skipped, and says so)"
      fi
    done
  } > "$OUT/install.log" 2>&1
  say "install: $(grep -c '^installed' "$OUT/install.log") installed, $(grep -c '^SKIPPED' "$OUT/install.log") skipped ($OUT/install.log)"
fi

# -- the fast test suite on this device ------------------------------------------------------------------
if [ "$TESTS" = 1 ]; then
  PAR=""
  if $PY -c 'import xdist' 2>/dev/null; then PAR="-n 8"; fi
  timeout 300 $PY -m pytest tests -m "not slow" -q -p no:cacheprovider $PAR > "$OUT/tests.log" 2>&1
  say "tests (exit $?): $(tail -n 1 "$OUT/tests.log")"
fi

# -- the benchmark suite ---------------------------------------------------------------------------------
timeout 420 $PY -m mm3d.cli bench-suite --suite gpu --device "$DEVICE" $TINY --out "$OUT/gpu_check.json" \
  > "$OUT/bench.log" 2>&1
rc=$?
say "bench-suite (exit $rc):"
grep -v "^[0-9][0-9]:" "$OUT/bench.log" | tail -n 12
say "done: $OUT/gpu_check.json"
exit $rc
