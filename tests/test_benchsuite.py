"""`mm3d bench-suite`: the GPU check's entries run end to end on the CPU with tiny variants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm3d.benchsuite import SUITES, run_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu_with_tiny_variants_and_writes_one_json(tmp_path):
    """tools/gpu_check.sh --device cpu --tiny: the lent machine's script, down the same path."""
    env = {k: v for k, v in os.environ.items() if k != "MM3D_POINTMAE_ROOT"}
    env["PYTHON"] = sys.executable
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--device", "cpu", "--tiny", "--no-install",
                           "--no-tests", "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], [e.get("error") for e in report["entries"]])
    assert "bench-suite (exit 0)" in proc.stdout
    names = [e["name"] for e in report["entries"]]
    assert names == [e.name for e in SUITES["gpu"]]
    for row in report["entries"]:
        r = row["result"]
        assert r["ms_per_step"] > 0 and r["batch_size"] == 2 and r["device"] == "cpu"
        assert 0 < r["peak_fraction"] < 2
    by = {e["name"]: e for e in report["entries"]}
    # the point entries have no official peer without a checkout, and say why
    assert "MM3D_POINTMAE_ROOT" in by["pointmae_small_fp32_b128"]["peer_note"]
    assert by["pointmae_small_bf16_b128"]["result"]["precision"] == "bf16"
    ops = {(o["op"], o["shape"], o["impl"]) for o in report["ops"]}
    assert ("fps", "B=2 N=1024 G=64", "torch") in ops and ("knn", "B=2 M=64 N=1024 k=32", "torch") in ops
    assert not any(impl == "numpy_bruteforce" for _, _, impl in ops)  # the GPU check times ours only
    assert "pointmae_small_bf16_b128_compiled" in proc.stdout  # the per-entry summary lines


def test_an_unknown_suite_or_a_missing_gpu_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown suite"):
        run_suite("tpu", "cpu", tmp_path / "x.json")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            run_suite("gpu", "cuda", tmp_path / "x.json")
