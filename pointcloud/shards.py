"""Point clouds in prepared shards: the preparers of ``mm3d data prepare`` and the datasets over shards.

Preparing (``mm3d data prepare --kind KIND ...`` or ``mm3d data prepare CONFIG --out DIR``) turns a
dataset in its official layout into WebDataset shards (:mod:`mm3d.shards`), one sample per cloud:
``<key>.npy`` (``np.save`` bytes of a float32 (N, C) array) and ``<key>.json``. Each preparer stores
exactly the array the file dataset of :mod:`mm3d.pointcloud.datasets` builds its items from, so a
dataset over the shards gives the same items as the files for the same seed:

================  ============================  ==================================================
kind              stored ``npy``                what the json adds
================  ============================  ==================================================
``shapenet55``    the file's points, (N, 3)     ``label`` (synset index), ``synset``
``modelnet``      the FPS cache, (P, 3 or 6)    ``label``, ``id``, ``class``, ``fps`` = P: farthest
                                                point sampling of the file's points down to
                                                ``cache_points`` and the unit-sphere normalisation,
                                                done once here instead of in ModelNet's cache
``scanobjectnn``  the cloud's x y z, (2048, 3)  ``label``, ``row`` of the h5 file, ``variant``
``pointfolder``   the file's x y z, (N, 3)      ``label`` (class sub-folder index, or -1), ``path``
================  ============================  ==================================================

Every json also holds ``source`` (the original file), ``line`` (where it is listed) and ``points``
(N). An input that cannot be read (or is of the wrong shape, or non-finite where the file dataset
refuses it) raises in :meth:`convert`, so the driver lists it in ``prepare_report.json`` and the
manifest's ``skipped``; the datasets here count those as left out (``dropped``), under the same
``data.max_failure_ratio`` as the file datasets.

Training from shards (``data.format: shards``, ``data.shards``; see :func:`pretrain_shard_datasets`
and :func:`cls_shard_datasets`): :class:`ShapeNet55Shards`, :class:`ModelNetShards`,
:class:`ScanObjectNNShards` and :class:`PointFolderShards` read samples through
:class:`~mm3d.shards.ShardSamples` (wids, random access) and expose ``shard_set``, so the trainer
draws them with the shard-local :class:`~mm3d.shards.ShardSampler`. A sample that cannot be decoded
(unreadable npy, wrong shape, NaN) is named by (shard, key) and replaced by the next readable one,
counted by the dataset's :class:`~mm3d.datacheck.FailureBudget`.
"""

from __future__ import annotations

import io
import json
import logging
import re
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mm3d.config import ConfigError
from mm3d.datacheck import BadSample, FailureBudget, read_or_replace
from mm3d.registry import PREPARERS, PrepareItem
from mm3d.shards import ShardSamples, ShardSet, has_split, resolve_shards, safe_key, split_folder
from mm3d.pointcloud.datasets import SCANOBJECTNN_CLASSES, SCANOBJECTNN_FILES, EpochDraws, _resample
from mm3d.pointcloud.files import MISSING, modelnet_classes, modelnet_shapes, read_list_lines
from mm3d.pointcloud.io import bin_columns_for, read_points, read_text_points
from mm3d.pointcloud.transforms import normalize_unit_sphere, sample_indices

log = logging.getLogger(__name__)

MODALITY = "pointcloud"
#: the extensions a folder of scans is read with by default: those of PointFolder, so that shards and
#: files give the same items (``.txt``/``.csv`` are opt-in: a folder often holds notes as .txt)
FOLDER_EXTENSIONS = (".ply", ".pcd", ".xyz", ".npy", ".bin")

# ----------------------------------------------------------------------------------------------
# Helpers shared by the preparers
# ----------------------------------------------------------------------------------------------


def encode_sample(points: np.ndarray, meta: dict[str, Any]) -> dict[str, bytes]:
    """``{"npy": np.save bytes of float32 (N, C) points, "json": meta + points=N}``."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, points, allow_pickle=False)
    return {"npy": buf.getvalue(), "json": json.dumps({**meta, "points": int(points.shape[0])},
                                                    sort_keys=True).encode()}


def _under(root: str | Path | None, path: str | Path) -> Path:
    """`path` as given when absolute, existing or without a root; else under `root` (``--root``)."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() or not root else Path(root) / p


def _arg(args: Any, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


class _PointPreparer:
    """What every point preparer shares: the modality, the tasks whose configs it reads and the
    ``--nonfinite`` option."""

    modality: ClassVar[str] = MODALITY
    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ("pointmae_pretrain", "pointmae_classify", "pointmae_svm")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--nonfinite", choices=("drop", "error"), default=None,
                            help="point clouds: drop points with NaN/inf (default, as data.drop_nonfinite) or "
                                 "refuse the file")

    def handles(self, cfg: Any) -> bool:
        """Whether this preparer writes the shards of `cfg` (its ``data.dataset``)."""
        return PREPARER_OF_DATASET.get(getattr(cfg.data, "dataset", ""), "") == self.name


def _drop_nonfinite(args: Any) -> bool:
    return _arg(args, "nonfinite", "drop") == "drop"


# ----------------------------------------------------------------------------------------------
# ShapeNet-55
# ----------------------------------------------------------------------------------------------


def _shapenet_synsets(lists: Sequence[Path]) -> list[str]:
    """The sorted synsets named in `lists` and in ``train.txt`` / ``test.txt`` beside them (the label
    order of :class:`~mm3d.pointcloud.datasets.ShapeNet55`); a name without ``-`` is an error."""
    files = dict.fromkeys([*lists, *(p.parent / f"{s}.txt" for p in lists for s in ("train", "test"))])
    synsets = set()
    for p in files:
        if not p.is_file() and p not in lists:
            continue
        for line_no, name in read_list_lines(p):
            if "-" not in name:
                raise ValueError(f"{p}, line {line_no}: {name!r} is not '<synset>-<model id>.npy'")
            synsets.add(name.split("-", 1)[0])
    return sorted(synsets)


