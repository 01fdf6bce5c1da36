"""VideoMAE checkpoint conversion: parity with Hugging Face transformers, official layout, reports."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from mm3d.checkpoint import CheckpointError, load_model_weights
from mm3d.config import config_from_dict, to_dict
from mm3d.masking import tube_mask
from mm3d.registry import CONVERTERS, variant_config
from mm3d.testing import assert_close
from mm3d.video.convert import (classifier_init_state, hf_to_ours, official_to_ours, ours_to_hf)
from mm3d.video.models import VideoMAEConfig, build_classifier, build_pretrain_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def hf_config(**kw):
    base = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=48, num_hidden_layers=2,
                num_attention_heads=3, intermediate_size=192, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2, decoder_intermediate_size=128, norm_pix_loss=True,
                use_mean_pooling=False)
    base.update(kw)
    return transformers.VideoMAEConfig(**base)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight (HF initialises norms to 1/0 and biases to 0, which hides mistakes).

    A key bias, which some transformers versions create (always zero in VideoMAE checkpoints),
    stays zero: VideoMAE attention has none.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("key.bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 3, 4, 32, 32, generator=g)  # ours: (B, C, T, H, W)
    mask = tube_mask(batch, (2, 4, 4), 0.75, generator=g)
    return video, mask


@pytest.mark.parametrize("mean_pooling", [False, True])  # True: transformers' default, no final encoder norm
@pytest.mark.parametrize("norm_pix", [True, False])
def test_hf_pretraining_parity(norm_pix, mean_pooling):
    hf = randomized(transformers.VideoMAEForPreTraining(hf_config(norm_pix_loss=norm_pix,
                                                                  use_mean_pooling=mean_pooling)))
    conv = hf_to_ours(hf.state_dict(), hf.config)
    assert conv.kind == "pretrain" and conv.config.norm_pix_loss == norm_pix
    assert conv.config.encoder_norm is not mean_pooling
    ours = build_pretrain_model(conv.config).eval()
    ours.load_state_dict(conv.state_dict, strict=True)
    video, mask = inputs()
    with torch.no_grad():
        theirs = hf(video.transpose(1, 2), bool_masked_pos=mask)
        mine = ours({"video": video, "mask": mask})
    assert_close(mine.pred, theirs.logits, atol=ATOL, msg="reconstruction")
    assert_close(mine.loss, theirs.loss, atol=ATOL, msg="loss")


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_hf_classification_parity(mean_pooling):
    hf = randomized(transformers.VideoMAEForVideoClassification(
        hf_config(use_mean_pooling=mean_pooling, num_labels=7)), seed=1)
    conv = hf_to_ours(hf.state_dict(), hf.config)
    assert conv.kind == "classifier" and conv.config.num_classes == 7
    ours = build_classifier(conv.config).eval()
    ours.load_state_dict(conv.state_dict, strict=True)
    video, _ = inputs(3)
    with torch.no_grad():
        assert_close(ours({"video": video}).logits, hf(video.transpose(1, 2)).logits, atol=ATOL, msg="logits")


def ours_config(**kw) -> VideoMAEConfig:
    return dataclasses.replace(variant_config("videomae_tiny_test"), head_norm_eps=1e-5, **kw)


def test_round_trip_ours_hf_ours():
    cfg = ours_config()
    model = randomized(build_pretrain_model(cfg))
    hf_sd, hf_cfg, notes = ours_to_hf(model.state_dict(), cfg, "pretrain")
    assert not notes
    back = hf_to_ours(hf_sd, hf_cfg)
    assert back.state_dict.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict[k], v), k
    for f in ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
              "tubelet_size", "patch_size", "img_size", "num_frames", "mlp_ratio", "qkv_bias", "norm_pix_loss"):
        assert getattr(back.config, f) == getattr(cfg, f), f


def save_ours(model, cfg, path, task="videomae_pretrain"):
    torch.save({"model": model.state_dict(), "config": {"task": task, "model": to_dict(cfg)}}, path)


def test_to_hf_directory_loads_in_transformers(tmp_path):
    cfg = ours_config()
    model = randomized(build_pretrain_model(cfg))
    save_ours(model, cfg, tmp_path / "ours.pt")
    notes = CONVERTERS.get("to-hf")(str(tmp_path / "ours.pt"), str(tmp_path / "hf"))
    assert any("model.safetensors" in n for n in notes)
    hf = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    video, mask = inputs()
    with torch.no_grad():
        theirs = hf(video.transpose(1, 2), bool_masked_pos=mask)
        mine = model({"video": video, "mask": mask})
    assert_close(mine.pred, theirs.logits, atol=ATOL)
    assert_close(mine.loss, theirs.loss, atol=ATOL)

    clf_cfg = ours_config(num_classes=4)
    clf = randomized(build_classifier(clf_cfg))
    save_ours(clf, clf_cfg, tmp_path / "clf.pt", task="videomae_finetune")
    CONVERTERS.get("to-hf")(str(tmp_path / "clf.pt"), str(tmp_path / "hf_clf"))
    hf_clf = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "hf_clf").eval()
    with torch.no_grad():
        assert_close(clf({"video": video}).logits, hf_clf(video.transpose(1, 2)).logits, atol=ATOL)


def test_to_hf_reports_what_hf_cannot_hold():
    cfg = dataclasses.replace(variant_config("videomae_tiny_test"))  # eps 1e-6 on the final norms
    _, _, notes = ours_to_hf(build_pretrain_model(cfg).state_dict(), cfg, "pretrain")
    assert any("1e-5" in n and "eps" in n for n in notes)
    with pytest.raises(ValueError, match="layer scale"):
        ours_to_hf({}, dataclasses.replace(cfg, init_values=0.1), "pretrain")
    with pytest.raises(ValueError, match="sincos_3d"):
        ours_to_hf({}, dataclasses.replace(cfg, pos_embed="sincos_3d"), "pretrain")


def test_videomae_hf_converter_reads_a_directory(tmp_path):
    hf = randomized(transformers.VideoMAEForPreTraining(hf_config()), seed=2)
    hf.save_pretrained(tmp_path / "hf")
    notes = CONVERTERS.get("videomae-hf")(str(tmp_path / "hf"), str(tmp_path / "ours.pt"))
    assert any("wrote" in n for n in notes)
    ck = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert ck["meta"]["converted_from"] == "videomae-hf" and ck["config"]["task"] == "videomae_pretrain"
    model = build_pretrain_model(config_from_dict(VideoMAEConfig, ck["config"]["model"])).eval()
    load_model_weights(model, ck)
    video, mask = inputs()
    with torch.no_grad():
        assert_close(model({"video": video, "mask": mask}).pred,
                     hf(video.transpose(1, 2), bool_masked_pos=mask).logits, atol=ATOL)


def test_hf_unknown_and_missing_keys_are_reported():
    hf = transformers.VideoMAEForPreTraining(hf_config())
    sd = dict(hf.state_dict())
    sd["videomae.something_new.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="something_new"):
        hf_to_ours(sd, hf.config)
    conv = hf_to_ours(sd, hf.config, strict=False)
    assert any("something_new" in n for n in conv.notes)
    del sd["decoder.head.weight"]
    with pytest.raises(KeyError, match="decoder.head.weight"):
        hf_to_ours(sd, hf.config, strict=False)


# --------------------------------------------------------------------------- official layout


def official_block(prefix: str, dim: int, hidden: int, gamma: bool, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One block with the names and shapes of MCG-NJU/VideoMAE modeling_finetune.Block."""
    shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.q_bias": (dim,), "attn.v_bias": (dim,),
              "attn.qkv.weight": (3 * dim, dim), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
              "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (hidden, dim),
              "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
    if gamma:
        shapes.update({"gamma_1": (dim,), "gamma_2": (dim,)})
    return {prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}


