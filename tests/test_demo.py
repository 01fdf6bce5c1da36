"""`mm3d demo --quick`: every stage of `make demo` runs end to end on tiny data and writes its report."""

import json

import pytest

from mm3d.demo import run_demo


@pytest.mark.slow
def test_demo_quick_runs_every_stage(tmp_path):
    assert run_demo(tmp_path, quick=True) == 0
    report = (tmp_path / "REPORT.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in ("pointmae_pretrain", "pointmae_finetune", "pointmae_finetune_scratch",
                 "videomae_pretrain", "videomae_finetune", "videomae_finetune_scratch", "videomae_linprobe",
                 "videomae_linprobe_scratch"):
        assert name in summary, report
        assert summary[name]["first_loss"] is not None
    assert "not available" not in report
    assert summary["pointmae_finetune"]["test"]["top1"] >= 0.0
    assert any(str(f).endswith(".png") for f in summary["pointmae_pretrain"]["files"])
    assert any(str(f).endswith(".png") for f in summary["videomae_pretrain"]["files"])