class ShapeNet55Preparer(_PointPreparer):
    """ShapeNet-55 (``shapenet_pc/*.npy`` + list files): each listed file's (N, 3) points as read.

    ``--root`` is the ShapeNet55-34 folder, ``--list`` a list file (``ShapeNet-55/train.txt``, relative
    to the root or not). The label is the synset's index among the sorted synsets of ``train.txt``
    and ``test.txt`` beside the list (as :class:`~mm3d.pointcloud.datasets.ShapeNet55` numbers them).
    CONFIG form: ``data.split_dir`` lists; with ``data.use_both_splits`` train is test + train and
    there is no test split.
    """

    name = "shapenet55"

    def _lists(self, x: Any, split: str = "train") -> tuple[Path, list[Path]]:
        if hasattr(x, "data"):  # a run config
            d = x.data
            names = {"train": ["test", "train"] if d.use_both_splits else ["train"],
                     "test": [] if d.use_both_splits else ["test"]}.get(split, [])
            return Path(d.root), [Path(d.root) / d.split_dir / f"{s}.txt" for s in names]
        lst = _under(x.root, x.list)
        return (Path(x.root) if x.root else lst.parent.parent), [lst]

    def settings(self, args: Any) -> dict[str, Any]:
        return {"drop_nonfinite": _drop_nonfinite(args)}

    def classes(self, x: Any) -> list[str]:
        """The synsets, in label order."""
        root, lists = self._lists(x, "train")
        if not lists:
            root, lists = self._lists(x, "test")
        return _shapenet_synsets(lists)

    def items(self, args: Any) -> list[PrepareItem]:
        return self._items(*self._lists(args))

    def _items(self, root: Path, lists: Sequence[Path]) -> list[PrepareItem]:
        pc_dir = root / "shapenet_pc"
        if not pc_dir.is_dir():
            raise FileNotFoundError(f"ShapeNet55: point folder not found: {pc_dir}")
        index = {s: i for i, s in enumerate(_shapenet_synsets(lists))}
        items = []
        for p in lists:
            for line_no, name in read_list_lines(p):
                synset = name.split("-", 1)[0]
                items.append(PrepareItem(safe_key(len(items), Path(name).stem), str(pc_dir / name),
                                         f"{p}:{line_no}", {"label": index[synset], "synset": synset}))
        return items

    def convert(self, item: PrepareItem, settings: dict[str, Any]) -> dict[str, bytes]:
        path = Path(item.source)
        if not path.is_file():
            raise FileNotFoundError(MISSING)
        pts = read_points(path, drop_nonfinite=settings["drop_nonfinite"])[:, :3]
        return encode_sample(pts, {"label": item.info["label"], "synset": item.info["synset"],
                                   "source": item.source, "line": item.line})

    def from_config(self, cfg: Any, split: str, args: Any = None
                    ) -> tuple[list[PrepareItem], dict[str, Any]] | None:
        _require_dataset(cfg, self.name, args)
        root, lists = self._lists(cfg, split)
        if not lists:
            return None
        return self._items(root, lists), {"drop_nonfinite": bool(cfg.data.drop_nonfinite)}


# ----------------------------------------------------------------------------------------------
# ModelNet40 / ModelNet10
# ----------------------------------------------------------------------------------------------


def modelnet_cache_cloud(arr: np.ndarray, cache_points: int, channels: int, *, where: str = "") -> np.ndarray:
    """One row of ModelNet's FPS cache: (N, >= C) file points -> (cache_points, C) float32 points, the
    farthest-point sample from point 0 centred and scaled to the unit sphere (x y z only; normals kept),
    as :meth:`~mm3d.pointcloud.datasets.ModelNet._build_cache` computes it for a batch of files."""
    if arr.shape[1] < channels:
        raise ValueError(f"{where}: {arr.shape[1]} columns, need {channels} "
                         f"(x,y,z{',nx,ny,nz' if channels == 6 else ''})")
    if arr.shape[0] < cache_points:
        raise ValueError(f"{where}: {arr.shape[0]} points, fewer than cache_points={cache_points}; "
                         f"lower cache_points")
    batch = torch.from_numpy(np.ascontiguousarray(arr[:, :channels]))[None]
    idx = sample_indices(batch, cache_points, "fps")
    picked = torch.gather(batch, 1, idx.unsqueeze(-1).expand(-1, -1, channels))
    return normalize_unit_sphere(picked)[0].numpy()


