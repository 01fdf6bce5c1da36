"""Trainer features with no other test: bf16 autocast on the CPU, gradient clipping, the weight-decay
schedule, torch.compile; SLURM/torchrun environment parsing; the sampler when ranks outnumber samples."""

from __future__ import annotations

import json
import math
import os
from unittest import mock

import pytest
import torch

import mm3d.toy  # noqa: F401  (registers the toy task)
from mm3d.config import load_config
from mm3d.data import ResumableSampler
from mm3d.distributed import DistInfo, _env_info
from mm3d.trainer import Trainer


def toy_cfg(tmp_path, *extra, name="run"):
    return load_config(None, ["task=toy_regression", f"output_dir={tmp_path / name}", "train.batch_size=8",
                              "train.device=cpu", "train.log_every=1", "train.progress=off",
                              "train.tensorboard=false", "train.eval_every=0", "model.dropout=0.0",
                              "optim.warmup_steps=0", *extra])


def train_records(tmp_path, name="run"):
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


# ------------------------------------------------------------------------------------ bf16


def test_bf16_autocast_on_cpu_runs_the_forward_in_bf16_with_fp32_gradients(tmp_path):
    t = Trainer(toy_cfg(tmp_path, "train.precision=bf16", "train.max_steps=3"))
    seen_dtypes, grad_dtypes = [], []
    t.model.net[0].register_forward_hook(lambda mod, inp, out: seen_dtypes.append(out.dtype))

    def before_step(opt, args, kwargs):
        grad_dtypes.extend((p.dtype, None if p.grad is None else p.grad.dtype)
                           for g in opt.param_groups for p in g["params"])

    t.optimizer.register_step_pre_hook(before_step)
    first = [p.detach().clone() for p in t.model.parameters()]
    t.fit()
    assert seen_dtypes[:3] == [torch.bfloat16] * 3  # the 3 training forwards ran the Linear in bf16
    n_params = len(first)
    assert len(grad_dtypes) == 3 * n_params
    assert set(grad_dtypes) == {(torch.float32, torch.float32)}  # fp32 master weights, fp32 gradients
    losses = [r["loss"] for r in train_records(tmp_path)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(a, b) for a, b in zip(first, t.model.parameters()))  # every tensor moved
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


def test_fp32_default_runs_the_forward_in_fp32(tmp_path):
    t = Trainer(toy_cfg(tmp_path, "train.max_steps=1"))
    seen = []
    t.model.net[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    t.fit()
    assert seen[0] == torch.float32


# ---------------------------------------------------------------------------------- clipping


def _sgd_run(tmp_path, clip, name):
    """Plain SGD (lr 1, no momentum, no weight decay, constant LR): a step moves the parameters by
    exactly minus the (clipped) gradient. Returns per step: the raw gradients, the parameter change."""
    t = Trainer(toy_cfg(tmp_path, "optim.name=momentum", "optim.momentum=0", "optim.lr=1.0",
                        "optim.weight_decay=0", "optim.schedule=constant", f"optim.clip_grad={clip}",
                        "train.max_steps=3", name=name))
    params = list(t.model.parameters())
    raw: list[list[torch.Tensor | None]] = [[None] * len(params)]  # per step, per parameter
    before: list[torch.Tensor] = []
    deltas: list[list[torch.Tensor]] = []

    def grad_hook(i):  # the gradient as backward produced it, before any clipping
        def hook(grad):
            raw[-1][i] = grad.detach().clone()
        return hook

    def pre_step(*args):
        before[:] = [p.detach().clone() for p in params]

    def post_step(*args):
        deltas.append([p.detach() - b for p, b in zip(params, before)])
        raw.append([None] * len(params))

    for i, p in enumerate(params):
        p.register_hook(grad_hook(i))
    t.optimizer.register_step_pre_hook(pre_step)
    t.optimizer.register_step_post_hook(post_step)
    t.fit()
    return raw[:-1], deltas, train_records(tmp_path, name)


@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_clip_grad_logs_the_preclip_norm_and_clips_the_update(tmp_path, clip):
    raw, deltas, records = _sgd_run(tmp_path, clip, f"clip{clip}")
    assert len(raw) == len(deltas) == len(records) == 3
    for step, (grads, delta, rec) in enumerate(zip(raw, deltas, records)):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        assert rec["grad_norm"] == pytest.approx(norm, rel=1e-5), step  # logged: the norm before clipping
        moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in delta])).item()
        assert moved == pytest.approx(min(norm, clip), rel=1e-4), step
        scale = min(1.0, clip / (norm + 1e-6))  # torch's clip_grad_norm_ coefficient
        for g, d in zip(grads, delta):
            torch.testing.assert_close(d, -scale * g, rtol=1e-4, atol=1e-7)
    if clip < 1:  # the small limit really was active at every step
        assert all(r["grad_norm"] > 10 * clip for r in records)


