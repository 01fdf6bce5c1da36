"""The targets core: config, registry and builder, losses, teachers (EMA and frozen), scored masks,
and the trainer's per-optimizer-step hook (accumulation, exact resume of an EMA teacher)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mm3d.bench import run_bench
from mm3d.checkpoint import CheckpointError, load_model_weights
from mm3d.config import ConfigError, config_from_dict, load_config
from mm3d.errors import MissingFileError
from mm3d.losses import loss_names, per_token_loss, token_loss
from mm3d.masking import num_masked, random_mask, scored_mask
from mm3d.registry import LOSSES, TARGETS, TASKS, register_target, register_task, target_kinds
from mm3d.targets import Target, TargetConfig, build_target
from mm3d.teacher import (FrozenModule, MomentumSchedule, ema_momentum, ema_update_, frozen_copy, layer_average,
                          load_frozen_teacher, teacher_layers)
from mm3d.testing import assert_close, sigterm_after_step
from mm3d.toy import ToyConfig, ToyModelConfig, ToyOutput, ToyTask
from mm3d.trainer import Trainer, TrainingInterrupted, run

# --------------------------------------------------------------------------------------------
# A toy modality: a regressor whose embedding is followed by an EMA teacher (data2vec in miniature)
# --------------------------------------------------------------------------------------------


class ToyEMATarget(Target):
    """EMA copy of the student's embedding; its output is the target of the student's predictor."""

    default_loss = "mse"
    uses_teacher = True

    def __init__(self, student: nn.Module, out_dim: int, schedule: MomentumSchedule, *, loss: str = "",
                 loss_beta: float = 1.0) -> None:
        super().__init__(out_dim, loss=loss, loss_beta=loss_beta)
        self.teacher = frozen_copy(student)
        self.schedule = schedule

    @classmethod
    def from_config(cls, tcfg: TargetConfig, *, student: nn.Module, hidden: int) -> "ToyEMATarget":
        return cls(student, hidden, MomentumSchedule.from_config(tcfg), loss=tcfg.loss, loss_beta=tcfg.loss_beta)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim). Returns (B, hidden) teacher features."""
        return self.teacher(x)

    def after_optimizer_step(self, step: int, total_steps: int, student: nn.Module) -> None:
        ema_update_(self.teacher.module, student, self.schedule(step, total_steps))


