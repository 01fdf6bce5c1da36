"""The Python API: mm3d.create_model / list_models, the timm feature interface, load_clip / load_cloud.

The "three lines" tests run the lines of the README section "Use it from Python" (kept in step by
hand: the README is written separately) on the real sample files, with tiny variants built from
checkpoints saved here.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mm3d
from mm3d.checkpoint import CheckpointError
from mm3d.config import to_dict
from mm3d.errors import UserError
from mm3d.pointcloud.classification import ClsDataConfig, PointClassifyConfig
from mm3d.pointcloud.io import read_points
from mm3d.pointcloud.models import PointMAEClassifier, PointMAEPretrain
from mm3d.pointcloud.models import build_classifier as build_point_classifier
from mm3d.pointcloud.models import build_pretrain_model as build_point_pretrain
from mm3d.pointcloud.ops import farthest_point_sample
from mm3d.pointcloud.tasks import PointDataConfig, PointPretrainConfig
from mm3d.pointcloud.transforms import normalize_unit_sphere
from mm3d.registry import MODELS, variant_config
from mm3d.testing import assert_close
from mm3d.video.data import VideoDataset, VideoRecord
from mm3d.video.finetune import FinetuneDataConfig, VideoFinetuneConfig
from mm3d.video.models import VideoMAEClassifier, VideoMAEPretrain
from mm3d.video.models import build_classifier as build_video_classifier
from mm3d.video.models import build_pretrain_model as build_video_pretrain
from mm3d.video.tasks import VideoDataConfig, VideoPretrainConfig
from mm3d.video.transforms import test_transform

VIDEO = "videomae_tiny_test"  # 4 frames of 32^2, width 48
POINTS = "pointmae_tiny_test"  # 16 groups of 8 points, width 32


def _frames(path: str) -> int | None:
    """The frame count of a rawframe folder (None for a video file: the decoder tells)."""
    return len(list(Path(path).glob("img_*.jpg"))) if Path(path).is_dir() else None


def _save(path, model, cfg):
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    return path


@pytest.fixture
def video_pretrain_ckpt(tmp_path):
    """A tiny VideoMAE pretraining checkpoint whose config samples every 2nd frame."""
    torch.manual_seed(0)
    cfg = variant_config(VIDEO)
    return _save(tmp_path / "video_pretrain.pt", build_video_pretrain(cfg),
                 VideoPretrainConfig(model=cfg, data=VideoDataConfig(sampling_rate=2)))


@pytest.fixture
def video_classifier_ckpt(tmp_path):
    """A tiny fine-tuned VideoMAE classifier (5 classes) evaluated with one view per video."""
    torch.manual_seed(1)
    cfg = variant_config(VIDEO)
    model = build_video_classifier(cfg)
    with torch.no_grad():  # a head far from its tiny initial scale, so class scores differ
        model.head.weight.normal_()
    data = FinetuneDataConfig(sampling_rate=2, test_num_clips=1, test_num_crops=1)
    return _save(tmp_path / "video_cls.pt", model, VideoFinetuneConfig(model=cfg, data=data))


@pytest.fixture
def point_pretrain_ckpt(tmp_path):
    """A tiny Point-MAE pretraining checkpoint whose config feeds 256 points and reads .bin files with 6 columns."""
    torch.manual_seed(2)
    cfg = variant_config(POINTS)
    return _save(tmp_path / "point_pretrain.pt", build_point_pretrain(cfg),
                 PointPretrainConfig(model=cfg, data=PointDataConfig(npoints=256, bin_columns=6)))


@pytest.fixture
def point_classifier_ckpt(tmp_path):
    """A tiny fine-tuned Point-MAE classifier (4 classes), model.num_classes left 0 as configs do."""
    torch.manual_seed(3)
    cfg = variant_config(POINTS)
    data = ClsDataConfig(npoints=256, fps_points=256, classes=["airplane", "chair", "lamp", "vase"])
    return _save(tmp_path / "point_cls.pt", build_point_classifier(cfg, 4).eval(),
                 PointClassifyConfig(model=cfg, data=data))


# --------------------------------------------------------------------------------------------
# Three lines from a file to a feature vector (the README's "Use it from Python")
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relpath", ["video/kinetics400/arm_wrestling/demo.mp4", "video/rawframes/ApplyEyeMakeup_clip"])
def test_three_lines_video(realdata, video_pretrain_ckpt, relpath):
    path, ckpt = str(realdata / relpath), str(video_pretrain_ckpt)

    # --- the README lines ---
    model = mm3d.create_model(checkpoint=ckpt)
    clip = mm3d.video.load_clip(path, checkpoint=ckpt)                                 # (C, T, H, W)
    feature = model.forward_head(model.forward_features(clip[None]), pre_logits=True)  # (1, D)
    # ------------------------

    assert isinstance(model, VideoMAEPretrain) and not model.training
    assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32
    # the evaluation dataset's view of the file, with the checkpoint's sampling rate (2, not the default 4)
    expected = VideoDataset([VideoRecord(path, 0, _frames(path), "x")], mode="test", num_frames=4, sampling_rate=2,
                            transform=test_transform(32, 32, 1))[0]["video"]
    assert_close(clip, expected, atol=0)
    other_rate = VideoDataset([VideoRecord(path, 0, _frames(path), "x")], mode="test", num_frames=4, sampling_rate=4,
                              transform=test_transform(32, 32, 1))[0]["video"]
    assert not torch.equal(clip, other_rate)
    # the feature: the mean of the stored encoder's tokens over the whole clip
    stored = build_video_pretrain(variant_config(VIDEO)).eval()
    stored.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    with torch.no_grad():
        assert_close(feature, stored.encoder(clip[None]).mean(dim=1), atol=1e-6)
    assert feature.shape == (1, 48)


@pytest.mark.parametrize("relpath", ["pointcloud/modelnet40_sample/chair/", "pointcloud/scans/bunny.pcd",
                                     "pointcloud/scans/scene0000_00.bin"])
def test_three_lines_pointcloud(realdata, point_pretrain_ckpt, relpath):
    path = realdata / relpath
    if path.is_dir():
        path = sorted(path.glob("*.txt"))[0]
    path, ckpt = str(path), str(point_pretrain_ckpt)

    # --- the README lines ---
    model = mm3d.create_model(checkpoint=ckpt)
    cloud = mm3d.pointcloud.load_cloud(path, checkpoint=ckpt)                           # (N, 3)
    feature = model.forward_head(model.forward_features(cloud[None]), pre_logits=True)  # (1, 2D)
    # ------------------------

    assert isinstance(model, PointMAEPretrain) and not model.training
    # the checkpoint's data section decides: 256 points, .bin files of 6 float32 columns (x y z r g b)
    raw = torch.from_numpy(np.ascontiguousarray(read_points(path, bin_columns=6)[:, :3])).float()
    expected = normalize_unit_sphere(raw[farthest_point_sample(raw[None], 256)[0]])
    assert cloud.shape == (256, 3)
    assert_close(cloud, expected, atol=1e-6)
    assert abs(float(cloud.norm(dim=1).max()) - 1.0) < 1e-5
    stored = build_point_pretrain(variant_config(POINTS)).eval()
    stored.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    with torch.no_grad():
        tokens = stored.encoder(*stored.group(cloud[None]))
        assert_close(feature, torch.cat([tokens.amax(dim=1), tokens.mean(dim=1)], dim=-1), atol=1e-6)
    assert feature.shape == (1, 64)


# --------------------------------------------------------------------------------------------
# Preprocessing = what predict uses; a classifier called on it gives predict's scores
# --------------------------------------------------------------------------------------------


def test_video_classifier_on_load_clip_gives_predicts_scores(realdata, video_classifier_ckpt):
    from mm3d.checkpoint import model_from_checkpoint
    path = str(realdata / "video/ucf101/ApplyEyeMakeup/test.avi")
    model = mm3d.create_model(checkpoint=video_classifier_ckpt)
    assert isinstance(model, VideoMAEClassifier) and model.num_classes == 5
    with torch.no_grad():
        probs = model(mm3d.video.load_clip(path, checkpoint=video_classifier_ckpt)[None]).logits.softmax(-1)[0]
    task, cfg, cli_model = model_from_checkpoint(str(video_classifier_ckpt), False)
    row = task.predict(cli_model, cfg, [path], topk=5, label_map=None, device=torch.device("cpu"))[0]
    assert row["views"] == 1
    for name, p in row["topk"]:
        assert abs(float(probs[int(name)]) - p) < 1e-5, (name, p, probs)
    assert float(probs.max()) > 0.3  # the scores are not uniform: the comparison means something


def test_point_classifier_on_load_cloud_gives_predicts_scores(realdata, point_classifier_ckpt):
    from mm3d.checkpoint import model_from_checkpoint
    path = str(sorted((realdata / "pointcloud/modelnet40_sample/lamp").glob("*.txt"))[0])
    model = mm3d.create_model(checkpoint=point_classifier_ckpt)
    assert isinstance(model, PointMAEClassifier) and model.num_classes == 4
    cloud = mm3d.pointcloud.load_cloud(path, checkpoint=point_classifier_ckpt)
    with torch.no_grad():
        probs = model(cloud[None]).logits.softmax(-1)[0]
        assert_close(model({"points": cloud[None]}).logits.softmax(-1)[0], probs, atol=0)  # the batch dict too
    task, cfg, cli_model = model_from_checkpoint(str(point_classifier_ckpt), False)
    row = task.predict(cli_model, cfg, [path], topk=4, label_map=None, device=torch.device("cpu"))[0]
    names = ["airplane", "chair", "lamp", "vase"]
    for name, p in row["topk"]:
        assert abs(float(probs[names.index(name)]) - p) < 1e-5, (name, p, probs)


def test_load_clip_defaults_and_config(realdata, tmp_path):
    path = realdata / "video/kinetics400/arm_wrestling/demo.mp4"
    assert mm3d.video.load_clip(path).shape == (3, 16, 224, 224)  # no checkpoint: the official 16 x 224^2
    cfg = VideoFinetuneConfig(model=dataclasses.replace(variant_config(VIDEO), num_frames=8),
                              data=FinetuneDataConfig(short_side=48))
    clip = mm3d.video.load_clip(path, config=cfg)
    assert clip.shape == (3, 8, 32, 32)
    assert torch.equal(clip, mm3d.video.load_clip(path, config=to_dict(cfg)))  # a mapping reads the same
    with pytest.raises(UserError, match="not a video config"):
        mm3d.video.load_clip(path, config=PointClassifyConfig())


def test_load_cloud_defaults_and_errors(realdata, video_pretrain_ckpt, tmp_path):
    path = sorted((realdata / "pointcloud/modelnet40_sample/vase").glob("*.txt"))[0]
    assert mm3d.pointcloud.load_cloud(path).shape == (1024, 3)  # no checkpoint: ModelNet's 1024 points
    with pytest.raises(CheckpointError, match="not a point-cloud one"):
        mm3d.pointcloud.load_cloud(path, checkpoint=video_pretrain_ckpt)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n")
    with pytest.raises(ValueError, match="bad.txt"):
        mm3d.pointcloud.load_cloud(bad)


# --------------------------------------------------------------------------------------------
# create_model: variants, classes, heads, overrides
# --------------------------------------------------------------------------------------------


def test_list_models():
    assert mm3d.list_models() == sorted(MODELS)
    assert mm3d.list_models("pointmae_*") == ["pointmae_small", "pointmae_tiny", "pointmae_tiny_test"]
    assert mm3d.list_models("*huge*") == ["videomae_huge"]
    assert mm3d.list_models("*tiny*", modality="video") == ["videomae_tiny", "videomae_tiny_test"]
    assert mm3d.list_models(modality="pointcloud") == ["pointmae_small", "pointmae_tiny", "pointmae_tiny_test"]
    assert mm3d.list_models("nothing*") == []
    with pytest.raises(ValueError, match="did you mean 'video'"):
        mm3d.list_models(modality="vidoe")


def test_import_mm3d_stays_cheap():
    code = "import sys, mm3d; print('torch' in sys.modules, callable(mm3d.create_model), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]  # torch and the modalities load on first use of the API


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_variant_builds_both_kinds(name):
    """Tiny variants are built and run; the big ones are built on the meta device (shapes, no memory)."""
    small = "tiny" in name
    with torch.device("cpu" if small else "meta"):
        pre = mm3d.create_model(name)
        cls = mm3d.create_model(name, num_classes=7)
    video = MODELS.get(name).modality == "video"
    assert isinstance(pre, VideoMAEPretrain if video else PointMAEPretrain)
    assert isinstance(cls, VideoMAEClassifier if video else PointMAEClassifier)
    assert pre.num_classes == 0 and cls.num_classes == 7
    cfg = variant_config(name)
    if small:
        x = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size) if video else \
            torch.randn(2, max(cfg.num_group, cfg.group_size) * 2, 3)
        with torch.no_grad():
            tokens = pre.forward_features(x)
            assert tokens.shape == (2, cfg.num_tokens if video else cfg.num_group, cfg.embed_dim)
            assert pre.forward_head(tokens).shape == (2, pre.num_features)
            assert cls(x).logits.shape == (2, 7)
    else:
        assert all(p.is_meta for p in cls.parameters())
        width = sum(p.numel() for n, p in cls.named_parameters() if n.startswith("encoder.blocks.0."))
        assert width == 12 * cfg.embed_dim ** 2 + (12 if video else 10) * cfg.embed_dim  # qkv (+ q, v biases), proj, mlp, norms
    if name == "pointmae_small":  # the description's count: 22.1M as a classifier
        assert round(sum(p.numel() for p in cls.parameters()) / 1e6, 1) == 22.1


@pytest.mark.parametrize("name", [VIDEO, POINTS])
def test_num_classes_reset_classifier_and_forward_head(name):
    torch.manual_seed(0)
    cfg = variant_config(name)
    video = name == VIDEO
    x = torch.randn(3, 3, cfg.num_frames, cfg.img_size, cfg.img_size) if video else torch.randn(3, 64, 3)
    model = mm3d.create_model(name, num_classes=6)
    width = cfg.embed_dim if video else 2 * cfg.embed_dim
    assert model.num_features == width
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (3, cfg.num_tokens, cfg.embed_dim) if video else (3, 1 + cfg.num_group, cfg.embed_dim)
        assert model.forward_head(tokens).shape == (3, 6)
        pooled = model.forward_head(tokens, pre_logits=True)
        assert pooled.shape == (3, width)
        assert_close(model.forward_head(tokens), model(x).logits, atol=0)
        model.reset_classifier(11)
        assert model.num_classes == 11 and model(x).logits.shape == (3, 11)
        assert_close(model.forward_head(tokens, pre_logits=True), pooled, atol=0)  # the encoder is untouched
        model.reset_classifier(0)  # no head: the pooled feature comes out
        assert_close(model(x).logits, pooled, atol=0)
    assert isinstance(mm3d.create_model(name, num_classes=0).get_classifier(), torch.nn.Identity)
    pre = mm3d.create_model(name)
    pre.reset_classifier(0)
    with pytest.raises(ValueError, match="create_model"):
        pre.reset_classifier(3)


@pytest.mark.parametrize("name", [VIDEO, POINTS])
def test_forward_features_are_the_tokens_the_classifier_reads(name):
    """The tokens forward_features returns are those the classifier pools inside forward (caught by a hook
    on the last module that makes them), and forward_head of them gives forward's logits."""
    torch.manual_seed(0)
    cfg = variant_config(name)
    video = name == VIDEO
    model = mm3d.create_model(name, num_classes=4, **({"use_mean_pooling": False} if video else {}))
    x = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size) if video else torch.randn(2, 64, 3)
    seen = []
    last = model.encoder.norm  # video without mean pooling and points: the final norm makes the tokens
    handle = last.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        logits = model({"video": x} if video else {"points": x}).logits
        inside = seen[-1]
        tokens = model.forward_features(x)
    handle.remove()
    assert_close(tokens, inside, atol=0)
    assert_close(model.forward_head(tokens), logits, atol=0)
    assert not torch.equal(tokens[:, 0], tokens[:, 1])


