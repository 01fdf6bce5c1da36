"""FSDP2 (train.strategy=fsdp) on CPU with gloo: torchrun launches 2 processes through the `mm3d`
CLI on the tiny Point-MAE pretraining (two transformer stacks: the encoder's and the decoder's
blocks are the units). Tolerances (fp32): losses rtol 1e-5, weights and optimizer state atol 1e-6
(sharded reductions sum in another order than DDP's bucketed all-reduce); bf16: rtol 2e-2."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import mm3d.toy  # noqa: F401  (the toy task)
from mm3d.checkpoint import load_checkpoint
from mm3d.cli import main as mm3d_main
from mm3d.config import ConfigError, load_config
from mm3d.fsdp import (apply_fsdp, full_model_state, full_optimizer_state, gathered, is_sharded, load_model_state,
                       load_optimizer_state, shard_units)
from mm3d.registry import TASKS
from mm3d.trainer import build_optimizer

COMMON = ["train.batch_size=4", "train.log_every=1", "train.progress=off", "train.tensorboard=false",
          "train.device=cpu", "train.eval_every=0", "train.save_every=0", "optim.lr=0.002", "optim.warmup_steps=0",
          "optim.schedule=constant", "optim.clip_grad=1.0",
          # the same AdamW implementation under both strategies (auto-fused is off under FSDP): this
          # compares sharding, and AdamW's step on the near-zero gradients of biases before BatchNorm
          # amplifies the last-bit differences between the fused and the per-parameter kernels
          "optim.fused=false"]


@pytest.fixture
def pc_config(tmp_path, mn_root):
    cfg = tmp_path / "pc.yaml"
    cfg.write_text(f"task: pointmae_pretrain\nmodel:\n  variant: pointmae_tiny_test\ndata:\n  dataset: modelnet40\n"
                   f"  root: {mn_root}\n  npoints: 256\n  report_shapes: 0\n  cache_points: 512\n"
                   f"  cache_dir: {tmp_path / 'cache'}\n")
    return cfg


def torchrun(cfg, *overrides, command="pretrain"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mm3d.cli", command, str(cfg), *COMMON, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(run_dir, split="train"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def losses(run_dir, key="loss"):
    return torch.tensor([r[key] for r in records(run_dir)], dtype=torch.float64)


# Parameters whose gradient is zero in exact arithmetic: biases whose only effect is a constant shift
# of a BatchNorm input in train mode (the mini-PointNet's first layer; its last, whose shift reaches the
# fusing layer's BN as a constant through both halves; the fusing layer), and the BN running means they
# move. Their gradients are round-off; DDP and FSDP differ in the last bits, and AdamW turns round-off
# into lr-sized steps of random sign, so these random-walk apart (they do in the official model too).
# In train mode they cannot change the function (losses and gradient norms match to 1e-5); in eval mode
# only through the running means' lag behind them (the scores below).
BN_CANCELLED = ("encoder.patch_embed.first_conv.0.bias", "encoder.patch_embed.first_conv.3.bias",
                "encoder.patch_embed.second_conv.0.bias", "encoder.patch_embed.first_conv.1.running_mean",
                "encoder.patch_embed.second_conv.1.running_mean")


def assert_state_close(a, b, atol=1e-6, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if k not in skip:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def assert_optimizer_close(a, b, atol=1e-6):
    assert a["state"].keys() == b["state"].keys()
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    for i in a["state"]:
        assert_state_close(a["state"][i], b["state"][i], atol)


# ---- in one process: a gloo group of one rank ---------------------------------------------------


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tiny_pretrain(seed=0):
    cfg = load_config(None, ["task=pointmae_pretrain", "model.variant=pointmae_tiny_test", "data.npoints=256",
                             "optim.lr=0.01"])
    torch.manual_seed(seed)
    return cfg, TASKS.get("pointmae_pretrain").build_model(cfg)


def test_units_are_every_block_of_both_stacks():
    _, model = tiny_pretrain()
    units = shard_units(model)
    assert units == [*model.encoder.blocks, *model.decoder.blocks] and len(units) == 2 + 1
    for task in ("videomae_pretrain", "videomae_finetune"):  # the video models follow the same convention
        video = TASKS.get(task).build_model(load_config(None, [f"task={task}", "model.variant=videomae_tiny_test"]))
        stacks = [video.encoder.blocks] + ([video.decoder.blocks] if hasattr(video, "decoder") else [])
        assert shard_units(video) == [b for stack in stacks for b in stack] and len(shard_units(video)) >= 2

    class Declared(torch.nn.Module):  # a model naming its own units wins over the `blocks` convention
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.trunk = torch.nn.Linear(2, 2)

        def fsdp_units(self):
            return [self.trunk]

    m = Declared()
    assert shard_units(m) == [m.trunk]


def test_fsdp_refuses_ema_and_fp16():
    for bad in ("train.ema=true", "train.precision=fp16"):
        with pytest.raises(ConfigError, match="strategy=fsdp"):
            load_config(None, ["task=toy_regression", "train.strategy=fsdp", bad])


def test_sharded_state_round_trips_in_the_unsharded_format(one_rank_group):
    """One rank: the same model and optimizer trained plain and sharded give the same states, in the
    same (index-keyed) format; loading those into a fresh sharded model restores them; under bf16 the
    blocks compute with bf16 parameters while the stored ones stay fp32."""
    cfg, plain = tiny_pretrain()
    _, sharded = tiny_pretrain()
    apply_fsdp(sharded)
    assert is_sharded(sharded) and not is_sharded(plain)
    batch = {"points": torch.randn(4, 256, 3, generator=torch.Generator().manual_seed(1))}
    opts = []
    for model in (plain, sharded):
        opt = build_optimizer(model, cfg, 0.01)
        for _ in range(2):
            model(batch, generator=torch.Generator().manual_seed(2)).loss.backward()
            opt.step()
            opt.zero_grad()
        opts.append(opt)
    assert_state_close(full_model_state(sharded), plain.state_dict())
    osd = full_optimizer_state(sharded, opts[1])
    assert_optimizer_close(osd, opts[0].state_dict())

    _, fresh = tiny_pretrain(seed=5)
    apply_fsdp(fresh)
    fresh_opt = build_optimizer(fresh, cfg, 0.01)
    load_model_state(fresh, plain.state_dict())
    load_optimizer_state(fresh, fresh_opt, opts[0].state_dict())
    assert_state_close(full_model_state(fresh), plain.state_dict())
    assert_optimizer_close(full_optimizer_state(fresh, fresh_opt), opts[0].state_dict())

    _, half = tiny_pretrain()
    apply_fsdp(half, param_dtype=torch.bfloat16)
    seen = []
    hook = half.encoder.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16), gathered(half):
        half(batch, generator=torch.Generator().manual_seed(2))
    hook.remove()
    assert seen == [torch.bfloat16]
    assert {v.dtype for v in full_model_state(half).values() if v.is_floating_point()} == {torch.float32}


# ---- two processes under torchrun ----------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_equals_ddp_and_checkpoints_move_between_strategies(tmp_path, pc_config):
    """Accumulation (2 micro-steps), clipping and activation checkpointing: FSDP's losses, gradient
    norms, weights and optimizer state equal DDP's. FSDP's checkpoint scores the same in a single
    process (`mm3d evaluate`); DDP's step-2 checkpoint resumes under FSDP to DDP's step-4 numbers."""
    run = ["train.epochs=2", "train.max_steps=4", "train.accum_steps=2", "train.grad_checkpointing=true",
           "train.save_every_steps=2"]
    torchrun(pc_config, f"output_dir={tmp_path / 'ddp'}", *run)
    torchrun(pc_config, f"output_dir={tmp_path / 'fsdp'}", "train.strategy=fsdp", *run)
    torch.testing.assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses(tmp_path / "fsdp", "grad_norm"), losses(tmp_path / "ddp", "grad_norm"),
                               rtol=1e-5, atol=1e-6)
    assert losses(tmp_path / "ddp").unique().numel() == 4  # the steps learn something
    ddp, fsdp = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("ddp", "fsdp"))
    assert fsdp["step"] == 4 and fsdp["config"]["train"]["strategy"] == "fsdp"
    assert_state_close(fsdp["model"], ddp["model"], skip=BN_CANCELLED)
    assert_optimizer_close(fsdp["optimizer"], ddp["optimizer"])

    # FSDP's full-state checkpoint in a single process (`mm3d evaluate`) scores as DDP's does there; under
    # torchrun both strategies scored the same (each rank draws its evaluation masks from its own stream)
    result = {}
    for name in ("ddp", "fsdp"):
        assert mm3d_main(["evaluate", str(pc_config), *COMMON, f"output_dir={tmp_path / ('single_' + name)}",
                          f"checkpoint={tmp_path / name / 'checkpoints' / 'last.pt'}"]) == 0
        single = json.loads((tmp_path / f"single_{name}" / "eval" / "results.json").read_text())["test"]["loss"]
        two = json.loads((tmp_path / name / "results.json").read_text())["test"]["loss"]
        result[name] = (single, two)
    # (eval mode: the BN-cancelled biases above, 3e-3 apart after 4 steps at this test's lr, less their
    # running means' share, move the scores by about 7e-4)
    assert result["fsdp"] == pytest.approx(result["ddp"], rel=3e-3)

    # DDP's checkpoint of step 2, resumed under FSDP (strategy is run-neutral: no resume_force)
    step2 = tmp_path / "ddp" / "checkpoints" / "step_00000002.pt"
    torchrun(pc_config, f"output_dir={tmp_path / 'moved'}", "train.strategy=fsdp", *run, f"train.resume={step2}")
    torch.testing.assert_close(losses(tmp_path / "moved"), losses(tmp_path / "ddp")[2:], rtol=1e-5, atol=1e-6)
    moved = load_checkpoint(tmp_path / "moved" / "checkpoints" / "last.pt")
    assert_state_close(moved["model"], ddp["model"], skip=BN_CANCELLED)
    assert_optimizer_close(moved["optimizer"], ddp["optimizer"])


@pytest.mark.slow
def test_fsdp_bf16_follows_ddp_bf16(tmp_path, pc_config):
    """bf16: FSDP computes with bf16 parameter copies under autocast; DDP autocasts fp32 weights.
    The losses agree to bf16 precision."""
    run = ["train.max_steps=2", "train.precision=bf16"]
    torchrun(pc_config, f"output_dir={tmp_path / 'ddp'}", *run)
    torchrun(pc_config, f"output_dir={tmp_path / 'fsdp'}", "train.strategy=fsdp", *run)
    torch.testing.assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), rtol=2e-2, atol=0)
    ck = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.pt")
    assert {v.dtype for v in ck["model"].values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.slow
def test_fsdp_evaluates_a_split_the_ranks_hold_unevenly(tmp_path):
    """17 validation samples on 2 ranks: 3 batches on one, 2 on the other (a sharded forward would
    wait for a peer that has none left); the mean equals a single process's over all 17."""
    cfg = tmp_path / "toy.yaml"
    cfg.write_text("task: toy_regression\n")
    toy = ["data.num_val=17", "model.dropout=0.0", "train.max_steps=2", "train.eval_every=1"]
    torchrun(cfg, f"output_dir={tmp_path / 'fsdp'}", "train.strategy=fsdp", *toy, command="finetune")
    two = records(tmp_path / "fsdp", "val")
    assert two and all(r["step"] == 2 for r in two)
    assert mm3d_main(["evaluate", str(cfg), *COMMON, *toy, f"output_dir={tmp_path / 'single'}",
                      f"checkpoint={tmp_path / 'fsdp' / 'checkpoints' / 'last.pt'}"]) == 0
    single = json.loads((tmp_path / "single" / "eval" / "results.json").read_text())["val"]["loss"]
    assert two[-1]["loss"] == pytest.approx(single, rel=1e-6)