def official_pretrain_sd(dim=128, depth=2, ddim=64, ddepth=1, tubelet=2, patch=16, gamma=False):
    g = torch.Generator().manual_seed(0)
    sd = {"encoder.patch_embed.proj.weight": torch.randn(dim, 3, tubelet, patch, patch, generator=g),
          "encoder.patch_embed.proj.bias": torch.randn(dim, generator=g),
          "encoder.norm.weight": torch.randn(dim, generator=g), "encoder.norm.bias": torch.randn(dim, generator=g),
          "encoder_to_decoder.weight": torch.randn(ddim, dim, generator=g),
          "mask_token": torch.randn(1, 1, ddim, generator=g),
          "decoder.norm.weight": torch.randn(ddim, generator=g), "decoder.norm.bias": torch.randn(ddim, generator=g),
          "decoder.head.weight": torch.randn(3 * tubelet * patch * patch, ddim, generator=g),
          "decoder.head.bias": torch.randn(3 * tubelet * patch * patch, generator=g)}
    for i in range(depth):
        sd.update(official_block(f"encoder.blocks.{i}.", dim, 4 * dim, gamma, g))
    for i in range(ddepth):
        sd.update(official_block(f"decoder.blocks.{i}.", ddim, 4 * ddim, gamma, g))
    return sd