class ToyPlainTarget(Target):
    """A second toy kind, so the registry has a choice (targets are the raw inputs)."""

    @classmethod
    def from_config(cls, tcfg: TargetConfig, *, student: nn.Module, hidden: int) -> "ToyPlainTarget":
        return cls(hidden, loss=tcfg.loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


if "tcoretoy.ema" not in TARGETS:
    register_target("tcoretoy", "ema", default=True)(ToyEMATarget)
    register_target("tcoretoy", "plain")(ToyPlainTarget)


@dataclass
class EmaToyModelConfig(ToyModelConfig):
    target: TargetConfig = field(default_factory=TargetConfig)


@dataclass
class EmaToyConfig(ToyConfig):
    model: EmaToyModelConfig = field(default_factory=EmaToyModelConfig)


class EmaToyRegressor(nn.Module):
    """y from x through an embedding (Linear + BatchNorm: parameters and buffers) with dropout; the
    embedding also regresses its EMA teacher's features through a predictor."""

    def __init__(self, in_dim: int, hidden: int, dropout: float, tcfg: TargetConfig) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden))
        self.head = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.predictor = nn.Linear(hidden, hidden)
        self.target = build_target("tcoretoy", tcfg, student=self.embed, hidden=hidden)
        self.calls: list[tuple[int, int]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> ToyOutput:
        h = self.embed(batch["x"])
        pred = self.head(h).squeeze(-1)
        feat = self.target(batch["x"])
        loss = F.mse_loss(pred, batch["y"]) + self.target.loss(self.predictor(h), feat)
        return ToyOutput(loss=loss, pred=pred)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.calls.append((step, total_steps))
        self.target.after_optimizer_step(step, total_steps, self.embed)


class EmaToyTask(ToyTask):
    name = "tcore_ema_toy"
    config_class = EmaToyConfig
    description = "toy regression with an EMA-teacher feature target (tests of the targets core)"
    built: list[EmaToyRegressor] = []

    def build_model(self, cfg: EmaToyConfig) -> nn.Module:
        m = cfg.model
        model = EmaToyRegressor(m.in_dim, m.hidden, m.dropout, m.target)
        self.built.append(model)
        return model


if EmaToyTask.name not in TASKS:
    register_task(EmaToyTask())


def toy_cfg(tmp_path, *extra, name="run"):
    return load_config(None, ["task=tcore_ema_toy", f"output_dir={tmp_path / name}", "train.batch_size=8",
                              "optim.lr=0.01", "train.log_every=1", "train.progress=off", "train.tensorboard=false",
                              "train.eval_every=0", "optim.warmup_steps=1", *extra])


# --------------------------------------------------------------------------------------------
# Config, registry, builder
# --------------------------------------------------------------------------------------------


@dataclass
class _Model:
    target: TargetConfig = field(default_factory=TargetConfig)


@dataclass
class _Root:
    model: _Model = field(default_factory=_Model)


def test_target_config_defaults_and_validation_name_the_key():
    cfg = config_from_dict(_Root, {"model": {"target": {"kind": "ema", "layers": 8, "norm_pix": False}}})
    t = cfg.model.target
    assert (t.kind, t.layers, t.norm_pix, t.momentum, t.momentum_end, t.loss) == ("ema", 8, False, 0.999, 0.9999, "")
    assert TargetConfig().norm_pix is None and TargetConfig().kind == ""
    assert (TargetConfig().hog_window, TargetConfig().center_weight) == (0, 0.1)  # MaskFeat's code, PCP-MAE's eta
    for bad, key in ((("layers", 0)), "model.target.layers"), ((("momentum", 1.5)), "model.target.momentum"), \
            ((("momentum_steps", -1)), "model.target.momentum_steps"), ((("hog_bins", 0)), "model.target.hog_bins"), \
            ((("hog_window", -1)), "model.target.hog_window"), \
            ((("center_weight", -1.0)), "model.target.center_weight"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict(_Root, {"model": {"target": {bad[0]: bad[1]}}})
    with pytest.raises(ConfigError, match=r"unknown key 'model\.target\.layer_s'"):
        config_from_dict(_Root, {"model": {"target": {"layer_s": 2}}})


def test_build_target_default_kind_unknown_kind_and_loss():
    student = nn.Linear(3, 4)
    assert target_kinds("tcoretoy") == ["ema", "plain"]
    t = build_target("tcoretoy", TargetConfig(), student=student, hidden=4)
    assert isinstance(t, ToyEMATarget) and t.kind == "ema" and t.modality == "tcoretoy"
    assert t.out_dim == 4 and t.loss_name == "mse" and t.uses_teacher
    assert isinstance(build_target("tcoretoy", TargetConfig(kind="plain", loss="cosine"), student=student, hidden=4),
                      ToyPlainTarget)
    with pytest.raises(ConfigError, match=r"model\.target\.kind='emma' is not a tcoretoy target \(did you mean "
                                          r"'ema'\?\); known: ema, plain"):
        build_target("tcoretoy", TargetConfig(kind="emma"), student=student, hidden=4)
    with pytest.raises(ConfigError, match=r"model\.target\.loss='mes'.*did you mean 'mse'.*allowed: cosine, l1, mse"):
        build_target("tcoretoy", TargetConfig(loss="mes"), student=student, hidden=4)
    with pytest.raises(ConfigError, match="registers no default"):
        build_target("nosuchmodality", TargetConfig(), student=student, hidden=4)
    with pytest.raises(KeyError, match="already registered"):
        register_target("tcoretoy", "ema")(ToyPlainTarget)
    with pytest.raises(KeyError, match="already has the default target"):
        register_target("tcoretoy", "other", default=True)(ToyPlainTarget)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

PRED = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
TARG = torch.tensor([[1.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("kind,per_token,beta", [
    # differences d = [[0, 2], [3, 4]]
    ("mse", [2.0, 12.5], 1.0),  # (0 + 4) / 2, (9 + 16) / 2
    ("l1", [1.0, 3.5], 1.0),
    ("smooth_l1", [0.75, 3.0], 1.0),  # |d| >= beta: |d| - beta / 2 -> 1.5; 2.5, 3.5
    ("smooth_l1", [0.5, 2.5], 2.0),  # 2 - 1 = 1; 3 - 1 = 2, 4 - 1 = 3
    ("smooth_l1", [0.25, 1.5625], 4.0),  # |d| < beta: d^2 / (2 beta) -> 0.5; 1.125, and 4 - 2 = 2
    ("smooth_l1", [1.0, 3.5], 0.0),  # beta 0: plain L1
])
def test_losses_match_the_hand_formulas(kind, per_token, beta):
    expected = torch.tensor(per_token)
    assert_close(per_token_loss(PRED, TARG, kind, beta=beta), expected, atol=1e-7)
    assert_close(token_loss(PRED, TARG, kind, beta=beta), expected.mean(), atol=1e-7)


def test_cosine_loss_and_weighted_reduction():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 2.0], [0.0, -1.0], [1.0, math.sqrt(3.0)]])
    # orthogonal 1, parallel 0, opposite 2, 60 degrees 1 - 1/2
    assert_close(per_token_loss(pred, target, "cosine"), torch.tensor([1.0, 0.0, 2.0, 0.5]), atol=1e-6)
    w = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    mse = torch.tensor([[2.0, 12.5], [2.0, 12.5]])
    p2, t2 = torch.stack([PRED, PRED]), torch.stack([TARG, TARG])  # (2, 2 tokens, 2 features)
    assert_close(token_loss(p2, t2, "mse", w), (mse * w).sum() / w.sum(), atol=1e-6)  # (2 + 2 + 37.5) / 5
    assert float(token_loss(p2, t2, "mse", w)) == pytest.approx(41.5 / 5)
    assert float(token_loss(p2, t2, "mse", torch.zeros(2, 2))) == 0.0
    with pytest.raises(ValueError, match="weight must have the tokens' shape"):
        token_loss(p2, t2, "mse", torch.ones(2))
    with pytest.raises(ValueError, match="differ in shape"):
        token_loss(PRED, TARG[:1], "l1")


def test_token_loss_is_videomae_loss_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 7, 12, generator=g, dtype=torch.bfloat16)
    target = torch.randn(3, 7, 12, generator=g)
    per_token = (pred.float() - target.float()).square().mean(dim=-1)
    assert torch.equal(token_loss(pred, target, "mse"), per_token.mean())
    weight = (torch.rand(3, 7, generator=g) > 0.5).float()
    weight[0, 0] = 1.0
    assert torch.equal(token_loss(pred, target, "mse", weight),
                       (per_token * weight).sum() / weight.sum().clamp(min=1))
    assert pred.dtype == torch.bfloat16 and token_loss(pred, target, "l1").dtype == torch.float32
    assert {"mse", "l1", "smooth_l1", "cosine"} <= set(loss_names(token_dims=1))
    assert all(LOSSES.get(n).token_dims == 1 for n in ("mse", "l1", "smooth_l1", "cosine"))


# --------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    """Two trained parameters, one fixed parameter, a float buffer and an integer buffer."""

    def __init__(self, a: float, b: float, c: float, buf: float, count: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([a]))
        self.b = nn.Parameter(torch.tensor([b, 2 * b]))
        self.c = nn.Parameter(torch.tensor([c]), requires_grad=False)
        self.register_buffer("stat", torch.tensor([buf]))
        self.register_buffer("count", torch.tensor(count))


def test_momentum_schedule_values():
    tcfg = TargetConfig(momentum=0.999, momentum_end=0.9999)  # momentum_steps=0: ramp over the whole run
    assert ema_momentum(0, 100, tcfg) == 0.999
    assert ema_momentum(50, 100, tcfg) == pytest.approx(0.99945, abs=1e-12)
    assert ema_momentum(100, 100, tcfg) == 0.9999 and ema_momentum(150, 100, tcfg) == 0.9999
    ramp = TargetConfig(momentum=0.5, momentum_end=0.9, momentum_steps=4)
    assert [ema_momentum(s, 100, ramp) for s in range(6)] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 0.9])
    assert MomentumSchedule(0.9, 0.9)(3, 10) == 0.9