def test_overrides_and_unknown_keys(video_pretrain_ckpt, caplog):
    model = mm3d.create_model(VIDEO, drop_path=0.1, num_frames=8)
    assert model.encoder.grid == (4, 4, 4)
    assert model.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with pytest.raises(TypeError, match="did you mean 'drop_path'"):
        mm3d.create_model(VIDEO, drop_pat=0.1)
    with pytest.raises(TypeError, match="did you mean 'num_group'"):
        mm3d.create_model(POINTS, num_groups=8)
    with pytest.raises(TypeError, match="VideoMAEConfig key 'patch' \\(did you mean 'patch_size'"):
        mm3d.create_model(checkpoint=video_pretrain_ckpt, patch=8)  # the keys of the checkpoint's family
    with pytest.raises(TypeError, match="as the name"):
        mm3d.create_model(VIDEO, variant=POINTS)
    with pytest.raises(UserError, match="did you mean 'videomae_tiny_test'"):
        mm3d.create_model("videomae_tiny_tset")
    with pytest.raises(UserError, match="variant name"):
        mm3d.create_model()
    # over a checkpoint's config: 8 frames, the stored 4-frame position table interpolated and said so
    with caplog.at_level(logging.INFO, logger="mm3d.api"):
        model = mm3d.create_model(checkpoint=video_pretrain_ckpt, num_frames=8)
    assert model.encoder.grid == (4, 4, 4)
    assert "encoder.pos_embed: recomputed sincos_3d table" in caplog.text or "encoder.pos_embed: interpolated" \
        in caplog.text


