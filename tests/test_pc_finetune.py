"""Point-cloud fine-tuning protocols end to end on tiny synthetic data, plus their pieces:
classification with voting, few-shot folds, the SVM probe, initialisation and robustness errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from mm3d.checkpoint import CheckpointError
from mm3d.config import load_config, save_config, to_dict
from mm3d.datacheck import BadDataError
from mm3d.registry import TASKS, variant_config
from mm3d.testing import assert_close
from mm3d.pointcloud import fewshot
from mm3d.pointcloud.checkpoints import load_encoder_checkpoint
from mm3d.pointcloud.classification import build_cls_datasets, eval_points
from mm3d.pointcloud.models import build_classifier
from mm3d.pointcloud.probe import fit_linear_svm
from mm3d.pointcloud.splits import stratified_split
from mm3d.pointcloud.transforms import random_subset

TINY = ["model.variant=pointmae_tiny_test", "data.npoints=64", "data.fps_points=80", "data.cache_points=128",
        "train.batch_size=8", "train.epochs=1", "train.device=cpu", "train.tensorboard=false",
        "train.progress=off", "train.best_metric=top1", "train.best_mode=max", "optim.lr=1e-3",
        "train.keep_last=1", "data.votes=0"]


def cls_cfg(root, out, *extra, task="pointmae_classify"):
    return load_config(None, [f"data.root={root}", f"output_dir={out}", *TINY, *extra], task=task)


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


def test_stratified_split_is_fixed_and_per_class():
    labels = [0] * 10 + [1] * 20 + [2] * 1
    keep, held = stratified_split(labels, 0.1, seed=0)
    assert sorted(keep + held) == list(range(31)) and not set(keep) & set(held)
    held_labels = [labels[i] for i in held]
    assert held_labels.count(0) == 1 and held_labels.count(1) == 2 and held_labels.count(2) == 0
    assert stratified_split(labels, 0.1, seed=0) == (keep, held)
    assert stratified_split(labels, 0.1, seed=1) != (keep, held)


def test_random_subset_and_eval_points(mn_root, tmp_path):
    pts = torch.randn(4, 80, 3)
    sub = random_subset(pts, 64, torch.Generator().manual_seed(0))
    assert sub.shape == (4, 64, 3)
    for b in range(4):  # distinct points of the same cloud
        same = (sub[b][:, None, :] == pts[b][None, :, :]).all(dim=-1)  # (64, 80)
        assert (same.sum(dim=1) == 1).all() and len(torch.unique(same.float().argmax(dim=1))) == 64
    cfg = cls_cfg(mn_root, tmp_path)
    assert torch.equal(eval_points(pts, cfg.data), pts[:, :64])  # ModelNet pools are FPS-ordered
    task = TASKS.get("pointmae_classify")
    batch = task.batch_transform(cfg, torch.device("cpu"))({"points": pts, "label": torch.zeros(4)})
    assert batch["points"].shape == (4, 64, 3)
    rot = cls_cfg(mn_root, tmp_path, "data.augmentation=rotate")
    out = task.batch_transform(rot, torch.device("cpu"))({"points": pts[:, :64]})["points"]
    # a rotation keeps norms (the points come shuffled: compare the sorted norms)
    assert_close(out.norm(dim=-1).sort(dim=1).values, pts[:, :64].norm(dim=-1).sort(dim=1).values, atol=1e-5)


def test_vote_logits_average_the_votes(mn_root, tmp_path):
    cfg = cls_cfg(mn_root, tmp_path, "data.votes=3")
    task = TASKS.get("pointmae_classify")
    torch.manual_seed(0)
    model = build_classifier(cfg.model, 10).eval()
    pool = torch.randn(2, 80, 3)
    votes = task.vote_logits(model, pool, cfg, torch.Generator().manual_seed(5))
    one = cls_cfg(mn_root, tmp_path, "data.votes=1")
    gen = torch.Generator().manual_seed(5)
    singles = torch.stack([task.vote_logits(model, pool, one, gen) for _ in range(3)])
    assert_close(votes, singles.mean(dim=0), atol=1e-5)
    assert not torch.allclose(singles[0], singles[1])  # the votes differ (subsets, scale, shift)


def test_init_from_pretraining_checkpoint(tiny_pointmae_pretrain_ckpt):
    torch.manual_seed(1)
    model = build_classifier(variant_config("pointmae_tiny_test"), 7)
    head_before = model.head[0].weight.clone()
    notes = load_encoder_checkpoint(model, tiny_pointmae_pretrain_ckpt)
    sd = torch.load(tiny_pointmae_pretrain_ckpt, weights_only=True)["model"]
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(v, sd[k]), k
    assert torch.equal(model.head[0].weight, head_before)
    text = " ".join(notes)
    assert "dropped" in text and "decoder.*" in text and "mask_token" in text and "recon_head.*" in text
    assert "newly initialised" in text and "cls_token" in text and "head.*" in text


def test_init_from_classifier_with_other_class_count(tmp_path):
    src = build_classifier(variant_config("pointmae_tiny_test"), 40)
    path = tmp_path / "cls40.pt"
    torch.save({"model": src.state_dict(), "config": None}, path)
    model = build_classifier(variant_config("pointmae_tiny_test"), 10)
    notes = " ".join(load_encoder_checkpoint(model, path))
    assert torch.equal(model.cls_token, src.cls_token)  # everything that fits is loaded
    assert torch.equal(model.head[0].weight, src.head[0].weight)
    assert "head.8.weight: checkpoint (40, 32) vs model (10, 32)" in notes


def test_checkpoint_of_an_earlier_version_with_trans_dim_still_loads(mn_root, tmp_path, capsys):
    """Checkpoints store their config; before `model.embed_dim` it was called `model.trans_dim`."""
    from mm3d.cli import main
    from mm3d.config import ConfigError, config_from_dict
    from mm3d.pointcloud.classification import PointClassifyConfig

    cfg = cls_cfg(mn_root, tmp_path)
    torch.manual_seed(0)
    model = build_classifier(cfg.model, 10).eval()
    stored = to_dict(cfg)
    stored["model"]["trans_dim"] = stored["model"].pop("embed_dim")  # as earlier versions wrote it
    path = tmp_path / "old.pt"
    torch.save({"model": model.state_dict(), "config": stored}, path)
    back = config_from_dict(PointClassifyConfig, torch.load(path, weights_only=True)["config"])
    assert back.model.embed_dim == 32 and to_dict(back) == to_dict(cfg)
    # `mm3d predict` rebuilds the model from the stored config and gives this model's answer
    sample = mn_root / "torus" / "torus_0005.txt"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(path), "--topk", "3", "--json", str(sample)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = TASKS.get("pointmae_classify").predict(model, cfg, [str(sample)], topk=3, label_map=None,
                                                      device=torch.device("cpu"))[0]
    assert [name for name, _ in row["topk"]] == [name for name, _ in expected["topk"]]
    assert [p for _, p in row["topk"]] == pytest.approx([p for _, p in expected["topk"]], abs=1e-6)
    stored["model"]["embed_dim"] = 32
    with pytest.raises(ConfigError, match="'model.trans_dim' is the old name of 'model.embed_dim'"):
        config_from_dict(PointClassifyConfig, stored)


def test_checkpoint_architecture_mismatch_names_keys_and_shapes(tiny_pointmae_pretrain_ckpt, tmp_path):
    wide = variant_config("pointmae_tiny_test")
    wide.embed_dim, wide.encoder_dims = 48, 48
    with pytest.raises(CheckpointError) as e:
        load_encoder_checkpoint(build_classifier(wide, 10), tiny_pointmae_pretrain_ckpt)
    msg = str(e.value)
    assert "encoder.norm.weight: checkpoint (32,) vs model (48,)" in msg and "model.variant" in msg
    deep = variant_config("pointmae_tiny_test")
    deep.depth = 3
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \[encoder\.blocks\.2\."):
        load_encoder_checkpoint(build_classifier(deep, 10), tiny_pointmae_pretrain_ckpt)
    official = tmp_path / "official.pth"
    torch.save({"base_model": {"MAE_encoder.norm.weight": torch.zeros(384)}}, official)
    with pytest.raises(CheckpointError, match="mm3d convert --from pointmae-official"):
        load_encoder_checkpoint(build_classifier(deep, 10), official)


def test_class_list_disagreeing_with_data_fails_before_training(mn_root, tmp_path):
    from mm3d.trainer import run

    wrong = ["sphere", "box", "cube"] + ["x"] * 7
    with pytest.raises(ValueError, match=r"data.classes .* disagrees .* label 2: config 'cube' vs data 'cylinder'"):
        run(cls_cfg(mn_root, tmp_path / "a", "data.classes=" + json.dumps(wrong)))
    with pytest.raises(ValueError, match="model.num_classes=40 disagrees with the 10 classes"):
        run(cls_cfg(mn_root, tmp_path / "b", "model.num_classes=40"))
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_missing_file_in_split_list(mn_root, tmp_path):
    root = tmp_path / "mn"
    shutil.copytree(mn_root, root, ignore=shutil.ignore_patterns(".mm3d_cache"))
    (root / "box" / "box_0002.txt").unlink()
    with pytest.raises(BadDataError, match=r"box_0002.txt \(\S*modelnet40_train.txt:6\): listed file does not exist"):
        build_cls_datasets(cls_cfg(root, tmp_path), ["train", "val", "test"])


def test_val_split_only_when_selecting_on_val(mn_root, tmp_path):
    ds = build_cls_datasets(cls_cfg(mn_root, tmp_path), ["train", "val", "test"])
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (30, 10, 20)  # one per class carved
    assert set(ds["train"].indices).isdisjoint(ds["val"].indices)
    assert ds["val"][3]["index"] == 3 and ds["val"].classes == ds["test"].classes
    papers = build_cls_datasets(cls_cfg(mn_root, tmp_path, "train.select_on=test"), ["train", "val", "test"])
    assert sorted(papers) == ["test", "train"] and len(papers["train"]) == 40


# ----------------------------------------------------------------------------------------------
# Classification end to end: fine-tune, evaluate, predict
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_classification_end_to_end(mn_root, tiny_pointmae_pretrain_ckpt, tmp_path, capsys):
    from mm3d.cli import main
    from mm3d.trainer import run

    out = tmp_path / "run"
    cfg = cls_cfg(mn_root, out, f"init={tiny_pointmae_pretrain_ckpt}", "data.votes=2", "train.epochs=2")
    res = run(cfg)
    assert res["selected_on"] == "val"
    assert {"top1", "top5", "mean_class_acc", "loss"} <= set(res["val"])
    assert {"top1", "vote_top1", "vote_mean_class_acc"} <= set(res["test"])  # voting on test only
    assert "vote_top1" not in res["val"]
    assert res["test"]["num_samples"] == 20 and res["val"]["num_samples"] == 10
    assert res["test"]["chance_top1"] == pytest.approx(0.1)  # balanced: 2 test shapes in each of 10 classes
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"]["vote_top1"] == res["test"]["vote_top1"]
    md = (out / "results.md").read_text()
    assert "honest: best on val" in md and "2 votes on test" in md and "scale_translate" in md
    assert (out / "test" / "confusion.png").stat().st_size > 0
    rows = (out / "test" / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("label,class") and len(rows) == 11 and rows[1].startswith("0,sphere,2,")
    preds = json.loads((out / "test" / "predictions.json").read_text())
    assert len(preds) == 20 and sum(p["correct"] for p in preds) / 20 == pytest.approx(res["test"]["top1"])

    # mm3d evaluate on the selected checkpoint reproduces the test metrics
    cfg_path = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_path)
    ckpt = out / "checkpoints" / "best.pt"
    assert main(["evaluate", str(cfg_path), f"checkpoint={ckpt}", "init="]) == 0
    ev = json.loads((out / "eval" / "results.json").read_text())
    assert ev["test"]["top1"] == pytest.approx(res["test"]["top1"])
    assert "given checkpoint (best.pt)" in (out / "eval" / "results.md").read_text()

    # mm3d predict: top-k classes of one file, names from the data's class list
    capsys.readouterr()
    sample = mn_root / "torus" / "torus_0005.txt"
    assert main(["predict", "--checkpoint", str(ckpt), "--topk", "3", "--json", str(sample)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["input"] == str(sample) and len(row["topk"]) == 3
    names = (mn_root / "modelnet40_shape_names.txt").read_text().split()
    assert all(name in names for name, _ in row["topk"])
    assert sum(p for _, p in row["topk"]) <= 1.0 + 1e-6


@pytest.mark.slow
def test_select_on_test_is_labelled(mn_root, tmp_path):
    from mm3d.trainer import run

    out = tmp_path / "papers"
    res = run(cls_cfg(mn_root, out, "train.select_on=test", "data.augmentation=rotate", "data.votes=0"))
    assert res["selected_on"] == "test" and "val" not in res and "vote_top1" not in res["test"]
    md = (out / "results.md").read_text()
    assert "custom: best on test" in md and "| off | rotate |" in md


# ----------------------------------------------------------------------------------------------
# Few-shot
# ----------------------------------------------------------------------------------------------


def test_fewshot_fold_files(mn_root, tmp_path):
    paths = fewshot.write_fewshot_folds(mn_root, tmp_path / "fs", ways=[5, 10], shots=[2, 3], folds=3,
                                        test_per_class=2)
    assert len(paths) == 2 * 2 * 3
    fold = fewshot.read_fold(tmp_path / "fs" / "5way_2shot" / "1.json")
    assert fold["way"] == 5 and len(fold["classes"]) == 5 and len(set(fold["classes"])) == 5
    assert len(fold["train"]) == 10 and len(fold["test"]) == 10
    train_ids = (mn_root / "modelnet40_train.txt").read_text().split()
    test_ids = (mn_root / "modelnet40_test.txt").read_text().split()
    for shape, label in fold["train"]:
        assert shape in train_ids and shape.rsplit("_", 1)[0] == fold["classes"][label]
    for shape, label in fold["test"]:
        assert shape in test_ids and shape.rsplit("_", 1)[0] == fold["classes"][label]
    # fixed seeds: regenerating gives the same files; folds differ from each other
    again = fewshot.write_fewshot_folds(mn_root, tmp_path / "fs2", ways=[5], shots=[2], folds=3, test_per_class=2)
    assert all(p.read_text() == (tmp_path / "fs" / p.relative_to(tmp_path / "fs2")).read_text() for p in again)
    assert {p.read_text() for p in again[:3]}.__len__() == 3
    with pytest.raises(ValueError, match="only 0 of 10 classes"):
        fewshot.make_fold(fewshot.read_modelnet_lists(mn_root), 5, 10, 0)


def test_fewshot_cli_and_fold_errors(mn_root, tmp_path, capsys):
    from mm3d.cli import main

    out = tmp_path / "fs"
    assert main(["data", "fewshot", "--root", str(mn_root), "--out", str(out), "--ways", "5", "--shots", "2",
                 "--folds", "2", "--test-per-class", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 2
    fold = json.loads((out / "5way_2shot" / "0.json").read_text())
    fold["train"][3][1] = (fold["train"][3][1] + 1) % 5  # a label that names another class
    (out / "5way_2shot" / "0.json").write_text(json.dumps(fold))
    cfg = cls_cfg(mn_root, tmp_path, "data.dataset=modelnet40_fewshot", f"data.fewshot_root={out}", "data.way=5",
                  "data.shot=2")
    with pytest.raises(ValueError, match=r"0.json, train entry 3: shape '\w+' is a '\w+', but label"):
        build_cls_datasets(cfg, ["train", "test"])
    fold["train"][3] = ["sphere_9999", 0]
    (out / "5way_2shot" / "0.json").write_text(json.dumps(fold))
    with pytest.raises(ValueError, match="train entry 3: shape 'sphere_9999' is not in the train list"):
        build_cls_datasets(cfg, ["train", "test"])


@pytest.mark.slow
def test_fewshot_folds_end_to_end(mn_root, tmp_path):
    from mm3d.trainer import run

    fs = tmp_path / "fs"
    fewshot.write_fewshot_folds(mn_root, fs, ways=[5], shots=[2], folds=2, test_per_class=2)
    out = tmp_path / "run"
    cfg = cls_cfg(mn_root, out, "data.dataset=modelnet40_fewshot", f"data.fewshot_root={fs}", "data.way=5",
                  "data.shot=2", "seeds=[0,1]", "train.select_on=last", "train.batch_size=5", "data.votes=0")
    res = run(cfg)
    assert res["seeds"] == [0, 1] and "test/top1" in res["mean"] and "test/top1" in res["std"]
    for k in (0, 1):  # seed k is fold k: its query set is that fold's test list
        info = json.loads((out / f"seed_{k}" / "results.json").read_text())
        assert info["test"]["num_samples"] == 10
        classes = fewshot.read_fold(fs / "5way_2shot" / f"{k}.json")["classes"]
        csv_rows = (out / f"seed_{k}" / "test" / "per_class.csv").read_text().splitlines()[1:]
        assert [r.split(",")[1] for r in csv_rows] == classes
    assert "mean ± std" in (out / "results.md").read_text()


# ----------------------------------------------------------------------------------------------
# Linear SVM probe
# ----------------------------------------------------------------------------------------------


def test_fit_linear_svm_selects_c():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 4
    y = np.repeat(np.arange(3), 20)
    x = centers[y] + rng.normal(size=(60, 8))
    yt = np.repeat(np.arange(3), 5)
    xt = centers[yt] + rng.normal(size=(15, 8))
    res = fit_linear_svm(x, y, xt, yt, cs=[0.01, 1.0], select_on="val", val_fraction=0.2)
    assert res.c in (0.01, 1.0) and set(res.scores) == {0.01, 1.0} and res.val_accuracy == res.scores[res.c]
    assert (res.pred == yt).mean() > 0.9
    papers = fit_linear_svm(x, y, xt, yt, cs=[0.01, 1.0], select_on="test")
    assert papers.val_accuracy == max(papers.scores.values())
    single = fit_linear_svm(x, y, xt, yt, cs=[0.5], select_on="last")
    assert single.c == 0.5 and single.val_accuracy is None and not single.scores


def test_svm_probe_end_to_end(mn_root, tiny_pointmae_pretrain_ckpt, tmp_path):
    from mm3d.cli import main

    cfg = cls_cfg(mn_root, tmp_path / "svm", "train.epochs=0", "data.fps_points=64", "data.augmentation=none",
                  "data.votes=0", "probe.cs=[0.1,1.0]", "data.val_fraction=0.25", task="pointmae_svm")
    cfg_path = tmp_path / "svm.yaml"
    save_config(cfg, cfg_path)
    assert main(["evaluate", str(cfg_path), f"checkpoint={tiny_pointmae_pretrain_ckpt}"]) == 0  # strict load of a pretrain ckpt
    res = json.loads((tmp_path / "svm" / "eval" / "results.json").read_text())
    test = res["test"]
    assert test["C"] in (0.1, 1.0) and 0.0 <= test["top1"] <= 1.0 and "select_top1" in test
    assert test["num_samples"] == 20 and test["train_samples"] == 40
    assert "honest: C chosen on val carved from train" in (tmp_path / "svm" / "eval" / "results.md").read_text()
    svm_rows = (tmp_path / "svm" / "eval" / "test" / "per_class.csv").read_text().splitlines()[1:]
    assert sum(int(r.split(",")[3]) for r in svm_rows) == round(test["top1"] * 20)  # correct counts add up
    assert not (tmp_path / "svm" / "eval" / "test" / "predictions.json").exists()  # hard predictions: no scores
    # `mm3d finetune CONFIG init=CKPT` runs no training step and gives the same probe
    from dataclasses import replace

    from mm3d.trainer import run

    again = run(replace(cfg, init=str(tiny_pointmae_pretrain_ckpt), output_dir=str(tmp_path / "svm_init")))
    assert again["test"]["top1"] == test["top1"] and again["test"]["C"] == test["C"]
    assert not (tmp_path / "svm_init" / "checkpoints").exists()


def test_svm_config_refuses_training(mn_root, tmp_path):
    from mm3d.config import ConfigError

    with pytest.raises(ConfigError, match="keep train.epochs at 0"):
        cls_cfg(mn_root, tmp_path, "train.epochs=3", task="pointmae_svm")
    with pytest.raises(ConfigError, match="choose C with train.select_on=val"):
        cls_cfg(mn_root, tmp_path, "train.epochs=0", "train.select_on=last", task="pointmae_svm")


# ----------------------------------------------------------------------------------------------
# Real ModelNet40 files
# ----------------------------------------------------------------------------------------------


def test_real_modelnet40_sample(realdata, tmp_path, monkeypatch):
    monkeypatch.setenv("MM3D_CACHE_DIR", str(tmp_path / "cache"))  # the sample folder is read-only
    root = realdata / "pointcloud" / "modelnet40_sample"
    cfg = load_config(None, [f"data.root={root}", f"output_dir={tmp_path}", *TINY, "data.cache_points=256",
                             "data.fps_points=200", "data.npoints=128", "model.num_classes=40"],
                      task="pointmae_classify")
    task = TASKS.get("pointmae_classify")
    ds = task.build_datasets(cfg, ["train", "val", "test"])
    assert len(ds["test"]) == 4 and len(ds["train"]) + len(ds["val"]) == 8
    assert ds["test"].classes[0] == "airplane" and len(ds["test"].classes) == 40
    model = task.build_model(cfg)
    loader = torch.utils.data.DataLoader(ds["test"], batch_size=4)
    res = task.evaluate(model, loader, cfg, torch.device("cpu"), "test")
    assert res.metrics["num_samples"] == 4 and "vote_top1" not in res.metrics  # votes off (TINY)
    assert res.metrics["chance_top1"] == 0.25  # one test shape of each of 4 classes
    rows = task.predict(model, cfg, [str(root / "airplane" / "airplane_0703.txt")], topk=5, label_map=None,
                        device=torch.device("cpu"))
    assert len(rows[0]["topk"]) == 5
    names = (root / "modelnet40_shape_names.txt").read_text().split()
    assert all(n in names for n, _ in rows[0]["topk"])
    # few-shot folds from the real lists (2 train / 1 test shape per class present)
    fewshot.write_fewshot_folds(root, tmp_path / "fs", ways=[2], shots=[2], folds=2, test_per_class=1)
    fold = fewshot.read_fold(tmp_path / "fs" / "2way_2shot" / "0.json")
    assert set(fold["classes"]) <= {"airplane", "chair", "lamp", "vase"}
    base = ds["test"].base
    assert len(fewshot.FewShotModelNet(base, tmp_path / "fs" / "2way_2shot" / "0.json", "test")) == 2
