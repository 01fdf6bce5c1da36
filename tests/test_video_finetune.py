"""VideoMAE fine-tuning: configs, views, mixup on clips, layer decay, weight initialisation, data checks,
the linear probe and an end-to-end run of the demo config on tiny synthetic clips."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mm3d.checkpoint import CheckpointError
from mm3d.config import ConfigError, load_config, to_dict
from mm3d.registry import TASKS, variant_config
from mm3d.testing import PROJECT_ROOT, assert_close
from mm3d.trainer import build_optimizer, run
from mm3d.video.finetune import VideoMixup, classifier_init_from, collate_views
from mm3d.video.models import build_classifier, build_pretrain_model
from mm3d.video.tokens import interpolate_pos_embed
from mm3d.video.synth import SynthVideoSpec, render_clip, write_mp4, write_video_dataset

CONFIGS = PROJECT_ROOT / "configs" / "video"
FAST = ["train.progress=off", "train.tensorboard=false", "train.num_workers=0", "train.device=cpu"]


def tiny_cfg(*overrides: str):
    """A fine-tuning config of the minimal test variant (4 frames x 32^2, patch 8, 5 classes)."""
    return load_config(None, ["task=videomae_finetune", "model.variant=videomae_tiny_test", *overrides])


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """9 classes x (1 train, 1 val, 1 test) clips of 32x32, 8-12 frames, in the synth layout."""
    out = tmp_path_factory.mktemp("synth")
    write_video_dataset(out, SynthVideoSpec(size=32, min_frames=8, max_frames=12, per_class=(1, 1, 1)),
                        seed=0, rawframes=False)
    return out


def data_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "data.train_list=train.txt", "data.val_list=val.txt", "data.test_list=test.txt",
            "data.label_map=label_map.txt", "model.num_classes=9"]


# -------------------------------------------------------------------------------------- configs


def test_configs_mirror_the_official_recipes():
    expect = {  # name: (variant, classes, sampling, flip, test views, blr, layer decay, epochs, drop path)
        "k400_vits": ("videomae_small", 400, "dense", True, (5, 3), 5e-4, 0.75, 150, 0.1),
        "k400_vitb": ("videomae_base", 400, "dense", True, (5, 3), 5e-4, 0.75, 75, 0.1),
        "ssv2_vits": ("videomae_small", 174, "segment", False, (2, 3), 1e-3, 0.7, 40, 0.1),
        "ssv2_vitb": ("videomae_base", 174, "segment", False, (2, 3), 5e-4, 0.75, 30, 0.1),
        "ucf101_vits": ("videomae_small", 101, "dense", True, (5, 3), 5e-4, 0.7, 100, 0.2),
        "ucf101_vitb": ("videomae_base", 101, "dense", True, (5, 3), 5e-4, 0.7, 100, 0.2),
        "hmdb51_vits": ("videomae_small", 51, "dense", True, (5, 3), 1e-3, 0.7, 50, 0.2),
        "hmdb51_vitb": ("videomae_base", 51, "dense", True, (5, 3), 1e-3, 0.7, 50, 0.2),
    }
    for name, (variant, classes, sampling, flip, views, blr, ld, epochs, dp) in expect.items():
        c = load_config(CONFIGS / f"videomae_finetune_{name}.yaml")
        assert c.task == "videomae_finetune" and c.model.variant == variant
        assert (c.model.num_classes, c.data.sampling, c.data.flip) == (classes, sampling, flip), name
        assert (c.data.test_num_clips, c.data.test_num_crops) == views, name
        assert (c.optim.blr, c.optim.layer_decay, c.train.epochs, c.model.drop_path) == (blr, ld, epochs, dp), name
        assert (c.model.num_frames, c.model.img_size, c.model.use_mean_pooling) == (16, 224, True)
        assert c.data.auto_augment == "rand-m7-n4-mstd0.5-inc1" and c.data.reprob == 0.25
        assert c.data.num_sample == 2 and c.data.rrc_scale == (0.08, 1.0)
        assert (c.mixup.mixup, c.mixup.cutmix, c.mixup.label_smoothing) == (0.8, 1.0, 0.1)
        assert c.optim.betas == (0.9, 0.999) and c.optim.weight_decay == 0.05 and c.optim.warmup_epochs == 5
        assert (c.train.best_metric, c.train.best_mode, c.train.select_on) == ("top1", "max", "val")
        if sampling == "dense":
            assert c.data.sampling_rate == (2 if "hmdb" in name else 4)
    for name in ("videomae_finetune_demo", "videomae_linprobe_demo"):
        c = load_config(CONFIGS / f"{name}.yaml")
        assert c.model.variant == "videomae_tiny" and c.model.num_classes == 9


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="mixup.label_smoothing"):
        tiny_cfg("model.label_smoothing=0.1")
    with pytest.raises(ConfigError, match="short_side=16 is smaller"):
        tiny_cfg("data.short_side=16")
    with pytest.raises(ConfigError, match="test_num_crops must be >= 1"):
        tiny_cfg("data.test_num_crops=0")
    with pytest.raises(ConfigError, match="RandAugment"):
        tiny_cfg("data.auto_augment=v0")


# -------------------------------------------------------------------------------- batches, mixup


def test_collate_flattens_views_video_major():
    samples = [{"video": torch.full((3, 2, 3, 4, 4), float(i)), "label": torch.tensor(i + 10),
                "index": torch.tensor(i)} for i in range(2)]
    for s in samples:
        s["video"][1] += 0.5  # second view
    out = collate_views(samples)
    assert out["video"].shape == (6, 2, 3, 4, 4)
    assert out["video"][:, 0, 0, 0, 0].tolist() == [0.0, 0.5, 0.0, 1.0, 1.5, 1.0]
    assert out["label"].tolist() == [10, 10, 10, 11, 11, 11] and out["index"].tolist() == [0, 0, 0, 1, 1, 1]
    single = collate_views([{"video": torch.zeros(2, 3, 4, 4), "label": torch.tensor(1), "index": torch.tensor(5)}])
    assert single["video"].shape == (1, 2, 3, 4, 4) and single["index"].tolist() == [5]


def test_mixup_cuts_one_box_shared_by_every_frame_and_channel():
    torch.manual_seed(0)
    np.random.seed(0)
    b, c, t, h, w = 4, 3, 4, 16, 12
    video = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, c, t, h, w).clone()
    label = torch.tensor([0, 1, 2, 3])
    mix = VideoMixup(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    for _ in range(5):
        out = mix({"video": video, "label": label, "index": label})
        x, target = out["video"], out["label"]
        assert x.shape == video.shape and target.shape == (b, 4)
        for i in range(b):
            pasted = x[i] != i  # pixels taken from the flipped partner b - 1 - i
            assert bool((x[i][pasted] == b - 1 - i).all())
            # the same (H, W) box in every channel and frame
            assert bool((pasted == pasted[0, 0]).all())
            ys, xs = torch.nonzero(pasted[0, 0], as_tuple=True)
            if len(ys):  # a full rectangle
                box = pasted[0, 0, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
                assert bool(box.all()) and int(pasted[0, 0].sum()) == box.numel()
            kept = 1.0 - float(pasted[0, 0].float().mean())
            assert target[i, i] == pytest.approx(kept, abs=1e-6)
            assert target[i, b - 1 - i] == pytest.approx(1.0 - kept, abs=1e-6)


def test_mixup_blends_clips_and_smooths_targets():
    np.random.seed(1)
    b = 4
    video = torch.randn(b, 3, 2, 8, 8)
    label = torch.tensor([0, 1, 2, 1])
    mix = VideoMixup(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    out = mix({"video": video.clone(), "label": label})
    target = out["label"]
    lam = float(target[0, 0] - 0.1 / 5) / 0.9 if label[0] != label[-1] else None
    assert target.sum(dim=1).allclose(torch.ones(b))
    assert lam is not None
    assert_close(out["video"], lam * video + (1 - lam) * video.flip(0), atol=1e-5)
    # an odd batch: the first two clips are mixed, the last keeps its clip and a smoothed target
    np.random.seed(1)
    odd = mix({"video": video[:3].clone(), "label": label[:3]})
    assert torch.equal(odd["video"][2], video[2])
    assert_close(odd["label"][2], torch.tensor([0.02, 0.02, 0.92, 0.02, 0.02]))
    assert odd["label"].sum(dim=1).allclose(torch.ones(3))
    assert not torch.equal(odd["video"][0], video[0])


# ---------------------------------------------------------------------------------- layer decay


def test_layer_decay_param_groups_scale_each_block():
    cfg = tiny_cfg("model.depth=3", "optim.layer_decay=0.75", "optim.weight_decay=0.05", "model.cls_token=true")
    model = TASKS.get("videomae_finetune").build_model(cfg)
    opt = build_optimizer(model, cfg, lr=1e-3)
    scale_of, decay_of = {}, {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale_of[id(p)], decay_of[id(p)] = g["lr_scale"], g["weight_decay"]
    depth, d = 3, 0.75
    seen = set()
    for name, p in model.named_parameters():
        if name.startswith(("encoder.patch_embed", "encoder.cls_token")):
            expected = d ** (depth + 1)  # the stem: layer 0
        elif name.startswith("encoder.blocks."):
            i = int(name.split(".")[2])
            expected = d ** (depth - i)  # block i: layer i + 1
        else:
            assert name.startswith(("fc_norm", "head")), name
            expected = 1.0  # the head and final norm: the last layer
        assert scale_of[id(p)] == pytest.approx(expected), name
        no_decay = p.ndim <= 1 or name in ("encoder.cls_token",)
        assert decay_of[id(p)] == (0.0 if no_decay else 0.05), name
        seen.add(name)
    assert len(seen) == len(scale_of)
    assert sorted({round(s, 6) for s in scale_of.values()}) == sorted(round(d ** k, 6) for k in range(depth + 2))


# ------------------------------------------------------------------------- position embeddings


def _trilinear_reference(pos: torch.Tensor, old, new) -> torch.Tensor:
    """Slow align_corners=False trilinear resize of a (1, L, D) table, one output token at a time."""
    vol = pos[0].reshape(*old, -1).double()
    out = torch.zeros(*new, vol.shape[-1], dtype=torch.float64)

    def taps(j: int, n_in: int, n_out: int):
        src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return [(i0, 1.0 - (src - i0)), (i1, src - i0)]

    for t, h, w in itertools.product(*(range(n) for n in new)):
        for (a, wa), (b, wb), (c, wc) in itertools.product(taps(t, old[0], new[0]), taps(h, old[1], new[1]),
                                                           taps(w, old[2], new[2])):
            out[t, h, w] += wa * wb * wc * vol[a, b, c]
    return out.reshape(1, -1, vol.shape[-1]).float()


@pytest.mark.parametrize("old,new", [((2, 3, 3), (4, 2, 5)), ((1, 4, 4), (3, 4, 4)), ((4, 2, 2), (2, 6, 3)),
                                     ((3, 3, 3), (3, 3, 3))])
def test_pos_embed_interpolation_matches_slow_reference(old, new):
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, math.prod(old), 6, generator=g)
    out = interpolate_pos_embed(pos, old, new)
    assert out.shape == (1, math.prod(new), 6)
    assert_close(out, _trilinear_reference(pos, old, new), atol=1e-5)
    if old == new:
        assert torch.equal(out, pos)


# ---------------------------------------------------------------------------- initialisation


def _save(tmp_path: Path, name: str, model: torch.nn.Module, model_cfg, task: str) -> Path:
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "config": {"task": task, "model": to_dict(model_cfg)}}, path)
    return path


def test_init_from_pretraining_checkpoint_interpolates_pos_embed_and_drops_decoder(tmp_path):
    pre_cfg = variant_config("videomae_tiny_test")  # 4 frames x 32^2: grid (2, 4, 4)
    torch.manual_seed(0)
    pre = build_pretrain_model(pre_cfg)
    ckpt = _save(tmp_path, "pre.pt", pre, pre_cfg, "videomae_pretrain")
    cfg = tiny_cfg("model.num_frames=8", "model.img_size=48", "model.num_classes=7")  # grid (4, 6, 6)
    model = TASKS.get("videomae_finetune").build_model(cfg)
    notes = TASKS.get("videomae_finetune").init_weights(model, str(ckpt), cfg)
    text = "\n".join(notes)
    assert "encoder.pos_embed: interpolated (1, 32, 48) (grid (2, 4, 4)) -> (1, 144, 48) (grid (4, 6, 6))" in text
    assert "decoder" in text and "encoder.norm.weight" in text  # dropped, and said so
    assert "missing (left at initialisation): [fc_norm.weight, fc_norm.bias, head.weight, head.bias]" in text
    sd, own = pre.state_dict(), model.state_dict()
    for k in own:
        if k.startswith("encoder.") and k != "encoder.pos_embed":
            assert torch.equal(own[k], sd[k]), k
    assert_close(own["encoder.pos_embed"], interpolate_pos_embed(sd["encoder.pos_embed"], (2, 4, 4), (4, 6, 6)))


def test_init_from_classifier_with_another_class_count_leaves_the_head_out(tmp_path):
    src_cfg = dataclasses.replace(variant_config("videomae_tiny_test"), num_classes=3)
    src = build_classifier(src_cfg)
    ckpt = _save(tmp_path, "cls.pt", src, src_cfg, "videomae_finetune")
    cfg = tiny_cfg("model.num_classes=5")
    model = TASKS.get("videomae_finetune").build_model(cfg)
    head_before = model.head.weight.clone()
    notes = classifier_init_from(model, str(ckpt))
    assert any("head not loaded: head.weight is (3, 48) in the checkpoint, (5, 48) in the model" in n for n in notes)
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.fc_norm.weight, src.fc_norm.weight)
    assert not any("interpolated" in n for n in notes)  # same grid: the table is kept as is
    # the same class count: everything loads, the head included
    same = build_classifier(src_cfg)
    classifier_init_from(same, str(ckpt))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in same.state_dict().items())


def test_init_from_official_state_dict(tmp_path):
    """An official fine-tuned .pth (keys patch_embed/blocks/fc_norm/head, no position table)."""
    src_cfg = dataclasses.replace(variant_config("videomae_tiny_test"), num_classes=5)
    src = build_classifier(src_cfg)
    official = {}
    for k, v in src.state_dict().items():
        if k == "encoder.pos_embed":
            continue
        official[k.removeprefix("encoder.")] = v
    path = tmp_path / "official.pth"
    torch.save({"module": official}, path)
    model = build_classifier(src_cfg)
    notes = classifier_init_from(model, str(path))
    assert any("official VideoMAE" in n for n in notes)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_init_from_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=48,
                                         num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
                                         use_mean_pooling=True, num_labels=5)
    torch.manual_seed(0)
    hf = transformers.VideoMAEForVideoClassification(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    # Hugging Face's layer-norm eps: 1e-12 in the blocks, 1e-5 for fc_norm
    cfg = tiny_cfg("model.norm_eps=1e-12", "model.head_norm_eps=1e-5", "model.num_classes=5", "model.drop_path=0")
    model = TASKS.get("videomae_finetune").build_model(cfg).eval()
    notes = classifier_init_from(model, str(tmp_path / "hf"))
    assert any("Hugging Face" in n for n in notes)
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert_close(model({"video": video}).logits, hf(video.transpose(1, 2)).logits, atol=1e-5)
    # 8 frames: the table is interpolated in time, the rest loads
    longer = TASKS.get("videomae_finetune").build_model(tiny_cfg("model.num_frames=8", "model.num_classes=5"))
    notes = classifier_init_from(longer, str(tmp_path / "hf"))
    assert any("encoder.pos_embed: interpolated (1, 32, 48) (grid (2, 4, 4)) -> (1, 64, 48)" in n for n in notes)
    assert torch.equal(longer.head.weight, model.head.weight)


def test_init_rejects_another_architecture(tmp_path):
    deep_cfg = dataclasses.replace(variant_config("videomae_tiny_test"), depth=3)
    path = _save(tmp_path, "deep.pt", build_pretrain_model(dataclasses.replace(deep_cfg, depth=1)),
                 dataclasses.replace(deep_cfg, depth=1), "videomae_pretrain")
    with pytest.raises(CheckpointError, match="does not fit the encoder.*encoder.blocks.1"):
        classifier_init_from(build_classifier(deep_cfg), str(path))


# ------------------------------------------------------------------------------------- data


def test_label_outside_the_head_fails_before_training_naming_the_line(tmp_path, synth):
    bad = tmp_path / "bad.txt"
    lines = (synth / "train.txt").read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + [lines[2].rsplit(" ", 1)[0] + " 9"] + lines[3:]) + "\n")
    cfg = tiny_cfg(f"data.root={synth}", f"data.train_list={bad}", "model.num_classes=9")
    with pytest.raises(ValueError, match=rf"{bad}:3: label 9 is outside the classes \[0, 9\)"):
        TASKS.get("videomae_finetune").build_datasets(cfg, ["train"])
    cfg = tiny_cfg(*data_overrides(synth), "model.num_classes=10")
    with pytest.raises(ValueError, match="label map .* has 9 classes but the model's head has model.num_classes=10"):
        TASKS.get("videomae_finetune").build_datasets(cfg, ["train"])


def test_mixed_resolution_and_short_videos_give_fixed_size_views(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w, frames) in enumerate([(32, 48, 12), (40, 32, 3), (36, 36, 1), (64, 48, 20)]):
        clip = render_clip("move_left", rng, num_frames=frames, size=max(h, w))[:, :h, :w]
        write_mp4(tmp_path / f"v{i}.mp4", np.ascontiguousarray(clip))
        rows.append(f"v{i}.mp4 {i % 3}")
    (tmp_path / "list.txt").write_text("\n".join(rows) + "\n")
    cfg = tiny_cfg(f"data.root={tmp_path}", "data.train_list=list.txt", "data.test_list=list.txt",
                   "data.num_sample=2", "data.test_num_clips=2", "data.test_num_crops=3", "model.num_classes=3",
                   "data.max_failure_ratio=0")
    ds = TASKS.get("videomae_finetune").build_datasets(cfg, ["train", "test"])
    for i in range(4):
        item = ds["train"][i]
        assert item["video"].shape == (2, 3, 4, 32, 32) and int(item["index"]) == i
        assert torch.isfinite(item["video"]).all()
        test = ds["test"][i]
        assert test["video"].shape == (6, 3, 4, 32, 32) and int(test["label"]) == i % 3
    batch = collate_views([ds["test"][0], ds["test"][1]])
    assert batch["video"].shape == (12, 3, 4, 32, 32) and batch["index"].tolist() == [0] * 6 + [1] * 6


# ------------------------------------------------------------------------------ linear probe


def test_linear_probe_trains_only_the_head():
    cfg = load_config(None, ["task=videomae_linprobe", "model.variant=videomae_tiny_test", "optim.lr=0.1",
                             "optim.weight_decay=0", "mixup.mixup=0", "mixup.cutmix=0"])
    task = TASKS.get("videomae_linprobe")
    model = task.build_model(cfg)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["head.1.bias", "head.1.weight"]
    assert isinstance(model.head[0], torch.nn.BatchNorm1d) and model.head[0].affine is False
    opt = build_optimizer(model, cfg, lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"video": torch.randn(4, 3, 4, 32, 32), "label": torch.tensor([0, 1, 2, 3])}
    model.train()
    model(batch).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == ["head.0.num_batches_tracked", "head.0.running_mean", "head.0.running_var",
                       "head.1.bias", "head.1.weight"]
    with pytest.raises(ValueError, match="freezes the encoder"):
        task.build_model(load_config(None, ["task=videomae_linprobe", "model.variant=videomae_tiny_test",
                                            "model.drop_path=0.1"]))


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_demo_config_fine_tunes_end_to_end(tmp_path, synth):
    """The demo config (shrunk to the test variant and 3 steps) from a pretraining checkpoint:
    training with mixup and repeated augmentation, multi-view val/test, the report files."""
    pre_cfg = variant_config("videomae_tiny_test")
    pre = _save(tmp_path, "pre.pt", build_pretrain_model(pre_cfg), pre_cfg, "videomae_pretrain")
    cfg = load_config(CONFIGS / "videomae_finetune_demo.yaml", [
        *data_overrides(synth), "model.variant=videomae_tiny_test", "model.num_frames=4", "model.img_size=32",
        "model.patch_size=8", "model.embed_dim=48", "model.depth=2", "model.num_heads=3", f"init={pre}",
        "train.batch_size=2", "train.max_steps=3", "train.eval_every=1", "data.test_num_clips=2",
        "data.test_num_crops=3", "data.sampling_rate=2", "mixup.mixup=0.8", "mixup.cutmix=1.0",
        f"output_dir={tmp_path / 'run'}", *FAST])
    results = run(cfg)
    for split in ("val", "test"):
        m = results[split]
        assert m["num_samples"] == 9 and 0.0 <= m["top1"] <= m["top5"] <= 1.0 and math.isfinite(m["loss"])
        rows = json.loads((tmp_path / "run" / split / "predictions.json").read_text())
        assert len(rows) == 9 and {r["label_name"] for r in rows} == set(
            (Path(synth) / "label_map.txt").read_text().split())
        assert all(len(r["topk"]) == 5 and r["sample"].endswith(".mp4") for r in rows)
        assert (tmp_path / "run" / split / "confusion.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"]["top1"] == results["test"]["top1"]
    log_rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["split"] == "train" for r in log_rows) >= 1