def test_checkpoint_with_and_without_a_name(video_pretrain_ckpt, video_classifier_ckpt, point_classifier_ckpt,
                                            caplog):
    # a classifier checkpoint: the classifier with its head's size, with or without the name
    for name in (None, VIDEO):
        model = mm3d.create_model(name, checkpoint=video_classifier_ckpt)
        assert isinstance(model, VideoMAEClassifier) and model.num_classes == 5
    stored = torch.load(video_classifier_ckpt, weights_only=True)["model"]
    assert torch.equal(model.head.weight, stored["head.weight"])
    point = mm3d.create_model(checkpoint=point_classifier_ckpt)  # its config says num_classes 0: the head decides
    assert isinstance(point, PointMAEClassifier) and point.num_classes == 4
    # a pretraining checkpoint into a classifier: loaded as init= loads it, every dropped and fresh key logged
    with caplog.at_level(logging.INFO, logger="mm3d.api"):
        model = mm3d.create_model(checkpoint=video_pretrain_ckpt, num_classes=3)
    assert isinstance(model, VideoMAEClassifier) and model.num_classes == 3
    assert "pretraining decoder not used by the classifier, dropped" in caplog.text
    assert "missing (left at initialisation): [fc_norm.weight, fc_norm.bias, head.weight, head.bias]" in caplog.text
    pre = torch.load(video_pretrain_ckpt, weights_only=True)["model"]
    assert torch.equal(model.encoder.blocks[1].mlp.fc2.weight, pre["encoder.blocks.1.mlp.fc2.weight"])
    # another class count than the fine-tuned head: the head is left out and said so
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mm3d.api"):
        assert mm3d.create_model(checkpoint=video_classifier_ckpt, num_classes=2).num_classes == 2
    assert "head not loaded: head.weight is (5, 48) in the checkpoint" in caplog.text
    # the other modality's name
    with pytest.raises(CheckpointError, match="holds a video model, not a pointcloud one"):
        mm3d.create_model(POINTS, checkpoint=video_pretrain_ckpt)
    # weights of another width than the named preset
    with pytest.raises(CheckpointError, match="mismatching shapes"):
        mm3d.create_model(VIDEO, checkpoint=video_pretrain_ckpt, embed_dim=96, num_heads=3)


