"""Point-MAE models: shapes, gradients, masking semantics, batching, loss vs brute force, size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mm3d.config import ConfigError, config_from_dict
from mm3d.masking import num_masked
from mm3d.pointcloud.models import (
    Grouped, PointMAEClassifier, PointMAEConfig, PointMAEPretrain, build_classifier,
    build_pretrain_model)
from mm3d.registry import MODELS, variant_config
from mm3d.testing import assert_close

TINY = "pointmae_tiny_test"


def tiny_cfg(**kw) -> PointMAEConfig:
    return dataclasses.replace(variant_config(TINY), **kw)


def clouds(b: int, n: int = 256, seed: int = 0) -> torch.Tensor:
    """(B, N, 3) clouds on a noisy ellipsoid, roughly unit scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g)
    x = x / x.norm(dim=-1, keepdim=True) * torch.tensor([0.9, 0.5, 0.3])
    return x + 0.02 * torch.randn(b, n, 3, generator=g)


class FixedGroups(torch.nn.Module):
    """Stand-in for `Group` that returns given patches (to edit patch contents directly)."""

    def __init__(self, neighborhood: torch.Tensor, center: torch.Tensor) -> None:
        super().__init__()
        self.neighborhood, self.center = neighborhood, center

    def forward(self, points: torch.Tensor) -> Grouped:
        return Grouped(self.neighborhood, self.center)


def test_variants_registered_and_validated():
    for name in ("pointmae_small", "pointmae_tiny", "pointmae_tiny_test"):
        v = MODELS.get(name)
        assert v.modality == "pointcloud" and isinstance(v.config, PointMAEConfig)
        v.config.validate()
    small = variant_config("pointmae_small")
    assert (small.embed_dim, small.depth, small.num_heads, small.decoder_depth, small.decoder_num_heads,
            small.num_group, small.group_size, small.drop_path, small.mask_ratio, small.mask_type,
            small.loss, small.qkv_bias) == (384, 12, 6, 4, 6, 64, 32, 0.1, 0.6, "random", "cdl2", False)
    with pytest.raises(ValueError, match="num_heads"):
        tiny_cfg(num_heads=3).validate()
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_cfg(mask_ratio=1.0).validate()
    with pytest.raises(ConfigError, match="mask_type"):
        config_from_dict(PointMAEConfig, {"variant": TINY, "mask_type": "rand"})


def test_pretrain_shapes_no_nan_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_pretrain_model(cfg).train()
    b = 2
    out = model({"points": clouds(b)})
    g, k, m = cfg.num_group, cfg.group_size, num_masked(cfg.num_group, cfg.mask_ratio)
    assert out.pred.shape == out.target.shape == (b, m, k, 3)
    assert out.mask.shape == (b, g) and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [m] * b
    assert out.center.shape == (b, g, 3) and out.neighborhood.shape == (b, g, k, 3)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and torch.isfinite(out.pred).all()
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_classifier_shapes_no_nan_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_classifier(cfg, num_classes=5).train()
    b = 4
    out = model({"points": clouds(b), "label": torch.tensor([0, 1, 2, 4])})
    assert out.logits.shape == (b, 5) and torch.isfinite(out.logits).all()
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    model.eval()
    with torch.no_grad():
        assert model({"points": clouds(b)}).loss is None
        tokens = model.forward_features(clouds(b))
        assert tokens.shape == (b, 1 + cfg.num_group, cfg.embed_dim)
        assert model.forward_head(tokens, pre_logits=True).shape == (b, 2 * cfg.embed_dim)
        feats = model.forward_block_features(clouds(b), blocks=(0, 1))
    assert len(feats.features) == 2 and all(f.shape == (b, cfg.num_group, cfg.embed_dim) for f in feats.features)
    assert feats.center.shape == (b, cfg.num_group, 3)
    with pytest.raises(ValueError, match="block index"):
        model.forward_block_features(clouds(b), blocks=(cfg.depth,))


