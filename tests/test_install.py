"""A normal (not editable) `pip install` ships the configs: `mm3d demo` runs from any folder.

The project is installed into a throwaway venv whose ``.pth`` file puts this interpreter's
site-packages after its own, so torch and the other dependencies are reused, not downloaded.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# build outputs and local state that a clean clone does not have
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    "runs", "demo_out", "data")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_pip_install_runs_the_demo_from_any_folder(tmp_path):
    # a copy of the source, so the in-tree build (build/, *.egg-info) never touches the checkout
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "mm3d-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-build-isolation", src],
         timeout=300)

    shipped = {p.relative_to(site / "mm3d" / "configs") for p in (site / "mm3d" / "configs").rglob("*.yaml")}
    source = {p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped == source, f"missing: {sorted(map(str, source - shipped))}"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = _run([venv / "bin" / "mm3d", "demo", "--quick", "--only", "pointcloud", "--out", "out"],
                cwd=elsewhere, env=env, timeout=600)

    report = (elsewhere / "out" / "REPORT.md").read_text()
    summary = json.loads((elsewhere / "out" / "summary.json").read_text())
    assert "### pointmae_pretrain (configs/pointcloud/pointmae_pretrain_demo.yaml)" in report, proc.stdout[-4000:]
    pretrain = summary["pointmae_pretrain"]
    # the config came from the installed package, not from the source tree or the copy
    assert pretrain["config"] == str(site / "mm3d" / "configs" / "pointcloud" / "pointmae_pretrain_demo.yaml")
    assert f"Configs from `{site / 'mm3d' / 'configs'}`" in report
    # a real pretraining run: Chamfer losses are finite and positive, and the report quotes them
    assert 0 < pretrain["first_loss"] < math.inf and 0 < pretrain["last_loss"] < math.inf
    assert f"loss {pretrain['first_loss']:.4f} (first steps)" in report
    assert summary["pointmae_finetune"]["test"]["num_samples"] > 0
    assert "not available" not in report
