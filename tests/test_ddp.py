"""Real DDP: torchrun launches 2 CPU processes (gloo) on the toy task through the `mm3d` CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mm3d.toy  # noqa: F401
from mm3d.checkpoint import load_checkpoint
from mm3d.config import load_config
from mm3d.trainer import run

COMMON = ["model.dropout=0.0", "optim.lr=0.05", "optim.schedule=constant", "optim.warmup_steps=0",
          "train.log_every=1", "train.progress=off", "train.tensorboard=false", "train.eval_every=0",
          "train.save_every=0", "train.epochs=1"]


def torchrun(tmp_path, *overrides):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text("task: toy_regression\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mm3d.cli", "finetune", str(cfg), *COMMON, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in rows if r["split"] == "train"])


@pytest.mark.slow
def test_ddp_matches_single_process_and_resumes_on_both_ranks(tmp_path):
    # global batch 8: 2 ranks x 4 vs 1 process x 8
    torchrun(tmp_path, f"output_dir={tmp_path / 'ddp'}", "train.batch_size=4", "train.max_steps=3",
             "train.save_every_steps=3")
    single = load_config(None, ["task=toy_regression", *COMMON, f"output_dir={tmp_path / 'single'}",
                                "train.batch_size=8", "train.max_steps=6"])
    run(single)
    ddp_ck = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ddp_ck["step"] == 3 and ddp_ck["world_size"] == 2 and len(ddp_ck["rng_per_rank"]) == 2
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")[:3]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # resume the rank-0 checkpoint on both ranks and continue to step 6
    torchrun(tmp_path, f"output_dir={tmp_path / 'ddp'}", "train.batch_size=4", "train.max_steps=6",
             "train.resume=auto")
    full = train_losses(tmp_path / "ddp")
    torch.testing.assert_close(full, train_losses(tmp_path / "single"), rtol=1e-5, atol=1e-6)
    single_ck = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    ddp_ck = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    for k, v in single_ck["model"].items():
        torch.testing.assert_close(ddp_ck["model"][k], v, rtol=1e-5, atol=1e-6)
