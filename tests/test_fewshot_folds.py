"""Few-shot folds in the official pickle layout: the restricted reader, its checks, the dataset over
one split, our writer (``mm3d data fewshot --format pkl``) and how a config picks its fold file."""

import io
import pickle
import pickletools
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mm3d.errors import MissingFileError
from mm3d.testing import assert_close
from mm3d.pointcloud import fewshot
from mm3d.pointcloud.classification import ClsDataConfig
from mm3d.pointcloud.datasets import ModelNet
from mm3d.pointcloud.fewshot import FoldFileError, PickledFewShot

N_STORED = 96  # points per stored cloud in the hand-made official folds (8192 in the release)
NAMES = [f"name{k}" for k in range(40)]  # a made-up 40-line modelnet40_shape_names.txt


def _official_fold(way: int, shot: int, queries: int, seed: int = 0) -> dict:
    """A fold as the official generator builds it: per-class lists of (N, 6) float32 clouds from the
    FPS .dat lists, label i for the i-th drawn class, key the ModelNet label read from the
    ``np.array([cls]).astype(np.int32)`` label arrays, both lists shuffled."""
    rng = np.random.default_rng(seed)
    py = random.Random(seed)

    def cloud() -> np.ndarray:  # far from the unit sphere, so normalising changes it
        xyz = rng.normal(size=(N_STORED, 3)) * rng.uniform(0.5, 3.0) + rng.uniform(-4, 4, size=3)
        nrm = rng.normal(size=(N_STORED, 3))
        return np.concatenate([xyz, nrm / np.linalg.norm(nrm, axis=1, keepdims=True)], 1).astype(np.float32)

    keys = py.sample(range(40), way)
    train, test = [], []
    for i, cls in enumerate(keys):
        key = np.array([cls]).astype(np.int32)[0]
        train += [(cloud(), i, key) for _ in range(shot)]
        test += [(cloud(), i, key) for _ in range(queries)]
    py.shuffle(train)
    py.shuffle(test)
    return {"train": train, "test": test}


def _write_official(root: Path, way: int, shot: int, fold: int, data: dict, **dump) -> Path:
    path = root / f"{way}way_{shot}shot" / f"{fold}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(data, f, **dump)
    return path


def _unit_sphere(points: np.ndarray) -> np.ndarray:
    """The official per-item normalisation of x y z, in numpy."""
    xyz = points[:, :3] - points[:, :3].mean(axis=0)
    return xyz / np.sqrt((xyz ** 2).sum(axis=1)).max()