def test_ema_update_by_hand_two_steps():
    student = _Tiny(a=3.0, b=5.0, c=7.0, buf=11.0, count=4)
    teacher = frozen_copy(_Tiny(a=1.0, b=1.0, c=0.0, buf=0.0, count=0)).module
    sched = MomentumSchedule.from_config(TargetConfig(momentum=0.5, momentum_end=0.9, momentum_steps=4))
    ema_update_(teacher, student, sched(0, 100))  # decay 0.5
    assert_close(teacher.a, torch.tensor([0.5 * 1 + 0.5 * 3]), atol=1e-7)  # 2
    assert_close(teacher.b, torch.tensor([0.5 * 1 + 0.5 * 5, 0.5 * 2 + 0.5 * 10]), atol=1e-7)  # 3, 6
    assert teacher.c.item() == 7.0 and teacher.stat.item() == 11.0 and teacher.count.item() == 4  # copied
    student.a.data.fill_(-1.0)
    student.stat.fill_(13.0)
    ema_update_(teacher, student, sched(2, 100))  # decay 0.7
    assert_close(teacher.a, torch.tensor([0.7 * 2 + 0.3 * -1]), atol=1e-6)  # 1.1
    assert_close(teacher.b, torch.tensor([0.7 * 3 + 0.3 * 5, 0.7 * 6 + 0.3 * 10]), atol=1e-6)  # 3.6, 7.2
    assert teacher.stat.item() == 13.0
    ema_update_(teacher, student, 0.5, buffers="ema")  # timm's choice: floating buffers averaged too
    assert teacher.stat.item() == 13.0 and teacher.count.item() == 4
    student.stat.fill_(1.0)
    ema_update_(teacher, student, 0.25, buffers="ema")
    assert teacher.stat.item() == pytest.approx(0.25 * 13 + 0.75 * 1)
    assert teacher.a.grad is None and not teacher.a.requires_grad
    with pytest.raises(ValueError, match="differ in structure"):
        ema_update_(teacher, nn.Linear(1, 1), 0.5)
    with pytest.raises(ValueError, match="decay must be in"):
        ema_update_(teacher, student, 1.5)