class ModelNetPreparer(_PointPreparer):
    """ModelNet40/10 (``modelnet40_normal_resampled``): each shape's FPS cache row (see the module
    docstring), so training from the shards never runs the farthest point sampling.

    ``--root`` is the ModelNet folder, ``--list`` ``modelnet40_train.txt`` (or ``modelnet10_*``; the
    prefix picks the class list ``modelnet<n>_shape_names.txt``). Options: ``--cache-points`` (8192:
    what both the 1k and the 8k protocols read), ``--normals`` (keep nx ny nz: C = 6). CONFIG form:
    ``data.cache_points``; a few-shot config prepares the ModelNet40 train and test splits its JSON
    folds pick shapes from.
    """

    name = "modelnet"

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--cache-points", type=int, default=None,
                            help="ModelNet: farthest points kept per shape (default 8192)")
        parser.add_argument("--normals", action="store_true", default=None,
                            help="ModelNet: keep the normals (x y z nx ny nz per point)")

    def _source(self, x: Any, split: str = "train") -> tuple[Path, Path, int]:
        """(root, list file, number of classes)."""
        if hasattr(x, "data"):
            d = x.data
            n = 40 if d.dataset == "modelnet40_fewshot" else int(d.dataset[-2:])
            return Path(d.root), Path(d.root) / f"modelnet{n}_{split}.txt", n
        list_file = _under(x.root, x.list)
        root = Path(x.root) if x.root else list_file.parent
        m = re.match(r"modelnet(10|40)_", list_file.name)
        if m is None:
            raise ValueError(f"--list {list_file}: expected modelnet40_<split>.txt or modelnet10_<split>.txt "
                             f"(the prefix picks the class list)")
        return root, list_file, int(m.group(1))

    def settings(self, args: Any) -> dict[str, Any]:
        cache_points = int(_arg(args, "cache_points", 8192))
        if cache_points < 1:
            raise ValueError(f"--cache-points must be positive, got {cache_points}")
        return {"cache_points": cache_points, "sample": "fps", "normals": bool(_arg(args, "normals", False)),
                "num_classes": self._source(args)[2], "drop_nonfinite": _drop_nonfinite(args)}

    def classes(self, x: Any) -> list[str]:
        root, _, n = self._source(x)
        return modelnet_classes(root, n)

    def items(self, args: Any) -> list[PrepareItem]:
        return self._items(*self._source(args))

    def _items(self, root: Path, list_file: Path, num_classes: int) -> list[PrepareItem]:
        classes = modelnet_classes(root, num_classes)
        index = {c: i for i, c in enumerate(classes)}
        return [PrepareItem(safe_key(i, shape_id), str(root / cls / f"{shape_id}.txt"), f"{list_file}:{line_no}",
                            {"label": index[cls], "id": shape_id, "class": cls})
                for i, (line_no, shape_id, cls) in enumerate(modelnet_shapes(root, num_classes, list_file, classes))]

    def convert(self, item: PrepareItem, settings: dict[str, Any]) -> dict[str, bytes]:
        path = Path(item.source)
        if not path.is_file():
            raise FileNotFoundError(MISSING)
        channels = 6 if settings["normals"] else 3
        arr = read_text_points(path, drop_nonfinite=settings["drop_nonfinite"])
        cloud = modelnet_cache_cloud(arr, settings["cache_points"], channels, where=str(path))
        info = item.info
        return encode_sample(cloud, {"label": info["label"], "id": info["id"], "class": info["class"],
                                     "source": item.source, "line": item.line, "fps": settings["cache_points"],
                                     "columns": "x y z nx ny nz" if channels == 6 else "x y z",
                                     "normalized": "unit sphere"})

    def from_config(self, cfg: Any, split: str, args: Any = None
                    ) -> tuple[list[PrepareItem], dict[str, Any]] | None:
        _require_dataset(cfg, self.name, args)
        if split not in ("train", "test"):
            return None
        root, list_file, n = self._source(cfg, split)
        settings = {"cache_points": int(cfg.data.cache_points), "sample": "fps",
                    "normals": bool(_arg(args, "normals", False)), "num_classes": n,
                    "drop_nonfinite": bool(cfg.data.drop_nonfinite)}
        return self._items(root, list_file, n), settings


# ----------------------------------------------------------------------------------------------
# ScanObjectNN
# ----------------------------------------------------------------------------------------------

_H5_OPEN: dict[str, Any] = {}  # path -> open h5py.File, one per file in each worker process


def _h5(path: str) -> Any:
    import h5py

    f = _H5_OPEN.get(path)
    if f is None:
        f = _H5_OPEN[path] = h5py.File(path, "r")
    return f


def _scan_variant(path: Path) -> tuple[str, str] | None:
    """(variant, split) of an official ScanObjectNN h5 file name, or None."""
    for variant, (folder, train_file, test_file) in SCANOBJECTNN_FILES.items():
        for split, name in (("train", train_file), ("test", test_file)):
            if path.parent.name == folder and path.name == name:
                return variant, split
    return None