def test_no_grad_norm_logged_without_clipping(tmp_path):
    Trainer(toy_cfg(tmp_path, "train.max_steps=2")).fit()
    assert all("grad_norm" not in r for r in train_records(tmp_path))


# -------------------------------------------------------------------------- weight-decay schedule


def test_weight_decay_schedule_follows_cosine_and_spares_no_decay_groups(tmp_path):
    start, end, steps = 0.05, 0.3, 8
    t = Trainer(toy_cfg(tmp_path, f"optim.weight_decay={start}", f"optim.weight_decay_end={end}",
                        f"train.max_steps={steps}"))
    seen: list[list[float]] = []
    t.optimizer.register_step_pre_hook(lambda opt, *a: seen.append([g["weight_decay"] for g in opt.param_groups]))
    decayed = [g["wd_base"] > 0 for g in t.optimizer.param_groups]
    assert any(decayed) and not all(decayed)  # the toy MLP has weights (decayed) and biases (not)
    t.fit()
    assert len(seen) == steps
    for s, wds in enumerate(seen):
        want = end + (start - end) * 0.5 * (1 + math.cos(math.pi * s / steps))
        for wd, dec in zip(wds, decayed):
            assert wd == (pytest.approx(want, rel=1e-9) if dec else 0.0), (s, wds)
    assert [w for w, d in zip(seen[0], decayed) if d][0] == pytest.approx(start)  # step 0: the start value
    t._apply_schedule(steps)  # the schedule's end (one past the last step) is the end value
    assert [g["weight_decay"] for g, d in zip(t.optimizer.param_groups, decayed) if d] == [pytest.approx(end)]
    # without weight_decay_end the decay stays constant
    c = Trainer(toy_cfg(tmp_path, f"optim.weight_decay={start}", "train.max_steps=4", name="const"))
    for s in (0, 2, 4):
        c._apply_schedule(s)
        assert sorted(g["weight_decay"] for g in c.optimizer.param_groups) == [0.0, start]


# ------------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path):
    common = ["train.max_steps=3", "optim.lr=0.05"]
    Trainer(toy_cfg(tmp_path, *common, name="eager")).fit()
    t = Trainer(toy_cfg(tmp_path, *common, "train.compile=true", name="compiled"))
    assert hasattr(t.ddp_model, "_orig_mod")  # the trained module is the compiled wrapper
    t.fit()
    eager, compiled = ([r["loss"] for r in train_records(tmp_path, n)] for n in ("eager", "compiled"))
    assert len(eager) == len(compiled) == 3
    assert eager[0] != eager[-1]  # the steps changed the model
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- SLURM / torchrun environment