def test_layer_average_equals_manual_instance_norm_and_mean():
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(2, 5, 4, generator=g) * (i + 1) + i for i in range(3)]

    def inorm(h):  # per sample and channel over the tokens, biased variance, eps 1e-5
        return (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + 1e-5)

    assert_close(layer_average(hidden, TargetConfig()), sum(inorm(h) for h in hidden) / 3, atol=1e-5)
    assert_close(layer_average(hidden, TargetConfig(instance_norm=False)), sum(hidden) / 3, atol=1e-6)
    norm = nn.LayerNorm(4)
    nn.init.normal_(norm.weight)
    got = layer_average(hidden[-1:], TargetConfig(final_norm=True), norm)
    assert_close(got, F.layer_norm(hidden[-1], (4,), norm.weight, norm.bias), atol=1e-5)
    with pytest.raises(ConfigError, match="final_norm"):
        layer_average(hidden, TargetConfig(final_norm=True))
    assert teacher_layers(12, TargetConfig(layers=8)) == (4, 5, 6, 7, 8, 9, 10, 11)
    assert teacher_layers(12, TargetConfig(layers=2, layer=5)) == (4, 5)
    assert teacher_layers(12, TargetConfig(layer=-3)) == (9,)
    with pytest.raises(ConfigError, match=r"model\.target\.layer=12 is outside"):
        teacher_layers(12, TargetConfig(layer=12))
    with pytest.raises(ConfigError, match=r"model\.target\.layers=3 .* at most 2"):
        teacher_layers(12, TargetConfig(layers=3, layer=1))


class _WithTeachers(nn.Module):
    def __init__(self, teacher: FrozenModule | None = None) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
        self.ema = frozen_copy(self.student)
        self.frozen = teacher if teacher is not None else FrozenModule(nn.Linear(3, 4), persistent=False)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.ema(x) + self.frozen(x)
        return token_loss(self.head(self.student(x)), target, "smooth_l1")


def test_no_gradient_reaches_a_teacher_and_teachers_stay_in_eval():
    model = _WithTeachers().train()
    x = torch.randn(6, 3)
    model(x).backward()
    for teacher in (model.ema, model.frozen):
        assert not teacher.training and not any(m.training for m in teacher.modules())
        for p in teacher.parameters():
            assert p.grad is None and not p.requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    # even outside no_grad a frozen teacher's output has no graph
    assert not model.frozen(x).requires_grad and not model.ema(x).requires_grad
    # eval mode: the EMA copy's BatchNorm uses its running statistics, dropout is off
    out1, out2 = model.ema(x), model.ema(x)
    assert torch.equal(out1, out2)