class ScanObjectNNPreparer(_PointPreparer):
    """ScanObjectNN (h5 release, any variant): each cloud's x y z, (N, 3) (2048 in the release).

    ``--root`` is the ScanObjectNN folder, ``--list`` the h5 file (``main_split/training_objectdataset.h5``;
    its folder and name give the variant). A cloud with a label outside the 15 classes or a non-finite
    coordinate is refused (listed), as :class:`~mm3d.pointcloud.datasets.ScanObjectNN` leaves it out.
    CONFIG form: ``data.scan_variant``.
    """

    name = "scanobjectnn"

    def _path(self, x: Any, split: str = "train") -> tuple[Path, str]:
        if hasattr(x, "data"):
            folder, train_file, test_file = SCANOBJECTNN_FILES[x.data.scan_variant]
            return Path(x.data.root) / folder / (train_file if split == "train" else test_file), x.data.scan_variant
        path = _under(x.root, x.list)
        known = _scan_variant(path)
        return path, known[0] if known else ""

    def settings(self, args: Any) -> dict[str, Any]:
        return {"variant": self._path(args)[1], "num_classes": len(SCANOBJECTNN_CLASSES)}

    def classes(self, x: Any) -> list[str]:
        return list(SCANOBJECTNN_CLASSES)

    def items(self, args: Any) -> list[PrepareItem]:
        return self._items(self._path(args)[0])

    def _items(self, path: Path) -> list[PrepareItem]:
        import h5py

        if not path.is_file():
            raise FileNotFoundError(f"ScanObjectNN file not found: {path}")
        with h5py.File(path, "r") as f:
            for k in ("data", "label"):
                if k not in f:
                    raise ValueError(f"{path}: no {k!r} dataset (keys: {list(f.keys())})")
            shape = f["data"].shape
            labels = np.asarray(f["label"]).reshape(-1).astype(np.int64)
        if len(shape) != 3 or shape[2] < 3:
            raise ValueError(f"{path}: 'data' must be (M, N, 3), got shape {shape}")
        if labels.shape[0] != shape[0]:
            raise ValueError(f"{path}: {labels.shape[0]} labels for {shape[0]} clouds")
        return [PrepareItem(safe_key(j, f"cloud{j}"), str(path), f"cloud {j}", {"row": j, "label": int(labels[j])})
                for j in range(shape[0])]

    def convert(self, item: PrepareItem, settings: dict[str, Any]) -> dict[str, bytes]:
        row, label = item.info["row"], item.info["label"]
        if not 0 <= label < settings["num_classes"]:
            raise ValueError(f"label {label} is outside the {settings['num_classes']} classes")
        cloud = np.asarray(_h5(item.source)["data"][row], dtype=np.float32)
        if not np.isfinite(cloud).all():
            raise ValueError("non-finite coordinates")
        return encode_sample(cloud[:, :3], {"label": label, "row": row, "variant": settings["variant"],
                                            "source": item.source, "line": item.line})

    def from_config(self, cfg: Any, split: str, args: Any = None
                    ) -> tuple[list[PrepareItem], dict[str, Any]] | None:
        _require_dataset(cfg, self.name, args)
        if split not in ("train", "test"):
            return None
        path, variant = self._path(cfg, split)
        return self._items(path), {"variant": variant, "num_classes": len(SCANOBJECTNN_CLASSES)}


# ----------------------------------------------------------------------------------------------
# A folder of scans
# ----------------------------------------------------------------------------------------------


def folder_files(root: Path, extensions: Sequence[str]) -> list[Path]:
    """The point files under `root` with one of `extensions`, sorted (as PointFolder lists them)."""
    if not root.is_dir():
        raise FileNotFoundError(f"point folder not found: {root}")
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise ValueError(f"no {', '.join(sorted(exts))} files under {root}")
    return files


def folder_classes(root: Path, files: Sequence[Path]) -> list[str]:
    """The class sub-folders: when every file lies in a sub-folder of `root`, the sorted names of the
    first level; else [] (unlabelled)."""
    parts = [p.relative_to(root).parts if p.is_relative_to(root) else () for p in files]
    return sorted({q[0] for q in parts}) if all(len(q) > 1 for q in parts) else []


class PointFolderPreparer(_PointPreparer):
    """A folder of scans (``.ply .pcd .xyz .npy .bin``, and ``.txt``/``.csv`` with ``--extensions``):
    each file's x y z, (N, 3), read with :func:`~mm3d.pointcloud.io.read_points`.

    ``--list`` is the folder (every file under it, as :class:`~mm3d.pointcloud.datasets.PointFolder`
    finds them), or a text file naming one scan a line (relative to ``--root``, default the list's
    folder). When every file lies in a sub-folder of the root, the first-level sub-folder is the class
    (label = its index among the sorted names); else the label is -1. Options: ``--extensions``,
    ``--bin-columns`` (raw ``.bin``; resolved as PointFolder does). CONFIG form (``data.dataset:
    folder``): the train split only (its test split re-reads it).
    """

    name = "pointfolder"

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--extensions", default=None,
                            help=f"point folder: comma-separated file extensions (default "
                                 f"{','.join(FOLDER_EXTENSIONS)}; add .txt for text scans)")
        parser.add_argument("--bin-columns", type=int, default=None,
                            help="point folder: float32 values per point in raw .bin files (default 4)")

    def _files(self, x: Any) -> tuple[Path, list[tuple[Path, str]], list[str], int | None]:
        """(root, [(file, where listed)], extensions, bin_columns option)."""
        if hasattr(x, "data"):  # a run config: data.root is the folder
            root, exts, bin_columns = Path(x.data.root), list(FOLDER_EXTENSIONS), x.data.bin_columns
            return root, [(p, "") for p in folder_files(root, exts)], exts, bin_columns
        exts = _arg(x, "extensions", FOLDER_EXTENSIONS)
        exts = [e.strip() for e in exts.split(",") if e.strip()] if isinstance(exts, str) else list(exts)
        bin_columns = _arg(x, "bin_columns", None)
        listed = _under(x.root, x.list)
        if listed.is_dir():
            return listed, [(p, "") for p in folder_files(listed, exts)], exts, bin_columns
        root = Path(x.root) if x.root else listed.parent
        return root, [(_under(root, name), f"{listed}:{n}") for n, name in read_list_lines(listed)], exts, bin_columns

    def _settings(self, x: Any, drop_nonfinite: bool) -> dict[str, Any]:
        _, files, exts, bin_columns = self._files(x)
        return {"extensions": exts, "bin_columns": bin_columns_for([p for p, _ in files], bin_columns),
                "drop_nonfinite": drop_nonfinite}

    def settings(self, args: Any) -> dict[str, Any]:
        return self._settings(args, _drop_nonfinite(args))

    def classes(self, x: Any) -> list[str] | None:
        root, files, _, _ = self._files(x)
        return folder_classes(root, [p for p, _ in files]) or None

    def items(self, args: Any) -> list[PrepareItem]:
        return self._items(*self._files(args)[:2])

    def _items(self, root: Path, files: Sequence[tuple[Path, str]]) -> list[PrepareItem]:
        index = {c: i for i, c in enumerate(folder_classes(root, [p for p, _ in files]))}
        items = []
        for i, (p, where) in enumerate(files):
            rel = p.relative_to(root) if p.is_relative_to(root) else p
            items.append(PrepareItem(safe_key(i, p.stem), str(p), where,
                                     {"label": index[rel.parts[0]] if index else -1, "path": rel.as_posix()}))
        return items

    def convert(self, item: PrepareItem, settings: dict[str, Any]) -> dict[str, bytes]:
        pts = read_points(item.source, bin_columns=settings["bin_columns"],
                          drop_nonfinite=settings["drop_nonfinite"])[:, :3]
        return encode_sample(pts, {"label": item.info["label"], "path": item.info["path"],
                                   "source": item.source, "line": item.line})

    def from_config(self, cfg: Any, split: str, args: Any = None
                    ) -> tuple[list[PrepareItem], dict[str, Any]] | None:
        _require_dataset(cfg, self.name, args)
        if _arg(args, "extensions", None) is not None:
            raise ConfigError("--extensions applies to --list folders; a data.dataset=folder config reads the "
                              f"extensions of PointFolder ({', '.join(FOLDER_EXTENSIONS)}), as its files do")
        if split != "train":  # a folder has no held-out split: its test split re-reads the train shards
            return None
        return self._items(*self._files(cfg)[:2]), self._settings(cfg, bool(cfg.data.drop_nonfinite))


