"""Bad data is found, all of it, and reported.

- `mm3d data check` opens every listed sample directly and lists every bad one (file, list line,
  reason) in its JSON report, exit status 1: videos (truncated, zero-byte, text renamed .mp4,
  missing) and point clouds (garbled/truncated text, empty, NaN-only, missing, wrong .bin size);
- evaluation counts and names every sample it did not score, and refuses a test metric with
  missing samples unless eval.allow_missing=true;
- point-cloud loaders skip, count and name bad files and fail past data.max_failure_ratio, as the
  video loader does;
- NaN points (PCL's invalid pixels of organised scans) are dropped and counted;
- raw .bin files: a size that fits no whole number of points says which column counts fit, an
  ambiguous size warns, and `mm3d predict --bin-columns` reads the columns given.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mm3d.cli import main
from mm3d.config import load_config, to_dict
from mm3d.datacheck import BadDataError, MissingSamplesError
from mm3d.pointcloud.classification import build_cls_datasets
from mm3d.pointcloud.datasets import ModelNet, PointFolder
from mm3d.pointcloud.io import read_points, write_ply
from mm3d.registry import TASKS
from mm3d.video.synth import write_mp4


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MM3D_CACHE_DIR", str(tmp_path / "user_cache"))


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------------------------
# data: tiny videos and point clouds, good and bad
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_clip(tmp_path_factory) -> bytes:
    """The bytes of a valid 8-frame 32x32 H.264 mp4."""
    path = tmp_path_factory.mktemp("clip") / "good.mp4"
    frames = (np.random.default_rng(0).random((8, 32, 32, 3)) * 255).astype(np.uint8)
    write_mp4(path, frames)
    return path.read_bytes()


def write_video_list(root: Path, good_clip: bytes, n_good: int, bad: dict[int, str]) -> list[str]:
    """`root/list.txt` of n_good + len(bad) rows ``path label``; row i (0-based) of `bad` is the kind
    of bad video named (truncated, zero-byte, text, missing). Returns the file of each row."""
    root.mkdir(parents=True, exist_ok=True)
    rows, files, g = [], [], 0
    for i in range(n_good + len(bad)):
        kind = bad.get(i)
        name = f"{kind}.mp4" if kind else f"good_{g}.mp4"
        if kind == "truncated":
            (root / name).write_bytes(good_clip[: len(good_clip) // 2])
        elif kind == "zero":
            (root / name).write_bytes(b"")
        elif kind == "text":
            (root / name).write_text("this is a text file renamed .mp4\n" * 20)
        elif kind is None:
            (root / name).write_bytes(good_clip)
            g += 1
        rows.append(f"{name} {i % 3}")
        files.append(str(root / name))
    (root / "list.txt").write_text("\n".join(rows) + "\n")
    return files


def write_modelnet(root: Path, classes=("cone", "cube"), n_train=3, n_test=2, points=200) -> None:
    """A small ``modelnet40_normal_resampled`` layout: lines ``x,y,z,nx,ny,nz``."""
    rng = np.random.default_rng(0)
    lists = {"train": [], "test": []}
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(n_train + n_test):
            shape = f"{cls}_{k + 1:04d}"
            np.savetxt(root / cls / f"{shape}.txt", rng.standard_normal((points, 6)), fmt="%.6f", delimiter=",")
            lists["train" if k < n_train else "test"].append(shape)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(classes) + "\n")
    for split, ids in lists.items():
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")


MN = ["task=pointmae_classify", "model.variant=pointmae_tiny_test", "data.npoints=64", "data.fps_points=80",
      "data.cache_points=128", "data.votes=0", "train.device=cpu", "train.batch_size=4"]


def _yaml(tmp_path: Path, overrides: list[str], root: Path) -> Path:
    """A config file for the `key=value` overrides (the task included)."""
    lines = [f"output_dir: {tmp_path / 'run'}"]
    sections: dict[str, list[str]] = {}
    for o in [*overrides, f"data.root={root}"]:
        key, value = o.split("=", 1)
        if "." in key:
            sec, sub = key.split(".", 1)
            sections.setdefault(sec, []).append(f"  {sub}: {value}")
        else:
            lines.append(f"{key}: {value}")
    for sec, items in sections.items():
        lines += [f"{sec}:", *items]
    path = tmp_path / "cfg.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def organised_pcd(path: Path, *, ascii: bool = False, nan_rows=(1,), width: int = 4, height: int = 3) -> Path:
    """An organised PCD (``HEIGHT`` > 1) with fields x y z rgb, as PCL writes stereo scans; the rows
    `nan_rows` are invalid pixels (NaN x y z)."""
    rng = np.random.default_rng(1)
    xyz = rng.random((height, width, 3)).astype(np.float32)
    xyz[list(nan_rows)] = np.nan
    rgb = struct.unpack("f", struct.pack("I", 0x00FF8040))[0]
    rec = np.concatenate([xyz.reshape(-1, 3), np.full((width * height, 1), rgb, np.float32)], 1).astype("<f4")
    header = (f"# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\n"
              f"TYPE F F F F\nCOUNT 1 1 1 1\nWIDTH {width}\nHEIGHT {height}\nVIEWPOINT 0 0 0 1 0 0 0\n"
              f"POINTS {width * height}\nDATA {'ascii' if ascii else 'binary'}\n")
    if ascii:
        lines = [" ".join("nan" if np.isnan(v) else f"{v:.6f}" for v in r[:3]) + f" {r[3]:.8e}" for r in rec]
        path.write_text(header + "\n".join(lines) + "\n")
    else:
        path.write_bytes(header.encode() + rec.tobytes())
    return path


# ----------------------------------------------------------------------------------------------
# item 6: `mm3d data check` opens every sample and lists every bad one
# ----------------------------------------------------------------------------------------------


def test_data_check_lists_every_bad_video(tmp_path, good_clip, capsys, caplog):
    """Truncated, zero-byte, text-renamed and missing videos are all listed with file, list line and
    reason, although data.max_failure_ratio would let the loader replace them."""
    root = tmp_path / "videos"
    bad = {2: "truncated", 5: "zero", 9: "text", 14: "missing"}
    files = write_video_list(root, good_clip, 19, bad)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: videomae_pretrain\nmodel:\n  variant: videomae_tiny_test\noutput_dir: {tmp_path / 'run'}\n"
                   f"data:\n  root: {root}\n  train_list: list.txt\n  sampling_rate: 1\n  max_failure_ratio: 0.5\n")
    rc, out, err = _run(["data", "check", cfg], capsys)
    assert rc == 1
    report = json.loads(out)
    assert report["ok"] is False and report["errors"] == 4 and report["train"]["samples"] == 23
    listed = {b["file"]: b for b in report["train"]["bad"]}
    assert set(listed) == {files[i] for i in bad}
    for i, kind in bad.items():
        entry = listed[files[i]]
        assert entry["line"] == f"{root / 'list.txt'}:{i + 1}" and entry["index"] == i and entry["reason"]
    assert "does not exist" in listed[files[14]]["reason"]
    # the default report goes to the run folder and is the JSON printed; every bad file is logged as met
    assert json.loads((tmp_path / "run" / "data_check.json").read_text()) == report
    assert all(f"bad sample {f}" in caplog.text for f in listed)
    rc, _, _ = _run(["data", "check", cfg, "--report", tmp_path / "r.json"], capsys)
    assert rc == 1 and json.loads((tmp_path / "r.json").read_text())["errors"] == 4


def test_data_check_lists_every_bad_point_cloud_file(tmp_path, capsys):
    """ModelNet: a missing, a garbled, a truncated and an empty file in one run (not one per rerun);
    a folder of scans: garbled text, an empty .ply, a NaN-only .npy and a .bin of the wrong size."""
    root = tmp_path / "mn"
    write_modelnet(root)
    (root / "cone/cone_0002.txt").unlink()
    (root / "cube/cube_0001.txt").write_text("solid cube\nfacet normal 0 0 1\n")
    text = (root / "cube/cube_0003.txt").read_text()
    (root / "cube/cube_0003.txt").write_text(text[: len(text) // 2 + 7])  # cut in the middle of a line
    (root / "cone/cone_0004.txt").write_text("")
    rc, out, _ = _run(["data", "check", _yaml(tmp_path, MN, root), "--report", tmp_path / "mn.json"], capsys)
    assert rc == 1
    report = json.loads(out)
    bad = [b for split in ("train", "val", "test") for b in report.get(split, {}).get("bad", [])]
    assert sorted(Path(b["file"]).name for b in bad) == ["cone_0002.txt", "cone_0004.txt", "cube_0001.txt",
                                                         "cube_0003.txt"]
    by_name = {Path(b["file"]).name: b for b in bad}
    assert by_name["cone_0002.txt"]["reason"] == "listed file does not exist"
    assert by_name["cone_0002.txt"]["line"] == f"{root / 'modelnet40_train.txt'}:2"
    assert "not a number" in by_name["cube_0001.txt"]["reason"]
    assert "columns" in by_name["cube_0003.txt"]["reason"] and "empty" in by_name["cone_0004.txt"]["reason"]
    assert by_name["cone_0004.txt"]["line"] == f"{root / 'modelnet40_test.txt'}:1"

    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(scans / f"good_{i}.npy", rng.random((50, 3)).astype(np.float32))
    (scans / "garbled.xyz").write_text("0.1 0.2 0.3\n0.4 0.5 zero\n")
    (scans / "empty.ply").write_bytes(b"")
    np.save(scans / "nan.npy", np.full((20, 3), np.nan, np.float32))
    rng.random((7, 6)).astype(np.float32).tofile(scans / "scene.bin")  # 168 bytes: 3, 6 or 7 columns
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(f"task: pointmae_pretrain\nmodel:\n  variant: pointmae_tiny_test\noutput_dir: {tmp_path / 'f'}\n"
                   f"data:\n  dataset: folder\n  root: {scans}\n  npoints: 256\n")
    rc, out, _ = _run(["data", "check", cfg], capsys)
    report = json.loads(out)
    assert rc == 1 and report["errors"] == 4 and report["test"]["checked"] == 0  # test = train here
    reasons = {Path(b["file"]).name: b["reason"] for b in report["train"]["bad"]}
    assert set(reasons) == {"garbled.xyz", "empty.ply", "nan.npy", "scene.bin"}
    assert "0 of 20 points left" in reasons["nan.npy"]
    assert "column counts that fit: 3, 6, 7" in reasons["scene.bin"]


# ----------------------------------------------------------------------------------------------
# item 7: evaluation names what it did not score, and refuses a test metric with missing samples
# ----------------------------------------------------------------------------------------------


def test_evaluate_names_unscored_videos_and_refuses_by_default(tmp_path, good_clip, capsys):
    root = tmp_path / "videos"
    files = write_video_list(root, good_clip, 9, {3: "text"})
    overrides = [f"data.root={root}", "data.test_list=list.txt", "model.num_classes=3", "data.test_num_clips=1",
                 "data.test_num_crops=1", "data.sampling_rate=1", "data.max_failure_ratio=0.5", "train.batch_size=4",
                 "train.device=cpu", "train.tensorboard=false", "train.progress=off", f"output_dir={tmp_path / 'run'}"]
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("task: videomae_finetune\nmodel:\n  variant: videomae_tiny_test\n")
    cfg = load_config(cfg_file, overrides)
    torch.manual_seed(0)
    ckpt = tmp_path / "cls.pt"
    torch.save({"model": TASKS.get("videomae_finetune").build_model(cfg).state_dict(), "config": to_dict(cfg)}, ckpt)

    rc, _, err = _run(["evaluate", cfg_file, *overrides, f"checkpoint={ckpt}"], capsys)
    assert rc == 2
    assert files[3] in err and "list.txt:4" in err and "eval.allow_missing=true" in err

    rc, out, _ = _run(["evaluate", cfg_file, *overrides, f"checkpoint={ckpt}", "eval.allow_missing=true"], capsys)
    assert rc == 0
    printed = json.loads(out)
    res = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert res["test"] == printed["test"]
    assert res["test"]["num_samples"] == 9 and res["test"]["num_missing"] == 1
    assert len(res["test"]["missing"]) == 1 and files[3] in res["test"]["missing"][0]
    assert "list.txt:4" in res["test"]["missing"][0]
    md = (tmp_path / "run" / "eval" / "results.md").read_text()
    assert "num_missing" in md and "## Not scored (test): 1 sample(s)" in md and files[3] in md


def test_classification_evaluation_counts_shapes_left_out(tmp_path):
    """A test file the ModelNet loader left out is not scored: counted, named, refused by default."""
    root = tmp_path / "mn"
    write_modelnet(root)
    (root / "cube/cube_0005.txt").write_text("1,2\n")
    cfg = load_config(None, [*MN, f"data.root={root}", "data.max_failure_ratio=0.5"])
    test = build_cls_datasets(cfg, ["test"])["test"]
    assert len(test) == 3 and [Path(b.file).name for b in test.dropped] == ["cube_0005.txt"]
    task = TASKS.get("pointmae_classify")
    torch.manual_seed(0)
    model = task.build_model(cfg)
    loader = torch.utils.data.DataLoader(test, batch_size=4)
    with pytest.raises(MissingSamplesError, match=r"cube_0005.txt \(\S*modelnet40_test.txt:4\)"):
        task.evaluate(model, loader, cfg, torch.device("cpu"), "test")
    allowed = load_config(None, [*MN, f"data.root={root}", "data.max_failure_ratio=0.5", "eval.allow_missing=true"])
    m = task.evaluate(model, loader, allowed, torch.device("cpu"), "test").metrics
    assert m["num_samples"] == 3 and m["num_missing"] == 1 and "cube_0005.txt" in m["missing"][0]
    m = task.evaluate(model, loader, cfg, torch.device("cpu"), "val").metrics  # other splits: reported
    assert m["num_missing"] == 1


# ----------------------------------------------------------------------------------------------
# item 8: point-cloud loaders skip, count and name bad files, and fail past max_failure_ratio
# ----------------------------------------------------------------------------------------------


def test_failure_ratio_has_the_video_default_in_every_point_cloud_config():
    video = load_config(None, ["task=videomae_pretrain"]).data.max_failure_ratio
    for task in ("pointmae_pretrain", "pointmae_classify", "pointmae_svm", "pointmae_partseg"):
        assert load_config(None, [f"task={task}"]).data.max_failure_ratio == video == 0.01


def test_point_folder_skips_counts_and_names_bad_files(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for i in range(4):
        write_ply(tmp_path / f"scan_{i}.ply", rng.random((40, 3)))
    (tmp_path / "scan_1.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 40\n")  # header only
    ds = PointFolder(tmp_path, npoints=32, max_failure_ratio=0.25, seed=0)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert all(it["points"].shape == (32, 3) for it in items)
    assert torch.equal(items[1]["points"], items[2]["points"])  # scan_1 replaced by the next readable file
    assert list(ds.failed) == [1] and "scan_1.ply" in caplog.text and "1/4" in caplog.text
    strict = PointFolder(tmp_path, npoints=32, max_failure_ratio=0.1)
    strict[0]
    with pytest.raises(BadDataError, match=r"1 of 4 point-cloud files could not be read.*scan_1.ply"):
        strict[1]
    # a dataset that reads its files when built leaves bad ones out (and names them), within the ratio
    root = tmp_path / "mn"
    write_modelnet(root, n_train=5)
    (root / "cone/cone_0002.txt").write_text("")
    train = ModelNet(root, "train", npoints=64, cache_points=128, max_failure_ratio=0.1)
    assert len(train) == 9 and "cone_0002" not in train.ids and [int(x) for x in train.labels] == [0] * 4 + [1] * 5
    with pytest.raises(BadDataError, match="cone_0002.txt"):
        ModelNet(root, "train", npoints=64, cache_points=128, max_failure_ratio=0.05)


@pytest.mark.slow
def test_pretraining_on_a_folder_with_a_bad_file_trains(tmp_path, caplog):
    from mm3d.trainer import run

    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(tmp_path / f"s{i}.npy", rng.random((300, 3)).astype(np.float32))
    (tmp_path / "s3.npy").write_bytes(b"\x93NUMPY garbage")
    cfg = load_config(None, ["task=pointmae_pretrain", "model.variant=pointmae_tiny_test", "data.dataset=folder",
                             f"data.root={tmp_path}", "data.npoints=256", "data.max_failure_ratio=0.2",
                             "train.batch_size=4", "train.max_steps=2", "train.device=cpu", "train.progress=off",
                             "train.tensorboard=false", "data.report_shapes=0", f"output_dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING):
        res = run(cfg)
    assert "s3.npy" in caplog.text and "replaced by another sample" in caplog.text
    assert np.isfinite(res["test"]["loss"])


# ----------------------------------------------------------------------------------------------
# item 9: organised scans with NaN pixels
# ----------------------------------------------------------------------------------------------


def test_organised_pcd_with_nan_pixels_is_read_and_the_drop_counted(tmp_path, caplog):
    path = organised_pcd(tmp_path / "scan.pcd")
    with caplog.at_level(logging.INFO, logger="mm3d.pointcloud.io"):
        pts = read_points(path)
    assert pts.shape == (8, 6) and np.isfinite(pts).all()  # x y z r g b; the 4 NaN pixels of row 1 dropped
    assert np.allclose(pts[0, 3:], [1.0, 128 / 255, 64 / 255], atol=1e-3)
    assert "dropped 4 of 12 points" in caplog.text and "scan.pcd" in caplog.text
    with pytest.raises(ValueError, match=r"scan.pcd, point 4 \(0-based\): non-finite"):
        read_points(path, drop_nonfinite=False)
    text = organised_pcd(tmp_path / "scan_ascii.pcd", ascii=True)
    assert read_points(text).shape == (8, 6)
    with pytest.raises(ValueError, match=r"scan_ascii.pcd, line 16: non-finite"):
        read_points(text, drop_nonfinite=False)
    with pytest.raises(ValueError, match=r"all_nan.pcd: 0 of 12 points left after dropping 12"):
        read_points(organised_pcd(tmp_path / "all_nan.pcd", nan_rows=(0, 1, 2)))
    # the datasets: dropped by default; data.drop_nonfinite=false restores the error
    assert PointFolder(tmp_path, npoints=16, extensions=(".pcd",)).check_sample(1).shape == (8, 3)
    strict = PointFolder(tmp_path, npoints=16, extensions=(".pcd",), drop_nonfinite=False)
    with pytest.raises(ValueError, match="non-finite"):
        strict.check_sample(1)
    with pytest.raises(ValueError, match="line 3: non-finite"):
        read_points(_write(tmp_path / "a.xyz", "0 0 0\n1 1 1\nnan 0 0\n"), drop_nonfinite=False)
    assert read_points(tmp_path / "a.xyz").shape == (2, 3)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_real_organised_scan_with_nan(realdata, caplog):
    path = realdata / "pointcloud" / "scans" / "table_scene_mug_stereo_textured.pcd"
    if not path.is_file():
        pytest.skip(f"{path.name} is not among the real-data samples (the synthetic organised PCD covers it)")
    with caplog.at_level(logging.INFO, logger="mm3d.pointcloud.io"):
        pts = read_points(path)
    assert np.isfinite(pts).all() and pts.shape[0] > 0 and "non-finite" in caplog.text


# ----------------------------------------------------------------------------------------------
# item 10: raw .bin files and their column count
# ----------------------------------------------------------------------------------------------


def test_bin_size_errors_name_the_counts_that_fit_and_ambiguity_warns(tmp_path, caplog):
    rng = np.random.default_rng(0)
    odd = tmp_path / "odd.bin"
    rng.random((7, 6)).astype(np.float32).tofile(odd)  # 168 bytes: 3, 6 or 7 columns, not 4
    with pytest.raises(ValueError, match=r"odd.bin: 168 bytes .*default bin_columns=4.*column counts that fit: "
                                         r"3, 6, 7; set data.bin_columns"):
        read_points(odd)
    with pytest.raises(ValueError, match=r"bin_columns=5 .*fit: 3, 6, 7"):
        read_points(odd, bin_columns=5)
    assert read_points(odd, bin_columns=6).shape == (7, 6)
    even = tmp_path / "even.bin"
    rng.random((8, 6)).astype(np.float32).tofile(even)  # 192 bytes: 3, 4, 6 or 8 columns
    with caplog.at_level(logging.WARNING, logger="mm3d.pointcloud.io"):
        assert read_points(even).shape == (12, 4)
    assert "even.bin" in caplog.text and "fits 3, 4, 6, 8 float32 values" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mm3d.pointcloud.io"):
        assert read_points(even, bin_columns=6).shape == (8, 6)
    assert not caplog.text  # a count that is named is not second-guessed


def test_real_scannet_bin_warns_without_a_column_count(realdata, caplog):
    path = realdata / "pointcloud" / "scans" / "scene0000_00.bin"
    with caplog.at_level(logging.WARNING, logger="mm3d.pointcloud.io"):
        read_points(path)
    assert "scene0000_00.bin" in caplog.text and "fits 3, 4, 6, 7, 8 float32" in caplog.text


def test_predict_and_visualize_read_bin_files_with_bin_columns(tmp_path, capsys):
    cfg = load_config(None, [*MN, "model.num_classes=2", "data.classes=[a, b]"])
    torch.manual_seed(0)
    ckpt = tmp_path / "cls.pt"
    torch.save({"model": TASKS.get("pointmae_classify").build_model(cfg).state_dict(), "config": to_dict(cfg)}, ckpt)
    scan = tmp_path / "scan.bin"
    np.random.default_rng(0).random((301, 6)).astype(np.float32).tofile(scan)  # 7224 bytes: 3, 6 or 7 columns
    rc, out, err = _run(["predict", "--checkpoint", ckpt, "--json", "--device", "cpu", scan], capsys)
    assert rc != 0 and "column counts that fit: 3, 6, 7" in out + err
    rc, out, err = _run(["predict", "--checkpoint", ckpt, "--json", "--device", "cpu", "--bin-columns", "6", scan],
                        capsys)
    assert rc == 0, err
    row = json.loads(out.splitlines()[-1])
    assert row["input"] == str(scan) and [name for name, _ in row["topk"]] in (["a", "b"], ["b", "a"])

    pre = load_config(None, ["task=pointmae_pretrain", "model.variant=pointmae_tiny_test", "data.npoints=256"])
    torch.save({"model": TASKS.get("pointmae_pretrain").build_model(pre).state_dict(), "config": to_dict(pre)},
               tmp_path / "pre.pt")
    vis = ["visualize", "--checkpoint", tmp_path / "pre.pt", "--input", scan, "--out", tmp_path / "vis", "--device",
           "cpu"]
    rc, out, err = _run(vis, capsys)
    assert rc == 2 and "column counts that fit: 3, 6, 7" in err
    rc, out, err = _run([*vis, "--bin-columns", "6"], capsys)
    assert rc == 0 and (tmp_path / "vis" / "scan_input.ply").is_file()
    assert read_points(tmp_path / "vis" / "scan_input.ply").shape[0] == 256


def test_multi_seed_summary_keeps_the_names_of_unscored_samples(tmp_path, monkeypatch):
    """`seeds: [...]` averages the numbers of every seed; the names of unscored samples stay per seed."""
    import mm3d.trainer as trainer

    class OneSeed:
        def __init__(self, cfg):
            self.seed = cfg.seed

        def fit(self):
            return {"test": {"top1": 0.5 + self.seed, "num_missing": 1.0, "missing": ["a.mp4 (list.txt:2): bad"]}}

    monkeypatch.setattr(trainer, "Trainer", OneSeed)
    summary = trainer.run_seeds(load_config(None, ["task=toy_regression", "seeds=[0, 1]", f"output_dir={tmp_path}"]))
    assert summary["mean"]["test/top1"] == 1.0 and summary["mean"]["test/num_missing"] == 1.0
    assert "test/missing" not in summary["mean"]
    assert summary["per_seed"]["1"]["test/missing"] == ["a.mp4 (list.txt:2): bad"]
    assert json.loads((tmp_path / "results.json").read_text())["per_seed"]["0"]["test/missing"]
