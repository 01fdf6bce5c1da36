"""Official Point-MAE checkpoints -> ours: every weight lands where it belongs."""

from __future__ import annotations

import argparse

import pytest
import torch

from mm3d.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from mm3d.config import config_from_dict
from mm3d.pointcloud.convert import convert_pointmae_official, official_to_ours
from mm3d.pointcloud.models import build_classifier, build_pretrain_model
from mm3d.pointcloud.tasks import PointPretrainConfig
from mm3d.registry import CONVERTERS, variant_config


# The official names and shapes, written out from Pang-Yatian/Point-MAE models/Point_MAE.py
# (Encoder, Group, Block with qkv_bias=False, TransformerEncoder/Decoder, Point_MAE, PointTransformer).
def _pointnet(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, (cin, hid, cout) in {"first_conv": (3, 128, 256), "second_conv": (512, 512, d)}.items():
        out[f"{prefix}{name}.0.weight"] = (hid, cin, 1)
        out[f"{prefix}{name}.0.bias"] = (hid,)
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}{name}.1.{p}"] = (hid,)
        out[f"{prefix}{name}.1.num_batches_tracked"] = ()
        out[f"{prefix}{name}.3.weight"] = (cout, hid, 1)
        out[f"{prefix}{name}.3.bias"] = (cout,)
    return out


def _mlp3(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}0.weight": (128, 3), f"{prefix}0.bias": (128,), f"{prefix}2.weight": (d, 128),
            f"{prefix}2.bias": (d,)}


def _blocks(prefix: str, depth: int, d: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for i in range(depth):
        p = f"{prefix}{i}."
        out.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.qkv.weight": (3 * d, d),
                    p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,), p + "norm2.weight": (d,),
                    p + "norm2.bias": (d,), p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
                    p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,)})
    return out


def official_pretrain_shapes(d: int = 384, depth: int = 12, dec: int = 4, k: int = 32) -> dict[str, tuple[int, ...]]:
    s = _pointnet("MAE_encoder.encoder.", d)
    s.update(_mlp3("MAE_encoder.pos_embed.", d))
    s.update(_blocks("MAE_encoder.blocks.blocks.", depth, d))
    s.update({"MAE_encoder.norm.weight": (d,), "MAE_encoder.norm.bias": (d,), "mask_token": (1, 1, d)})
    s.update(_mlp3("decoder_pos_embed.", d))
    s.update(_blocks("MAE_decoder.blocks.", dec, d))
    s.update({"MAE_decoder.norm.weight": (d,), "MAE_decoder.norm.bias": (d,),
              "increase_dim.0.weight": (3 * k, d, 1), "increase_dim.0.bias": (3 * k,)})
    return s


def official_classifier_shapes(d: int = 384, depth: int = 12, classes: int = 40) -> dict[str, tuple[int, ...]]:
    s = _pointnet("encoder.", d)
    s.update(_mlp3("pos_embed.", d))
    s.update(_blocks("blocks.blocks.", depth, d))
    s.update({"norm.weight": (d,), "norm.bias": (d,), "cls_token": (1, 1, d), "cls_pos": (1, 1, d)})
    for i, (cin, cout) in {0: (2 * d, 256), 4: (256, 256), 8: (256, classes)}.items():
        s[f"cls_head_finetune.{i}.weight"] = (cout, cin)
        s[f"cls_head_finetune.{i}.bias"] = (cout,)
    for i in (1, 5):
        for p in ("weight", "bias", "running_mean", "running_var"):
            s[f"cls_head_finetune.{i}.{p}"] = (256,)
        s[f"cls_head_finetune.{i}.num_batches_tracked"] = ()
    return s