#: data.dataset of a point config -> the preparer that writes its shards
PREPARER_OF_DATASET = {"shapenet55": "shapenet55", "modelnet40": "modelnet", "modelnet10": "modelnet",
                       "modelnet40_fewshot": "modelnet", "scanobjectnn": "scanobjectnn", "folder": "pointfolder"}


def _require_dataset(cfg: Any, kind: str, args: Any = None) -> None:
    """Refuse a config of another dataset, and command-line options that contradict the config's keys
    (CONFIG form: the config decides; ``--nonfinite``, ``--cache-points``, ``--bin-columns``)."""
    conflicts = {"nonfinite": ("drop_nonfinite", lambda v: v == "drop"), "cache_points": ("cache_points", int),
                 "bin_columns": ("bin_columns", int)}
    for option, (key, as_value) in conflicts.items():
        given = getattr(args, option, None) if args is not None else None
        if given is not None and hasattr(cfg.data, key) and as_value(given) != getattr(cfg.data, key):
            raise ConfigError(f"--{option.replace('_', '-')} {given} contradicts the config's data.{key}="
                              f"{getattr(cfg.data, key)}; with a CONFIG, set data.{key} as an override instead")
    dataset = getattr(cfg.data, "dataset", "")
    if PREPARER_OF_DATASET.get(dataset) != kind:
        wants = sorted(d for d, k in PREPARER_OF_DATASET.items() if k == kind)
        raise ConfigError(f"the {kind} preparer reads configs with data.dataset {' or '.join(wants)}, "
                          f"not {dataset!r}" + (f" (use --kind {PREPARER_OF_DATASET[dataset]})"
                                                if dataset in PREPARER_OF_DATASET else ""))


for _p in (ShapeNet55Preparer(), ModelNetPreparer(), ScanObjectNNPreparer(), PointFolderPreparer()):
    PREPARERS.add(_p.name, _p)


# ----------------------------------------------------------------------------------------------
# Datasets over shards
# ----------------------------------------------------------------------------------------------


def read_json_members(shard_set: ShardSet) -> list[dict[str, Any]]:
    """The parsed ``<key>.json`` of every sample of `shard_set`, in sample order, read from the tar
    headers and json members only (the npy members are skipped, not read)."""
    import tarfile

    out: list[dict[str, Any]] = []
    for url, count in zip(shard_set.urls, shard_set.counts):
        keys: dict[str, dict[str, Any] | None] = {}
        try:
            with tarfile.open(url, "r:") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    key = member.name[:len(member.name) - len(base)] + base.split(".", 1)[0]
                    keys.setdefault(key, None)
                    if member.isfile() and base.split(".", 1)[-1] == "json":
                        f = tar.extractfile(member)
                        keys[key] = json.loads(f.read()) if f is not None else None
        except (OSError, tarfile.TarError, ValueError) as e:
            raise ValueError(f"{url}: cannot read the json members of the shard ({e})") from e
        if len(keys) != count:
            raise ValueError(f"{url}: {len(keys)} samples, the manifest says {count}")
        for key, meta in keys.items():
            if not isinstance(meta, dict):
                raise ValueError(f"{url}, key {key}: no readable .json member")
            out.append(meta)
    return out


def check_shard_meta(shard_set: ShardSet, kind: str, what: str) -> dict[str, Any]:
    """The manifest's ``mm3d`` section of `shard_set` after checking that it holds point clouds of
    preparer `kind`; shards without a manifest (plain tars) pass with a warning. `what` names the
    config key in messages (``data.shards``)."""
    meta = shard_set.meta
    if not meta:
        log.warning("%s=%s: no mm3d manifest beside the shards; their kind cannot be checked (expected %s "
                    "point clouds)", what, shard_set.spec, kind)
        return {}
    modality, found = meta.get("modality"), meta.get("kind")
    if modality != MODALITY:
        raise ConfigError(f"{what}={shard_set.spec}: these shards hold {modality or 'unknown'} samples (manifest "
                          f"mm3d.modality), not point clouds")
    if found != kind:
        raise ConfigError(f"{what}={shard_set.spec}: these shards were prepared by the {found!r} preparer "
                          f"(manifest mm3d.kind); this dataset reads {kind!r} shards (mm3d data prepare --kind "
                          f"{kind} ...)")
    return meta


