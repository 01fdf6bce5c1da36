"""Point-cloud targets (model.target.kind): points (default, unchanged), center (PCP-MAE), teacher, ema.

Independent references: the true centres of clouds built from known patch centres; a per-axis loop for
PCP-MAE's sine-cosine code; the teacher's block output recomputed by hand from the checkpoint; the EMA
update recomputed from its formula; an uninterrupted run for the EMA resume.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from mm3d.checkpoint import CheckpointError, load_checkpoint
from mm3d.config import ConfigError, load_config, to_dict
from mm3d.pointcloud.checkpoints import load_encoder_checkpoint
from mm3d.pointcloud.models import Grouped, PointMAEPretrain, build_classifier, build_pretrain_model
from mm3d.pointcloud.ops import chamfer_distance
from mm3d.pointcloud.synth import synth_shapenet55
from mm3d.pointcloud.targets import CenterTarget, EMATarget, PointsTarget, TeacherTarget, center_code
from mm3d.pointcloud.tasks import PointPretrainConfig
from mm3d.registry import variant_config
from mm3d.targets import TargetConfig
from mm3d.testing import assert_close, sigterm_after_step
from mm3d.trainer import Trainer, TrainingInterrupted, run

TINY = "pointmae_tiny_test"  # width 32, depth 2, 16 groups x 8 points

def tiny(kind: str = "", **model_kw) -> PointMAEPretrain:
    target = model_kw.pop("target", None) or TargetConfig(kind=kind)
    cfg = dataclasses.replace(variant_config(TINY), target=target, **model_kw)
    return build_pretrain_model(cfg)


def clustered_clouds(b: int, g: int, k: int, *, seed: int = 0, jitter: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clouds made of g well-separated clusters of k points around known centres.

    Returns points (b, g*k, 3) and the centres (b, g, 3). With jitter 0 every cluster is k copies
    of its centre, so FPS picks exactly the known centres (one per cluster) and KNN the cluster."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij"), -1).reshape(-1, 3)  # 27 cells
    cells = torch.stack([torch.randperm(27, generator=gen)[:g] for _ in range(b)])  # (b, g)
    centres = (grid[cells] - 1.0) * 0.5 + 0.05 * torch.rand(b, g, 3, generator=gen)  # spacing 0.5
    offsets = jitter * torch.randn(b, g, k, 3, generator=gen)
    offsets[:, :, 0] = 0.0  # the centre itself is a point of its cluster
    return (centres[:, :, None] + offsets).reshape(b, g * k, 3), centres


# --------------------------------------------------------------------------------------------
# points: the default, unchanged
# --------------------------------------------------------------------------------------------


def test_default_kind_is_points_with_todays_keys_and_loss():
    torch.manual_seed(0)
    default = tiny("")
    torch.manual_seed(0)
    explicit = tiny("points")
    assert isinstance(default.target, PointsTarget) and default.target.loss_name == "chamfer_l2"
    sd, sd2 = default.state_dict(), explicit.state_dict()
    assert list(sd) == list(sd2)
    assert not any(k.startswith("target.") for k in sd)
    # Point-MAE's names: encoder, mask token, decoder with its own positional MLP, the 3K-wide head
    assert {k.split(".")[0] for k in sd} == {"encoder", "mask_token", "decoder_pos_embed", "decoder", "recon_head"}
    assert tuple(sd["recon_head.weight"].shape) == (3 * 8, 32, 1)
    assert "encoder.pos_embed.0.weight" in sd and tuple(sd["encoder.pos_embed.0.weight"].shape) == (16, 3)
    points = torch.randn(2, 256, 3)
    mask = default.make_mask(default.group(points).center, torch.Generator().manual_seed(1))
    out = default({"points": points, "mask": mask})
    out2 = explicit({"points": points, "mask": mask})
    assert out.pred.shape == out.target.shape == (2, 9, 8, 3) and out.center_pred is None
    # the loss is Point-MAE's: the mean over the masked patches of each patch's Chamfer L2
    ref = chamfer_distance(out.pred.reshape(-1, 8, 3).float(), out.target.reshape(-1, 8, 3).float(), kind="l2")
    assert torch.equal(out.loss, ref) and torch.equal(out.loss, out2.loss)
    cdl1 = tiny("", loss="cdl1").target
    assert cdl1.loss_name == "chamfer_l1"


def test_eval_metrics_are_the_chamfer_distances():
    torch.manual_seed(0)
    model = tiny("").eval()
    points = torch.randn(2, 256, 3)
    out = model({"points": points}, generator=torch.Generator().manual_seed(0))
    assert set(out.metrics) == set(model.metric_names) == {"cd_l2", "cd_l1"}
    pred, target = out.pred.reshape(-1, 8, 3), out.target.reshape(-1, 8, 3)
    assert torch.equal(out.metrics["cd_l2"], chamfer_distance(pred, target, kind="l2"))
    assert torch.equal(out.metrics["cd_l1"], chamfer_distance(pred, target, kind="l1"))
    assert tiny("").train()({"points": points}).metrics == {}  # training steps compute no extra Chamfer


def test_unknown_kind_and_bad_loss_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.target\.kind='centre'.*known: center, ema, points, teacher"):
        tiny("centre")
    with pytest.raises(ConfigError, match=r"model\.target\.loss='mse'.*allowed: chamfer_l2, chamfer_l1"):
        tiny(target=TargetConfig(kind="points", loss="mse"))
    with pytest.raises(ConfigError, match=r"model\.target\.loss='chamfer_l2'"):
        tiny(target=TargetConfig(kind="ema", loss="chamfer_l2"))
    with pytest.raises(ValueError, match="pos_encoding=sincos needs embed_dim divisible by 6"):
        dataclasses.replace(variant_config(TINY), pos_encoding="sincos").validate()  # width 32


# --------------------------------------------------------------------------------------------
# center: PCP-MAE
# --------------------------------------------------------------------------------------------


def test_sincos_code_matches_a_per_axis_loop():
    center = torch.randn(2, 5, 3)
    dim = 12
    got = center_code(center, "sincos", dim)
    omega = torch.tensor([1.0 / 10000 ** (f / 2) for f in range(2)])
    parts = []
    for axis in range(3):  # PCP-MAE's get_pos_embed: per axis, sines then cosines
        angle = center[:, :, axis, None] * omega
        parts += [torch.sin(angle), torch.cos(angle)]
    assert_close(got, torch.cat(parts, dim=-1), atol=1e-6)
    assert torch.equal(center_code(center, "xyz", 3), center)


@pytest.mark.parametrize("encoding", ["xyz", "sincos"])
def test_centre_target_is_the_true_centres_of_the_masked_patches(encoding):
    torch.manual_seed(0)
    width = 36 if encoding == "sincos" else 32  # sincos: divisible by 6
    model = tiny("center", pos_encoding=encoding, embed_dim=width, encoder_dims=width).eval()
    assert isinstance(model.target, CenterTarget) and model.decoder_pos_embed is None
    points, centres = clustered_clouds(2, 16, 8)
    out = model({"points": points}, generator=torch.Generator().manual_seed(3))
    # the model's patch centres are the known ones (FPS picks one point per cluster: its centre)
    for b in range(2):
        assert torch.equal(torch.unique(out.center[b], dim=0), torch.unique(centres[b], dim=0))
    true_masked = out.center[out.mask].reshape(2, -1, 3)
    expected = true_masked if encoding == "xyz" else center_code(true_masked, "sincos", width)
    assert out.center_target.shape == out.center_pred.shape == expected.shape
    assert torch.equal(out.center_target, expected)
    # the loss is the points' Chamfer plus eta times the centre codes' MSE
    eta = model.target.center_weight
    assert eta == TargetConfig().center_weight == 0.1  # PCP-MAE's ita
    cd = chamfer_distance(out.pred.reshape(-1, 8, 3), out.target.reshape(-1, 8, 3), kind="l2")
    mse = (out.center_pred - expected).square().mean()
    assert_close(out.loss, cd + eta * mse, atol=1e-6)
    assert_close(out.metrics["center_mse"], mse, atol=1e-6)


class FixedGroup(nn.Module):
    """Stands in for Group: returns the given patches whatever the points."""

    def __init__(self, neighborhood: torch.Tensor, center: torch.Tensor) -> None:
        super().__init__()
        self.neighborhood, self.center = neighborhood, center

    def forward(self, points: torch.Tensor) -> Grouped:
        return Grouped(self.neighborhood, self.center)


@pytest.mark.parametrize("kind", ["center", "points"])
def test_decoder_never_sees_the_true_masked_centres(kind):
    """Moving the masked patches' centres changes nothing PCP-MAE predicts (the decoder places those
    patches at predicted centres); Point-MAE, which gives the decoder the true centres, changes."""
    torch.manual_seed(0)
    model = tiny(kind).eval()
    neighborhood, center = 0.05 * torch.randn(2, 16, 8, 3), torch.randn(2, 16, 3)
    mask = model.make_mask(center, torch.Generator().manual_seed(0))
    moved = center.clone()
    moved[mask] += 0.7
    model.group = FixedGroup(neighborhood, center)
    a = model({"points": torch.zeros(2, 256, 3), "mask": mask})
    model.group = FixedGroup(neighborhood, moved)
    b = model({"points": torch.zeros(2, 256, 3), "mask": mask})
    if kind == "center":
        assert torch.equal(a.pred, b.pred) and torch.equal(a.center_pred, b.center_pred)
        assert not torch.equal(a.center_target, b.center_target) and a.loss != b.loss  # only the targets moved
    else:
        assert not torch.allclose(a.pred, b.pred)


def test_decoder_positions_of_masked_patches_are_the_predicted_centres_detached():
    torch.manual_seed(0)
    model = tiny("center").train()
    seen = {}
    model.decoder.register_forward_pre_hook(lambda mod, args: seen.update(pos=args[1]))
    out = model({"points": clustered_clouds(2, 16, 8, jitter=0.01)[0]}, generator=torch.Generator().manual_seed(0))
    m = out.center_pred.shape[1]
    assert_close(seen["pos"][:, -m:], model.encoder.embed_code(out.center_pred), atol=0)
    # gradient stopped: the points loss alone leaves the centre head without gradient
    torch.nn.functional.mse_loss(out.pred, out.target).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.target.center_head.parameters())
    assert model.encoder.pos_embed[0].weight.grad.abs().sum() > 0  # the decoder's positions do train it


def test_visible_stream_ignores_the_masked_stream():
    """The visible tokens attend to each other only (PCP-MAE's shared encoder): their outputs do not
    depend on the masked patches' shapes."""
    torch.manual_seed(0)
    model = tiny("center").eval()
    neighborhood, center = 0.05 * torch.randn(2, 16, 8, 3), torch.randn(2, 16, 3)
    mask = model.make_mask(center, torch.Generator().manual_seed(0))
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    vis_idx, mask_idx = order[:, :7], order[:, 7:]
    vis_center = torch.gather(center, 1, vis_idx[..., None].expand(-1, -1, 3))
    x_vis, x_mask = model._encode_with_centers(neighborhood, vis_idx, mask_idx, vis_center)
    other = neighborhood.clone()
    other[mask] = 0.05 * torch.randn_like(other[mask])
    x_vis2, x_mask2 = model._encode_with_centers(other, vis_idx, mask_idx, vis_center)
    assert_close(x_vis, x_vis2, atol=1e-6)
    assert not torch.allclose(x_mask, x_mask2)


def test_training_on_a_fixed_toy_reduces_the_centre_error():
    torch.manual_seed(0)
    model = tiny(target=TargetConfig(kind="center", center_weight=1.0)).train()
    points, _ = clustered_clouds(2, 16, 8, jitter=0.02, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def centre_error() -> float:  # in train mode (BatchNorm on the batch) as the steps see it
        with torch.no_grad():
            out = model({"points": points}, generator=torch.Generator().manual_seed(7))
        return float((out.center_pred - out.center_target).square().mean())

    before = centre_error()
    for _ in range(10):  # the same clouds and masks every step: the centres can be learnt
        out = model({"points": points}, generator=torch.Generator().manual_seed(7))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = centre_error()
    assert after < 0.5 * before, (before, after)


# --------------------------------------------------------------------------------------------
# teacher and ema
# --------------------------------------------------------------------------------------------


def _save_ckpt(path: Path, model: PointMAEPretrain, model_cfg) -> Path:
    torch.save({"model": model.state_dict(),
                "config": to_dict(PointPretrainConfig(task="pointmae_pretrain", model=model_cfg))}, path)
    return path


def test_frozen_teacher_loads_its_checkpoint_and_stays_out_of_the_state_dict(tmp_path):
    torch.manual_seed(1)
    wide = dataclasses.replace(variant_config(TINY), embed_dim=48, encoder_dims=48, num_heads=3,
                               decoder_num_heads=3)
    ckpt = _save_ckpt(tmp_path / "teacher.pt", build_pretrain_model(wide), wide)
    tcfg = TargetConfig(kind="teacher", checkpoint=str(ckpt), layer=0, layers=1, instance_norm=False)
    model = tiny(target=tcfg)
    assert isinstance(model.target, TeacherTarget) and model.target.out_dim == 48
    assert model.recon_head.out_channels == 48  # the head follows the teacher's width, not the student's 32
    assert not any(k.startswith("target.") for k in model.state_dict())
    enc_sd = {k[len("encoder."):]: v for k, v in load_checkpoint(ckpt)["model"].items() if k.startswith("encoder.")}
    for k, v in model.target.teacher.module.state_dict().items():
        assert torch.equal(v, enc_sd[k]), k
    # the target is block 0's raw output on ALL patches, taken at the masked ones: recomputed by hand
    points = torch.randn(2, 256, 3)
    out = model({"points": points}, generator=torch.Generator().manual_seed(0))
    nb, c = model.group(points)
    t = model.target.teacher.module
    x = t.blocks[0](t.embed(nb) + t.pos_embed(c))
    assert_close(out.target, x[out.mask].reshape(2, -1, 48), atol=1e-5)
    # a strict reload of the student's checkpoint needs no teacher weights
    again = tiny(target=tcfg)
    again.load_state_dict(model.state_dict(), strict=True)


def test_teacher_from_a_classification_checkpoint(tmp_path):
    torch.manual_seed(2)
    cfg = variant_config(TINY)
    cls = build_classifier(cfg, 5)
    path = tmp_path / "cls.pt"
    torch.save({"model": cls.state_dict()}, path)  # no config: the student's architecture is assumed
    model = tiny(target=TargetConfig(kind="teacher", checkpoint=str(path)))
    for k, v in model.target.teacher.module.state_dict().items():
        assert torch.equal(v, cls.encoder.state_dict()[k]), k
    with pytest.raises(ConfigError, match="model.target.checkpoint is empty"):
        tiny("teacher")


@pytest.mark.parametrize("kind", ["teacher", "ema"])
def test_no_gradient_reaches_a_teacher(kind, tiny_pointmae_pretrain_ckpt):
    torch.manual_seed(0)
    model = tiny(target=TargetConfig(kind=kind, checkpoint=str(tiny_pointmae_pretrain_ckpt), layers=2))
    model.train()
    teacher = model.target.teacher
    assert not teacher.training and not teacher.module.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model({"points": torch.randn(2, 256, 3)})
    assert out.pred.shape == out.target.shape == (2, 9, 32) and not out.target.requires_grad
    out.loss.backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None for p in model.encoder.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # an optimizer step never moves the teacher
    assert not any(id(p) in {id(q) for q in teacher.parameters()} for g in opt.param_groups for p in g["params"])


def test_ema_update_follows_its_formula():
    torch.manual_seed(0)
    tcfg = TargetConfig(kind="ema", momentum=0.9, momentum_end=0.99, momentum_steps=10)
    model = tiny(target=tcfg)
    assert isinstance(model.target, EMATarget)
    teacher, student = model.target.teacher.module, model.encoder
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    for k, v in student.state_dict().items():
        assert torch.equal(v, t0[k]), k  # starts as the student
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    model.after_optimizer_step(5, 100)  # mid-ramp: 0.9 + (0.99 - 0.9) * 5 / 10
    d = 0.9 + 0.09 * 5 / 10
    s = student.state_dict()
    for name, p in student.named_parameters():
        assert_close(teacher.get_parameter(name), d * t0[name] + (1 - d) * s[name], atol=1e-6, msg=name)
    for name, buf in student.named_buffers():
        assert torch.equal(teacher.get_buffer(name), buf), name  # buffers copied (data2vec)


def _pretrain_cfg(root: Path, out: Path, *extra: str):
    return load_config(None, [
        "task=pointmae_pretrain", f"model.variant={TINY}", "data.dataset=shapenet55", f"data.root={root}",
        "data.npoints=256", "data.report_shapes=0", f"output_dir={out}", "train.batch_size=4",
        "train.num_workers=0", "train.log_every=1", "train.progress=off", "train.tensorboard=false",
        "optim.warmup_steps=1", *extra])


@pytest.fixture(scope="module")
def sn_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sn55") / "sn"
    synth_shapenet55(root, seed=0, scale="tiny")
    return root


@pytest.mark.slow
def test_ema_teacher_resumes_exactly(sn_root, tmp_path):
    common = ["train.max_steps=5", "train.epochs=1", "train.eval_every=0", "train.save_every=0",
              "train.save_every_steps=2", "model.target.kind=ema", "model.target.layers=2",
              "model.target.momentum=0.5", "model.target.momentum_end=0.8"]  # a fast teacher: differences show
    straight = Trainer(_pretrain_cfg(sn_root, tmp_path / "straight", *common))
    straight.fit()
    first = Trainer(_pretrain_cfg(sn_root, tmp_path / "resumed", *common))
    sigterm_after_step(first, 2)
    with pytest.raises(TrainingInterrupted):
        first.fit()
    again = Trainer(_pretrain_cfg(sn_root, tmp_path / "resumed", *common, "train.resume=auto"))
    assert again.state.step == 3
    again.fit()
    a, b = straight.model.state_dict(), again.model.state_dict()
    assert list(a) == list(b) and any(k.startswith("target.teacher.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the teacher moved away from its start and from the student
    w = "target.teacher.module.blocks.0.attn.qkv.weight"
    assert not torch.equal(a[w], a["encoder.blocks.0.attn.qkv.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["points", "center", "teacher", "ema"])
def test_every_kind_trains_two_steps_through_the_trainer(kind, sn_root, tmp_path, tiny_pointmae_pretrain_ckpt):
    extra = [f"model.target.kind={kind}"]
    if kind == "teacher":
        extra.append(f"model.target.checkpoint={tiny_pointmae_pretrain_ckpt}")
    if kind == "center":
        extra += ["model.pos_encoding=sincos", "model.embed_dim=36", "model.encoder_dims=36", "model.num_heads=3",
                  "model.decoder_num_heads=3"]
    res = run(_pretrain_cfg(sn_root, tmp_path / kind, "train.max_steps=2", "train.epochs=1", *extra))
    metrics = res["test"] if "test" in res else res[sorted(res)[-1]]
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    expected = {"points": {"cd_l2", "cd_l1"}, "center": {"cd_l2", "cd_l1", "center_mse"}}.get(kind, set())
    assert expected <= set(metrics)


def test_a_sincos_pretraining_initialises_a_sincos_classifier_only(tmp_path):
    cfg = dataclasses.replace(variant_config(TINY), embed_dim=36, encoder_dims=36, num_heads=3, decoder_num_heads=3,
                              pos_encoding="sincos", target=TargetConfig(kind="center"))
    torch.manual_seed(0)
    pre = build_pretrain_model(cfg)
    cls = build_classifier(cfg, 4)
    load_encoder_checkpoint(cls, {"model": pre.state_dict()})
    points = torch.randn(2, 256, 3)
    assert torch.equal(cls.encoder.pos_embed(points[:, :16]), pre.encoder.pos_embed(points[:, :16]))
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_encoder_checkpoint(build_classifier(dataclasses.replace(cfg, pos_encoding="xyz"), 4),
                                {"model": pre.state_dict()})
