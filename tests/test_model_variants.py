"""Every registered model variant builds (on the meta device: no memory, no time), with exactly the
parameter count its widths imply and the published size of the official models; the largest ones
run a forward pass on the meta device with the right output shapes."""

from __future__ import annotations

import pytest
import torch

from mm3d.registry import MODELS, variant_config
from mm3d.pointcloud import models as point_models
from mm3d.video import models as video_models

# Published sizes of the fine-tuned models (VideoMAE with a 400-class Kinetics head; Point-MAE with a
# 15-class ScanObjectNN head), in millions, as the papers round them.
PUBLISHED_M = {"videomae_small": 22, "videomae_base": 87, "videomae_large": 305, "videomae_huge": 633,
               "pointmae_small": 22.1}
CLASSES = {"video": 400, "pointcloud": 15}


def vit_block(d: int, mlp_ratio: float, bias: int) -> int:
    """timm pre-norm block: 2 LayerNorms, qkv (no bias) + `bias` extra bias values, proj, 2-layer MLP."""
    h = int(d * mlp_ratio)
    return 4 * d + 3 * d * d + bias + d * d + d + d * h + h + h * d + d


def video_counts(cfg) -> dict[str, int]:
    """VideoMAE, from the widths: tubelet embedding, q/v-bias blocks, final norm; the decoder side; the
    classifier (mean pooling: fc_norm instead of the encoder's final norm, then the linear head)."""
    d, dd, n = cfg.embed_dim, cfg.decoder_embed_dim, CLASSES["video"]
    k = cfg.in_chans * cfg.tubelet_size * cfg.patch_size ** 2  # pixels per tubelet

    def block(w):
        return vit_block(w, cfg.mlp_ratio, 2 * w if cfg.qkv_bias else 0)

    encoder = (k * d + d) + cfg.depth * block(d) + 2 * d
    decoder = d * dd + dd + cfg.decoder_depth * block(dd) + 2 * dd + (dd * k + k)  # proj, mask token, ..., head
    return {"encoder": encoder, "pretrain": encoder + decoder, "classifier": encoder + d * n + n}


def point_counts(cfg) -> dict[str, int]:
    """Point-MAE, from the widths: mini-PointNet (convs + BatchNorm affine), centre MLP, blocks, norm;
    mask token, decoder centre MLP, decoder blocks and norm, reconstruction conv; the classifier's cls
    token and position, and its [Linear, BatchNorm] x hidden + Linear head on [cls, max] (2D)."""
    d, e, (h1, h2, h3), n = cfg.embed_dim, cfg.encoder_dims, cfg.pointnet_dims, CLASSES["pointcloud"]
    pointnet = (3 * h1 + h1) + 2 * h1 + (h1 * h2 + h2) + (2 * h2 * h3 + h3) + 2 * h3 + (h3 * e + e)
    proj = 0 if e == d else e * d + d
    centre_mlp = (3 * cfg.pos_hidden + cfg.pos_hidden) + (cfg.pos_hidden * d + d)

    def block(w):
        return vit_block(w, cfg.mlp_ratio, 3 * w if cfg.qkv_bias else 0)

    encoder = pointnet + proj + centre_mlp + cfg.depth * block(d) + 2 * d
    k3 = 3 * cfg.group_size
    decoder = d + centre_mlp + cfg.decoder_depth * block(d) + 2 * d + (d * k3 + k3)
    head, width = 0, 2 * d
    for h in cfg.cls_head_dims:
        head += width * h + h + 2 * h
        width = h
    return {"encoder": encoder, "pretrain": encoder + decoder, "classifier": encoder + 2 * d + head + width * n + n}


def build(name: str):
    """(pretraining model, classifier) of a variant, on the meta device."""
    variant = MODELS.get(name)
    cfg = variant_config(name)
    module = video_models if variant.modality == "video" else point_models
    with torch.device("meta"):
        return module.build_pretrain_model(cfg), module.build_classifier(cfg, CLASSES[variant.modality])


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_official_sizes_are_registered():
    assert set(PUBLISHED_M) <= set(MODELS)
    assert {"video", "pointcloud"} <= {MODELS.get(n).modality for n in MODELS}  # tests may add "core" toys


@pytest.mark.parametrize("name", list(MODELS))
def test_every_variant_builds_with_the_parameter_count_of_its_widths(name):
    pretrain, classifier = build(name)
    assert all(p.is_meta for p in (*pretrain.parameters(), *classifier.parameters()))
    cfg = variant_config(name)
    want = (video_counts if MODELS.get(name).modality == "video" else point_counts)(cfg)
    got = {"encoder": count(pretrain.encoder), "pretrain": count(pretrain), "classifier": count(classifier)}
    assert got == want
    if name in PUBLISHED_M:
        assert got["classifier"] / 1e6 == pytest.approx(PUBLISHED_M[name], rel=0.01), got


def test_published_figures_by_hand():
    """The formula spelled out for ViT-B (VideoMAE) and Point-MAE, so a wrong formula cannot hide."""
    # ViT-B: 12 blocks of 12 D^2 + 12 D (q/v biases, no k bias) + tubelet embedding 1536 D + D + norm 2 D
    d = 768
    assert video_counts(variant_config("videomae_base"))["encoder"] == 12 * (12 * d * d + 12 * d) + 1536 * d + d + 2 * d
    assert video_counts(variant_config("videomae_base"))["encoder"] == 86_227_200
    # Point-MAE encoder: 12 blocks of 12 D^2 + 10 D (no qkv bias) + mini-PointNet 494,464 + centre MLP 50,048
    d = 384
    assert point_counts(variant_config("pointmae_small"))["encoder"] == 12 * (12 * d * d + 10 * d) + 494_464 + 50_048 + 2 * d


def test_largest_video_variant_forward_shapes_on_meta():
    cfg = variant_config("videomae_huge")
    pretrain, classifier = build("videomae_huge")
    t, h, w = cfg.grid
    assert (t, h, w) == (8, 14, 14)
    k = 3 * 2 * 16 * 16
    with torch.device("meta"):
        video = torch.empty(2, 3, 16, 224, 224)
        out = pretrain({"video": video})
        cls = classifier({"video": video, "label": torch.zeros(2, dtype=torch.long)})
    masked = t * int(0.9 * h * w)  # tube masking: the same 176 of 196 positions in each of 8 time slices
    assert out.mask.shape == (2, t * h * w) and out.pred.shape == out.target.shape == (2, masked, k)
    assert out.loss.shape == () and cls.logits.shape == (2, 400) and cls.loss.shape == ()


def test_largest_point_variant_forward_shapes_on_meta():
    cfg = variant_config("pointmae_small")
    pretrain, classifier = build("pointmae_small")
    with torch.device("meta"):
        points = torch.empty(2, 1024, 3)
        out = pretrain({"points": points})
        cls = classifier({"points": points, "label": torch.zeros(2, dtype=torch.long)})
    g, k = cfg.num_group, cfg.group_size
    assert out.pred.shape == out.target.shape == (2, int(0.6 * g), k, 3) and out.mask.shape == (2, g)
    assert cls.logits.shape == (2, 15) and cls.loss.shape == ()