class PointShards(Dataset):
    """Base of the datasets over prepared point shards (see the module docstring).

    Subclasses set :attr:`kind` (the preparer), :attr:`noun` and :meth:`_item`, the item built from
    a sample's (N, C) points and json exactly as the file dataset builds it from the same array.

    Attributes: ``shard_set`` (the trainer's shard-local sampler reads it), ``meta`` (the manifest's
    ``mm3d`` section), ``settings``, ``dropped`` (the inputs the prepare left out, as
    :class:`~mm3d.datacheck.BadSample`), ``failed`` (samples replaced in this process).

    Args:
        shards: a folder, manifest, brace pattern or prepared root (:func:`mm3d.shards.resolve_shards`),
            or a resolved :class:`~mm3d.shards.ShardSet`.
        split: the split of a prepared root.
        what: the config key that named the shards, for messages.
        max_failure_ratio: bad samples (left out at prepare time or unreadable now) tolerated.
    """

    kind: ClassVar[str] = ""
    noun: ClassVar[str] = "point-cloud samples"
    channels: ClassVar[int | None] = 3  # columns every sample must have (None: 3 or more)

    def __init__(self, shards: str | Path | ShardSet, *, split: str = "train", what: str = "data.shards",
                 max_failure_ratio: float = 0.0) -> None:
        self.samples = ShardSamples(shards, split=split)
        self.shard_set = self.samples.shard_set
        self.meta = check_shard_meta(self.shard_set, self.kind, what)
        self.settings: dict[str, Any] = dict(self.meta.get("settings") or {})
        if self.meta.get("classes"):
            self.classes = list(self.meta["classes"])
        self.dropped = [BadSample(str(s.get("file", "")), str(s.get("line", "")), str(s.get("reason", "")))
                        for s in self.meta.get("skipped") or []]
        self.budget = FailureBudget(len(self.samples), max_failure_ratio, noun=self.noun, logger=log)
        self.budget.leave_out(self.dropped, len(self.samples) + len(self.dropped))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def failed(self) -> dict[int, str]:
        return self.budget.failed

    @cached_property
    def sample_meta(self) -> list[dict[str, Any]]:
        """The json of every sample (read once, from the json members only)."""
        return read_json_members(self.shard_set)

    def sample_source(self, i: int) -> tuple[str, str]:
        url, key = self.samples.source(i)
        return url, f"key {key}" if key else f"sample {i}"

    def load(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Sample `i` decoded and checked: ((N, C) float32 points, its json). ValueError / OSError
        naming (shard, key) for a missing member, an unreadable npy, a wrong shape or dtype, a
        non-finite value, a point count other than the json's."""
        sample = self.samples[i]
        url, key = sample["__shard__"], sample["__key__"]

        def bad(why: str) -> ValueError:
            return ValueError(f"{url}, key {key}: {why}")

        missing = [ext for ext in ("npy", "json") if ext not in sample]
        if missing:
            raise bad(f"no .{' or .'.join(missing)} member (has {sorted(k for k in sample if not k.startswith('__'))})")
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"unreadable .json ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("label", -1), int):
            raise bad(f".json must be an object with an integer 'label', got {str(meta)[:80]}")
        src = f" (prepared from {meta['source']})" if meta.get("source") else ""
        try:
            arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise bad(f"unreadable .npy ({e}){src}") from None
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[1] < 3 or (
                self.channels is not None and arr.shape[1] != self.channels) or arr.shape[0] == 0:
            cols = self.channels if self.channels is not None else "C>=3"
            raise bad(f"expected a float32 (N, {cols}) array, got {arr.dtype} {arr.shape}{src}")
        if "points" in meta and meta["points"] != arr.shape[0]:
            raise bad(f"{arr.shape[0]} points, the .json says {meta['points']}{src}")
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            raise bad(f"non-finite value (NaN or inf) at row {int(np.flatnonzero(~finite)[0])}{src}")
        return arr, meta

    def check_sample(self, i: int) -> dict[str, torch.Tensor]:
        """Item `i` read directly (no replacement); raises when its sample is bad."""
        arr, meta = self.load(i)
        return self._item(i, arr, meta)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i, (arr, meta) = read_or_replace(i, len(self), self.load, self.budget, self.sample_source, (ValueError, OSError))
        return self._item(i, arr, meta)

    def _item(self, i: int, arr: np.ndarray, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ShapeNet55Shards(EpochDraws, PointShards):
    """ShapeNet-55 from ``shapenet55`` shards: the items of :class:`~mm3d.pointcloud.datasets.ShapeNet55`
    (`npoints` random points of the file without replacement, centred and scaled to the unit sphere;
    ``label`` the synset index; ``seed``: fixed per-item sampling)."""

    kind = "shapenet55"
    noun = "ShapeNet-55 samples"

    def __init__(self, shards: str | Path | ShardSet, npoints: int = 1024, *, seed: int | None = None,
                 **kw: Any) -> None:
        super().__init__(shards, **kw)
        self.npoints, self.seed = int(npoints), seed
        self.synsets = list(self.meta.get("classes") or [])

    def _item(self, i: int, arr: np.ndarray, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        pts = torch.from_numpy(arr)
        idx = _resample(pts.shape[0], self.npoints, self.item_generator(i))
        return {"points": normalize_unit_sphere(pts[idx]), "label": torch.tensor(meta["label"], dtype=torch.long)}


class ModelNetShards(PointShards):
    """ModelNet40/10 from ``modelnet`` shards (the FPS cache, computed at prepare time): the items of
    :class:`~mm3d.pointcloud.datasets.ModelNet`, the first `npoints` cached points (+ ``normals``).

    The shards must have been prepared with `cache_points` points per shape (an FPS prefix of another
    size is not the same sample: the normalisation differs) and the class list of `num_classes`, and
    with normals when `use_normals`. ``ids`` and ``labels`` (read from the json members) serve the
    few-shot folds and the stratified validation split.
    """

    kind = "modelnet"
    noun = "ModelNet samples"
    channels = None

    def __init__(self, shards: str | Path | ShardSet, *, num_classes: int = 40, npoints: int = 1024,
                 cache_points: int = 8192, use_normals: bool = False, what: str = "data.shards", **kw: Any) -> None:
        super().__init__(shards, what=what, **kw)
        s = self.settings
        if s:
            if s.get("cache_points") != cache_points:
                raise ConfigError(f"{what}={self.shard_set.spec}: prepared with cache_points={s.get('cache_points')}, "
                                  f"the config has data.cache_points={cache_points}; prepare again with "
                                  f"--cache-points {cache_points} or set data.cache_points={s.get('cache_points')}")
            if s.get("num_classes", num_classes) != num_classes:
                raise ConfigError(f"{what}={self.shard_set.spec}: prepared from the ModelNet{s['num_classes']} lists, "
                                  f"the config reads ModelNet{num_classes}")
            if use_normals and not s.get("normals"):
                raise ConfigError(f"{what}={self.shard_set.spec}: prepared without normals (--normals), the config "
                                  f"uses them")
        if not 0 < npoints <= cache_points:
            raise ValueError(f"ModelNet npoints={npoints} must be in [1, cache_points={cache_points}]")
        self.channels_in = 6 if s.get("normals") else 3
        self.npoints, self.use_normals, self.cache_points = int(npoints), bool(use_normals), int(cache_points)
        self.root = self.shard_set.spec
        if not hasattr(self, "classes"):
            raise ConfigError(f"{what}={self.shard_set.spec}: the manifest names no classes (mm3d.classes)")

    @cached_property
    def ids(self) -> list[str]:
        return [str(m.get("id", "")) for m in self.sample_meta]

    @cached_property
    def labels(self) -> torch.Tensor:
        return torch.tensor([int(m["label"]) for m in self.sample_meta], dtype=torch.long)

    def _item(self, i: int, arr: np.ndarray, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        if arr.shape[0] < self.npoints:
            raise ValueError(f"{self.sample_source(i)[0]}: {arr.shape[0]} points stored, npoints={self.npoints}")
        pts = torch.from_numpy(arr[:self.npoints])
        item = {"points": pts[:, :3], "label": torch.tensor(meta["label"], dtype=torch.long)}
        if self.use_normals:
            item["normals"] = pts[:, 3:6]
        return item


class ScanObjectNNShards(EpochDraws, PointShards):
    """ScanObjectNN from ``scanobjectnn`` shards: the items of
    :class:`~mm3d.pointcloud.datasets.ScanObjectNN` (all stored points, or a random `npoints` of them,
    optionally re-normalised). The variant recorded at prepare time must be `variant`."""

    kind = "scanobjectnn"
    noun = "ScanObjectNN clouds"

    def __init__(self, shards: str | Path | ShardSet, variant: str = "OBJ_BG", npoints: int | None = 2048, *,
                 normalize: bool = False, seed: int | None = None, what: str = "data.shards", **kw: Any) -> None:
        super().__init__(shards, what=what, **kw)
        found = self.settings.get("variant")
        if found and found != variant:
            raise ConfigError(f"{what}={self.shard_set.spec}: these are ScanObjectNN {found} shards, the config "
                              f"reads {variant} (data.scan_variant)")
        self.classes = list(SCANOBJECTNN_CLASSES)
        self.npoints, self.normalize, self.seed = npoints, bool(normalize), seed

    def _item(self, i: int, arr: np.ndarray, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        pts = torch.from_numpy(arr)
        npoints = pts.shape[0] if self.npoints is None else self.npoints
        if npoints > pts.shape[0]:
            raise ValueError(f"{self.sample_source(i)[0]}: npoints={npoints} exceeds the {pts.shape[0]} stored points")
        if npoints < pts.shape[0]:
            pts = pts[_resample(pts.shape[0], npoints, self.item_generator(i))]
        if self.normalize:
            pts = normalize_unit_sphere(pts)
        return {"points": pts.clone(), "label": torch.tensor(meta["label"], dtype=torch.long)}


class PointFolderShards(EpochDraws, PointShards):
    """A folder of scans from ``pointfolder`` shards: the items of
    :class:`~mm3d.pointcloud.datasets.PointFolder` (`npoints` points, random with repeats for smaller
    scans or FPS, on the unit sphere)."""

    kind = "pointfolder"
    noun = "point-cloud files"

    def __init__(self, shards: str | Path | ShardSet, npoints: int = 1024, *, sample: str = "random",
                 seed: int | None = None, **kw: Any) -> None:
        if sample not in ("random", "fps"):
            raise ValueError(f"PointFolder sample must be 'random' or 'fps', got {sample!r}")
        super().__init__(shards, **kw)
        self.npoints, self.sample, self.seed = int(npoints), sample, seed

    def _item(self, i: int, arr: np.ndarray, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        pts = torch.from_numpy(arr)
        if self.sample == "fps" and pts.shape[0] >= self.npoints:
            idx = sample_indices(pts, self.npoints, "fps")
        else:
            idx = _resample(pts.shape[0], self.npoints, self.item_generator(i))
        return {"points": normalize_unit_sphere(pts[idx])}


# ----------------------------------------------------------------------------------------------
# From a config's data section
# ----------------------------------------------------------------------------------------------


def check_shard_keys(data: Any) -> None:
    """Validate the shard keys of a point ``data`` section (``format``, ``shards``, ``shuffle_buffer``)."""
    if data.format not in ("files", "shards"):
        raise ValueError(f"format must be 'files' or 'shards', got {data.format!r}")
    if data.format == "shards" and not data.shards:
        raise ValueError("format=shards needs data.shards: a folder of shards, a manifest, a brace pattern "
                         "('dir/shard-{000000..000009}.tar') or a prepared root with dataset.json "
                         "(mm3d data prepare writes them)")
    if data.shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {data.shuffle_buffer}")


def split_shards(data: Any, split: str) -> tuple[str, str] | None:
    """(shard spec, config key) of `split`: ``data.val_shards`` / ``data.test_shards`` when set, else
    the split of the prepared root ``data.shards`` (its ``dataset.json``); ``data.shards`` itself for
    train. None when the split has no shards."""
    if split == "train":
        return str(data.shards), "data.shards"
    key = {"val": "val_shards", "test": "test_shards"}.get(split)
    if key and getattr(data, key, ""):
        return str(getattr(data, key)), f"data.{key}"
    if data.shards and Path(data.shards).is_dir() and has_split(data.shards, split):
        return str(split_folder(data.shards, split)), "data.shards"
    return None


def _open(cls: type[PointShards], data: Any, split: str, **kw: Any) -> PointShards | None:
    found = split_shards(data, split)
    if found is None:
        return None
    spec, what = found
    return cls(spec, split=split, what=what, max_failure_ratio=data.max_failure_ratio, **kw)


def pretrain_shard_datasets(data: Any, splits: Iterable[str], *, seed: int = 0) -> dict[str, Dataset]:
    """The pretraining datasets of a point ``data`` section with ``format: shards`` (the shards of
    ``data.dataset``'s preparer): ``train`` always, ``test`` when test shards exist; as
    :func:`~mm3d.pointcloud.tasks.build_pretrain_datasets` builds them from files. A folder of scans
    has no held-out split: its ``test`` re-reads the training shards with a fixed seed. The training
    split draws from (seed, epoch, index) once the trainer sets its epoch (:class:`EpochDraws`)."""
    splits, out = set(splits), {}
    if data.dataset == "shapenet55":
        if "train" in splits:
            out["train"] = _open(ShapeNet55Shards, data, "train", npoints=data.npoints, seed=seed)
        if "test" in splits and not data.use_both_splits:
            test = _open(ShapeNet55Shards, data, "test", npoints=data.npoints, seed=seed)
            if test is None:
                log.info("no ShapeNet-55 test shards (data.test_shards, or a test split in %s): no test split",
                         data.shards)
            else:
                out["test"] = test
    elif data.dataset in ("modelnet40", "modelnet10"):
        n = int(data.dataset[-2:])
        for split in ("train", "test"):
            if split in splits:
                ds = _open(ModelNetShards, data, split, num_classes=n, npoints=data.npoints,
                           cache_points=data.cache_points)
                if ds is not None:
                    out[split] = ds
    elif data.dataset == "folder":
        if "train" in splits:
            out["train"] = _open(PointFolderShards, data, "train", npoints=data.npoints, sample=data.sample, seed=seed)
        if "test" in splits:
            test = _open(PointFolderShards, data, "test", npoints=data.npoints, sample=data.sample, seed=seed)
            out["test"] = test if test is not None else PointFolderShards(
                data.shards, npoints=data.npoints, sample=data.sample, seed=seed,
                max_failure_ratio=data.max_failure_ratio)
    else:
        raise ConfigError(f"data.format=shards: no shard dataset for data.dataset={data.dataset!r}")
    return out


def cls_shard_datasets(cfg: Any, splits: Iterable[str]) -> dict[str, Dataset]:
    """The raw train/test datasets of a classification config with ``data.format: shards``: the items
    of the file datasets of ``_base_datasets`` (:mod:`mm3d.pointcloud.classification`): training items
    carry every stored point (the FPS cache of ModelNet, all points of a ScanObjectNN cloud),
    evaluation items the pool (``data.fps_points``). Few-shot ``.json`` folds are read against ModelNet40
    shards of the train and test splits; ``.pkl`` folds hold their own points (no shards needed)."""
    from mm3d.pointcloud import fewshot

    d = cfg.data
    out: dict[str, Dataset] = {}

    def modelnet(split: str) -> ModelNetShards:
        n = 10 if d.dataset == "modelnet10" else 40
        ds = _open(ModelNetShards, d, split, num_classes=n, cache_points=d.cache_points,
                   npoints=d.cache_points if split == "train" else d.fps_points)
        if ds is None:
            raise ConfigError(f"no {split} shards: set data.{split}_shards, or give data.shards a prepared root "
                              f"with a {split} split (mm3d data prepare CONFIG --out DIR)")
        return ds

    for split in splits:
        if split not in ("train", "test"):
            continue
        if d.dataset == "modelnet40_fewshot":
            fold = d.fold if d.fold >= 0 else cfg.seed
            out[split] = fewshot.open_fold_split(d, split, fold, allow_pickle=cfg.allow_pickle, modelnet=modelnet,
                                                 npoints=d.cache_points if split == "train" else d.fps_points)
        elif d.dataset == "scanobjectnn":
            ds = _open(ScanObjectNNShards, d, split, variant=d.scan_variant,
                       npoints=None if split == "train" else d.fps_points,
                       seed=None if split == "train" else cfg.seed)
            if ds is None:
                raise ConfigError(f"no {split} shards: set data.{split}_shards, or give data.shards a prepared "
                                  f"root with a {split} split")
            out[split] = ds
        else:
            out[split] = modelnet(split)
    return out


def shard_classes(data: Any) -> list[str] | None:
    """The class names recorded in the manifest of the training shards of `data` (``data.shards``), or
    None when it names none."""
    names = resolve_shards(data.shards, "train").meta.get("classes")
    return list(names) if names else None