def _globals(raw: bytes) -> set[str]:
    """'module.name' of every global a pickle names (loaded by a plain unpickler that records them)."""
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            found.add(f"{module}.{name}")
            return super().find_class(module, name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 warns on the numpy.core names
        Recorder(io.BytesIO(raw)).load()
    return found


@pytest.fixture()
def official(tmp_path):
    """An official-layout 5-way 3-shot fold 0 (4 queries per class) and a ModelNet40 names file."""
    data = _official_fold(5, 3, 4)
    path = _write_official(tmp_path / "fs", 5, 3, 0, data)
    names = tmp_path / "mn" / "modelnet40_shape_names.txt"
    names.parent.mkdir()
    names.write_text("\n".join(NAMES) + "\n")
    return path, data, names


def test_reads_official_fold(official):
    path, data, names = official
    assert "numpy._core.multiarray._reconstruct" in _globals(path.read_bytes()) or \
        "numpy.core.multiarray._reconstruct" in _globals(path.read_bytes())  # a real numpy array pickle
    for split in ("train", "test"):
        ds = PickledFewShot(path, split, npoints=40, allow_pickle=True, way=5, shape_names=names)
        entries = data[split]
        assert len(ds) == len(entries) == (15 if split == "train" else 20)
        for i, (points, label, key) in enumerate(entries):
            item = ds[i]
            assert item["points"].shape == (40, 3) and item["points"].dtype == torch.float32
            # normalised over all stored points, then the FPS prefix (the stored order)
            assert_close(item["points"], _unit_sphere(points)[:40], atol=1e-5, msg=f"{split} {i}")
            assert item["label"].dtype == torch.long and int(item["label"]) == label
            assert ds.classes[label] == NAMES[int(key)]
            assert ds.sample_source(i) == (str(path), f"{split} entry {i}")
        assert ds.labels.tolist() == [e[1] for e in entries]
        assert ds.keys.tolist() == [int(e[2]) for e in entries]
        assert int(ds.check_sample(3)["label"]) == entries[3][1]
    full = PickledFewShot(path, "test", npoints=N_STORED, allow_pickle=True)
    assert full[0]["points"].norm(dim=1).max() == pytest.approx(1.0, abs=1e-6)
    assert_close(full[0]["points"].mean(0), torch.zeros(3), atol=1e-6)
    # no names file: class_<ModelNet label>, in fold-label order
    keys = {label: int(key) for _, label, key in data["train"]}
    assert full.classes == [f"class_{keys[c]}" for c in range(5)]
    with pytest.raises(FoldFileError, match=r"0.pkl, train entry \d+: 96 points, fewer than the 100"):
        PickledFewShot(path, "train", npoints=100, allow_pickle=True)


def test_numpy1_pickles_load_without_numpy_core(official, tmp_path):
    """The official files were written by numpy 1.x (``numpy.core`` names, pickle protocol 3): they
    load without importing numpy's deprecated module names."""
    _, data, _ = official
    raw = pickle.dumps(data, protocol=3).replace(b"numpy._core.", b"numpy.core.")  # no framing at protocol 3
    assert "numpy.core.multiarray._reconstruct" in _globals(raw) and "numpy.core.multiarray.scalar" in _globals(raw)
    path = tmp_path / "old" / "0.pkl"
    path.parent.mkdir()
    path.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold = fewshot.read_pickled_fold(path, allow_pickle=True, way=5)
    assert fold.way == 5 and len(fold.splits["test"]) == 20
    np.testing.assert_array_equal(fold.splits["train"][2][0], data["train"][2][0])
    assert type(fold.splits["train"][2][0]) is np.ndarray  # not the unpickler's guarded subclass


def test_pickles_are_opt_in(official):
    path, _, _ = official
    with pytest.raises(FoldFileError, match=r"0\.pkl is a pickle.*allow_pickle=true"):
        PickledFewShot(path, "train", npoints=8, allow_pickle=False)
    with pytest.raises(MissingFileError, match="not found: .*7.pkl"):
        fewshot.read_pickled_fold(path.with_name("7.pkl"), allow_pickle=True)


class _Shell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_refuses_other_globals(official, tmp_path):
    path, data, _ = official
    marker = tmp_path / "ran"
    data["test"][2] = (data["test"][2][0], data["test"][2][1], _Shell(marker))
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(FoldFileError, match=r"0\.pkl: refused global (posix|nt|os)\.system"):
        fewshot.read_pickled_fold(path, allow_pickle=True)
    assert not marker.exists()
    # numpy.ndarray called directly with an object dtype would read pointers from the buffer
    evil = {"train": [(np.zeros((4, 3), np.float32), 0, 1)], "test": [(_ObjectArray(), 0, 1)]}
    path.write_bytes(pickle.dumps(evil))
    with pytest.raises(FoldFileError, match=r"0\.pkl: not a readable pickle .*refused numpy\.ndarray"):
        fewshot.read_pickled_fold(path, allow_pickle=True)


class _ObjectArray:
    def __reduce__(self):
        return np.ndarray, ((1,), "O", bytearray(8))  # (null pointers: harmless if the guard fails)


def _bad(data: dict, split: str, k: int, entry) -> dict:
    data[split][k] = entry
    return data


@pytest.mark.parametrize("edit, message", [
    (lambda d: [d["train"]], r"expected a dict with 'train' and 'test' lists .*got list"),
    (lambda d: {"train": d["train"]}, r"expected a dict with 'train' and 'test' lists .*got \['train'\]"),
    (lambda d: {**d, "test": []}, r"the test split has no entries"),
    (lambda d: _bad(d, "train", 4, d["train"][4][:2]), r"train entry 4: expected a \(points, label, key\) triple, "
                                                       r"got tuple of 2"),
    (lambda d: _bad(d, "test", 6, (d["test"][6][0][:, 0], *d["test"][6][1:])),
     r"test entry 6: points must be an \(N, C >= 3\) float array, got a float32 array of shape \(96,\)"),
    (lambda d: _bad(d, "test", 1, (d["test"][1][0][:, :2], *d["test"][1][1:])), r"test entry 1: points must be"),
    (lambda d: _bad(d, "train", 0, (d["train"][0][0].astype(np.int64), *d["train"][0][1:])),
     r"train entry 0: points must be .* got a int64 array"),
    (lambda d: _bad(d, "train", 2, (np.full((5, 6), np.nan, np.float32), *d["train"][2][1:])),
     r"train entry 2: points hold NaN or inf"),
    (lambda d: _bad(d, "test", 3, (d["test"][3][0], 5, d["test"][3][2])), r"test entry 3: label 5 is not an integer in 0..4"),
    (lambda d: _bad(d, "test", 3, (d["test"][3][0], "0", d["test"][3][2])), r"test entry 3: label '0' is not an integer"),
    (lambda d: _bad(d, "test", 7, (d["test"][7][0], d["test"][7][1], -1)), r"test entry 7: key -1 is not a ModelNet label"),
])
def test_structure_errors_name_file_split_entry(official, edit, message):
    path, data, _ = official
    path.write_bytes(pickle.dumps(edit(data)))
    with pytest.raises(FoldFileError, match=str(path.name) + r".*" + message):
        PickledFewShot(path, "train", npoints=8, allow_pickle=True, way=5)


def test_labels_and_keys_must_agree(official):
    path, data, names = official
    label, key = data["test"][5][1], int(data["test"][5][2])
    other = next(int(k) for _, lab, k in data["train"] if lab != label)
    data["test"][5] = (data["test"][5][0], label, np.int32(other))
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(FoldFileError, match=rf"test entry 5: label {label} has key {other} here but key {key} at "
                                            r"train entry \d+"):
        fewshot.read_pickled_fold(path, allow_pickle=True)
    data["test"][5] = (data["test"][5][0], label, np.int32(key))
    key0 = next(k for _, lab, k in data["train"] if lab == 0)
    two = {split: [(p, lab, key0 if lab == 4 else k) for p, lab, k in entries] for split, entries in data.items()}
    path.write_bytes(pickle.dumps(two))  # labels 0 and 4 share one ModelNet class
    with pytest.raises(FoldFileError, match=rf"train entry \d+: key {key0} has label (0|4) here but label "
                                            r"(?!\1)(0|4) at train entry \d+"):
        fewshot.read_pickled_fold(path, allow_pickle=True)
    data = {split: [e for e in entries if e[1] != 2] for split, entries in data.items()}  # label 2: no entry
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(FoldFileError, match=r"labels \[2\] of the 5-way fold have no entry"):
        fewshot.read_pickled_fold(path, allow_pickle=True, way=5)
    data = _official_fold(5, 1, 1, seed=3)
    path.write_bytes(pickle.dumps(data))
    top = max(int(k) for _, _, k in data["train"])
    names.write_text("\n".join(NAMES[:top]) + "\n")  # one line short of the largest key
    with pytest.raises(FoldFileError, match=rf"keys \[{top}\] are not ModelNet labels of .*shape_names.txt "
                                            rf"\({top} classes\)"):
        PickledFewShot(path, "train", npoints=8, allow_pickle=True, shape_names=names)


# ------------------------------------------------------------------------------------------------
# Writing the official layout from a ModelNet root
# ------------------------------------------------------------------------------------------------

CACHE = 256  # points per shape written (8192 officially; the tiny synthetic files have 1024)


@pytest.fixture(scope="module")
def both_formats(mn_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folds")
    kw = dict(ways=[5], shots=[2], folds=2, test_per_class=2)
    json_paths = fewshot.write_fewshot_folds(mn_root, out, **kw)
    pkl_paths = fewshot.write_fewshot_folds(mn_root, out, fmt="pkl", cache_points=CACHE, **kw)
    assert [p.with_suffix("") for p in json_paths] == [p.with_suffix("") for p in pkl_paths]
    assert [p.name for p in pkl_paths] == ["0.pkl", "1.pkl"] and pkl_paths[0].parent.name == "5way_2shot"
    return out


def test_written_pkl_holds_the_json_draw(mn_root, both_formats):
    mn = {s: ModelNet(mn_root, s, npoints=CACHE, cache_points=CACHE) for s in ("train", "test")}
    for k in (0, 1):
        folded = fewshot.read_fold(both_formats / "5way_2shot" / f"{k}.json")
        fold = fewshot.read_pickled_fold(both_formats / "5way_2shot" / f"{k}.pkl", allow_pickle=True, way=5)
        assert fold.keys == [mn["train"].classes.index(c) for c in folded["classes"]]
        for split in ("train", "test"):
            assert len(fold.splits[split]) == len(folded[split]) == 10
            for (points, label, key), (shape, json_label) in zip(fold.splits[split], folded[split]):
                i = mn[split].ids.index(shape)
                assert label == json_label and key == int(mn[split].labels[i])
                assert points.shape == (CACHE, 6) and points.dtype == np.float32
                # x y z are the FPS cache that the json fold is read through; normals are unit vectors
                assert_close(points[:, :3], mn[split][i]["points"], msg=f"{k} {split} {shape}")
                assert_close(np.linalg.norm(points[:, 3:], axis=1), np.ones(CACHE), atol=1e-4)
        # the datasets over both files serve the same items
        names = mn_root / "modelnet40_shape_names.txt"
        for split in ("train", "test"):
            via_json = fewshot.FewShotModelNet(ModelNet(mn_root, split, npoints=64, cache_points=CACHE),
                                               both_formats / "5way_2shot" / f"{k}.json", split)
            via_pkl = PickledFewShot(both_formats / "5way_2shot" / f"{k}.pkl", split, npoints=64, allow_pickle=True,
                                     way=5, shape_names=names)
            assert via_pkl.classes == via_json.classes == folded["classes"]
            assert torch.equal(via_pkl.labels, via_json.labels)
            for i in range(len(via_pkl)):
                assert_close(via_pkl[i]["points"], via_json[i]["points"], atol=1e-5, msg=f"{k} {split} {i}")


def test_official_reader_reads_our_pkl(both_formats):
    """The official loader: ``pickle.load(f)[subset]``, then per item the unpacked (points, label, _),
    x y z normalised in place, and the 8192 (here CACHE) points as a tensor."""
    raw = (both_formats / "5way_2shot" / "1.pkl").read_bytes()
    # only public numpy names, so that numpy 1.x (the official environment) and 2.x both load it
    assert _globals(raw) == {"numpy.ndarray", "builtins.bytearray", "numpy.int32"}
    assert pickletools.genops(raw).__next__()[1] == 4  # protocol 4
    for subset in ("train", "test"):
        dataset = pickle.loads(raw)[subset]
        assert len(dataset) == 10
        for points, label, key in dataset:
            assert type(points) is np.ndarray and type(label) is int and type(key) is np.int32
            points[:, 0:3] = _unit_sphere(points)  # writable, as the official loader needs
            current = torch.from_numpy(points[np.arange(points.shape[0])].copy()).float()
            assert current.shape == (CACHE, 6) and 0 <= label < 5


def test_written_folds_are_deterministic(mn_root, both_formats, tmp_path):
    again = fewshot.write_fewshot_folds(mn_root, tmp_path, ways=[5], shots=[2], folds=1, test_per_class=2,
                                        fmt="pkl", cache_points=CACHE, normals=False)
    fold = fewshot.read_pickled_fold(again[0], allow_pickle=True)
    first = fewshot.read_pickled_fold(both_formats / "5way_2shot" / "0.pkl", allow_pickle=True)
    assert fold.keys == first.keys
    for (a, la, ka), (b, lb, kb) in zip(fold.splits["test"], first.splits["test"]):
        assert a.shape == (CACHE, 3) and (la, ka) == (lb, kb)
        np.testing.assert_array_equal(a, b[:, :3])


def test_cli_writes_pkl(mn_root, tmp_path, capsys):
    from mm3d.cli import main

    out = tmp_path / "fs"
    assert main(["data", "fewshot", "--root", str(mn_root), "--out", str(out), "--ways", "5", "--shots", "2",
                 "--folds", "1", "--test-per-class", "2", "--format", "pkl", "--cache-points", str(CACHE)]) == 0
    assert '"format": "pkl"' in capsys.readouterr().out
    assert sorted(p.name for p in (out / "5way_2shot").iterdir()) == ["0.pkl"]
    assert "official Point-BERT/Point-MAE folds" in (out / "README.txt").read_text()


# ------------------------------------------------------------------------------------------------
# Choosing the file of a config: data.fewshot_format
# ------------------------------------------------------------------------------------------------


def _cfg(root: Path | str, fs: Path, fmt: str) -> ClsDataConfig:
    return ClsDataConfig(dataset="modelnet40_fewshot", root=str(root), fewshot_root=str(fs), way=5, shot=2,
                         fewshot_format=fmt, cache_points=CACHE)


def test_open_fold_split_by_format(mn_root, both_formats, tmp_path):
    asked = []

    def modelnet(split: str) -> ModelNet:
        asked.append(split)
        return ModelNet(mn_root, split, npoints=64, cache_points=CACHE)

    kw = dict(allow_pickle=True, npoints=64, modelnet=modelnet)
    for fmt, kind in (("auto", fewshot.FewShotModelNet), ("json", fewshot.FewShotModelNet), ("pkl", PickledFewShot)):
        ds = fewshot.open_fold_split(_cfg(mn_root, both_formats, fmt), "test", 1, **kw)
        assert type(ds) is kind and len(ds) == 10 and ds[0]["points"].shape == (64, 3)
        assert ds.classes == fewshot.read_fold(both_formats / "5way_2shot" / "1.json")["classes"]
        assert fewshot.fold_classes(_cfg(mn_root, both_formats, fmt), 1, allow_pickle=True) == ds.classes
    assert asked == ["test", "test"]
    # auto falls back to the pkl; without a ModelNet root its classes are class_<ModelNet label>
    only_pkl = tmp_path / "only_pkl"
    (only_pkl / "5way_2shot").mkdir(parents=True)
    (only_pkl / "5way_2shot" / "1.pkl").write_bytes((both_formats / "5way_2shot" / "1.pkl").read_bytes())
    ds = fewshot.open_fold_split(_cfg("", only_pkl, "auto"), "train", 1, allow_pickle=True, npoints=CACHE,
                                 modelnet=None)
    assert type(ds) is PickledFewShot and ds[0]["points"].shape == (CACHE, 3)
    keys = fewshot.read_pickled_fold(only_pkl / "5way_2shot" / "1.pkl", allow_pickle=True).keys
    assert ds.classes == [f"class_{k}" for k in keys]
    with pytest.raises(FoldFileError, match="allow_pickle=true"):
        fewshot.open_fold_split(_cfg("", only_pkl, "auto"), "train", 1, allow_pickle=False, npoints=8, modelnet=None)
    with pytest.raises(FoldFileError, match="allow_pickle=true"):
        fewshot.fold_classes(_cfg("", only_pkl, "pkl"), 1, allow_pickle=False)
    # missing files: every path tried is named, with the command that writes them
    for fmt, tried in (("auto", ["0.json", "0.pkl"]), ("json", ["0.json"])):
        with pytest.raises(MissingFileError) as err:
            fewshot.open_fold_split(_cfg("", only_pkl, fmt), "test", 0, **kw)
        message = str(err.value)
        assert all(str(only_pkl / "5way_2shot" / name) in message for name in tried), message
        assert "mm3d data fewshot" in message and ("0.pkl" in message) == (fmt == "auto")
        assert fewshot.fold_classes(_cfg("", only_pkl, fmt), 0, allow_pickle=True) is None
    assert isinstance(err.value, FileNotFoundError)


def test_real_modelnet40_pkl_folds(realdata, tmp_path):
    """Folds of the real ModelNet40 sample in the official layout: FPS points with normals per shape
    (256 here, to keep CPU farthest-point sampling short; 8192 by default) and the true ModelNet40
    labels as keys (airplane 0, chair 8, lamp 19, vase 37)."""
    root = realdata / "pointcloud" / "modelnet40_sample"
    kw = dict(ways=[2], shots=[2], folds=2, test_per_class=1, cache_dir=tmp_path / "cache", cache_points=256)
    fewshot.write_fewshot_folds(root, tmp_path / "fs", **kw)
    fewshot.write_fewshot_folds(root, tmp_path / "fs", fmt="pkl", **kw)
    true_label = {"airplane": 0, "chair": 8, "lamp": 19, "vase": 37}
    for k in (0, 1):
        folded = fewshot.read_fold(tmp_path / "fs" / "2way_2shot" / f"{k}.json")
        path = tmp_path / "fs" / "2way_2shot" / f"{k}.pkl"
        with path.open("rb") as f:  # the official loader's read
            official = pickle.load(f)
        for split, n in (("train", 4), ("test", 2)):
            assert len(official[split]) == n
            for (points, label, key), (shape, json_label) in zip(official[split], folded[split]):
                assert points.shape == (256, 6) and points.dtype == np.float32 and label == json_label
                assert type(key) is np.int32 and key == true_label[shape.rsplit("_", 1)[0]]
                assert np.linalg.norm(points[:, :3], axis=1).max() == pytest.approx(1.0, abs=1e-5)
                assert_close(np.linalg.norm(points[:, 3:], axis=1), np.ones(256), atol=1e-3)
            ds = PickledFewShot(path, split, npoints=128, allow_pickle=True, way=2,
                                shape_names=root / "modelnet40_shape_names.txt")
            assert ds.classes == folded["classes"] and ds.labels.tolist() == [lab for _, lab in folded[split]]
