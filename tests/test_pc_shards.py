"""Point clouds in prepared shards: every preparer (mm3d data prepare) and the datasets over its shards,
which must give the file datasets' items for the same seed; bad inputs and bad samples; config errors;
Point-MAE pretraining and ModelNet fine-tuning from shards."""

import io
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from mm3d.config import ConfigError, load_config, save_config
from mm3d.data import ResumableSampler
from mm3d.datacheck import BadDataError, check_dataset
from mm3d.shards import ShardSampler, ShardWriter, write_manifest
from mm3d.pointcloud import datasets as D
from mm3d.pointcloud.files import MISSING
from mm3d.pointcloud.io import write_ply
from mm3d.pointcloud.shards import (ModelNetShards, PointFolderShards, ScanObjectNNShards, ShapeNet55Shards,
                                    pretrain_shard_datasets)
from mm3d.pointcloud.synth import synth_scanobjectnn, synth_shapenet55

CACHE = 256  # ModelNet cache points in these tests (the synthetic files have 1024)


def prepare(*args) -> None:
    """Run `mm3d data prepare ARGS` in this process (one worker unless given, no progress bar)."""
    from mm3d.cli import main

    assert main(["data", "prepare", *map(str, args), "--no-progress", *(["--workers", "1"]
                                                                       if "--workers" not in args else [])]) == 0


def manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def assert_same_items(a, b, n=None):
    """Items of datasets `a` and `b` equal key by key, dtype and value (exactly)."""
    assert len(a) == len(b)
    for i in range(len(a) if n is None else n):
        x, y = a[i], b[i]
        assert x.keys() == y.keys(), i
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, (i, k)
            assert torch.equal(x[k], y[k]), (i, k, (x[k].float() - y[k].float()).abs().max())


@pytest.fixture(scope="module")
def sn_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sn") / "ShapeNet55-34"
    synth_shapenet55(root, seed=0, scale="tiny")  # 15 synsets x (2 train + 1 test) files of 8192 points
    return root


@pytest.fixture(scope="module")
def so_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("so") / "ScanObjectNN"
    synth_scanobjectnn(root, seed=0, scale="tiny")  # 15 classes x (2 train + 1 test) clouds of 2048 points
    return root


@pytest.fixture(scope="module")
def mn_shards(mn_root, tmp_path_factory):
    """ModelNet train + test shards of the session's synthetic ModelNet (cache_points=CACHE), a prepared root."""
    out = tmp_path_factory.mktemp("mn_shards")
    for split in ("train", "test"):
        prepare("--kind", "modelnet", "--root", mn_root, "--list", mn_root / f"modelnet40_{split}.txt",
                "--split", split, "--cache-points", CACHE, "--out", out / split)
    (out / "dataset.json").write_text(json.dumps({"splits": {"train": "train", "test": "test"}}))
    return out


# ----------------------------------------------------------------------------------------------
# Each preparer: shards give the file dataset's items
# ----------------------------------------------------------------------------------------------


def test_modelnet_shards_hold_the_fps_cache(mn_root, mn_shards, tmp_path):
    files = D.ModelNet(mn_root, "train", npoints=CACHE, cache_points=CACHE, write_cache=False, cache_device="cpu")
    shards = ModelNetShards(mn_shards / "train", npoints=CACHE, cache_points=CACHE)
    # the stored arrays are the FPS cache the file path builds (bit for bit), in the same order
    stored = np.stack([shards.load(i)[0] for i in range(len(shards))])
    np.testing.assert_array_equal(stored, files.points)
    assert shards.classes == files.classes and shards.ids == files.ids and torch.equal(shards.labels, files.labels)
    meta = json.loads(shards.samples[0]["json"])
    assert meta["fps"] == CACHE and meta["points"] == CACHE and meta["id"] == files.ids[0]
    assert meta["source"] == str(files.paths[0]) and meta["line"].endswith("modelnet40_train.txt:1")
    m = manifest(mn_shards / "train")["mm3d"]
    assert (m["kind"], m["modality"], m["settings"]["cache_points"]) == ("modelnet", "pointcloud", CACHE)
    # the dataset travels to DataLoader workers (files re-opened there) and gives the same items
    loaded = torch.cat([b["points"] for b in torch.utils.data.DataLoader(shards, batch_size=16, num_workers=1)])
    assert torch.equal(loaded, torch.from_numpy(stored))
    # evaluation items are the FPS prefix (fps_points), as ModelNet(npoints=...) gives them
    test_files = D.ModelNet(mn_root, "test", npoints=100, cache_points=CACHE, write_cache=False, cache_device="cpu")
    assert_same_items(ModelNetShards(mn_shards, split="test", npoints=100, cache_points=CACHE), test_files)
    # converted by two worker processes: the same shard, byte for byte
    prepare("--kind", "modelnet", "--root", mn_root, "--list", mn_root / "modelnet40_train.txt",
            "--cache-points", CACHE, "--out", tmp_path / "par", "--workers", 2)
    assert manifest(tmp_path / "par")["shardlist"][0]["sha256"] == manifest(mn_shards / "train")["shardlist"][0][
        "sha256"]