def make_state(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> dict[str, torch.Tensor]:
    """Distinct values per tensor (so a swapped mapping cannot go unnoticed)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, (k, shape) in enumerate(shapes.items()):
        if k.endswith("num_batches_tracked"):
            out[prefix + k] = torch.tensor(1000 + i)
        else:
            out[prefix + k] = torch.randn(shape, generator=g) + i
    return out


EXPECTED_PRETRAIN = {  # a sample of the mapping, spelled out
    "MAE_encoder.encoder.first_conv.0.weight": "encoder.patch_embed.first_conv.0.weight",
    "MAE_encoder.encoder.second_conv.1.running_var": "encoder.patch_embed.second_conv.1.running_var",
    "MAE_encoder.pos_embed.2.weight": "encoder.pos_embed.2.weight",
    "MAE_encoder.blocks.blocks.11.attn.qkv.weight": "encoder.blocks.11.attn.qkv.weight",
    "MAE_encoder.norm.bias": "encoder.norm.bias",
    "mask_token": "mask_token",
    "decoder_pos_embed.0.bias": "decoder_pos_embed.0.bias",
    "MAE_decoder.blocks.3.mlp.fc2.weight": "decoder.blocks.3.mlp.fc2.weight",
    "MAE_decoder.norm.weight": "decoder.norm.weight",
    "increase_dim.0.weight": "recon_head.weight",
}
EXPECTED_CLASSIFIER = {
    "encoder.first_conv.3.bias": "encoder.patch_embed.first_conv.3.bias",
    "pos_embed.0.weight": "encoder.pos_embed.0.weight",
    "blocks.blocks.0.norm1.weight": "encoder.blocks.0.norm1.weight",
    "norm.weight": "encoder.norm.weight",
    "cls_token": "cls_token",
    "cls_pos": "cls_pos",
    "cls_head_finetune.5.running_mean": "head.5.running_mean",
    "cls_head_finetune.8.weight": "head.8.weight",
}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_pretrain_weights_land_where_they_belong(prefix):
    official = make_state(official_pretrain_shapes(), prefix)
    ours, report = official_to_ours(official)
    assert report.kind == "pretrain"
    assert report.unknown == [] and report.missing == [] and report.mismatched == []
    assert len(ours) == len(official) == len(report.renamed)
    for off, our in EXPECTED_PRETRAIN.items():
        assert report.renamed[off] == our
    for off, our in report.renamed.items():
        assert torch.equal(ours[our], official[prefix + off]), off
    assert report.model["embed_dim"] == 384 and report.model["depth"] == 12
    assert report.model["decoder_depth"] == 4 and report.model["group_size"] == 32
    assert report.model["num_heads"] == 6 and report.model["qkv_bias"] is False

    with torch.device("meta"):
        model = build_pretrain_model(variant_config("pointmae_small"))
    model.load_state_dict(ours, strict=True, assign=True)
    sd = model.state_dict()
    for off, our in report.renamed.items():
        assert torch.equal(sd[our], official[prefix + off]), off


def test_classifier_weights_land_where_they_belong():
    official = make_state(official_classifier_shapes(classes=40))
    ours, report = official_to_ours(official)
    assert report.kind == "classifier"
    assert report.unknown == [] and report.missing == [] and report.mismatched == []
    for off, our in EXPECTED_CLASSIFIER.items():
        assert report.renamed[off] == our
    assert report.model["num_classes"] == 40 and report.model["cls_head_dims"] == [256, 256]
    with torch.device("meta"):
        model = build_classifier(variant_config("pointmae_small"), num_classes=40)
    model.load_state_dict(ours, strict=True, assign=True)
    sd = model.state_dict()
    for off, our in report.renamed.items():
        assert torch.equal(sd[our], official[off]), off


def test_unknown_and_missing_keys_are_reported():
    official = make_state(official_pretrain_shapes(d=64, depth=2, dec=1, k=8))
    official["MAE_encoder.extra_proj.weight"] = torch.zeros(3)
    official["something_else"] = torch.zeros(1)
    del official["MAE_decoder.norm.bias"]
    ours, report = official_to_ours(official)
    assert set(report.unknown) == {"MAE_encoder.extra_proj.weight", "something_else"}
    assert report.missing == ["decoder.norm.bias"]
    lines = "\n".join(report.lines())
    assert "something_else" in lines and "decoder.norm.bias" in lines and "WARNING" in lines
    with pytest.raises(ValueError, match="not a Point-MAE"):
        official_to_ours({"fc.weight": torch.zeros(2, 2)})


def test_convert_file_end_to_end(tmp_path):
    assert "pointmae-official" in CONVERTERS
    src, dst = tmp_path / "pretrain.pth", tmp_path / "out" / "ours.pt"
    official = make_state(official_pretrain_shapes(), "module.")
    torch.save({"base_model": official, "optimizer": {"state": {}, "param_groups": []}, "epoch": 300,
                "metrics": {"acc": torch.tensor(0.0)}, "best_metrics": {"acc": 0.0}}, src)
    lines = convert_pointmae_official(str(src), str(dst))
    assert any("wrote" in line for line in lines) and any("optimizer" in line for line in lines)
    ck = load_checkpoint(dst)  # weights_only
    assert ck["meta"]["converted_from"] == "pointmae-official" and ck["meta"]["official"]["epoch"] == 300
    assert ck["meta"]["unmapped_keys"] == [] and ck["meta"]["missing_keys"] == []
    cfg = config_from_dict(PointPretrainConfig, ck["config"])
    assert cfg.task == "pointmae_pretrain" and cfg.model.variant == "pointmae_small"
    model = build_pretrain_model(cfg.model)
    load_model_weights(model, dst, strict=True)
    assert torch.equal(model.state_dict()["encoder.blocks.5.mlp.fc1.weight"],
                       official["module.MAE_encoder.blocks.blocks.5.mlp.fc1.weight"])


def test_files_that_need_pickle_load_only_when_allowed(tmp_path):
    src = tmp_path / "ckpt.pth"
    official = make_state(official_classifier_shapes(d=64, depth=1, classes=5))
    torch.save({"base_model": official, "args": argparse.Namespace(lr=1e-3)}, src)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        convert_pointmae_official(str(src), str(tmp_path / "a.pt"))
    lines = convert_pointmae_official(str(src), str(tmp_path / "b.pt"), allow_pickle=True)
    assert any("classifier" in line for line in lines)
    ck = load_checkpoint(tmp_path / "b.pt")
    assert ck["config"] is None and ck["meta"]["model"]["num_classes"] == 5


# ---------------------------------------------------------------------------------------------
# The converted model computes what the official model computes (a functional re-statement of
# the official forward over the official state dict, evaluation mode)
# ---------------------------------------------------------------------------------------------

F = torch.nn.functional


def _bn(sd, p, x):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        training=False, eps=1e-5)


def ref_pointnet(sd, p, patches):
    """official Encoder.forward: patches (B, G, K, 3) -> (B, G, D)."""
    b, g, k, _ = patches.shape
    x = patches.reshape(b * g, k, 3).transpose(2, 1)
    f = F.conv1d(x, sd[p + "first_conv.0.weight"], sd[p + "first_conv.0.bias"])
    f = F.conv1d(F.relu(_bn(sd, p + "first_conv.1.", f)), sd[p + "first_conv.3.weight"], sd[p + "first_conv.3.bias"])
    f = torch.cat([f.max(dim=2, keepdim=True)[0].expand(-1, -1, k), f], dim=1)
    f = F.conv1d(f, sd[p + "second_conv.0.weight"], sd[p + "second_conv.0.bias"])
    f = F.conv1d(F.relu(_bn(sd, p + "second_conv.1.", f)), sd[p + "second_conv.3.weight"], sd[p + "second_conv.3.bias"])
    return f.max(dim=2)[0].reshape(b, g, -1)


def ref_mlp3(sd, p, x):
    return F.linear(F.gelu(F.linear(x, sd[p + "0.weight"], sd[p + "0.bias"])), sd[p + "2.weight"], sd[p + "2.bias"])


def ref_block(sd, p, x, heads):
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-5)
    qkv = F.linear(h, sd[p + "attn.qkv.weight"]).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-5)
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                 sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + h


def ref_transformer(sd, p, depth, x, pos, heads):
    for i in range(depth):
        x = ref_block(sd, f"{p}{i}.", x + pos, heads)
    return x


def _ln(sd, p, x):
    return F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], eps=1e-5)


def ref_point_mae(sd, neighborhood, center, mask, heads, depth, dec):
    """official Point_MAE.forward with a given mask: (rebuild points (B*M, K, 3), gt, loss)."""
    b, g, k, _ = neighborhood.shape
    tokens = ref_pointnet(sd, "MAE_encoder.encoder.", neighborhood)
    c = tokens.shape[-1]
    x_vis = tokens[~mask].reshape(b, -1, c)
    pos = ref_mlp3(sd, "MAE_encoder.pos_embed.", center[~mask].reshape(b, -1, 3))
    x_vis = _ln(sd, "MAE_encoder.norm.", ref_transformer(sd, "MAE_encoder.blocks.blocks.", depth, x_vis, pos, heads))
    pos_vis = ref_mlp3(sd, "decoder_pos_embed.", center[~mask]).reshape(b, -1, c)
    pos_mask = ref_mlp3(sd, "decoder_pos_embed.", center[mask]).reshape(b, -1, c)
    m = pos_mask.shape[1]
    x_full = torch.cat([x_vis, sd["mask_token"].expand(b, m, -1)], dim=1)
    x_rec = ref_transformer(sd, "MAE_decoder.blocks.", dec, x_full, torch.cat([pos_vis, pos_mask], 1), heads)
    x_rec = _ln(sd, "MAE_decoder.norm.", x_rec[:, -m:])
    rebuild = F.conv1d(x_rec.transpose(1, 2), sd["increase_dim.0.weight"], sd["increase_dim.0.bias"])
    rebuild = rebuild.transpose(1, 2).reshape(b * m, -1, 3)
    gt = neighborhood[mask].reshape(b * m, -1, 3)
    d2 = ((rebuild[:, :, None] - gt[:, None]) ** 2).sum(-1)
    loss = d2.min(2)[0].mean() + d2.min(1)[0].mean()
    return rebuild, gt, loss


def ref_point_transformer(sd, neighborhood, center, heads, depth):
    """official PointTransformer.forward (evaluation mode): logits (B, C)."""
    b = neighborhood.shape[0]
    tokens = ref_pointnet(sd, "encoder.", neighborhood)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), tokens], dim=1)
    pos = torch.cat([sd["cls_pos"].expand(b, -1, -1), ref_mlp3(sd, "pos_embed.", center)], dim=1)
    x = _ln(sd, "norm.", ref_transformer(sd, "blocks.blocks.", depth, x, pos, heads))
    f = torch.cat([x[:, 0], x[:, 1:].max(1)[0]], dim=-1)
    h = "cls_head_finetune."
    f = F.relu(_bn(sd, h + "1.", F.linear(f, sd[h + "0.weight"], sd[h + "0.bias"])))
    f = F.relu(_bn(sd, h + "5.", F.linear(f, sd[h + "4.weight"], sd[h + "4.bias"])))
    return F.linear(f, sd[h + "8.weight"], sd[h + "8.bias"])


def _scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep activations in a sane range: small weights, positive BN variances."""
    out = {}
    for k, v in state.items():
        if k.endswith("running_var"):
            out[k] = v.abs() + 0.5
        elif k.endswith("num_batches_tracked"):
            out[k] = v
        elif k.endswith(("norm1.weight", "norm2.weight", "norm.weight")) or k.endswith(".1.weight"):
            out[k] = 1.0 + 0.1 * torch.randn_like(v)
        else:
            out[k] = 0.1 * torch.randn_like(v)
    return out


def test_converted_pretrain_model_computes_the_official_forward():
    torch.manual_seed(0)
    d, depth, dec, k = 128, 2, 2, 8  # 2 heads of 64 channels, as the converter assumes
    official = _scaled(make_state(official_pretrain_shapes(d=d, depth=depth, dec=dec, k=k)))
    ours, report = official_to_ours(official)
    cfg = PointPretrainConfig().model.__class__(**{kk: (tuple(v) if isinstance(v, list) else v)
                                                   for kk, v in report.model.items()},
                                               num_group=16, drop_path=0.0)
    model = build_pretrain_model(cfg).eval()
    model.load_state_dict(ours, strict=True)
    pts = torch.randn(2, 256, 3)
    with torch.no_grad():
        nb, ct = model.group(pts)
        mask = model.make_mask(ct, torch.Generator().manual_seed(0))
        out = model({"points": pts, "mask": mask})
        rebuild, gt, loss = ref_point_mae(official, nb, ct, mask, heads=2, depth=depth, dec=dec)
    from mm3d.testing import assert_close

    assert_close(out.pred.reshape(rebuild.shape), rebuild, atol=1e-5, msg="reconstruction")
    assert_close(out.target.reshape(gt.shape), gt, atol=0, rtol=0, msg="target")
    assert_close(out.loss, loss, atol=1e-6, msg="loss")


def test_converted_classifier_computes_the_official_forward():
    torch.manual_seed(0)
    d, depth = 128, 2
    official = _scaled(make_state(official_classifier_shapes(d=d, depth=depth, classes=7)))
    ours, report = official_to_ours(official)
    model_cfg = {kk: (tuple(v) if isinstance(v, list) else v) for kk, v in report.model.items() if kk != "num_classes"}
    cfg = PointPretrainConfig().model.__class__(**model_cfg, num_group=16, group_size=8, drop_path=0.0)
    model = build_classifier(cfg, num_classes=report.model["num_classes"]).eval()
    model.load_state_dict(ours, strict=True)
    pts = torch.randn(3, 256, 3)
    with torch.no_grad():
        nb, ct = model.group(pts)
        logits = model({"points": pts}).logits
        ref = ref_point_transformer(official, nb, ct, heads=2, depth=depth)
    from mm3d.testing import assert_close

    assert_close(logits, ref, atol=1e-5, msg="logits")