def official_finetune_sd(dim=128, depth=2, classes=6, gamma=True):
    g = torch.Generator().manual_seed(1)
    sd = {"patch_embed.proj.weight": torch.randn(dim, 3, 2, 16, 16, generator=g),
          "patch_embed.proj.bias": torch.randn(dim, generator=g),
          "fc_norm.weight": torch.randn(dim, generator=g), "fc_norm.bias": torch.randn(dim, generator=g),
          "head.weight": torch.randn(classes, dim, generator=g), "head.bias": torch.randn(classes, generator=g)}
    for i in range(depth):
        sd.update(official_block(f"blocks.{i}.", dim, 4 * dim, gamma, g))
    return sd


def official_name(ours: str) -> str:
    """Our key -> the official pretraining/fine-tuned key (the inverse map, written out)."""
    name = ours.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
    return name


def test_official_pretrain_file_maps_every_weight(tmp_path):
    sd = official_pretrain_sd()
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model="pretrain_videomae_x"), "epoch": 799}, path)
    convert = CONVERTERS.get("videomae-official")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        convert(str(path), str(tmp_path / "ours.pt"))
    notes = convert(str(path), str(tmp_path / "ours.pt"), allow_pickle=True)
    assert any("assumed 2 heads" in n for n in notes)
    ck = torch.load(tmp_path / "ours.pt", weights_only=True)
    cfg = config_from_dict(VideoMAEConfig, ck["config"]["model"])
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.decoder_embed_dim, cfg.decoder_num_heads) == (128, 2, 2, 64, 1)
    model = build_pretrain_model(cfg)
    load_model_weights(model, ck)  # strict: every key of the model is present
    mapped = {k for k in model.state_dict() if "pos_embed" not in k}
    assert {official_name(k) for k in mapped} == set(sd)
    for k in mapped:
        assert torch.equal(model.state_dict()[k], sd[official_name(k)]), k


def test_official_weights_under_module_with_layer_scale():
    sd = {"module." + k: v for k, v in official_pretrain_sd(gamma=True).items()}
    conv = official_to_ours(sd)
    assert conv.kind == "pretrain" and conv.config.init_values
    model = build_pretrain_model(conv.config)
    model.load_state_dict(conv.state_dict, strict=True)
    assert torch.equal(model.encoder.blocks[1].ls2.gamma, sd["module.encoder.blocks.1.gamma_2"])


def test_official_finetuned_maps_to_classifier():
    sd = official_finetune_sd()
    conv = official_to_ours(sd, img_size=64, num_frames=4)
    assert conv.kind == "classifier" and conv.config.num_classes == 6 and conv.config.use_mean_pooling
    model = build_classifier(conv.config).eval()
    model.load_state_dict(conv.state_dict, strict=True)
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.head.weight, sd["head.weight"])
    assert model.encoder.grid == (2, 4, 4)


