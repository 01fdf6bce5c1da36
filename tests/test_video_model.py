"""VideoMAE models: shapes, gradients, masking semantics, the loss target, position tables."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mm3d.config import ConfigError, config_from_dict
from mm3d.masking import running_cell_mask, tube_mask
from mm3d.registry import MODELS, variant_config
from mm3d.testing import assert_close
from mm3d.video.models import (QVBiasAttention, VideoMAEClassifier, VideoMAEConfig, VideoMAEPretrain,
                               build_classifier, build_pretrain_model)
from mm3d.video.tokens import (adapt_pos_embeds, interpolate_pos_embed, patchify, sincos_1d_table, sincos_3d_table,
                               unpatchify)

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def tiny(**kw) -> VideoMAEConfig:
    return dataclasses.replace(variant_config("videomae_tiny_test"), **kw)


def clip(cfg: VideoMAEConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


def pixel_mask(mask: torch.Tensor, cfg: VideoMAEConfig) -> torch.Tensor:
    """(B, L) token mask -> (B, C, T, H, W) pixel mask."""
    k = cfg.in_chans * cfg.tubelet_size * cfg.patch_size ** 2
    return unpatchify(mask[..., None].expand(-1, -1, k).float(), cfg.grid, cfg.tubelet_size,
                      cfg.patch_size).bool()


# ------------------------------------------------------------------------------------ variants


def test_variants_registered_with_official_widths():
    expect = {"videomae_small": (384, 12, 6, 192, 3), "videomae_base": (768, 12, 12, 384, 6),
              "videomae_large": (1024, 24, 16, 512, 8), "videomae_huge": (1280, 32, 16, 640, 8)}
    for name, (dim, depth, heads, ddim, dheads) in expect.items():
        c = MODELS.get(name).config
        assert (c.embed_dim, c.depth, c.num_heads, c.decoder_embed_dim, c.decoder_num_heads) == \
            (dim, depth, heads, ddim, dheads)
        assert (c.img_size, c.num_frames, c.tubelet_size, c.patch_size) == (224, 16, 2, 16)
        assert c.grid == (8, 14, 14) and c.mask_type == "tube" and c.mask_ratio == 0.9
        # 4 deep for S/B; 12 for L/H, as the released ViT-L/H K400 pretraining scripts and weights
        assert c.decoder_depth == (12 if name in ("videomae_large", "videomae_huge") else 4), name
    assert "videomae_tiny" in MODELS and "videomae_tiny_test" in MODELS


def test_config_validation_errors():
    with pytest.raises(ValueError, match="img_size 30 is not divisible by patch_size 8"):
        tiny(img_size=30).validate()
    with pytest.raises(ValueError, match="num_frames 5 is not divisible by tubelet_size 2"):
        tiny(num_frames=5).validate()
    with pytest.raises(ValueError, match="decoder_mask_ratio"):
        tiny(decoder_mask_type="running_cell", decoder_mask_ratio=0.6).validate()
    with pytest.raises(ConfigError, match="num_frames"):
        config_from_dict(VideoMAEConfig, {"variant": "videomae_tiny_test", "num_frames": 3})
    cfg = config_from_dict(VideoMAEConfig, {"variant": "videomae_tiny_test", "mask_ratio": 0.5})
    assert cfg.embed_dim == 48 and cfg.mask_ratio == 0.5


# ------------------------------------------------------------------------ shapes and gradients


@pytest.mark.parametrize("kw", [{}, {"tubelet_size": 1, "patch_size": 4, "num_frames": 2},
                                {"init_values": 0.1, "pos_embed": "sincos_3d", "drop_path": 0.1},
                                {"decoder_mask_type": "running_cell", "decoder_mask_ratio": 0.5}])
def test_pretrain_shapes_and_gradients(kw):
    cfg = tiny(**kw)
    model = build_pretrain_model(cfg).train()
    out = model({"video": clip(cfg)})
    b, length = 2, cfg.num_tokens
    k = cfg.in_chans * cfg.tubelet_size * cfg.patch_size ** 2
    n_dec = int(out.decoded[0].sum())
    assert out.mask.shape == (b, length) and out.mask.dtype == torch.bool
    assert out.pred.shape == out.target.shape == (b, n_dec, k)
    if cfg.decoder_mask_type is None:
        assert torch.equal(out.decoded, out.mask)
    else:
        assert n_dec == length // 2
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if "ls" not in n)


@pytest.mark.parametrize("kw", [{}, {"use_mean_pooling": False}, {"cls_token": True},
                                {"tubelet_size": 1, "patch_size": 4, "num_frames": 2}])
def test_classifier_shapes_and_gradients(kw):
    cfg = tiny(drop_path=0.1, head_drop=0.1, **kw)
    model = build_classifier(cfg, num_classes=7).train()
    video = clip(cfg, batch=3)
    out = model({"video": video, "label": torch.tensor([0, 3, 6])})
    assert out.logits.shape == (3, 7) and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    tokens = model.forward_features(video)
    assert tokens.shape == (3, cfg.num_tokens + cfg.cls_token, cfg.embed_dim)
    assert model.forward_head(tokens, pre_logits=True).shape == (3, cfg.embed_dim)
    assert model({"video": video}).loss is None


def test_classifier_losses():
    cfg = tiny()
    model = build_classifier(cfg, num_classes=5).eval()
    video = clip(cfg, batch=4)
    logits = model({"video": video}).logits
    soft = torch.softmax(torch.randn(4, 5), dim=-1)
    ref = -(soft * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert_close(model({"video": video, "label": soft}).loss, ref, atol=1e-6)
    smooth = build_classifier(tiny(label_smoothing=0.1), num_classes=5).eval()
    smooth.load_state_dict(model.state_dict())
    labels = torch.tensor([0, 1, 2, 4])
    target = F.one_hot(labels, 5) * 0.9 + 0.1 / 5
    ref = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert_close(smooth({"video": video, "label": labels}).loss, ref, atol=1e-6)


def test_layer_decay_groups():
    from timm.optim import create_optimizer_v2

    cfg = tiny()
    model = build_classifier(cfg, num_classes=5)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    depth = cfg.depth
    assert scale[id(params["encoder.patch_embed.proj.weight"])] == pytest.approx(0.75 ** (depth + 1))
    for i in range(depth):
        assert scale[id(params[f"encoder.blocks.{i}.attn.qkv.weight"])] == pytest.approx(0.75 ** (depth - i))
    assert scale[id(params["head.weight"])] == 1.0 and scale[id(params["fc_norm.weight"])] == 1.0
    assert decay[id(params["encoder.blocks.0.attn.q_bias"])] == 0.0
    assert decay[id(params["encoder.blocks.0.mlp.fc1.weight"])] == 0.05


def test_grad_checkpointing_same_result():
    cfg = tiny()
    a = build_pretrain_model(cfg)
    b = build_pretrain_model(dataclasses.replace(cfg, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    video, mask = clip(cfg), tube_mask(2, cfg.grid, cfg.mask_ratio, generator=torch.Generator().manual_seed(1))
    la, lb = a({"video": video, "mask": mask}).loss, b({"video": video, "mask": mask}).loss
    la.backward()
    lb.backward()
    assert_close(lb, la, atol=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert_close(pb.grad, pa.grad, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------- attention


def test_qv_bias_attention_matches_reference():
    torch.manual_seed(0)
    attn = QVBiasAttention(24, num_heads=3, qkv_bias=True).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, 24)
    w = attn.qkv.weight
    q = x @ w[:24].T + attn.q_bias
    k = x @ w[24:48].T  # no key bias
    v = x @ w[48:].T + attn.v_bias
    split = lambda t: t.reshape(2, 5, 3, 8).transpose(1, 2)  # noqa: E731
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(8), dim=-1)
    ref = attn.proj((a @ split(v)).transpose(1, 2).reshape(2, 5, 24))
    assert_close(attn(x), ref, atol=1e-5)
    assert "q_bias" in dict(attn.named_parameters()) and attn.qkv.bias is None


# ------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("kw", [{}, {"tubelet_size": 1, "patch_size": 4, "num_frames": 2}])
def test_encoder_ignores_masked_pixels(kw):
    cfg = tiny(**kw)
    model = build_pretrain_model(cfg).eval()
    video = clip(cfg)
    mask = tube_mask(2, cfg.grid, 0.75, generator=torch.Generator().manual_seed(3))
    noisy = torch.where(pixel_mask(mask, cfg), torch.randn_like(video) * 100, video)
    assert not torch.equal(noisy, video)
    with torch.no_grad():
        a, b = model.encoder(video, mask), model.encoder(noisy, mask)
        assert a.shape == (2, int((~mask[0]).sum()), cfg.embed_dim)
        assert torch.equal(a, b)
        # while a visible pixel does change it
        changed = video.clone()
        changed[pixel_mask(~mask, cfg)] += 1.0
        assert not torch.allclose(model.encoder(changed, mask), a)


def test_patch_embed_equals_conv3d():
    cfg = tiny(tubelet_size=2, patch_size=8)
    model = build_pretrain_model(cfg)
    video = clip(cfg)
    conv = model.encoder.patch_embed.proj(video).flatten(2).transpose(1, 2)  # official path
    ours = model.encoder.patch_embed(patchify(video, cfg.tubelet_size, cfg.patch_size))
    assert_close(ours, conv, atol=1e-5)


def test_bad_masks_raise():
    cfg = tiny()
    model = build_pretrain_model(cfg)
    mask = tube_mask(2, cfg.grid, 0.75)
    mask[0, 0] = ~mask[0, 0]
    with pytest.raises(ValueError, match="mask must mask the same number of tokens"):
        model({"video": clip(cfg), "mask": mask})
    with pytest.raises(ValueError, match="bool tensor"):
        model({"video": clip(cfg), "mask": mask.float()})


# --------------------------------------------------------------------------------- the loss


def reference_target(video: torch.Tensor, tubelet: int, patch: int, norm_pix: bool) -> torch.Tensor:
    """Slow VideoMAE target: loop over tokens; (B, L, tubelet*patch^2*C), (pt ph pw c) order."""
    b, c, t, h, w = video.shape
    x = video * STD[:, None, None, None] + MEAN[:, None, None, None]
    rows = []
    for i in range(b):
        toks = []
        for ti, hi, wi in itertools.product(range(t // tubelet), range(h // patch), range(w // patch)):
            cube = x[i, :, ti * tubelet:(ti + 1) * tubelet, hi * patch:(hi + 1) * patch,
                     wi * patch:(wi + 1) * patch]  # (C, pt, ph, pw)
            pix = cube.permute(1, 2, 3, 0).reshape(-1, c)  # (P, C), P in (pt ph pw) order
            if norm_pix:
                pix = (pix - pix.mean(0)) / (pix.var(0, unbiased=True).sqrt() + 1e-6)
            toks.append(pix.reshape(-1))
        rows.append(torch.stack(toks))
    return torch.stack(rows)


@pytest.mark.parametrize("tubelet,patch,norm_pix", list(itertools.product([(2), (1)], [8, 4], [True, False])))
def test_loss_matches_slow_reference(tubelet, patch, norm_pix):
    cfg = tiny(tubelet_size=tubelet, patch_size=patch, num_frames=4, norm_pix_loss=norm_pix)
    model = build_pretrain_model(cfg)
    video = clip(cfg)
    mask = tube_mask(2, cfg.grid, 0.75, generator=torch.Generator().manual_seed(0))
    out = model({"video": video, "mask": mask})
    full = reference_target(video, tubelet, patch, norm_pix)
    target = full[mask].reshape(2, -1, full.shape[-1])
    assert_close(out.target, target, atol=1e-5)
    assert_close(out.loss, ((out.pred - target) ** 2).mean(), atol=1e-6)


def test_dual_masking_loss_covers_intersection():
    cfg = tiny(decoder_mask_type="running_cell", decoder_mask_ratio=0.5)
    model = build_pretrain_model(cfg)
    video = clip(cfg)
    g = torch.Generator().manual_seed(5)
    mask = tube_mask(2, cfg.grid, 0.75, generator=g)
    dec_mask = running_cell_mask(2, cfg.grid, 0.5, generator=g)
    out = model({"video": video, "mask": mask, "decoder_mask": dec_mask})
    assert torch.equal(out.decoded, ~dec_mask)
    full = reference_target(video, cfg.tubelet_size, cfg.patch_size, True)
    target = full[~dec_mask].reshape(2, -1, full.shape[-1])
    assert_close(out.target, target, atol=1e-5)
    both = (mask & ~dec_mask)[~dec_mask].reshape(2, -1)  # which decoded tokens were also masked
    assert 0 < int(both.sum()) < both.numel()
    per_token = ((out.pred - target) ** 2).mean(-1)
    assert_close(out.loss, per_token[both].mean(), atol=1e-6)
    # the predictions of decoded-but-visible tokens do not reach the loss
    out.pred.retain_grad()
    out.loss.backward()
    assert float(out.pred.grad[~both].abs().max()) == 0.0 and float(out.pred.grad[both].abs().max()) > 0


def test_reconstruct_pastes_visible_and_unnormalises():
    cfg = tiny()
    model = build_pretrain_model(cfg).eval()
    video = clip(cfg, batch=1)
    mask = tube_mask(1, cfg.grid, 0.75, generator=torch.Generator().manual_seed(0))
    rec = model.reconstruct(video, mask)
    pm = pixel_mask(mask, cfg)
    assert rec.shape == video.shape and torch.equal(rec[~pm], video[~pm])
    # masked tubelets: the per-tubelet prediction times the tubelet's own std plus its own mean
    pred = model({"video": video, "mask": mask}).pred.reshape(1, -1, cfg.tubelet_size * cfg.patch_size ** 2, 3)
    raw = reference_target(video, cfg.tubelet_size, cfg.patch_size, norm_pix=False)[mask]
    raw = raw.reshape(1, -1, cfg.tubelet_size * cfg.patch_size ** 2, 3)
    unit = pred * (raw.var(-2, unbiased=True, keepdim=True).sqrt() + 1e-6) + raw.mean(-2, keepdim=True)
    expected = ((unit - MEAN) / STD).reshape(1, -1, unit.shape[-2] * 3)
    got = patchify(rec, cfg.tubelet_size, cfg.patch_size)[mask].reshape(expected.shape)
    assert_close(got, expected, atol=1e-5)


# ------------------------------------------------------------------------- position tables


def official_1d_table(n: int, d: int) -> np.ndarray:
    """The official formula, written with numpy as in the reference code."""
    table = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return table


@pytest.mark.parametrize("n,d", [(32, 48), (7, 10), (1568, 64)])
def test_sincos_1d_matches_official(n, d):
    assert_close(sincos_1d_table(n, d)[0], torch.from_numpy(official_1d_table(n, d)).float(), atol=1e-6)


def test_sincos_3d_table():
    grid, d = (2, 3, 4), 48
    table = sincos_3d_table(grid, d)[0].reshape(*grid, d)
    assert table.shape == (2, 3, 4, 48)
    # h/w channels do not depend on t, t channels do not depend on h/w
    assert torch.equal(table[0, :, :, 16:], table[1, :, :, 16:])
    assert torch.equal(table[:, 0, 0, :16], table[:, 2, 3, :16])
    assert len({tuple(r.tolist()) for r in table.reshape(-1, d)}) == 24  # all distinct


@pytest.mark.parametrize("old,new", [((2, 4, 4), (2, 4, 4)), ((2, 4, 4), (4, 4, 4)), ((2, 4, 4), (2, 7, 7)),
                                     ((8, 14, 14), (4, 16, 16))])
def test_interpolate_pos_embed(old, new):
    pos = torch.randn(1, math.prod(old), 12)
    out = interpolate_pos_embed(pos, old, new)
    assert out.shape == (1, math.prod(new), 12)
    if old == new:
        assert out is pos
    const = torch.ones(1, math.prod(old), 12) * 3.0
    assert_close(interpolate_pos_embed(const, old, new), torch.full((1, math.prod(new), 12), 3.0), atol=1e-6)
    with pytest.raises(ValueError, match="pos must be"):
        interpolate_pos_embed(pos, (3, 3, 3), new)


def test_adapt_pos_embeds_for_other_frames_and_size():
    src = build_classifier(tiny(), num_classes=5)
    dst = build_classifier(tiny(num_frames=8, img_size=48), num_classes=5)
    sd = src.state_dict()
    notes = adapt_pos_embeds(sd, dst, src.grid)
    assert len(notes) == 1 and "encoder.pos_embed" in notes[0] and "interpolated" in notes[0]
    dst.load_state_dict(sd)
    assert dst.encoder.pos_embed.shape == (1, 4 * 6 * 6, 48)
    same = src.state_dict()
    assert adapt_pos_embeds(same, src, src.grid) == []
    dst3 = build_classifier(tiny(num_frames=8, pos_embed="sincos_3d"), num_classes=5)
    sd3 = build_classifier(tiny(pos_embed="sincos_3d"), num_classes=5).state_dict()
    assert "recomputed" in adapt_pos_embeds(sd3, dst3, (2, 4, 4))[0]
    assert torch.equal(sd3["encoder.pos_embed"], dst3.encoder.pos_embed)


def test_models_are_plain_modules():
    cfg = tiny()
    assert isinstance(build_pretrain_model(cfg), VideoMAEPretrain)
    assert isinstance(build_classifier(cfg), VideoMAEClassifier)
    assert build_classifier(cfg).head.out_features == cfg.num_classes


@pytest.mark.slow
def test_official_k400_vits_config_pretrains_on_a_kinetics_list(tmp_path, realdata):
    """The ViT-S K400 recipe as shipped runs on a Kinetics-style `path label` list (the real mp4),
    shrunk only in steps, batch, precision and workers, and writes its checkpoint and pictures."""
    import json

    from mm3d.cli import main as cli_main
    from mm3d.testing import PROJECT_ROOT

    video = realdata / "video"
    code = cli_main(["pretrain", str(PROJECT_ROOT / "configs/video/videomae_pretrain_k400_vits.yaml"),
                     f"data.root={video}", f"data.train_list={video / 'annotations' / 'kinetics400_videos.txt'}",
                     "train.max_steps=2", "train.batch_size=1", "train.precision=fp32", "train.num_workers=0",
                     "train.device=cpu", "train.progress=off", "train.tensorboard=false", f"output_dir={tmp_path}"])
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert len([h for h in res["history"] if "loss" in h]) >= 1
    assert all(math.isfinite(h["loss"]) for h in res["history"] if "loss" in h)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert any(str(f).endswith("_grid.png") for f in res["files"])