def test_shapenet55_items_equal_the_files(sn_root, tmp_path):
    prepare("--kind", "shapenet55", "--root", sn_root, "--list", "ShapeNet-55/train.txt", "--out", tmp_path / "sn",
            "--shard-size", 200_000)  # ~98 KiB per cloud: several shards
    m = manifest(tmp_path / "sn")
    assert len(m["shardlist"]) > 1 and m["mm3d"]["num_samples"] == 30
    files = D.ShapeNet55(sn_root, "train", 64, seed=7)
    shards = ShapeNet55Shards(tmp_path / "sn", 64, seed=7)
    assert shards.synsets == files.synsets == m["mm3d"]["classes"]
    assert_same_items(shards, files)
    # unseeded training items draw from torch's global generator, as the files do
    unseeded = [D.ShapeNet55(sn_root, "train", 64), ShapeNet55Shards(tmp_path / "sn", 64)]
    draws = []
    for ds in unseeded:
        torch.manual_seed(3)
        draws.append(torch.stack([ds[i]["points"] for i in range(5)]))
    assert torch.equal(*draws)


def test_scanobjectnn_items_equal_the_files(so_root, tmp_path):
    prepare("--kind", "scanobjectnn", "--root", so_root, "--list", "main_split/training_objectdataset.h5",
            "--out", tmp_path / "bg")
    m = manifest(tmp_path / "bg")["mm3d"]
    assert m["settings"]["variant"] == "OBJ_BG" and m["classes"] == list(D.SCANOBJECTNN_CLASSES)
    assert_same_items(ScanObjectNNShards(tmp_path / "bg", "OBJ_BG", None),
                      D.ScanObjectNN(so_root, "OBJ_BG", "train", None))
    assert_same_items(ScanObjectNNShards(tmp_path / "bg", "OBJ_BG", 500, seed=1),
                      D.ScanObjectNN(so_root, "OBJ_BG", "train", 500, seed=1))
    with pytest.raises(ConfigError, match="ScanObjectNN OBJ_BG shards, the config reads PB_T50_RS"):
        ScanObjectNNShards(tmp_path / "bg", "PB_T50_RS")


def test_scanobjectnn_bad_clouds_are_reported_and_left_out(so_root, tmp_path):
    src = so_root / "main_split" / "test_objectdataset.h5"
    bad = tmp_path / "bad" / "test.h5"
    bad.parent.mkdir()
    with h5py.File(src) as f:
        data, labels = np.asarray(f["data"]), np.asarray(f["label"])
    data[2, 5, 1], labels[4] = np.nan, 99
    with h5py.File(bad, "w") as f:
        f["data"], f["label"] = data, labels
    prepare("--kind", "scanobjectnn", "--list", bad, "--out", tmp_path / "s")
    report = json.loads((tmp_path / "s" / "prepare_report.json").read_text())
    reasons = {s["line"]: s["reason"] for s in report["skipped"]}
    assert reasons == {"cloud 2": "non-finite coordinates", "cloud 4": "label 99 is outside the 15 classes"}
    assert manifest(tmp_path / "s")["mm3d"]["skipped"] == [{k: s[k] for k in ("file", "line", "reason")}
                                                          for s in report["skipped"]]
    with pytest.raises(BadDataError, match="2 of 15 ScanObjectNN clouds"):  # the file dataset's budget
        ScanObjectNNShards(tmp_path / "s")
    ds = ScanObjectNNShards(tmp_path / "s", max_failure_ratio=0.2)
    assert len(ds) == 13 and [str(b) for b in ds.dropped] == [
        f"{bad} (cloud 2): non-finite coordinates", f"{bad} (cloud 4): label 99 is outside the 15 classes"]
    assert [json.loads(ds.samples[i]["json"])["row"] for i in range(len(ds))] == [0, 1, 3, *range(5, 15)]