def test_classifier_head_is_the_official_layout():
    with torch.device("meta"):  # shapes only
        model = build_classifier(variant_config("pointmae_small"), num_classes=40)
    shapes = {k: tuple(v.shape) for k, v in model.head.state_dict().items() if k.endswith("weight")}
    assert shapes == {"0.weight": (256, 768), "1.weight": (256,), "4.weight": (256, 256),
                      "5.weight": (256,), "8.weight": (40, 256)}
    assert [type(m).__name__ for m in model.head] == [
        "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert model.head[3].p == 0.5
    assert model.no_weight_decay() == {"cls_token"}
    with pytest.raises(ValueError, match="disagrees"):
        build_classifier(dataclasses.replace(variant_config(TINY), num_classes=10), num_classes=40)


def test_encoder_and_prediction_ignore_masked_patch_contents():
    """Changing the points of masked patches changes the target and the loss, never the prediction."""
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_cfg()).train()  # train mode: BatchNorm on batch statistics too
    pts = clouds(2)
    nb, ct = model.group(pts)
    mask = model.make_mask(ct, torch.Generator().manual_seed(1))
    captured = []
    model.encoder.register_forward_hook(lambda mod, inp, out: captured.append(out.detach().clone()))

    model.group = FixedGroups(nb, ct)
    a = model({"points": pts, "mask": mask})
    nb2 = nb.clone()
    nb2[mask] = nb2[mask] * 3.0 + 0.1
    model.group = FixedGroups(nb2, ct)
    b = model({"points": pts, "mask": mask})
    assert_close(captured[1], captured[0], atol=0, rtol=0, msg="encoder output")
    assert_close(b.pred, a.pred, atol=0, rtol=0, msg="prediction")
    assert not torch.equal(b.target, a.target) and not torch.isclose(b.loss, a.loss)
    # a visible patch does change the encoder output
    nb3 = nb.clone()
    nb3[~mask] = nb3[~mask] * 1.5
    model.group = FixedGroups(nb3, ct)
    model({"points": pts, "mask": mask})
    assert not torch.allclose(captured[2], captured[0])


def test_batch_equals_individual_samples():
    """No cross-sample mixing: a batch of B gives the results of B single calls (eval mode)."""
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_cfg()).eval()
    cls = build_classifier(tiny_cfg(), num_classes=3).eval()
    pts = clouds(3, seed=2)
    with torch.no_grad():
        center = model.group(pts).center
        mask = model.make_mask(center, torch.Generator().manual_seed(0))
        full = model({"points": pts, "mask": mask})
        logits = cls({"points": pts}).logits
        for i in range(3):
            one = model({"points": pts[i:i + 1], "mask": mask[i:i + 1]})
            assert_close(one.pred[0], full.pred[i], atol=1e-5, msg=f"pred of sample {i}")
            assert_close(one.neighborhood[0], full.neighborhood[i], atol=0, rtol=0)
            assert_close(cls({"points": pts[i:i + 1]}).logits[0], logits[i], atol=1e-5)


def test_grouping_matches_brute_force():
    group = build_pretrain_model(tiny_cfg()).group
    pts = clouds(2, seed=3)
    nb, ct = group(pts)
    for b in range(2):
        # centres are cloud points, and the first one is point 0 (official FPS start)
        d_to_cloud = (ct[b][:, None] - pts[b][None]).norm(dim=-1)
        assert d_to_cloud.min(dim=1).values.max() == 0
        assert torch.equal(ct[b, 0], pts[b, 0])
        for gi in range(ct.shape[1]):
            d2 = ((pts[b] - ct[b, gi]) ** 2).sum(-1)
            expected = torch.sort(d2).values[: group.group_size]
            got = torch.sort((nb[b, gi] ** 2).sum(-1)).values
            assert_close(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be split"):
        group(clouds(1, n=8))


@pytest.mark.parametrize("loss", ["cdl2", "cdl1"])
def test_loss_equals_brute_force_chamfer_over_masked_patches(loss):
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_cfg(loss=loss)).eval()
    with torch.no_grad():
        out = model({"points": clouds(2, seed=4)})
    per_patch = []
    for p, t in zip(out.pred.reshape(-1, *out.pred.shape[2:]).double(), out.target.reshape(-1, *out.target.shape[2:]).double()):
        d2 = ((p[:, None, :] - t[None, :, :]) ** 2).sum(-1)  # (K, K)
        a, b = d2.min(dim=1).values, d2.min(dim=0).values
        per_patch.append(a.mean() + b.mean() if loss == "cdl2" else (a.sqrt().mean() + b.sqrt().mean()) / 2)
    assert_close(out.loss.double(), torch.stack(per_patch).mean(), atol=1e-6, rtol=1e-5)
    # the target really is the masked patches, in group order
    nb = out.neighborhood
    assert_close(out.target, nb[out.mask].reshape(out.target.shape), atol=0, rtol=0)


