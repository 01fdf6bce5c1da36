"""Point-MAE part segmentation: model shapes and gradients, the official head layout, the
ShapeNetPart task end to end with mIoU and renders, real ShapeNetPart files, label errors."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mm3d.config import load_config
from mm3d.datacheck import BadDataError
from mm3d.registry import TASKS, variant_config
from mm3d.testing import assert_close
from mm3d.pointcloud.partseg import PartSegDataConfig
from mm3d.pointcloud.segmentation import (PointMAESegmentation, SegHeadConfig, build_segmentation_model,
                                          default_fetch_blocks)
from mm3d.pointcloud.transforms import build_point_augmentation

SMALL_HEAD = ["head.label_dim=8", "head.propagation_dims=[32,32]", "head.head_dims=[32,16]"]
TINY = ["model.variant=pointmae_tiny_test", "data.npoints=64", "train.batch_size=4", "train.epochs=1",
        "train.device=cpu", "train.tensorboard=false", "train.progress=off", "train.best_metric=instance_miou",
        "train.best_mode=max", "optim.lr=1e-3", "train.keep_last=1", *SMALL_HEAD]


def tiny_model(**kw) -> PointMAESegmentation:
    head = SegHeadConfig(label_dim=8, propagation_dims=(32, 32), head_dims=(32, 16), **kw)
    return build_segmentation_model(variant_config("pointmae_tiny_test"), head)


@pytest.fixture(scope="module")
def snp_root(tmp_path_factory) -> Path:
    """Synthetic ShapeNetPart layout: 11 categories with shapes, 2/1/1 per category."""
    from mm3d.pointcloud.synth import synth_shapenetpart

    root = tmp_path_factory.mktemp("snp") / "snp"
    synth_shapenetpart(root, seed=0, scale="tiny")
    return root


def test_default_fetch_blocks():
    assert default_fetch_blocks(12) == (3, 7, 11)  # blocks 4, 8, 12 of the official model
    assert default_fetch_blocks(4) == (0, 2, 3)
    assert default_fetch_blocks(2) == (0, 0, 1)


def test_forward_backward_shapes_and_grads():
    torch.manual_seed(0)
    model = tiny_model()
    b, n = 3, 64
    batch = {"points": torch.randn(b, n, 3), "cls_label": torch.tensor([0, 5, 15]),
             "seg": torch.randint(0, 50, (b, n))}
    out = model(batch)
    assert out.logits.shape == (b, n, 50) and torch.isfinite(out.logits).all()
    assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 50), batch["seg"].reshape(-1)), atol=1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model({"points": batch["points"], "cls_label": batch["cls_label"]}).loss is None


def test_category_changes_the_prediction():
    torch.manual_seed(0)
    model = tiny_model().eval()
    pts = torch.randn(1, 64, 3).expand(2, -1, -1)
    logits = model({"points": pts, "cls_label": torch.tensor([0, 9])}).logits
    assert not torch.allclose(logits[0], logits[1])  # the label embedding reaches every point
    # The category enters only through its embedding, appended to every point's head input: the
    # geometry features agree, and the last label_dim channels are the embedding of the one-hot
    # category, LeakyReLU(0.2)(BatchNorm(W[:, c])) with fresh BatchNorm statistics (mean 0, var 1).
    with torch.no_grad():
        feats = model.forward_features(pts, torch.tensor([0, 9]))  # (2, C_in, N)
    conv, bn = model.label_conv[0], model.label_conv[1]
    d = conv.out_channels
    assert_close(feats[0, :-d], feats[1, :-d], atol=1e-6)
    for row, category in enumerate((0, 9)):
        embedding = F.leaky_relu(conv.weight[:, category, 0] / (1 + bn.eps) ** 0.5, 0.2)
        assert_close(feats[row, -d:], embedding[:, None].expand(-1, 64), atol=1e-6)
    # so the first head layer's pre-activation shifts by one vector, the same at every point
    with torch.no_grad():
        pre = model.convs1(feats)
        shift = model.convs1.weight[:, -d:, 0] @ (feats[0, -d:, 0] - feats[1, -d:, 0])
    assert_close(pre[0] - pre[1], shift[:, None].expand(-1, 64), atol=1e-5)
    assert ((logits[0] - logits[1]).abs().amax(dim=-1) > 1e-6).all()  # every point's logits move (init: ~7e-6)


def test_official_head_layout():
    model = build_segmentation_model(variant_config("pointmae_small"), SegHeadConfig())
    assert model.fetch_blocks == (3, 7, 11)
    assert model.label_conv[0].weight.shape == (64, 16, 1) and model.label_conv[0].bias is None
    assert model.propagation[0].weight.shape == (1536, 3 + 1152, 1)  # xyz + 3 x 384 block features
    assert model.propagation[3].weight.shape == (1024, 1536, 1)
    assert model.convs1.weight.shape == (512, 3392, 1)  # 1024 + 2 x 1152 + 64, as the official convs1
    assert model.hidden[0].weight.shape == (256, 512, 1) and model.convs3.weight.shape == (50, 256, 1)


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"cls_label'\] values must lie in \[0, 16\)"):
        model({"points": torch.randn(1, 64, 3), "cls_label": torch.tensor([16])})
    with pytest.raises(TypeError, match="cls_label"):
        model({"points": torch.randn(1, 64, 3)})
    with pytest.raises(ValueError, match="fetch_blocks"):
        tiny_model(fetch_blocks=(0, 5))


def test_init_from_pretraining_weights():
    from mm3d.pointcloud.checkpoints import load_encoder_checkpoint
    from mm3d.pointcloud.models import build_pretrain_model

    pre = build_pretrain_model(variant_config("pointmae_tiny_test"))
    model = tiny_model()
    notes = " ".join(load_encoder_checkpoint(model, {"model": pre.state_dict()}))
    assert torch.equal(model.encoder.blocks[1].mlp.fc1.weight, pre.encoder.blocks[1].mlp.fc1.weight)
    assert "decoder.*" in notes and "label_conv.*" in notes


def seg_cfg(root, out, *extra):
    return load_config(None, [f"data.root={root}", f"output_dir={out}", *TINY, *extra], task="pointmae_partseg")


def test_seg_augmentation_is_seeded_and_leaves_the_global_rng_alone():
    d = PartSegDataConfig()  # official: scale_shift, isotropic scale U(0.8, 1.25), shift U(-0.1, 0.1)
    torch.manual_seed(0)
    points = torch.randn(64, 50, 3)

    def augment(seed: int) -> torch.Tensor:
        aug = build_point_augmentation(d.augmentation, scale_low=d.scale_low, scale_high=d.scale_high,
                                       translate_range=d.translate_range, up_axis=d.up_axis,
                                       generator=torch.Generator().manual_seed(seed))
        return aug(points)

    state = torch.get_rng_state()
    a, b, c = augment(0), augment(0), augment(1)
    assert torch.equal(torch.get_rng_state(), state)  # every draw came from the generator
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # one isotropic scale per cloud (the same for every point and axis), one shift per cloud and axis
    centred_in, centred_out = points - points.mean(1, keepdim=True), a - a.mean(1, keepdim=True)
    scale = centred_out.norm(dim=-1) / centred_in.norm(dim=-1)  # (B, N)
    assert_close(scale, scale[:, :1].expand_as(scale), atol=1e-5)
    assert_close(centred_out, centred_in * scale[:, :1, None], atol=1e-5)
    assert scale.min() >= 0.8 - 1e-6 and scale.max() <= 1.25 + 1e-6 and scale.max() - scale.min() > 0.3
    shift = a - points * scale[:, :1, None]
    assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-5)
    assert shift.abs().max() <= 0.1 + 1e-6 and not torch.allclose(shift[0, 0, 0], shift[0, 0, 1])


def test_seg_batch_transform_draws_are_fixed_by_the_checkpointed_global_state(snp_root, tmp_path):
    # the training transform reseeds its own generator from the global one before each batch, so
    # a resumed run (global RNG restored from the checkpoint) continues the same augmentations
    cfg = load_config(None, [f"data.root={snp_root}", f"output_dir={tmp_path}", *TINY], task="pointmae_partseg")
    tf = TASKS.get("pointmae_partseg").batch_transform(cfg, torch.device("cpu"))
    batch = {"points": torch.randn(4, 64, 3)}
    torch.manual_seed(3)
    first, second = tf(batch)["points"], tf(batch)["points"]
    torch.manual_seed(3)
    assert torch.equal(tf(batch)["points"], first) and torch.equal(tf(batch)["points"], second)
    assert not torch.allclose(first, second)


def test_part_label_outside_category_names_file_and_line(snp_root, tmp_path):
    root = tmp_path / "snp"
    shutil.copytree(snp_root, root, ignore=shutil.ignore_patterns(".mm3d_cache"))
    entry = json.loads((root / "train_test_split" / "shuffled_train_file_list.json").read_text())[0]
    path = root / entry.split("/")[1] / (entry.split("/")[2] + ".txt")
    lines = path.read_text().splitlines()
    cols = lines[4].split()
    cols[6] = "49.000000" if float(cols[6]) < 47 else "0.000000"  # a part of another category
    lines[4] = " ".join(cols)
    path.write_text("\n".join(lines) + "\n")
    task = TASKS.get("pointmae_partseg")
    with pytest.raises(BadDataError, match=rf"{path.name} \([^)]*entry 0\): line 5: part label .* is not in the "
                                           rf"\w+ part set"):
        task.build_datasets(seg_cfg(root, tmp_path), ["train", "val", "test"])


@pytest.mark.slow
def test_partseg_end_to_end(snp_root, tmp_path, capsys):
    from mm3d.trainer import run

    out = tmp_path / "run"
    res = run(seg_cfg(snp_root, out, "train.epochs=2", "data.render_shapes=2"))
    assert res["selected_on"] == "val"
    test = res["test"]
    cats = ["Airplane", "Bag", "Cap", "Chair", "Guitar", "Knife", "Lamp", "Laptop", "Mug", "Rocket", "Table"]
    assert {f"iou_{c}" for c in cats} <= set(test) and "iou_Car" not in test  # no Car shapes in the synthetic set
    assert test["class_miou"] == pytest.approx(np.mean([test[f"iou_{c}"] for c in cats]))
    assert 0.0 <= test["instance_miou"] <= 1.0 and test["num_samples"] == 11
    md = (out / "results.md").read_text()
    assert "honest: best on val" in md and "instance_miou" in md and "| Airplane |" in md
    pngs = sorted((out / "plots").glob("partseg_test_*.png"))
    assert len(pngs) == 2
    from PIL import Image

    img = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert img.shape[1] == 800
    half = img[40:, :400], img[40:, 400:]
    for panel in half:  # ground truth and prediction both show coloured points on white
        assert (panel.min(axis=-1) < 200).mean() > 0.005

    # `mm3d visualize` renders any test shape of the trained model; files and bad indices are refused
    from mm3d.cli import main as cli_main

    ckpt = out / "checkpoints" / "last.pt"
    assert cli_main(["visualize", "--checkpoint", str(ckpt), "--dataset-index", "3", "--out", str(tmp_path / "vis"),
                     "--interactive", "--set", f"data.root={snp_root}"]) == 0  # headless: PNG only, logged
    img = np.asarray(Image.open(tmp_path / "vis" / "partseg_test_00003.png").convert("RGB"))
    assert img.shape[1] == 800 and (img[40:].min(axis=-1) < 200).mean() > 0.005
    capsys.readouterr()
    assert cli_main(["visualize", "--checkpoint", str(ckpt), "--dataset-index", "99", "--out", str(tmp_path / "v2"),
                     "--set", f"data.root={snp_root}"]) == 2
    assert re.search("--dataset-index 99 is out of range: the test split .* has 11 shapes", capsys.readouterr().err)
    assert cli_main(["visualize", "--checkpoint", str(ckpt), "--input", str(pngs[0]), "--out", str(tmp_path / "v3"),
                     "--set", f"data.root={snp_root}"]) == 3  # not available for files: says so


def test_real_shapenetpart_sample(realdata, tmp_path, monkeypatch):
    monkeypatch.setenv("MM3D_CACHE_DIR", str(tmp_path / "cache"))  # the sample folder is read-only
    root = realdata / "pointcloud" / "shapenetpart_sample"
    cfg = seg_cfg(root, tmp_path, "data.npoints=256")
    task = TASKS.get("pointmae_partseg")
    ds = task.build_datasets(cfg, ["train", "val", "test"])
    assert sorted(ds) == ["test", "train"]  # the real val list is empty: left out, selection falls back
    assert len(ds["test"].categories) == 16 and ds["test"].categories[-1] == "Table"
    torch.manual_seed(0)
    model = task.build_model(cfg)
    loader = torch.utils.data.DataLoader(ds["test"], batch_size=2)
    res = task.evaluate(model, loader, cfg, torch.device("cpu"), "test")
    m = res.metrics
    assert m["num_samples"] == 1 and [k for k in m if k.startswith("iou_")] == ["iou_Table"]
    assert m["class_miou"] == pytest.approx(m["iou_Table"]) == pytest.approx(m["instance_miou"])
    papers = task.build_datasets(seg_cfg(root, tmp_path, "train.select_on=test"), ["train", "val", "test"])
    assert len(papers["train"]) == 1 and "val" not in papers  # trainval = 1 train + 0 val shapes