def test_official_and_converted_point_mae_checkpoints(tmp_path):
    """An official Point-MAE .pth (names of Pang-Yatian/Point-MAE, 'module.' inside 'base_model') builds without
    a name, from the shapes; the classifier converted by `mm3d convert` gives the same logits."""
    from mm3d.cli import main
    from mm3d.pointcloud.convert import CLASSIFIER_RULES, PRETRAIN_RULES

    def official(sd, rules):
        out = {}
        for key, value in sd.items():
            old, new = next((o, n) for o, n in rules if key == n or (n.endswith(".") and key.startswith(n)))
            out["module." + old + key[len(new):]] = value
        return out

    torch.manual_seed(0)
    cfg = variant_config(POINTS)
    pre, cls = build_point_pretrain(cfg).eval(), build_point_classifier(cfg, 4).eval()
    torch.save({"base_model": official(pre.state_dict(), PRETRAIN_RULES), "epoch": 300}, tmp_path / "pretrain.pth")
    torch.save({"base_model": official(cls.state_dict(), CLASSIFIER_RULES)}, tmp_path / "cls.pth")
    x = torch.randn(2, 256, 3)
    model = mm3d.create_model(checkpoint=tmp_path / "pretrain.pth")  # 1 head assumed for width 32: same weights
    assert isinstance(model, PointMAEPretrain) and model.encoder.embed_dim == 32
    named = mm3d.create_model(POINTS, checkpoint=tmp_path / "pretrain.pth")
    with torch.no_grad():
        assert_close(named.forward_features(x), pre.forward_features(x), atol=1e-6)
        theirs = cls(x).logits
        assert_close(mm3d.create_model(POINTS, checkpoint=tmp_path / "cls.pth")(x).logits, theirs, atol=1e-5)
        assert main(["convert", "--from", "pointmae-official", str(tmp_path / "cls.pth"), str(tmp_path / "c.pt")]) == 0
        converted = mm3d.create_model(POINTS, checkpoint=tmp_path / "c.pt")
        assert converted.num_classes == 4
        assert_close(converted(x).logits, theirs, atol=1e-5)