def test_frozen_teacher_is_not_persistent(tmp_path):
    model = _WithTeachers()
    keys = list(model.state_dict())
    assert not any(k.startswith("frozen.") for k in keys) and "ema.module.0.weight" in keys
    fresh = _WithTeachers()
    frozen_before = fresh.frozen.module.weight.clone()
    assert not fresh.load_state_dict(model.state_dict(), strict=True).missing_keys
    assert torch.equal(fresh.frozen.module.weight, frozen_before)  # kept, not reset or required
    assert torch.equal(fresh.ema.module[0].weight, model.ema.module[0].weight)  # the EMA teacher is restored
    assert load_model_weights(fresh, model.state_dict())[-1].startswith("loaded")


def test_load_frozen_teacher_from_an_mm3d_checkpoint(tmp_path):
    source = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    path = tmp_path / "pre.pt"
    torch.save({"model": {**{f"encoder.{k}": v for k, v in source.state_dict().items()},
                          "decoder.weight": torch.zeros(2), "target.teacher.module.0.weight": torch.zeros(4, 3)}},
               path)
    teacher, notes = load_frozen_teacher(lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), str(path))
    assert isinstance(teacher, FrozenModule) and not teacher.persistent and not teacher.training
    assert torch.equal(teacher.module[0].weight, source[0].weight) and any("loaded" in n for n in notes)
    model = _WithTeachers(teacher)
    x = torch.randn(2, 3)
    assert torch.equal(model.frozen(x), source(x).detach())
    assert not any(k.startswith("frozen.") for k in model.state_dict())
    seen = []
    load_frozen_teacher(lambda: nn.Linear(3, 4), str(path), load=lambda m, p: seen.append(p) or ["mine"])
    assert seen == [str(path)]
    with pytest.raises(ConfigError, match=r"model\.target\.checkpoint is empty"):
        load_frozen_teacher(lambda: nn.Linear(3, 4), "")
    with pytest.raises(MissingFileError, match="no such file"):
        load_frozen_teacher(lambda: nn.Linear(3, 4), str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="does not match"):
        load_frozen_teacher(lambda: nn.Linear(3, 5), str(path))


# --------------------------------------------------------------------------------------------
# Scored masks
# --------------------------------------------------------------------------------------------


