"""Point-cloud data: file reading, synthetic generators, datasets, caches, transforms."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mm3d.datacheck import BadDataError
from mm3d.pointcloud import transforms as T
from mm3d.pointcloud.datasets import (SCANOBJECTNN_FILES, SHAPENETPART_CATEGORIES,
                                      SHAPENETPART_SEG_CLASSES, ModelNet, PointFolder,
                                      ScanObjectNN, ShapeNet55, ShapeNetPart)
from mm3d.pointcloud.io import read_points, write_ply
from mm3d.registry import SYNTH
from mm3d.testing import assert_close

# ----------------------------------------------------------------------------------------------
# fixtures: tiny synthetic sets, generated once per module
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    for kind in ("modelnet40", "shapenet55", "shapenetpart", "scanobjectnn"):
        SYNTH.get(kind)(root / kind, seed=0, scale="tiny")
    return root


@pytest.fixture
def modelnet_copy(synth_root, tmp_path) -> Path:
    """A private, editable copy of the tiny synthetic ModelNet set."""
    dst = tmp_path / "modelnet"
    shutil.copytree(synth_root / "modelnet40", dst)
    return dst


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    """Never write caches outside the test's folder."""
    path = tmp_path / "user_cache"
    monkeypatch.setenv("MM3D_CACHE_DIR", str(path))
    return path


def assert_unit_sphere(points: torch.Tensor, atol: float = 1e-5) -> None:
    """(..., N, 3) clouds centred on their centroid with the farthest point at distance 1."""
    assert_close(points.mean(-2), torch.zeros_like(points.mean(-2)), atol=atol, msg="centroid")
    radius = points.norm(dim=-1).amax(-1)
    assert_close(radius, torch.ones_like(radius), atol=atol, msg="radius")


# ----------------------------------------------------------------------------------------------
# io
# ----------------------------------------------------------------------------------------------


def test_read_real_scans(realdata):
    scans = realdata / "pointcloud" / "scans"
    bun0 = read_points(scans / "bun0.pcd")          # x y z + normals (curvature dropped)
    assert bun0.shape == (397, 6) and bun0.dtype == np.float32
    assert_close(torch.from_numpy(np.linalg.norm(bun0[:, 3:], axis=1)), torch.ones(397), atol=1e-4)
    assert_close(torch.from_numpy(bun0[0, :3]), torch.tensor([0.0054215998, 0.11349, 0.040748999]))
    bunny = read_points(scans / "bunny.pcd")        # PCD v.5, x y z only
    assert bunny.shape == (397, 3)
    assert_close(torch.from_numpy(bunny), torch.from_numpy(bun0[:, :3]), atol=1e-6)
    scene = read_points(scans / "scene0000_00.bin", bin_columns=6)
    assert scene.shape == (40684, 6)
    assert scene[:, 3:].min() >= 0 and scene[:, 3:].max() <= 255  # rgb
    with pytest.raises(ValueError, match=r"scene0000_00.bin.*bin_columns=5"):
        read_points(scans / "scene0000_00.bin", bin_columns=5)


def test_read_real_text_files(realdata):
    mn = read_points(realdata / "pointcloud/modelnet40_sample/airplane/airplane_0178.txt")
    assert mn.shape == (10000, 6)
    assert_close(torch.from_numpy(mn[0]), torch.tensor([-0.09228, -0.07449, 0.4679, -0.9627,
                                                        0.2153, 0.164]))
    part = read_points(realdata / "pointcloud/shapenetpart_sample/04379243/"
                                  "1a00aa6b75362cc5b324368d54a7416f.txt")
    assert part.shape == (2751, 7) and set(np.unique(part[:, 6])) <= {47.0, 48.0, 49.0}