def test_official_videomae_pth_builds_from_its_shapes(tmp_path):
    """An official VideoMAE pretraining .pth (no position tables, no config): the named preset gives the clip size."""
    torch.manual_seed(0)
    pre = build_video_pretrain(variant_config(VIDEO)).eval()
    torch.save({"model": {k: v for k, v in pre.state_dict().items() if not k.endswith("pos_embed")}},
               tmp_path / "official.pth")
    model = mm3d.create_model(VIDEO, checkpoint=tmp_path / "official.pth")
    video = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():  # the tiny variant's table is 3-D sin-cos: rebuilt by the preset, not stored officially
        model.encoder.pos_embed.copy_(pre.encoder.pos_embed)
        assert_close(model.forward_features(video), pre.forward_features(video), atol=1e-6)
    with pytest.raises(CheckpointError, match="no mm3d model family"):
        torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
        mm3d.create_model(checkpoint=tmp_path / "foreign.pth")


def test_hugging_face_folders(tmp_path):
    """transformers folders, built without a name: a classifier matches VideoMAEForVideoClassification's logits;
    a VideoMAEForPreTraining of the default config (use_mean_pooling=True: no final norm) gives VideoMAEModel's
    tokens."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=48, num_hidden_layers=2,
                 num_attention_heads=3, intermediate_size=192, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                 decoder_num_attention_heads=2, decoder_intermediate_size=128)
    g = torch.Generator().manual_seed(0)

    def randomized(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.endswith("key.bias"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return model.eval()

    video = torch.randn(2, 3, 4, 32, 32, generator=g)
    hf_cls = randomized(transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(**sizes, num_labels=7)))
    hf_cls.save_pretrained(tmp_path / "cls")
    hf_pre = randomized(transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**sizes)))
    assert hf_pre.config.use_mean_pooling
    hf_pre.save_pretrained(tmp_path / "pre")
    cls = mm3d.create_model(checkpoint=tmp_path / "cls")
    pre = mm3d.create_model(checkpoint=tmp_path / "pre")
    assert isinstance(cls, VideoMAEClassifier) and cls.num_classes == 7
    assert isinstance(pre, VideoMAEPretrain) and isinstance(pre.encoder.norm, torch.nn.Identity)
    with torch.no_grad():
        assert_close(cls(video).logits, hf_cls(video.transpose(1, 2)).logits, atol=1e-5)
        assert_close(pre.forward_features(video), hf_pre.videomae(video.transpose(1, 2)).last_hidden_state,
                     atol=1e-5)