def _scan_folder(root):
    rng = np.random.default_rng(0)
    for k, (cls, ext) in enumerate([("chair", "npy"), ("chair", "ply"), ("lamp", "npy"), ("lamp", "xyz")]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        pts = rng.normal(size=(300 + 50 * k, 3)).astype(np.float32)
        path = root / cls / f"scan{k}.{ext}"
        if ext == "npy":
            np.save(path, pts)
        elif ext == "ply":
            write_ply(path, pts)
        else:
            path.write_text("".join(f"{x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in pts))
    (root / "lamp" / "notes.txt").write_text("not a scan\n")  # .txt is not read by default


@pytest.mark.parametrize("sample", ["random", "fps"])
def test_point_folder_items_equal_the_files(tmp_path, sample):
    _scan_folder(tmp_path / "scans")
    prepare("--kind", "pointfolder", "--list", tmp_path / "scans", "--out", tmp_path / "s")
    m = manifest(tmp_path / "s")["mm3d"]
    assert m["classes"] == ["chair", "lamp"] and m["num_samples"] == 4
    ds = PointFolderShards(tmp_path / "s", 320, sample=sample, seed=5)
    assert [json.loads(ds.samples[i]["json"])["label"] for i in range(4)] == [0, 0, 1, 1]
    assert_same_items(ds, D.PointFolder(tmp_path / "scans", 320, sample=sample, seed=5))


def test_corrupt_inputs_are_reported_and_left_out(sn_root, tmp_path):
    root = tmp_path / "sn"
    shutil.copytree(sn_root, root)
    names = (root / "ShapeNet-55" / "test.txt").read_text().split()
    (root / "shapenet_pc" / names[1]).write_bytes(b"\x93NUMPY garbage")
    (root / "shapenet_pc" / names[4]).unlink()
    prepare("--kind", "shapenet55", "--root", root, "--list", root / "ShapeNet-55" / "test.txt", "--out",
            tmp_path / "s")
    skipped = manifest(tmp_path / "s")["mm3d"]["skipped"]
    assert [(s["file"], s["line"]) for s in skipped] == [
        (str(root / "shapenet_pc" / names[1]), f"{root / 'ShapeNet-55' / 'test.txt'}:2"),
        (str(root / "shapenet_pc" / names[4]), f"{root / 'ShapeNet-55' / 'test.txt'}:5")]
    assert "not a plain numeric .npy array" in skipped[0]["reason"] and skipped[1]["reason"] == MISSING
    ds = ShapeNet55Shards(tmp_path / "s", 32, max_failure_ratio=0.2)
    assert len(ds) == 13 and len(ds.dropped) == 2
    assert check_dataset(ds).bad == ds.dropped  # mm3d data check lists them


def test_bad_samples_in_shards_are_named_and_replaced(tmp_path):
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    good = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    nan = good.copy()
    nan[7, 2] = np.nan
    samples = {"000000_ok": npy(good), "000001_nan": npy(nan), "000002_shape": npy(good[:, :2]),
               "000003_junk": b"not an npy", "000004_ok": npy(good * 2)}
    with ShardWriter(tmp_path) as w:
        for k, data in samples.items():
            w.write(k, {"npy": data, "json": json.dumps({"label": 1, "points": 100, "source": f"{k}.npy"}).encode()})
    write_manifest(tmp_path, w.entries, {"modality": "pointcloud", "kind": "shapenet55", "classes": ["a", "b"]})
    ds = ShapeNet55Shards(tmp_path, 16, seed=0, max_failure_ratio=1.0)
    shard = str(tmp_path / "shard-000000.tar")
    with pytest.raises(ValueError, match=r"shard-000000.tar, key 000001_nan: non-finite value \(NaN or inf\) at row 7 "
                                         r"\(prepared from 000001_nan.npy\)"):
        ds.check_sample(1)
    bad = check_dataset(ds).bad
    assert [(b.file, b.line, b.index) for b in bad] == [(shard, "key 000001_nan", 1), (shard, "key 000002_shape", 2),
                                                        (shard, "key 000003_junk", 3)]
    assert "expected a float32 (N, 3) array, got float32 (100, 2)" in bad[1].reason
    assert "unreadable .npy" in bad[2].reason
    # loading replaces a bad sample by the next readable one and counts it; past the budget it fails
    assert torch.equal(ds[1]["points"], ds[4]["points"]) and set(ds.failed) == {1, 2, 3}
    strict = ShapeNet55Shards(tmp_path, 16)
    with pytest.raises(BadDataError, match="000001_nan"):
        strict[1]


# ----------------------------------------------------------------------------------------------
# Configs: keys, errors, the CONFIG form of prepare, training
# ----------------------------------------------------------------------------------------------

PRETRAIN = ["model.variant=pointmae_tiny_test", "data.npoints=64", "train.batch_size=8", "train.device=cpu",
            "train.tensorboard=false", "train.progress=off", "train.eval_every=0", "train.save_every=0",
            "data.report_shapes=0", "optim.warmup_steps=0", "train.max_steps=2", "train.log_every=1"]


def pretrain_cfg(tmp_path, name, *extra):
    return load_config(None, [f"output_dir={tmp_path / name}", *PRETRAIN, *extra], task="pointmae_pretrain")


def test_shard_config_errors(sn_root, mn_shards, tmp_path):
    with pytest.raises(ConfigError, match="format=shards needs data.shards"):
        pretrain_cfg(tmp_path, "a", "data.format=shards")
    with pytest.raises(ConfigError, match="prepared by the 'modelnet' preparer .* reads 'shapenet55' shards"):
        pretrain_shard_datasets(pretrain_cfg(tmp_path, "b", "data.format=shards", f"data.shards={mn_shards}").data,
                                ["train"])
    other = tmp_path / "video"
    shutil.copytree(mn_shards / "train", other)
    doc = manifest(other)
    doc["mm3d"]["modality"] = "video"
    (other / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="these shards hold video samples"):
        ModelNetShards(other, npoints=64, cache_points=CACHE)
    with pytest.raises(ConfigError, match="prepared with cache_points=256, the config has data.cache_points=8192"):
        pretrain_shard_datasets(pretrain_cfg(tmp_path, "c", "data.dataset=modelnet40", "data.format=shards",
                                             f"data.shards={mn_shards}").data, ["train"])
    with pytest.raises(ConfigError, match="prepared from the ModelNet40 lists, the config reads ModelNet10"):
        ModelNetShards(mn_shards, num_classes=10, npoints=64, cache_points=CACHE)


def test_prepare_config_form_and_pretrain_from_shapenet_shards(sn_root, tmp_path, capsys):
    from mm3d.trainer import Trainer

    cfg_path = tmp_path / "pretrain.yaml"
    save_config(pretrain_cfg(tmp_path, "cfg", f"data.root={sn_root}"), cfg_path)
    prepare(cfg_path, "--out", tmp_path / "prep")  # data.dataset picks the shapenet55 preparer
    index = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    assert index == {"splits": {"train": "train", "test": "test"}}
    assert manifest(tmp_path / "prep" / "train")["mm3d"]["num_samples"] == 30
    assert manifest(tmp_path / "prep" / "test")["mm3d"]["num_samples"] == 15

    from mm3d.cli import main

    assert main(["data", "prepare", str(cfg_path), "--out", str(tmp_path / "x"), "--nonfinite", "error"]) != 0  # the config says data.drop_nonfinite=true
    assert "--nonfinite error contradicts the config's data.drop_nonfinite=True" in capsys.readouterr().err

    files = Trainer(pretrain_cfg(tmp_path, "files", f"data.root={sn_root}"))
    assert not isinstance(files.train_sampler, ShardSampler)
    files.fit()
    shards = Trainer(pretrain_cfg(tmp_path, "shards", "data.format=shards", f"data.shards={tmp_path / 'prep'}"))
    assert isinstance(shards.train_sampler, ShardSampler)
    assert_same_items(shards.datasets["test"], files.datasets["test"])  # seeded: the same test items
    # The shard sampler's order is not ResumableSampler's (shards first, then a window shuffle), so the
    # runs see other batches; drawn in the same order, the shard items give the same losses.
    shards.train_sampler = ResumableSampler(len(shards.datasets["train"]), shuffle=True, seed=shards.cfg.seed)
    shards.fit()
    a, b = (_losses(tmp_path / name) for name in ("files", "shards"))
    assert len(a) == 2 and all(np.isfinite(a))
    assert a == b
    # ... and trained with the shard sampler, two steps run too
    Trainer(pretrain_cfg(tmp_path, "shard_order", "data.format=shards", f"data.shards={tmp_path / 'prep'}")).fit()
    assert len(_losses(tmp_path / "shard_order")) == 2


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


FINETUNE = ["model.variant=pointmae_tiny_test", "data.npoints=64", "data.fps_points=80", f"data.cache_points={CACHE}",
            "train.batch_size=8", "train.epochs=1", "train.max_steps=3", "train.device=cpu", "train.tensorboard=false",
            "train.progress=off", "train.best_metric=top1", "train.best_mode=max", "optim.lr=1e-3",
            "train.keep_last=1", "data.votes=0", "optim.warmup_steps=0", "train.log_every=1"]


@pytest.mark.slow
def test_modelnet_finetune_from_shards_equals_files(mn_root, mn_shards, tmp_path):
    from mm3d.trainer import Trainer, run

    res = {}
    for name, data in (("files", [f"data.root={mn_root}"]),
                       ("shards", ["data.format=shards", f"data.shards={mn_shards}"])):
        res[name] = run(load_config(None, [f"output_dir={tmp_path / name}", *FINETUNE, *data],
                                    task="pointmae_classify"))
    # select_on=val carves val from train: the training view is a subset, drawn by the same
    # ResumableSampler in both runs, so the batches, losses and metrics are the same
    a, b = _losses(tmp_path / "files"), _losses(tmp_path / "shards")
    assert len(a) == 3 and a == b
    for split in ("val", "test"):
        assert res["files"][split]["top1"] == res["shards"][split]["top1"]
        assert res["files"][split]["loss"] == pytest.approx(res["shards"][split]["loss"], abs=0)
    # trained on all of train (protocol=paper selects on test), the whole split is sampled shard by shard
    paper = Trainer(load_config(None, [f"output_dir={tmp_path / 'paper'}", *FINETUNE, "data.format=shards",
                                       f"data.shards={mn_shards}", "train.select_on=test"], task="pointmae_classify"))
    assert isinstance(paper.train_sampler, ShardSampler) and len(paper.train_sampler) == 40


def _shard_view(cfg, shards):
    """`cfg` (a classification config) as it reads with data.format=shards, data.shards=`shards`."""
    from dataclasses import asdict
    from types import SimpleNamespace

    data = SimpleNamespace(**{**asdict(cfg.data), "format": "shards", "shards": str(shards), "val_shards": "",
                              "test_shards": "", "shuffle_buffer": 1000})
    return SimpleNamespace(data=data, seed=cfg.seed, allow_pickle=cfg.allow_pickle)


@pytest.mark.parametrize("fewshot", [False, True])
def test_classification_datasets_from_shards_equal_the_files(mn_root, mn_shards, tmp_path, fewshot):
    from mm3d.pointcloud import fewshot as fs
    from mm3d.pointcloud.classification import _base_datasets
    from mm3d.pointcloud.shards import cls_shard_datasets

    extra = []
    if fewshot:
        fs.write_fewshot_folds(mn_root, tmp_path / "fs", ways=[5], shots=[2], folds=1, test_per_class=2)
        extra = ["data.dataset=modelnet40_fewshot", f"data.fewshot_root={tmp_path / 'fs'}", "data.way=5",
                 "data.shot=2", "data.fold=0"]
    cfg = load_config(None, [f"data.root={mn_root}", f"output_dir={tmp_path}", *FINETUNE, *extra],
                      task="pointmae_classify")
    files = _base_datasets(cfg, {"train", "test"})
    shards = cls_shard_datasets(_shard_view(cfg, mn_shards), ["train", "test"])
    for split in ("train", "test"):  # training items carry the whole cache, test items the FPS pool
        assert_same_items(shards[split], files[split])
        assert shards[split].classes == files[split].classes
        assert shards[split][0]["points"].shape[0] == (CACHE if split == "train" else 80)
    assert len(files["train"]) == (10 if fewshot else 40)


def test_data_check_on_shards(mn_shards, tmp_path, capsys):
    from mm3d.cli import main

    root = tmp_path / "mn"
    shutil.copytree(mn_shards, root)
    shard = root / "train" / "shard-000000.tar"
    raw = bytearray(shard.read_bytes())
    third = [i for i in range(len(raw)) if raw.startswith(b"\x93NUMPY", i)][2]  # the third sample's npy
    data = third + 10 + int.from_bytes(raw[third + 8:third + 10], "little")  # past the npy header
    raw[data + 12 * 5 + 4:data + 12 * 5 + 8] = np.float32(np.nan).tobytes()  # point 5, y
    shard.write_bytes(bytes(raw))
    cfg = tmp_path / "check.yaml"
    save_config(pretrain_cfg(tmp_path, "check", "data.dataset=modelnet40", "data.format=shards",
                             f"data.shards={root}", f"data.cache_points={CACHE}"), cfg)
    capsys.readouterr()
    assert main(["data", "check", str(cfg)]) == 1
    report = json.loads((tmp_path / "check" / "data_check.json").read_text())
    bad = report["train"]["bad"]
    assert [b["file"] for b in bad] == [str(shard)] * 2 and report["test"]["errors"] == 0
    assert "sha256 differs from the manifest" in bad[0]["reason"]
    assert bad[1]["line"] == "key 000002_sphere_0003" and bad[1]["index"] == 2
    assert "non-finite value (NaN or inf) at row 5 (prepared from " in bad[1]["reason"]
    assert bad[1]["reason"].endswith("sphere/sphere_0003.txt)")