def test_official_unknown_keys_are_reported():
    sd = official_finetune_sd()
    sd["pos_embed"] = torch.zeros(1, 1568, 128)  # learnable position embedding: not supported
    sd["dist_head.weight"] = torch.zeros(6, 128)
    with pytest.raises(ValueError, match="dist_head.weight"):
        official_to_ours(sd)
    conv = official_to_ours(sd, strict=False)
    assert any("pos_embed" in n and "dist_head.weight" in n for n in conv.notes)
    with pytest.raises(ValueError, match="pass num_heads"):
        official_to_ours(official_finetune_sd(dim=96))


def test_classifier_init_from_pretraining_checkpoint():
    cfg = variant_config("videomae_tiny_test")
    pre = build_pretrain_model(cfg)
    clf = build_classifier(dataclasses.replace(cfg, num_frames=8), num_classes=3)
    sd, notes = classifier_init_state(pre.state_dict(), clf, old_grid=cfg.grid)
    text = "\n".join(notes)
    assert "decoder" in text and "encoder.norm.weight" in text and "interpolated" in text
    load_notes = load_model_weights(clf, sd, strict=False)
    missing = [n for n in load_notes if n.startswith("missing")]
    assert len(missing) == 1 and all(k in missing[0] for k in ("fc_norm.weight", "head.weight"))
    assert torch.equal(clf.encoder.blocks[1].mlp.fc2.weight, pre.encoder.blocks[1].mlp.fc2.weight)
    # a classifier of another class count: its head is dropped and named
    other = build_classifier(cfg, num_classes=9)
    _, notes = classifier_init_state(build_classifier(cfg, num_classes=5).state_dict(), other)
    assert any("head not loaded" in n for n in notes)


def test_bench_peer_runs_the_same_step():
    from mm3d.registry import TASKS

    task = TASKS.get("videomae_pretrain")
    cfg = config_from_dict(task.config_class, {"model": {"variant": "videomae_tiny_test"},
                                               "optim": {"lr": 1e-3}, "train": {"device": "cpu"}})
    model = task.build_model(cfg)
    video, _ = inputs()
    name, step = task.bench_peer(cfg, model, {"video": video}, torch.device("cpu"))
    assert "VideoMAEForPreTraining" in name
    step()  # forward, backward and an optimizer step of the peer; ours is left untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dual = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decoder_mask_type="running_cell"))
    assert task.bench_peer(dual, model, {"video": video}, torch.device("cpu")) is None


def test_hf_default_config_folder_converts_and_round_trips(tmp_path):
    """A `VideoMAEConfig()`-default pretraining model saved by `save_pretrained` (use_mean_pooling=True:
    no final encoder norm) converts with `mm3d convert --from videomae-hf`, matches transformers, and
    writes back (`--from to-hf`) to a folder transformers loads with the same outputs."""
    from mm3d.checkpoint import load_checkpoint
    from mm3d.cli import main

    cfg = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=48,
                                      num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
                                      decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                      decoder_num_attention_heads=2, decoder_intermediate_size=128)
    assert cfg.use_mean_pooling  # the transformers default this test is about
    hf = randomized(transformers.VideoMAEForPreTraining(cfg))
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from", "videomae-hf", str(tmp_path / "hf"), str(tmp_path / "ours.pt")]) == 0
    ck = load_checkpoint(tmp_path / "ours.pt")
    model_cfg = config_from_dict(VideoMAEConfig, ck["config"]["model"])
    assert model_cfg.encoder_norm is False
    ours = build_pretrain_model(model_cfg).eval()
    load_model_weights(ours, ck)
    video, mask = inputs()
    with torch.no_grad():
        theirs = hf(video.transpose(1, 2), bool_masked_pos=mask)
        mine = ours({"video": video, "mask": mask})
    assert_close(mine.pred, theirs.logits, atol=ATOL, msg="reconstruction")
    assert main(["convert", "--from", "to-hf", str(tmp_path / "ours.pt"), str(tmp_path / "back")]) == 0
    again = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path / "back").eval()
    assert again.config.use_mean_pooling
    with torch.no_grad():
        assert_close(again(video.transpose(1, 2), bool_masked_pos=mask).logits, theirs.logits, atol=ATOL)

