"""The trainer on the toy task: resume, accumulation, schedules, NaN stop, checkpoints, EMA."""

import json
import math

import pytest
import torch

import mm3d.toy  # noqa: F401
from mm3d.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, load_model_weights
from mm3d.config import load_config
from mm3d.trainer import NonFiniteLossError, Trainer, cosine_schedule, run


def toy_cfg(tmp_path, *extra, name="run"):
    return load_config(None, ["task=toy_regression", f"output_dir={tmp_path / name}", "train.batch_size=8",
                              "optim.lr=0.01", "train.log_every=1", "train.progress=off",
                              "train.tensorboard=false", *extra])


def losses(tmp_path, name):
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_resume_mid_epoch_reproduces_losses(tmp_path):
    # 64 samples / batch 8 = 8 steps per epoch; stop at step 3 (mid-epoch), resume, go to 6.
    common = ["train.max_steps=6", "train.epochs=1", "train.eval_every=0", "train.save_every=0",
              "train.save_every_steps=3", "optim.warmup_steps=2"]
    run(toy_cfg(tmp_path, *common, name="straight"))
    first = toy_cfg(tmp_path, *common, name="resumed")
    trainer = Trainer(first)
    trainer.total_steps = 3  # interrupt after 3 steps (the schedule still spans 6)
    trainer.train_epoch(0, _Silent())
    trainer._save()
    again = Trainer(toy_cfg(tmp_path, *common, "train.resume=auto", name="resumed"))
    assert again.state.step == 3 and again.state.batch_in_epoch == 3
    again.fit()
    a, b = losses(tmp_path, "straight"), losses(tmp_path, "resumed")
    assert len(a) == 6 and len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-7)


class _Silent:
    def update(self, *a):
        pass

    def close(self):
        pass


def test_accumulation_matches_large_batch(tmp_path):
    # dropout off: 2 micro-batches of 8 with accumulation == one batch of 16
    base = ["model.dropout=0.0", "train.max_steps=4", "train.eval_every=0", "optim.warmup_steps=0"]
    big = Trainer(toy_cfg(tmp_path, *base, "train.batch_size=16", name="big"))
    acc = Trainer(toy_cfg(tmp_path, *base, "train.batch_size=8", "train.accum_steps=2", name="acc"))
    big.fit()
    acc.fit()
    for p, q in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses(tmp_path, "acc")), torch.tensor(losses(tmp_path, "big")),
                               rtol=1e-5, atol=1e-6)


def test_lr_schedule_warmup_then_cosine():
    vals = [cosine_schedule(s, 100, 10, 0.0, 1.0, 0.1) for s in range(101)]
    assert vals[0] == 0.0 and vals[5] == pytest.approx(0.5) and vals[10] == pytest.approx(1.0)
    assert vals[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert vals[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(vals[10:], vals[11:]))


def test_schedule_applied_per_group_with_lr_scale(tmp_path):
    t = Trainer(toy_cfg(tmp_path, "optim.warmup_steps=4", "optim.warmup_lr=0.0", "train.max_steps=8"))
    t.optimizer.param_groups[0]["lr_scale"] = 0.5
    lr = t._apply_schedule(2)
    assert lr == pytest.approx(0.005)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.0025)
    # norms/biases get no weight decay (timm param groups)
    decays = sorted(g["weight_decay"] for g in t.optimizer.param_groups)
    assert decays[0] == 0.0 and decays[-1] == pytest.approx(0.05)


def test_lr_scaled_by_total_batch(tmp_path):
    t = Trainer(toy_cfg(tmp_path, "optim.lr=null", "optim.blr=1e-3", "train.batch_size=8", "train.accum_steps=4"))
    assert t.lr == pytest.approx(1e-3 * 32 / 256)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = toy_cfg(tmp_path, "model.nan_at_call=6", "train.epochs=2", "train.save_every_steps=4",
                  "train.eval_every=0")
    with pytest.raises(NonFiniteLossError, match=r"at step 6 .*step_00000004.pt"):
        run(cfg)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_checkpoint_contents_and_best_selection(tmp_path):
    cfg = toy_cfg(tmp_path, "train.epochs=3", "train.keep_last=1", "train.keep_best=1", "train.ema=true",
                  "train.ema_decay=0.5")
    res = run(cfg)
    ck_dir = tmp_path / "run" / "checkpoints"
    index = json.loads((ck_dir / "index.json").read_text())
    assert 1 <= len(index) <= 2  # last + best (which may coincide)
    ck = load_checkpoint(ck_dir / "last.pt")
    for key in ("model", "optimizer", "scaler", "ema", "step", "epoch", "rng", "config", "batch_in_epoch"):
        assert key in ck
    assert ck["config"]["task"] == "toy_regression" and ck["config"]["train"]["epochs"] == 3
    best = min(index, key=lambda e: e["metric"])
    assert (ck_dir / "best.pt").samefile(ck_dir / best["file"])
    assert res["selected_on"] == "val" and "loss" in res["val"]
    assert (tmp_path / "run" / "plots" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_manager_retention(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2, keep_best=1, mode="max")
    for step, metric in [(1, 0.9), (2, 0.1), (3, 0.2), (4, 0.3)]:
        m.save({"x": torch.tensor(step)}, step, metric)
    kept = sorted(p.name for p in tmp_path.glob("step_*.pt"))
    assert kept == ["step_00000001.pt", "step_00000003.pt", "step_00000004.pt"]
    assert m.best().name == "step_00000001.pt" and m.latest().name == "step_00000004.pt"
    assert not list(tmp_path.glob(".*tmp*"))


def test_pickle_checkpoint_needs_opt_in(tmp_path):
    import argparse

    path = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_checkpoint(path)
    assert load_checkpoint(path, allow_pickle=True)["args"].lr == 1


def test_load_model_weights_reports_mismatches():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sd = model.state_dict()
    bad = dict(sd, **{"1.weight": torch.zeros(5, 4)})
    with pytest.raises(CheckpointError, match=r"1.weight: checkpoint \(5, 4\) vs model \(2, 4\)"):
        load_model_weights(model, {"model": bad})
    partial = {k: v for k, v in sd.items() if k.startswith("0.")}
    partial["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model_weights(model, partial)
    notes = load_model_weights(model, partial, strict=False)
    assert any("1.weight" in n for n in notes) and any("extra" in n for n in notes)


def test_seeds_aggregate_mean_std(tmp_path):
    cfg = toy_cfg(tmp_path, "seeds=[0,1]", "train.max_steps=2", "train.epochs=1")
    summary = run(cfg)
    assert set(summary["per_seed"]) == {"0", "1"}
    assert "val/loss" in summary["mean"] and summary["std"]["val/loss"] >= 0
    assert (tmp_path / "run" / "results.md").read_text().count("±") >= 1


def test_manager_never_retires_the_newest_verified_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=1, keep_best=0)
    m.save({"x": torch.tensor(1)}, 1)
    m.mark_verified(2)  # the loss of step 2, computed from step 1's weights, was finite
    m.save({"x": torch.tensor(2)}, 2)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000001.pt", "step_00000002.pt"]
    m.mark_verified(3)
    m.save({"x": torch.tensor(3)}, 3)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000002.pt", "step_00000003.pt"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(e["step"], e["verified"]) for e in index] == [(2, True), (3, False)]
    assert load_checkpoint(tmp_path / "last.pt")["metric"] is None and m.latest().name == "step_00000003.pt"