def test_read_formats_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((50, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", np.concatenate([pts, pts], 1))
    np.savetxt(tmp_path / "a.xyz", pts, fmt="%.6f")
    np.savetxt(tmp_path / "a.txt", pts, fmt="%.6f", delimiter=",")
    np.concatenate([pts, np.ones((50, 1), np.float32)], 1).tofile(tmp_path / "a.bin")
    write_ply(tmp_path / "a.ply", pts, colors=rng.random((50, 3)), normals=pts)
    write_ply(tmp_path / "b.ply", torch.from_numpy(pts))
    assert read_points(tmp_path / "a.npy").shape == (50, 6)
    for name, cols in (("a.xyz", 3), ("a.txt", 3), ("a.bin", 4), ("a.ply", 9), ("b.ply", 3)):
        arr = read_points(tmp_path / name)
        assert arr.shape == (50, cols) and arr.dtype == np.float32, name
        assert_close(torch.from_numpy(arr[:, :3]), torch.from_numpy(pts), atol=1e-5, msg=name)


@pytest.mark.parametrize("content, pattern", [
    ("1,2,3\n4,5,6\n7,8\n", r"bad.txt, line 3: 2 columns, expected 3"),
    ("1 2 3\n\n4 5 6 7\n", r"bad.txt, line 3: 4 columns, expected 3"),
    ("1,2,3\n4,5,6\n7,nan,9\n", r"bad.txt, line 3: non-finite"),
    ("1 2 3\n4 inf 6\n", r"bad.txt, line 2: non-finite"),
    ("1 2 3\n4 x 6\n", r"bad.txt, line 2: 'x' is not a number"),
    ("", r"bad.txt: empty"),
    ("\n  \n", r"bad.txt: empty"),
])
def test_read_text_errors(tmp_path, content, pattern):
    (tmp_path / "bad.txt").write_text(content)
    with pytest.raises(ValueError, match=pattern):
        read_points(tmp_path / "bad.txt", drop_nonfinite=False)


def test_read_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_points(tmp_path / "missing.txt")
    (tmp_path / "a.obj").write_text("v 1 2 3\n")
    with pytest.raises(ValueError, match="unsupported"):
        read_points(tmp_path / "a.obj")
    np.save(tmp_path / "flat.npy", np.zeros(12, np.float32))
    with pytest.raises(ValueError, match=r"flat.npy.*shape \(12,\)"):
        read_points(tmp_path / "flat.npy")
    arr = np.zeros((5, 3), np.float32)
    arr[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", arr)
    with pytest.raises(ValueError, match=r"nan.npy.*row 2"):
        read_points(tmp_path / "nan.npy", drop_nonfinite=False)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin: empty"):
        read_points(tmp_path / "empty.bin")
    (tmp_path / "nan.pcd").write_text(
        "VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 2\nHEIGHT 1\n"
        "POINTS 2\nDATA ascii\n0 0 0\n1 nan 2\n")
    with pytest.raises(ValueError, match=r"nan.pcd, line 11: non-finite"):
        read_points(tmp_path / "nan.pcd", drop_nonfinite=False)


# ----------------------------------------------------------------------------------------------
# synthetic generators
# ----------------------------------------------------------------------------------------------


def test_synth_deterministic(synth_root, tmp_path):
    for kind in ("modelnet40", "shapenet55"):
        SYNTH.get(kind)(tmp_path / "again" / kind, seed=0, scale="tiny")
        SYNTH.get(kind)(tmp_path / "other" / kind, seed=1, scale="tiny")
    a = (synth_root / "modelnet40/torus/torus_0002.txt").read_text()
    assert a == (tmp_path / "again/modelnet40/torus/torus_0002.txt").read_text()
    assert a != (tmp_path / "other/modelnet40/torus/torus_0002.txt").read_text()
    assert a.splitlines()[0].count(",") == 5 and len(a.splitlines()) == 1024
    names = (synth_root / "shapenet55/ShapeNet-55/train.txt").read_text()
    assert names == (tmp_path / "again/shapenet55/ShapeNet-55/train.txt").read_text()


def test_synth_layouts(synth_root):
    part = synth_root / "shapenetpart"
    lines = (part / "synsetoffset2category.txt").read_text().splitlines()
    assert [tuple(line.split("\t")) for line in lines] == list(SHAPENETPART_CATEGORIES.items())
    entries = json.loads((part / "train_test_split/shuffled_train_file_list.json").read_text())
    assert entries and all(e.startswith("shape_data/") and e.count("/") == 2 for e in entries)
    row = (part / (entries[0].split("/", 1)[1] + ".txt")).read_text().splitlines()[0].split(" ")
    assert len(row) == 7 and row[6].endswith(".000000")
    for folder, train_file, test_file in SCANOBJECTNN_FILES.values():
        with h5py.File(synth_root / "scanobjectnn" / folder / train_file, "r") as f:
            assert f["data"].shape == (30, 2048, 3) and f["data"].dtype == np.float32
            assert sorted(set(f["label"][()].tolist())) == list(range(15))
    npy = np.load(next((synth_root / "shapenet55/shapenet_pc").glob("*.npy")))
    assert npy.shape == (8192, 3) and npy.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# datasets on synthetic data
# ----------------------------------------------------------------------------------------------


def test_modelnet_synthetic(synth_root, tmp_path):
    kw = dict(cache_points=128, cache_dir=tmp_path / "cache")
    train = ModelNet(synth_root / "modelnet40", "train", npoints=128, use_normals=True, **kw)
    test = ModelNet(synth_root / "modelnet40", "test", npoints=64, **kw)
    assert (len(train), len(test)) == (40, 20) and len(train.classes) == 10
    item = train[5]
    assert item["points"].shape == (128, 3) and item["points"].dtype == torch.float32
    assert item["normals"].shape == (128, 3) and item["label"].dtype == torch.long
    assert_close(item["normals"].norm(dim=-1), torch.ones(128), atol=1e-4)
    assert_unit_sphere(torch.stack([train[i]["points"] for i in range(len(train))]))
    labels = torch.stack([test[i]["label"] for i in range(len(test))])
    assert labels.min() == 0 and labels.max() == 9 and test[0]["points"].shape == (64, 3)
    # items are prefixes of the cached FPS order, so any prefix is itself a farthest-point sample
    full = ModelNet(synth_root / "modelnet40", "test", npoints=128, **kw)[0]["points"]
    assert_close(test[0]["points"], full[:64])
    from mm3d.pointcloud.ops import farthest_point_sample
    assert torch.equal(farthest_point_sample(full[None], 64)[0], torch.arange(64))


def test_shapenet55_synthetic(synth_root):
    train = ShapeNet55(synth_root / "shapenet55", "train", npoints=256)
    test = ShapeNet55(synth_root / "shapenet55", "test", npoints=256, seed=0)
    both = ShapeNet55(synth_root / "shapenet55", "train", npoints=256, use_both_splits=True)
    assert (len(train), len(test), len(both)) == (30, 15, 45) and len(train.synsets) == 15
    batch = torch.stack([train[i]["points"] for i in range(4)])
    assert batch.shape == (4, 256, 3)
    assert_unit_sphere(batch)
    assert int(max(train[i]["label"] for i in range(len(train)))) == 14
    assert torch.equal(test[3]["points"], test[3]["points"])  # seeded: same points every time
    assert not torch.equal(test[3]["points"], test[4]["points"])


def test_shapenetpart_synthetic(synth_root, tmp_path):
    root = synth_root / "shapenetpart"
    ds = ShapeNetPart(root, "trainval", npoints=300, use_normals=True, cache_dir=tmp_path)
    assert len(ds) == 33 and ds.categories == list(SHAPENETPART_CATEGORIES)
    for i in range(len(ds)):
        item = ds[i]
        assert item["points"].shape == (300, 3) and item["seg"].shape == (300,)
        assert item["seg"].dtype == torch.long and item["cls_label"].dtype == torch.long
        allowed = SHAPENETPART_SEG_CLASSES[ds.categories[int(item["cls_label"])]]
        assert set(item["seg"].tolist()) <= set(allowed)
    assert len({int(ds[i]["cls_label"]) for i in range(len(ds))}) == 11
    # more points than the shape has: repeats; fewer: distinct points
    big = ShapeNetPart(root, "test", npoints=1024, cache_dir=tmp_path)[0]["points"]
    small = ShapeNetPart(root, "test", npoints=256, cache_dir=tmp_path)[0]["points"]
    assert big.shape == (1024, 3) and torch.unique(small, dim=0).shape[0] == 256


def test_scanobjectnn_synthetic(synth_root):
    for variant in SCANOBJECTNN_FILES:
        ds = ScanObjectNN(synth_root / "scanobjectnn", variant, "train")
        assert len(ds) == 30 and len(ds.classes) == 15
        item = ds[7]
        assert item["points"].shape == (2048, 3) and item["label"].dtype == torch.long
        assert_unit_sphere(item["points"])
    sub = ScanObjectNN(synth_root / "scanobjectnn", "PB_T50_RS", "test", npoints=1024,
                       normalize=True, seed=3)
    assert sub[0]["points"].shape == (1024, 3)
    assert_unit_sphere(sub[0]["points"])
    with pytest.raises(FileNotFoundError, match="main_split_nobg"):
        ScanObjectNN(synth_root / "modelnet40", "OBJ_ONLY", "test")


def test_scanobjectnn_bad_label(tmp_path):
    folder = tmp_path / "main_split"
    folder.mkdir()
    with h5py.File(folder / "test_objectdataset.h5", "w") as f:
        f["data"] = np.zeros((3, 16, 3), np.float32)
        f["label"] = np.array([0, 15, 2])
    with pytest.raises(BadDataError, match=r"test_objectdataset.h5 \(cloud 1\): label 15 is outside"):
        ScanObjectNN(tmp_path, "OBJ_BG", "test", npoints=16)


def test_point_folder(tmp_path, realdata):
    rng = np.random.default_rng(0)
    (tmp_path / "scans/sub").mkdir(parents=True)
    write_ply(tmp_path / "scans/a.ply", rng.random((500, 3)))
    np.save(tmp_path / "scans/sub/b.npy", rng.random((40, 3)).astype(np.float32))
    np.savetxt(tmp_path / "scans/sub/c.xyz", rng.random((300, 3)))
    rng.random((200, 6)).astype(np.float32).tofile(tmp_path / "scans/sub/d.bin")
    (tmp_path / "scans/notes.md").write_text("not a cloud")
    ds = PointFolder(tmp_path / "scans", npoints=128, bin_columns=6)
    assert [p.name for p in ds.files] == ["a.ply", "b.npy", "c.xyz", "d.bin"]
    batch = torch.stack([ds[i]["points"] for i in range(len(ds))])
    assert batch.shape == (4, 128, 3)
    assert_unit_sphere(batch)
    real = PointFolder(realdata / "pointcloud/scans", npoints=256, bin_columns=6, sample="fps")
    assert len(real) == 3 and real[0]["points"].shape == (256, 3)
    with pytest.raises(ValueError, match="no .* files"):
        PointFolder(tmp_path / "scans", extensions=(".pcd",))


# ----------------------------------------------------------------------------------------------
# datasets on the real samples
# ----------------------------------------------------------------------------------------------


def test_modelnet_real(realdata, tmp_path):
    root = realdata / "pointcloud/modelnet40_sample"
    train = ModelNet(root, "train", npoints=128, cache_points=128, cache_dir=tmp_path)
    test = ModelNet(root, "test", npoints=64, cache_points=128, sample="random",
                    cache_dir=tmp_path)
    assert len(train.classes) == 40 and (len(train), len(test)) == (8, 4)
    index = {name: train.classes.index(name) for name in ("airplane", "chair", "lamp", "vase")}
    assert index == {"airplane": 0, "chair": 8, "lamp": 19, "vase": 37}
    assert [int(train[i]["label"]) for i in range(8)] == [0, 0, 8, 8, 19, 19, 37, 37]
    assert [int(test[i]["label"]) for i in range(4)] == [0, 8, 19, 37]
    assert_unit_sphere(torch.stack([train[i]["points"] for i in range(8)]))
    assert test[0]["points"].shape == (64, 3)


def test_shapenetpart_real(realdata, tmp_path):
    root = realdata / "pointcloud/shapenetpart_sample"
    train = ShapeNetPart(root, "train", npoints=2048, use_normals=True, cache_dir=tmp_path)
    test = ShapeNetPart(root, "test", npoints=2048, cache_dir=tmp_path)
    val = ShapeNetPart(root, "val", cache_dir=tmp_path)  # the sample's val list is empty
    assert train.categories == list(SHAPENETPART_CATEGORIES) and len(train.categories) == 16
    assert (len(train), len(val), len(test)) == (1, 0, 1)
    for ds in (train, test):
        item = ds[0]
        assert int(item["cls_label"]) == 15  # Table
        assert set(item["seg"].tolist()) <= {47, 48, 49} and item["points"].shape == (2048, 3)
    assert_unit_sphere(train[0]["points"], atol=0.05)  # resampled with repeats from 2,751
    assert train[0]["normals"].shape == (2048, 3)


# ----------------------------------------------------------------------------------------------
# the preprocessed cache
# ----------------------------------------------------------------------------------------------


def test_cache_built_reused_rebuilt(modelnet_copy, tmp_path):
    kw = dict(npoints=32, cache_points=64, sample="random")
    first = ModelNet(modelnet_copy, "test", **kw)  # default location: <root>/.mm3d_cache
    assert not first.cache_hit and first.cache_path.parent == modelnet_copy / ".mm3d_cache"
    assert first.cache_path.is_file()
    again = ModelNet(modelnet_copy, "test", **kw)
    assert again.cache_hit and again.cache_path == first.cache_path
    assert torch.equal(again[3]["points"], first[3]["points"])
    changed = [ModelNet(modelnet_copy, "test", **{**kw, "cache_points": 96}),
               ModelNet(modelnet_copy, "test", **kw, use_normals=True),
               ModelNet(modelnet_copy, "test", **{**kw, "sample": "fps"})]
    lst = modelnet_copy / "modelnet40_test.txt"
    lst.write_text("\n".join(lst.read_text().split()[:-1]) + "\n")  # one file fewer
    changed.append(ModelNet(modelnet_copy, "test", **kw))
    paths = {first.cache_path} | {ds.cache_path for ds in changed}
    assert len(paths) == 5 and not any(ds.cache_hit for ds in changed)
    assert len(changed[-1]) == len(first) - 1


def test_cache_unwritable_root(modelnet_copy, user_cache, tmp_path, monkeypatch):
    (modelnet_copy / ".mm3d_cache").write_text("a file where the cache folder would go")
    ds = ModelNet(modelnet_copy, "test", npoints=32, cache_points=64, sample="random")
    assert ds.cache_path.parent == user_cache and not ds.cache_hit
    assert ModelNet(modelnet_copy, "test", npoints=32, cache_points=64, sample="random").cache_hit
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    monkeypatch.setenv("MM3D_CACHE_DIR", str(blocked))
    mem = ModelNet(modelnet_copy, "test", npoints=32, cache_points=64, sample="fps")
    assert mem.cache_path is None and mem[0]["points"].shape == (32, 3)


def test_cache_not_written_into_a_folder_marked_read_only(modelnet_copy, user_cache):
    """A dataset folder made read-only (r-xr-xr-x) is left untouched even by root, for whom the
    kernel would allow the write (the shared real-data samples are such folders)."""
    modelnet_copy.chmod(0o555)
    try:
        ds = ModelNet(modelnet_copy, "test", npoints=32, cache_points=64, sample="random")
        assert ds.cache_path.parent == user_cache and not (modelnet_copy / ".mm3d_cache").exists()
    finally:
        modelnet_copy.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# bad input: errors name the file and line
# ----------------------------------------------------------------------------------------------


def _edit_line(path: Path, line_no: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[line_no - 1] = new
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("new_line, pattern", [
    ("0.1,0.2,0.3,0.4,0.5", r"cone_0005.txt \(\S*modelnet40_test.txt:7\): line 7: 5 columns, expected 6"),
    ("0.1,nan,0.3,0.4,0.5,0.6", r"cone_0005.txt \(\S*modelnet40_test.txt:7\): line 7: non-finite"),
])
def test_modelnet_bad_file(modelnet_copy, tmp_path, new_line, pattern):
    _edit_line(modelnet_copy / "cone/cone_0005.txt", 7, new_line)
    with pytest.raises(BadDataError, match=pattern):
        ModelNet(modelnet_copy, "test", npoints=32, cache_points=64, sample="random",
                 write_cache=False, drop_nonfinite=False)


def test_modelnet_bad_lists(modelnet_copy):
    kw = dict(npoints=32, cache_points=64, sample="random", write_cache=False)
    with pytest.raises(BadDataError, match=r"_0005.txt \(\S+\): 1024 points, fewer than cache_points"):
        ModelNet(modelnet_copy, "test", npoints=32, cache_points=4096, write_cache=False)
    (modelnet_copy / "cone/cone_0005.txt").write_text("")
    with pytest.raises(BadDataError, match=r"cone_0005.txt \(\S+\): empty"):
        ModelNet(modelnet_copy, "test", **kw)
    lst = modelnet_copy / "modelnet40_train.txt"
    ids = lst.read_text().split()
    lst.write_text("\n".join(ids[:3] + ["sphere_0999"] + ids[3:]) + "\n")
    with pytest.raises(BadDataError, match=r"sphere_0999.txt \(\S*modelnet40_train.txt:4\): listed file does not"):
        ModelNet(modelnet_copy, "train", **kw)
    lst.write_text("\n".join(ids[:2] + ["dragon_0001"]) + "\n")
    with pytest.raises(ValueError, match=r"modelnet40_train.txt, line 3: .*'dragon'.*not in"):
        ModelNet(modelnet_copy, "train", **kw)
    names = modelnet_copy / "modelnet40_shape_names.txt"
    names.write_text(names.read_text() + "box\n")
    with pytest.raises(ValueError, match=r"shape_names.txt, line 11: class 'box' repeats"):
        ModelNet(modelnet_copy, "test", **kw)
    with pytest.raises(FileNotFoundError, match="modelnet10_shape_names.txt"):
        ModelNet(modelnet_copy, "test", num_classes=10, **kw)


def test_shapenetpart_bad_part(synth_root, tmp_path):
    root = tmp_path / "part"
    shutil.copytree(synth_root / "shapenetpart", root)
    entry = json.loads((root / "train_test_split/shuffled_test_file_list.json").read_text())[0]
    path = root / (entry.split("/", 1)[1] + ".txt")
    row = path.read_text().splitlines()[4].split(" ")
    category = {v: k for k, v in SHAPENETPART_CATEGORIES.items()}[path.parent.name]
    row[6] = "47.000000" if category != "Table" else "0.000000"
    _edit_line(path, 5, " ".join(row))
    with pytest.raises(BadDataError, match=rf"{path.name} \(\S+, entry 0\): line 5: part label .* {category} part"):
        ShapeNetPart(root, "test", write_cache=False)
    ShapeNetPart(root, "train", write_cache=False)  # other splits are unaffected
    lst = root / "train_test_split/shuffled_val_file_list.json"
    entries = json.loads(lst.read_text())
    lst.write_text(json.dumps(entries + ["shape_data/04379243/doesnotexist"]))
    with pytest.raises(BadDataError, match=rf"doesnotexist.txt \(\S*shuffled_val_file_list.json, entry "
                                           rf"{len(entries)}\): listed file does not exist"):
        ShapeNetPart(root, "val", write_cache=False)


def test_shapenet55_missing_file(synth_root, tmp_path):
    root = tmp_path / "sn"
    shutil.copytree(synth_root / "shapenet55", root)
    victim = (root / "ShapeNet-55/test.txt").read_text().split()[2]
    (root / "shapenet_pc" / victim).unlink()
    with pytest.raises(BadDataError, match=rf"{victim} \(\S*test.txt:3\): listed file does not exist"):
        ShapeNet55(root, "test")


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (2, 7, 3), (3, 9, 6)])
def test_transform_shapes_and_passthrough(shape):
    x = torch.randn(shape)
    for fn in (T.normalize_unit_sphere, T.scale_and_translate, T.rotate_up_axis, T.jitter,
               T.random_point_dropout):
        y = fn(x)
        assert y.shape == x.shape and y.dtype == x.dtype, fn.__name__
        if fn is not T.random_point_dropout:
            assert torch.equal(y[..., 3:], x[..., 3:]), fn.__name__
    assert T.sample_points(x, 4).shape == shape[:-2] + (4, shape[-1])


def test_normalize_unit_sphere():
    x = torch.randn(4, 100, 3) * torch.tensor([1.0, 5.0, 0.1]) + 3.0
    assert_unit_sphere(T.normalize_unit_sphere(x))
    flat = T.normalize_unit_sphere(torch.ones(1, 10, 3))
    assert torch.isfinite(flat).all() and flat.abs().max() == 0


def test_scale_and_translate_ranges():
    b = 256
    zeros, ones = torch.zeros(b, 4, 3), torch.ones(b, 4, 3)
    shift = T.scale_and_translate(zeros, generator=torch.Generator().manual_seed(0))
    scale = T.scale_and_translate(ones, generator=torch.Generator().manual_seed(0)) - shift
    assert shift.abs().max() <= 0.2 and shift.abs().max() > 0.15
    assert scale.min() >= 2 / 3 - 1e-6 and scale.max() <= 1.5 + 1e-6
    assert scale.min() < 0.75 and scale.max() > 1.4
    # one draw per cloud and axis, shared by the cloud's points
    assert torch.equal(scale[:, :1].expand_as(scale), scale)
    assert not torch.equal(scale[0, 0, 0].expand(3), scale[0, 0])
    assert not torch.equal(scale[0], scale[1])


def test_rotate_up_axis_matches_reference():
    x = torch.randn(5, 20, 6)
    angles = torch.rand(5) * 2 * math.pi
    y = T.rotate_up_axis(x, angles=angles, rotate_normals=True)
    for b in range(5):  # slow reference: rotation about y, right-handed, p' = R p
        c, s = math.cos(angles[b]), math.sin(angles[b])
        rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
        assert_close(y[b, :, :3], x[b, :, :3] @ rot.T, atol=1e-5)
        assert_close(y[b, :, 3:], x[b, :, 3:] @ rot.T, atol=1e-5)
    r = T.rotate_up_axis(x, generator=torch.Generator().manual_seed(1))
    assert_close(r[..., 1], x[..., 1])  # the up coordinate is kept
    assert_close(r[..., :3].norm(dim=-1), x[..., :3].norm(dim=-1), atol=1e-5)
    z = T.rotate_up_axis(torch.tensor([[1.0, 0.0, 0.0]]), up_axis="z",
                         angles=torch.tensor([math.pi / 2]))
    assert_close(z, torch.tensor([[0.0, 1.0, 0.0]]), atol=1e-6)


def test_jitter_and_dropout():
    x = torch.randn(8, 500, 3)
    d = T.jitter(x, sigma=0.01, clip=0.02) - x
    assert d.abs().max() <= 0.02 + 1e-6 and 0.007 < d.std() < 0.011
    y = T.random_point_dropout(x, max_ratio=0.875, generator=torch.Generator().manual_seed(0))
    dropped = (y != x).any(-1)
    assert torch.equal(y[dropped], x[:, :1].expand_as(x)[dropped])
    frac = dropped.float().mean(1)
    assert frac.max() <= 0.875 + 0.1 and len(set(frac.tolist())) > 1
    assert torch.equal(T.random_point_dropout(x, max_ratio=0.0), x)


def test_sampling():
    x = torch.randn(3, 50, 4)
    idx = T.sample_indices(x, 50)
    assert all(len(set(row.tolist())) == 50 for row in idx)
    over = T.sample_indices(x, 70)
    assert all(set(row.tolist()) == set(range(50)) for row in over)
    s = T.sample_points(x, 10, generator=torch.Generator().manual_seed(5))
    i = T.sample_indices(x, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s, torch.gather(x, 1, i[..., None].expand(-1, -1, 4)))
    assert T.sample_indices(x[0], 10).shape == (10,)
    from mm3d.pointcloud.ops import farthest_point_sample
    fps = T.sample_points(x, 10, "fps")
    ref = farthest_point_sample(x[..., :3], 10)
    assert torch.equal(fps, torch.gather(x, 1, ref[..., None].expand(-1, -1, 4)))
    with pytest.raises(ValueError, match="fps cannot pick 60"):
        T.sample_points(x, 60, "fps")


@pytest.mark.parametrize("kind", ["scale_translate", "scale_shift", "rotate"])
def test_point_augmentation_builder_draws_from_its_generator_only(kind):
    x = torch.randn(4, 64, 3)

    def run(seed: int) -> torch.Tensor:
        aug = T.build_point_augmentation(kind, scale_low=0.8, scale_high=1.25, translate_range=0.1,
                                         generator=torch.Generator().manual_seed(seed))
        return aug(x)

    state = torch.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert T.build_point_augmentation("none", scale_low=1, scale_high=1, translate_range=0,
                                      generator=torch.Generator()) is None
    with pytest.raises(TypeError, match="torch.Generator"):
        T.build_point_augmentation(kind, scale_low=1, scale_high=1, translate_range=0, generator=None)
    with pytest.raises(ValueError, match="unknown augmentation 'jitter'"):
        T.build_point_augmentation("jitter", scale_low=1, scale_high=1, translate_range=0,
                                   generator=torch.Generator())


def test_generator_determinism():
    x = torch.randn(4, 64, 3)

    def run(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [T.scale_and_translate(x, generator=g), T.rotate_up_axis(x, generator=g),
                T.jitter(x, generator=g), T.random_point_dropout(x, generator=g),
                T.sample_points(x, 16, generator=g)]

    for a, b, c in zip(run(0), run(0), run(1)):
        assert torch.equal(a, b) and not torch.equal(a, c)