def test_scored_mask_counts_and_seeding():
    scores = torch.rand(16, 50, generator=torch.Generator().manual_seed(0))
    for ratio in (0.0, 0.3, 0.75, 0.9, 1.0):
        m = scored_mask(scores, ratio, generator=torch.Generator().manual_seed(1))
        assert m.dtype == torch.bool and m.shape == (16, 50)
        assert (m.sum(1) == num_masked(50, ratio)).all()
    a = scored_mask(scores, 0.5, generator=torch.Generator().manual_seed(7))
    b = scored_mask(scores, 0.5, generator=torch.Generator().manual_seed(7))
    c = scored_mask(scores, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # zero scores are masked last: with 2 positive tokens and k = 2 they are always the masked ones
    zeros = torch.tensor([[0.0, 0.0, 1.0, 3.0, 0.0]]).repeat(500, 1)
    m = scored_mask(zeros, 0.4, generator=torch.Generator().manual_seed(0))
    assert m[:, 2:4].all() and not m[:, [0, 1, 4]].any()
    with pytest.raises(ValueError, match="shape"):
        scored_mask(torch.rand(4), 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        scored_mask(torch.ones(2, 4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="temperature"):
        scored_mask(scores, 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="mask ratio"):
        scored_mask(scores, 1.5)


def test_scored_mask_probabilities_follow_the_scores():
    # k = 1 of 4 tokens scored 1:2:3:4, 40000 samples: P(i) = s_i / 10 exactly (Plackett-Luce's first draw).
    # Seeded, so deterministic; the bound is 5 binomial standard deviations (<= 0.0125).
    n = 40000
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(n, 1)
    freq = scored_mask(scores, 0.25, generator=torch.Generator().manual_seed(0)).float().mean(0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert_close(freq, p, atol=float(5 * torch.sqrt(p * (1 - p) / n).max()), rtol=0)
    # temperature 2: proportional to sqrt(score)
    freq2 = scored_mask(scores, 0.25, generator=torch.Generator().manual_seed(1), temperature=2.0).float().mean(0)
    p2 = scores[0].sqrt() / scores[0].sqrt().sum()
    assert_close(freq2, p2, atol=float(5 * torch.sqrt(p2 * (1 - p2) / n).max()), rtol=0)
    # k = 4 of 16 with rising scores: masking frequency rises with the score (token 15 far above token 0)
    rising = torch.linspace(0.1, 1.6, 16).repeat(8000, 1)
    f = scored_mask(rising, 0.25, generator=torch.Generator().manual_seed(2)).float().mean(0)
    assert f[12:].mean() > 2 * f[:4].mean() and (f[8:].mean() > f[:8].mean())
    assert float(f.sum()) == pytest.approx(4.0)


def test_scored_mask_with_equal_scores_is_uniform():
    n, length = 20000, 10
    f = scored_mask(torch.full((n, length), 0.7), 0.3, generator=torch.Generator().manual_seed(3)).float().mean(0)
    bound = 5 * math.sqrt(0.3 * 0.7 / n)  # every token: P = k / L = 0.3
    assert_close(f, torch.full((length,), 0.3), atol=bound, rtol=0)
    ref = random_mask(n, length, 0.3, generator=torch.Generator().manual_seed(3)).float().mean(0)
    assert_close(f, ref, atol=2 * bound, rtol=0)


# --------------------------------------------------------------------------------------------
# The trainer's hook: once per optimizer step, (step, total); exact resume of an EMA teacher
# --------------------------------------------------------------------------------------------


def test_hook_runs_once_per_optimizer_step_with_accumulation(tmp_path):
    # 64 samples, micro-batches of 8, 2 per optimizer step: 4 steps per epoch, 2 epochs = 8 steps
    t = Trainer(toy_cfg(tmp_path, "train.accum_steps=2", "train.epochs=2"))
    model: EmaToyRegressor = t.model
    teacher0 = model.target.teacher.module[0].weight.clone()
    t.fit()
    assert model.calls == [(s, 8) for s in range(8)]
    # the teacher followed the student: it moved, and it is not the student itself
    w_t, w_s = model.target.teacher.module[0].weight, model.embed[0].weight
    assert not torch.equal(w_t, teacher0) and not torch.equal(w_t, w_s)
    assert w_t.grad is None and not model.target.teacher.training


def test_ema_teacher_resumes_exactly_mid_epoch(tmp_path):
    # 8 steps per epoch; the run is stopped (SIGTERM) after step 3 of 6, with a checkpoint, and resumed
    common = ["train.max_steps=6", "train.epochs=1", "train.save_every=0", "train.save_every_steps=2",
              "model.target.momentum=0.5", "model.target.momentum_end=0.9"]  # fast teacher: differences show
    straight = Trainer(toy_cfg(tmp_path, *common, name="straight"))
    straight.fit()
    first = Trainer(toy_cfg(tmp_path, *common, name="resumed"))
    sigterm_after_step(first, 2)
    with pytest.raises(TrainingInterrupted):
        first.fit()
    assert first.model.calls == [(0, 6), (1, 6), (2, 6)]
    again = Trainer(toy_cfg(tmp_path, *common, "train.resume=auto", name="resumed"))
    assert again.state.step == 3 and again.state.batch_in_epoch == 3
    again.fit()
    assert again.model.calls == [(3, 6), (4, 6), (5, 6)]
    a, b = straight.model.state_dict(), again.model.state_dict()
    assert list(a) == list(b) and any(k.startswith("target.teacher.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["target.teacher.module.0.weight"], a["embed.0.weight"])


def test_bench_step_includes_the_hook(tmp_path):
    cfg = load_config(None, ["task=tcore_ema_toy", "train.batch_size=8", "bench.warmup=1", "bench.steps=2",
                             f"output_dir={tmp_path}"])
    run_bench(cfg)
    assert EmaToyTask.built[-1].calls == [(0, 3), (1, 3), (2, 3)]


def test_target_config_keys_reach_the_target_through_run(tmp_path):
    # the whole pipeline through `run`: model.target.* picks the kind and its loss
    res = run(toy_cfg(tmp_path, "train.max_steps=2", "model.target.kind=plain", "model.target.loss=cosine",
                      "model.in_dim=32"))
    model = EmaToyTask.built[-1]
    assert isinstance(model.target, ToyPlainTarget) and model.target.loss_name == "cosine"
    assert model.calls == [(0, 2), (1, 2)] and "val" in res