def test_block_masking_masks_the_nearest_centres_of_a_seed():
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_cfg(mask_type="block")).eval()
    with torch.no_grad():
        out = model({"points": clouds(3, seed=5)}, generator=torch.Generator().manual_seed(0))
    m = num_masked(out.mask.shape[1], 0.6)
    assert out.mask.sum(1).tolist() == [m] * 3
    for b in range(3):
        masked = set(torch.nonzero(out.mask[b]).flatten().tolist())
        nearest_sets = [set(torch.cdist(out.center[b][s:s + 1], out.center[b])[0].argsort()[:m].tolist())
                        for s in masked]
        assert masked in nearest_sets, f"sample {b}: the masked patches are not one seed's {m} nearest"


def test_mask_from_generator_is_reproducible_and_given_masks_are_checked():
    model = build_pretrain_model(tiny_cfg()).eval()
    pts = clouds(2)
    with torch.no_grad():
        a = model({"points": pts}, generator=torch.Generator().manual_seed(7))
        b = model({"points": pts}, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pred, b.pred)
    bad = a.mask.clone()
    bad[0, bad[0].nonzero()[0]] = False  # sample 0 now masks one fewer
    with pytest.raises(ValueError, match="same number"):
        model({"points": pts, "mask": bad})
    with pytest.raises(ValueError, match="points"):
        model({"points": pts[0]})


def test_reconstruction_is_absolute_and_covers_every_patch():
    model = build_pretrain_model(tiny_cfg()).eval()
    pts = clouds(2)
    rec = model.reconstruct(pts, generator=torch.Generator().manual_seed(0))
    g, k = model.num_group, model.group_size
    m = num_masked(g, model.mask_ratio)
    assert rec.visible.shape == (2, g - m, k, 3) and rec.masked.shape == rec.predicted.shape == (2, m, k, 3)
    nb, ct = model.group(pts)
    absolute = nb + ct.unsqueeze(2)
    assert_close(rec.visible, absolute[~rec.mask].reshape(rec.visible.shape), atol=1e-6)
    assert_close(rec.masked, absolute[rec.mask].reshape(rec.masked.shape), atol=1e-6)
    # every visible / true masked point is a point of the input cloud
    for b in range(2):
        allp = torch.cat([rec.visible[b].reshape(-1, 3), rec.masked[b].reshape(-1, 3)])
        assert (allp[:, None] - pts[b][None]).norm(dim=-1).min(dim=1).values.max() < 1e-6


def test_pretrained_encoder_initialises_a_classifier():
    torch.manual_seed(0)
    pre = build_pretrain_model(tiny_cfg()).eval()
    cls = build_classifier(tiny_cfg(), num_classes=4).eval()
    res = cls.load_state_dict(pre.state_dict(), strict=False)
    assert sorted(res.missing_keys) == sorted(["cls_token", "cls_pos"] + [f"head.{k}" for k in cls.head.state_dict()
                                                                         if not k.endswith("num_batches_tracked")])
    assert all(k.startswith(("mask_token", "decoder", "recon_head")) for k in res.unexpected_keys)
    pts = clouds(2)
    with torch.no_grad():
        assert_close(cls.encoder(*cls.group(pts)), pre.forward_features(pts), atol=1e-6)