@pytest.fixture
def clean_env(tmp_path):
    """os.environ without launcher variables, restored whole afterwards (the code adds keys)."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MASTER_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with mock.patch.dict(os.environ, keep, clear=True):
        yield os.environ


def test_slurm_variables_give_rank_world_and_local_rank(clean_env, tmp_path):
    scontrol = tmp_path / "bin" / "scontrol"  # what `scontrol show hostnames node[07-08]` prints
    scontrol.parent.mkdir()
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames node[07-08]' ] && printf 'node07\\nnode08\\n'\n")
    scontrol.chmod(0o755)
    clean_env.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="123456",
                     SLURM_JOB_NODELIST="node[07-08]", PATH=f"{scontrol.parent}:{clean_env['PATH']}")
    assert _env_info() == DistInfo(rank=5, world_size=8, local_rank=1)
    # the torch.distributed env:// variables are filled in for init_process_group
    assert clean_env["MASTER_ADDR"] == "node07" and clean_env["MASTER_PORT"] == str(29500 + 456)
    assert (clean_env["RANK"], clean_env["WORLD_SIZE"], clean_env["LOCAL_RANK"]) == ("5", "8", "1")


def test_slurm_without_scontrol_takes_the_first_listed_host(clean_env):
    clean_env.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_NODELIST="alpha,beta", PATH="/nonexistent")
    assert _env_info() == DistInfo(rank=0, world_size=2, local_rank=0)
    assert clean_env["MASTER_ADDR"] == "alpha" and clean_env["MASTER_PORT"] == "29500"


def test_slurm_keeps_a_given_master_address(clean_env):
    clean_env.update(SLURM_PROCID="1", SLURM_NTASKS="4", SLURM_LOCALID="1", MASTER_ADDR="head", MASTER_PORT="1234")
    assert _env_info() == DistInfo(rank=1, world_size=4, local_rank=1)
    assert clean_env["MASTER_ADDR"] == "head" and clean_env["MASTER_PORT"] == "1234"


def test_torchrun_variables_take_precedence_over_slurm(clean_env):
    clean_env.update(RANK="3", WORLD_SIZE="4", LOCAL_RANK="2", SLURM_PROCID="0", SLURM_NTASKS="16",
                     SLURM_LOCALID="0")
    assert _env_info() == DistInfo(rank=3, world_size=4, local_rank=2)
    assert "MASTER_ADDR" not in clean_env  # SLURM was not consulted


def test_single_slurm_task_or_no_launcher_is_one_process(clean_env):
    assert _env_info() == DistInfo()
    clean_env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0")  # `srun -n 1` / salloc shell
    assert _env_info() == DistInfo() and not _env_info().enabled
    assert "RANK" not in clean_env and "MASTER_ADDR" not in clean_env


# ------------------------------------------------------------------------------------- sampler


def rank_indices(n: int, world: int, **kw) -> list[list[int]]:
    return [list(ResumableSampler(n, rank=r, world_size=world, **kw)) for r in range(world)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_without_padding_covers_each_sample_once_when_ranks_outnumber_samples(shuffle):
    parts = rank_indices(3, 8, pad=False, shuffle=shuffle, seed=4)
    assert sorted(i for p in parts for i in p) == [0, 1, 2]  # every sample once, none twice
    assert [len(p) for p in parts] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert [len(ResumableSampler(3, rank=r, world_size=8, pad=False)) for r in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("n, world", [(10, 4), (5, 3), (7, 7), (1, 2)])
def test_sampler_padding_gives_every_rank_the_same_count(n, world):
    parts = rank_indices(n, world, pad=True, shuffle=True, seed=1)
    per_rank = math.ceil(n / world)
    assert [len(p) for p in parts] == [per_rank] * world
    flat = [i for p in parts for i in p]
    assert set(flat) == set(range(n)) and len(flat) - len(set(flat)) == per_rank * world - n


def test_sampler_padding_when_ranks_outnumber_samples():
    """Padding wraps around as often as needed: with 3 samples over 8 ranks every rank gets one
    (padding with at most n repeats left ranks 6 and 7 empty, and a DDP step waiting for them)."""
    parts = rank_indices(3, 8, pad=True, shuffle=True, seed=0)
    assert [len(p) for p in parts] == [1] * 8
    assert {i for p in parts for i in p} == {0, 1, 2}