def test_layer_decay_groups_and_grad_checkpointing():
    from timm.optim import param_groups_layer_decay

    cls = build_classifier(tiny_cfg(), num_classes=3)
    groups = param_groups_layer_decay(cls, weight_decay=0.05, no_weight_decay_list=cls.no_weight_decay(),
                                      layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == len(list(cls.parameters()))
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == cls.encoder.depth + 2  # stem, every block, head
    pre = build_pretrain_model(tiny_cfg()).train()
    pts = clouds(2)
    gen = torch.Generator().manual_seed(0)
    mask = pre.make_mask(pre.group(pts).center, gen)
    ref = pre({"points": pts, "mask": mask})
    pre.set_grad_checkpointing(True)
    ck = pre({"points": pts, "mask": mask})
    assert_close(ck.loss, ref.loss, atol=1e-6)
    ck.loss.backward()
    assert all(p.grad is not None for p in pre.parameters())


def official_parameter_count(d: int = 384, depth: int = 12, dec_depth: int = 4, k: int = 32,
                             classes: int | None = None) -> int:
    """Parameters of the official Point_MAE / PointTransformer, counted from their layer list."""
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    pointnet = linear(3, 128) + 2 * 128 + linear(128, 256) + linear(512, 512) + 2 * 512 + linear(512, d)
    pos = linear(3, 128) + linear(128, d)
    block = 2 * 2 * d + linear(d, 3 * d, bias=False) + linear(d, d) + linear(d, 4 * d) + linear(4 * d, d)
    encoder = pointnet + pos + depth * block + 2 * d
    if classes is None:
        return encoder + d + pos + dec_depth * block + 2 * d + linear(d, 3 * k)
    head = linear(2 * d, 256) + 2 * 256 + linear(256, 256) + 2 * 256 + linear(256, classes)
    return encoder + 2 * d + head


def test_pointmae_small_parameter_count_matches_the_official_model():
    with torch.device("meta"):  # shapes only
        pre = build_pretrain_model(variant_config("pointmae_small"))
        cls = build_classifier(variant_config("pointmae_small"), num_classes=40)
    n_pre = sum(p.numel() for p in pre.parameters())
    n_cls = sum(p.numel() for p in cls.parameters())
    assert n_pre == official_parameter_count()
    assert n_cls == official_parameter_count(classes=40)
    assert 22.0e6 < n_cls < 22.2e6  # the paper's 22.1M
    assert 28.9e6 < n_pre < 29.1e6  # encoder + 4-block decoder + head


def test_constructors_reject_bad_arguments():
    with pytest.raises(ValueError, match="loss"):
        PointMAEPretrain(loss="emd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        PointMAEClassifier(num_classes=-1)  # 0 is allowed: no head, as timm's num_classes=0
    with pytest.raises(TypeError, match="points"):
        build_pretrain_model(tiny_cfg())(clouds(1).tolist())  # neither a tensor nor a dict


def test_patch_embedding_width_may_differ_from_the_transformer_width():
    model = build_pretrain_model(tiny_cfg(encoder_dims=24))
    assert isinstance(model.encoder.patch_proj, torch.nn.Linear)
    assert build_pretrain_model(tiny_cfg()).encoder.patch_proj.__class__.__name__ == "Identity"
    out = model({"points": clouds(2)})
    out.loss.backward()
    assert model.encoder.patch_proj.weight.grad is not None


def test_patch_embed_is_the_official_mini_pointnet_in_train_mode():
    """The mini-PointNet (matmuls on channels-last rows, the global half of the fusing layer applied
    once per patch) computes the official layer stack: 1x1 Conv1d on (BG, C, K), BatchNorm in train
    mode, ``torch.max`` pooling, ``cat([global, local])`` — outputs and every parameter gradient."""
    from torch import nn

    from mm3d.pointcloud.models import PatchEmbed

    torch.manual_seed(0)
    ours = PatchEmbed(48, dims=(16, 24, 40)).train()
    ref = nn.ModuleDict({
        "first_conv": nn.Sequential(nn.Conv1d(3, 16, 1), nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.Conv1d(16, 24, 1)),
        "second_conv": nn.Sequential(nn.Conv1d(48, 40, 1), nn.BatchNorm1d(40), nn.ReLU(inplace=True), nn.Conv1d(40, 48, 1)),
    }).train()
    ref.load_state_dict(ours.state_dict())
    patches = torch.randn(3, 5, 7, 3, dtype=torch.float64)
    ours, ref = ours.double(), ref.double()

    def official(p: torch.Tensor) -> torch.Tensor:
        b, g, k, _ = p.shape
        x = p.reshape(b * g, k, 3).transpose(2, 1)  # (BG, 3, K)
        f = ref["first_conv"](x)
        glob = torch.max(f, dim=2, keepdim=True)[0]
        f = ref["second_conv"](torch.cat([glob.expand(-1, -1, k), f], dim=1))
        return torch.max(f, dim=2, keepdim=False)[0].reshape(b, g, -1)

    out, want = ours(patches), official(patches)
    assert_close(out, want, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (want * w).sum().backward()
    for name, param in ours.named_parameters():
        assert_close(param.grad, ref.get_parameter(name).grad, rtol=1e-10, atol=1e-12)
    for name, buf in ours.named_buffers():  # BatchNorm running statistics
        assert_close(buf.double(), ref.get_buffer(name).double(), rtol=1e-12, atol=1e-12)
