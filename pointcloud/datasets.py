"""Point-cloud datasets in their official on-disk layouts.

Each dataset returns a dict of tensors per sample (the default collate stacks them):

=================  ====================================================================
dataset            keys
=================  ====================================================================
ShapeNet55         ``points`` (N, 3), ``label`` () synset index
ModelNet           ``points`` (N, 3), ``label`` (), ``normals`` (N, 3) with use_normals
ScanObjectNN       ``points`` (N, 3), ``label`` ()
ShapeNetPart       ``points`` (N, 3), ``cls_label`` () category, ``seg`` (N,) global part id,
                   ``normals`` (N, 3) with use_normals
PointFolder        ``points`` (N, 3)
=================  ====================================================================

Datasets only normalise (centre, unit sphere) and sample points; augmentations are applied to
whole batches on the device by the task (see :mod:`mm3d.pointcloud.transforms`). Random point
sampling draws from (seed, index) (evaluation splits: the same points every time) or, after
``set_epoch(e)``, from (seed, e, index): the training splits the tasks build get the run's seed and
the trainer sets the epoch, so an item's points do not depend on the loader worker or on where a
resumed run restarted (:class:`EpochDraws`). ``seed=None`` draws from torch's global generator.

Cheap checks run at construction (list files, listed files, class names, label ranges); file
contents are checked when read, with errors naming the file and line. ModelNet and ShapeNetPart
parse their text files once into a cache (see :func:`~mm3d.pointcloud.cache.load_or_build_cache`),
so all of their content checks run before training starts.

Bad files are skipped, named and counted as bad videos are (:mod:`mm3d.datacheck`): ModelNet,
ShapeNetPart and ScanObjectNN read everything when built and leave bad files (clouds) out
(``dropped``); ShapeNet55 and PointFolder return the next readable file in place of a bad one
(``failed``). More than ``max_failure_ratio`` bad (default 0: any) is a
:class:`~mm3d.datacheck.BadDataError` naming all of them. A malformed list is an error naming its
file and line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from mm3d.datacheck import BadSample, FailureBudget, bad_sample, read_or_replace
from mm3d.pointcloud.cache import cache_dirs, load_or_build_cache, restore_bad, store_bad
from mm3d.pointcloud.files import (
    MISSING, READ_ERRORS, ListedFiles, file_present, modelnet_classes, modelnet_shapes, read_list_lines)
from mm3d.pointcloud.io import (POINT_EXTENSIONS, bin_columns_for, data_row_line, read_points,
                                read_text_points)
from mm3d.pointcloud.transforms import normalize_unit_sphere, sample_indices

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Official constants
# ----------------------------------------------------------------------------------------------

#: The 16 ShapeNetPart categories and their synsets, in ``synsetoffset2category.txt`` order.
SHAPENETPART_CATEGORIES: dict[str, str] = {
    "Airplane": "02691156", "Bag": "02773838", "Cap": "02954340", "Car": "02958343",
    "Chair": "03001627", "Earphone": "03261776", "Guitar": "03467517", "Knife": "03624134",
    "Lamp": "03636649", "Laptop": "03642806", "Motorbike": "03790512", "Mug": "03797390",
    "Pistol": "03948459", "Rocket": "04099429", "Skateboard": "04225987", "Table": "04379243",
}

#: Category -> its global part ids (50 parts in all), the standard ShapeNetPart part sets.
SHAPENETPART_SEG_CLASSES: dict[str, list[int]] = {
    "Airplane": [0, 1, 2, 3], "Bag": [4, 5], "Cap": [6, 7], "Car": [8, 9, 10, 11],
    "Chair": [12, 13, 14, 15], "Earphone": [16, 17, 18], "Guitar": [19, 20, 21],
    "Knife": [22, 23], "Lamp": [24, 25, 26, 27], "Laptop": [28, 29],
    "Motorbike": [30, 31, 32, 33, 34, 35], "Mug": [36, 37], "Pistol": [38, 39, 40],
    "Rocket": [41, 42, 43], "Skateboard": [44, 45, 46], "Table": [47, 48, 49],
}
SHAPENETPART_NUM_PARTS = 50

#: ScanObjectNN's 15 classes; the label is the index in this list.
SCANOBJECTNN_CLASSES: tuple[str, ...] = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
    "bed", "pillow", "sink", "sofa", "toilet")

#: ScanObjectNN variant -> (folder, train file, test file), as the official h5 release names them.
SCANOBJECTNN_FILES: dict[str, tuple[str, str, str]] = {
    "OBJ_BG": ("main_split", "training_objectdataset.h5", "test_objectdataset.h5"),
    "OBJ_ONLY": ("main_split_nobg", "training_objectdataset.h5", "test_objectdataset.h5"),
    "PB_T50_RS": ("main_split", "training_objectdataset_augmentedrot_scale75.h5",
                  "test_objectdataset_augmentedrot_scale75.h5"),
}

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _item_generator(seed: int | None, index: int, epoch: int | None = None) -> torch.Generator | None:
    """Item `index`'s generator: None (torch's global one) without a seed; from (seed, index) alone
    without an epoch; else from (seed, epoch, index), well mixed."""
    if seed is None:
        return None
    if epoch is None:
        return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    state = np.random.SeedSequence([int(seed) % 2**63, int(epoch), int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochDraws:
    """Random point draws that depend on (seed, epoch, index) only (mixed into the datasets that draw).

    Without :meth:`set_epoch` an item draws from (seed, index): the same points every time
    (evaluation splits). The trainer calls ``set_epoch(e)`` on its training split before every
    epoch: item i then draws from (seed, e, i), new points each epoch that depend neither on the
    loader worker that reads it nor on where a resumed run restarted the epoch. ``seed=None``
    draws from torch's global generator (seeded per loader worker).
    """

    seed: int | None = None
    epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def item_generator(self, index: int) -> torch.Generator | None:
        """The generator of item `index`'s draws (None: torch's global one)."""
        return _item_generator(self.seed, index, self.epoch)


def _resample(n_available: int, npoints: int, generator: torch.Generator | None
              ) -> torch.Tensor:
    """(npoints,) indices: random without replacement when possible, else with repeats."""
    if n_available >= npoints:
        return torch.randperm(n_available, generator=generator)[:npoints]
    extra = torch.randint(n_available, (npoints - n_available,), generator=generator)
    return torch.cat([torch.randperm(n_available, generator=generator), extra])


# ----------------------------------------------------------------------------------------------
# ShapeNet-55
# ----------------------------------------------------------------------------------------------


class ShapeNet55(EpochDraws, ListedFiles):
    """ShapeNet-55 as released by Point-BERT and used for Point-MAE pretraining.

    Layout under `root` (``ShapeNet55-34/``)::

        shapenet_pc/<synset>-<model id>.npy     (8192, 3) float32 each
        ShapeNet-55/train.txt, test.txt         one file name per line, e.g. 02691156-1a04....npy

    Each item takes `npoints` random points of the file (without replacement), then centres and
    scales them to the unit sphere, as the official loader does. ``label`` is the index of the
    synset in :attr:`synsets` (the sorted synsets of both lists).

    Args:
        root: the dataset folder.
        split: ``train`` or ``test``.
        npoints: points per sample (1024 for Point-MAE).
        use_both_splits: train on train + test, as Point-BERT's pretraining does.
        split_dir: the folder of the list files (``ShapeNet-34`` for that benchmark).
        seed: fixed per-item sampling (see the module docstring).
        max_failure_ratio, drop_nonfinite: bad files (see the module docstring) and non-finite
            points (see :func:`~mm3d.pointcloud.io.read_points`).
    """

    def __init__(self, root: str | Path, split: Literal["train", "test"] = "train",
                 npoints: int = 1024, *, use_both_splits: bool = False,
                 split_dir: str = "ShapeNet-55", seed: int | None = None,
                 max_failure_ratio: float = 0.0, drop_nonfinite: bool = True) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"ShapeNet55 split must be 'train' or 'test', got {split!r}")
        self.root = Path(root)
        self.pc_dir = self.root / "shapenet_pc"
        self.npoints, self.seed = int(npoints), seed
        if not self.pc_dir.is_dir():
            raise FileNotFoundError(f"ShapeNet55: point folder not found: {self.pc_dir}")
        lists = {s: self.root / split_dir / f"{s}.txt" for s in ("train", "test")}
        entries = {s: read_list_lines(p) for s, p in lists.items()}
        use = ["test", "train"] if use_both_splits else [split]
        present = set(os.listdir(self.pc_dir))
        self.files: list[str] = []
        self.where: list[str] = []
        self.dropped: list[BadSample] = []
        synset_of: list[str] = []
        for s in use:
            for line_no, name in entries[s]:
                if "-" not in name:
                    raise ValueError(f"{lists[s]}, line {line_no}: {name!r} is not "
                                     f"'<synset>-<model id>.npy'")
                if name not in present:
                    self.dropped.append(BadSample(str(self.pc_dir / name), f"{lists[s]}:{line_no}", MISSING))
                    continue
                self.files.append(name)
                self.where.append(f"{lists[s]}:{line_no}")
                synset_of.append(name.split("-", 1)[0])
        if not self.files and not self.dropped:
            listed = ", ".join(str(lists[s]) for s in use)
            raise ValueError(f"ShapeNet55: no files listed in {listed}")
        self.synsets = sorted({n.split("-", 1)[0] for lst in entries.values() for _, n in lst})
        index = {s: i for i, s in enumerate(self.synsets)}
        self.labels = torch.tensor([index[s] for s in synset_of], dtype=torch.long)
        self.drop_nonfinite, self.paths = drop_nonfinite, [self.pc_dir / f for f in self.files]
        self.budget = FailureBudget(len(self.files), max_failure_ratio, noun="ShapeNet-55 files", logger=log)
        self.budget.leave_out(self.dropped, len(self.files) + len(self.dropped))

    def __len__(self) -> int:
        return len(self.files)

    def check_sample(self, i: int) -> torch.Tensor:
        """The (N, 3) points of file `i`, read directly (no replacement)."""
        return torch.from_numpy(read_points(self.paths[i], drop_nonfinite=self.drop_nonfinite)[:, :3])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i, pts = read_or_replace(i, len(self), self.check_sample, self.budget, self.sample_source, READ_ERRORS)
        idx = _resample(pts.shape[0], self.npoints, self.item_generator(i))
        return {"points": normalize_unit_sphere(pts[idx]), "label": self.labels[i]}


# ----------------------------------------------------------------------------------------------
# ModelNet40 / ModelNet10
# ----------------------------------------------------------------------------------------------


class ModelNet(ListedFiles):
    """ModelNet40 or ModelNet10 in the ``modelnet40_normal_resampled`` layout (PointNet++).

    Layout under `root`::

        modelnet40_shape_names.txt   class names, one a line; label = 0-based line index
        modelnet40_train.txt         shape ids, one a line, e.g. airplane_0001
        modelnet40_test.txt
        <class>/<class>_0001.txt     lines x,y,z,nx,ny,nz (10,000 in the release)

    (``modelnet10_*`` list files for `num_classes=10`.) The class is the id without its last
    ``_NNNN``. Synthetic sets (``mm3d data synth modelnet40``) list only their own classes; the
    number of classes is ``len(dataset.classes)``.

    On first use every file is read once and reduced to `cache_points` points, by farthest point
    sampling (start: the file's first point) or a fixed random subset, centred and scaled to the
    unit sphere: the equivalent of Point-MAE's ``modelnet40_train_8192pts_fps.dat``. The cache is
    an ``.npz`` whose name holds a hash of every setting (root, split, class list, file list and
    sizes, points, method, normals), so it is rebuilt whenever one changes. It goes to
    `cache_dir`, by default ``<root>/.mm3d_cache/``, falling back to :func:`user_cache_dir` when
    the root is read-only, and to memory when neither is writable.

    Items are the first `npoints` cached points; with FPS that prefix is itself a farthest-point
    sample. (Point-MAE's 1k protocol, FPS 1200 then 1024 at random, is done batched by the task
    from ``npoints=cache_points``.)

    Args:
        root: the dataset folder.
        split: ``train`` or ``test``.
        num_classes: 40 or 10, choosing the ``modelnet40_*`` or ``modelnet10_*`` list files.
        npoints: points per item, at most `cache_points`.
        use_normals: also return ``normals`` (N, 3).
        cache_points: points kept per shape in the cache (8192 in Point-MAE).
        cache_dir: where to read and write the cache (see above); the fallback folder is
            ``$MM3D_CACHE_DIR``, else ``$XDG_CACHE_HOME/mm3d``, else ``~/.cache/mm3d``.
        sample: ``fps`` or ``random`` reduction of each file to `cache_points`.
        cache_device: device for the batched FPS (default: CUDA when available).
        write_cache: False builds the cache in memory, without reading or writing files.
        max_failure_ratio, drop_nonfinite: bad files (left out and named, see the module
            docstring; the cache remembers them) and non-finite points.
    """

    def __init__(self, root: str | Path, split: Literal["train", "test"] = "train", *,
                 num_classes: Literal[10, 40] = 40, npoints: int = 1024,
                 use_normals: bool = False, cache_points: int = 8192,
                 cache_dir: str | Path | None = None, sample: Literal["fps", "random"] = "fps",
                 cache_device: str | torch.device | None = None,
                 write_cache: bool = True, max_failure_ratio: float = 0.0,
                 drop_nonfinite: bool = True) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"ModelNet split must be 'train' or 'test', got {split!r}")
        if num_classes not in (10, 40):
            raise ValueError(f"ModelNet num_classes must be 10 or 40, got {num_classes!r}")
        if sample not in ("fps", "random"):
            raise ValueError(f"ModelNet sample must be 'fps' or 'random', got {sample!r}")
        if not 0 < npoints <= cache_points:
            raise ValueError(f"ModelNet npoints={npoints} must be in [1, cache_points="
                             f"{cache_points}]")
        self.root = Path(root)
        self.split, self.npoints, self.use_normals = split, int(npoints), bool(use_normals)
        self.cache_points, self.sample, self.drop_nonfinite = int(cache_points), sample, drop_nonfinite
        list_file = self.root / f"modelnet{num_classes}_{split}.txt"
        self.classes: list[str] = modelnet_classes(self.root, num_classes)
        class_index = {name: i for i, name in enumerate(self.classes)}

        self.ids: list[str] = []
        self.paths: list[Path] = []
        self.where: list[str] = []
        self.dropped: list[BadSample] = []
        labels: list[int] = []
        listing: dict[Path, set[str]] = {}
        for line_no, shape_id, cls in modelnet_shapes(self.root, num_classes, list_file, self.classes):
            if not file_present(self.root / cls, f"{shape_id}.txt", listing):
                self.dropped.append(BadSample(str(self.root / cls / f"{shape_id}.txt"), f"{list_file}:{line_no}",
                                              MISSING))
                continue
            self.ids.append(shape_id)
            self.paths.append(self.root / cls / f"{shape_id}.txt")
            self.where.append(f"{list_file}:{line_no}")
            labels.append(class_index[cls])
        if not self.ids and not self.dropped:
            raise ValueError(f"{list_file}: no shapes listed")

        key = {"kind": "modelnet", "version": 1, "root": str(self.root.resolve()),
               "split": split, "num_classes": num_classes, "classes": self.classes,
               "cache_points": self.cache_points, "sample": sample, "normals": self.use_normals,
               "files": [[i, p.stat().st_size] for i, p in zip(self.ids, self.paths)]}
        if not drop_nonfinite:
            key["nonfinite"] = "error"
        stem = f"modelnet{num_classes}_{split}_{self.cache_points}pts_{sample}"
        dirs = cache_dirs(self.root, cache_dir) if write_cache else []
        device = torch.device(cache_device) if cache_device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        arrays, self.cache_path, self.cache_hit = load_or_build_cache(stem, key, dirs,
                                                                      lambda: self._build_cache(device))
        keep, bad = restore_bad(arrays, self.paths, self.where)
        self.dropped += bad
        self.ids, self.paths, self.where = ([x for x, k in zip(v, keep) if k]
                                            for v in (self.ids, self.paths, self.where))
        self.points = arrays["points"]  # (M, cache_points, 3 or 6) float32, the readable files
        expected = (len(self.ids), self.cache_points, 6 if self.use_normals else 3)
        assert self.points.shape == expected, (self.points.shape, expected)
        self.labels = torch.tensor(labels, dtype=torch.long)[torch.from_numpy(keep)]
        FailureBudget(len(self.ids) + len(self.dropped), max_failure_ratio, noun="ModelNet files",
                      logger=log).leave_out(self.dropped)

    def _build_cache(self, device: torch.device) -> dict[str, np.ndarray]:
        """Read every file and reduce it to (cache_points, C) normalised points (``points``, the
        readable files only) and the rows and reasons of the bad files."""
        chunk = 256 if device.type == "cuda" else 32  # files sampled together
        channels = 6 if self.use_normals else 3
        out = np.empty((len(self.paths), self.cache_points, channels), dtype=np.float32)
        log.info("building the ModelNet %s cache: %d files -> %d points (%s) on %s",
                 self.split, len(self.paths), self.cache_points, self.sample, device)
        gen = torch.Generator().manual_seed(0)
        bad: dict[int, str] = {}
        for start in range(0, len(self.paths), chunk):
            clouds, group = [], []
            for i in range(start, min(start + chunk, len(self.paths))):
                try:
                    arr = read_text_points(self.paths[i], drop_nonfinite=self.drop_nonfinite)
                    if arr.shape[1] < channels:
                        raise ValueError(f"{self.paths[i]}: {arr.shape[1]} columns, need {channels} "
                                         f"(x,y,z{',nx,ny,nz' if self.use_normals else ''})")
                    if arr.shape[0] < self.cache_points:
                        raise ValueError(f"{self.paths[i]}: {arr.shape[0]} points, fewer than "
                                         f"cache_points={self.cache_points}; lower cache_points")
                except READ_ERRORS as e:
                    bad[i] = bad_sample(self.paths[i], "", e).reason
                    continue
                clouds.append(arr[:, :channels])
                group.append(i)
            # Clouds of equal size are sampled together (the release has 10,000 points each).
            sizes = sorted({c.shape[0] for c in clouds})
            for n in sizes:
                members = [k for k, c in enumerate(clouds) if c.shape[0] == n]
                batch = torch.from_numpy(np.stack([clouds[k] for k in members])).to(device)
                idx = sample_indices(batch, self.cache_points, self.sample, generator=gen
                                     if self.sample == "random" else None)
                picked = torch.gather(batch, 1, idx.unsqueeze(-1).expand(-1, -1, channels))
                picked = normalize_unit_sphere(picked)
                out[[group[k] for k in members]] = picked.cpu().numpy()
            if (start // chunk) % 20 == 0:
                log.info("  %d / %d files", min(start + chunk, len(self.paths)), len(self.paths))
        keep = np.ones(len(self.paths), dtype=bool)
        keep[list(bad)] = False
        return {"points": out if keep.all() else out[keep], **store_bad(bad)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pts = torch.from_numpy(np.array(self.points[i, :self.npoints]))
        item = {"points": pts[:, :3], "label": self.labels[i]}
        if self.use_normals:
            item["normals"] = pts[:, 3:6]
        return item


# ----------------------------------------------------------------------------------------------
# ScanObjectNN
# ----------------------------------------------------------------------------------------------


class ScanObjectNN(EpochDraws, ListedFiles):
    """ScanObjectNN (h5 release) in one of its three benchmark variants.

    Layout under `root` (``ScanObjectNN/``), per :data:`SCANOBJECTNN_FILES`::

        main_split/training_objectdataset.h5                          OBJ_BG
        main_split/test_objectdataset.h5
        main_split_nobg/training_objectdataset.h5                     OBJ_ONLY
        main_split_nobg/test_objectdataset.h5
        main_split/training_objectdataset_augmentedrot_scale75.h5     PB_T50_RS
        main_split/test_objectdataset_augmentedrot_scale75.h5

    Each h5 file holds ``data`` (M, 2048, 3) float32 and ``label`` (M,) integers in [0, 15)
    (see :data:`SCANOBJECTNN_CLASSES`). Points are used as stored, like the official loader
    (the release is already centred and scaled); `normalize` re-normalises each item.

    Args:
        root: the dataset folder.
        variant: ``OBJ_BG``, ``OBJ_ONLY`` or ``PB_T50_RS``.
        split: ``train`` or ``test``.
        npoints: points per item; fewer than stored takes a random subset; None: all stored.
        normalize: centre and scale each item to the unit sphere.
        num_classes: labels must lie in [0, num_classes).
        seed: fixed per-item sampling (see the module docstring).
        max_failure_ratio: clouds with a label outside the classes or a non-finite coordinate are
            left out and named (see the module docstring).
    """

    def __init__(self, root: str | Path,
                 variant: Literal["OBJ_BG", "OBJ_ONLY", "PB_T50_RS"] = "OBJ_BG",
                 split: Literal["train", "test"] = "train", npoints: int | None = 2048, *,
                 normalize: bool = False, num_classes: int = len(SCANOBJECTNN_CLASSES),
                 seed: int | None = None, max_failure_ratio: float = 0.0) -> None:
        import h5py

        if variant not in SCANOBJECTNN_FILES:
            raise ValueError(f"ScanObjectNN variant must be one of {list(SCANOBJECTNN_FILES)}, "
                             f"got {variant!r}")
        if split not in ("train", "test"):
            raise ValueError(f"ScanObjectNN split must be 'train' or 'test', got {split!r}")
        folder, train_file, test_file = SCANOBJECTNN_FILES[variant]
        self.path = Path(root) / folder / (train_file if split == "train" else test_file)
        if not self.path.is_file():
            raise FileNotFoundError(f"ScanObjectNN {variant} {split}: file not found: {self.path}")
        with h5py.File(self.path, "r") as f:
            for k in ("data", "label"):
                if k not in f:
                    raise ValueError(f"{self.path}: no {k!r} dataset (keys: {list(f.keys())})")
            data = np.asarray(f["data"], dtype=np.float32)
            labels = np.asarray(f["label"]).reshape(-1).astype(np.int64)
        if data.ndim != 3 or data.shape[2] < 3:
            raise ValueError(f"{self.path}: 'data' must be (M, N, 3), got shape {data.shape}")
        if labels.shape[0] != data.shape[0]:
            raise ValueError(f"{self.path}: {labels.shape[0]} labels for {data.shape[0]} clouds")
        finite = np.isfinite(data).all(axis=(1, 2))
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes) | ~finite)
        self.dropped = [BadSample(str(self.path), f"cloud {j}", f"label {labels[j]} is outside the {num_classes} "
                                  f"classes" if not 0 <= labels[j] < num_classes else "non-finite coordinates")
                        for j in bad.tolist()]
        FailureBudget(len(labels), max_failure_ratio, noun="ScanObjectNN clouds", logger=log).leave_out(self.dropped)
        self.rows = np.setdiff1d(np.arange(len(labels)), bad)  # h5 row of each item
        data, labels = data[self.rows], labels[self.rows]
        npoints = data.shape[1] if npoints is None else npoints
        if npoints > data.shape[1]:
            raise ValueError(f"ScanObjectNN npoints={npoints} exceeds the {data.shape[1]} points "
                             f"stored per cloud in {self.path}")
        self.points = torch.from_numpy(np.ascontiguousarray(data[..., :3]))
        self.labels = torch.from_numpy(labels)
        self.classes = list(SCANOBJECTNN_CLASSES[:num_classes])
        self.npoints, self.normalize, self.seed = int(npoints), bool(normalize), seed

    def __len__(self) -> int:
        return self.points.shape[0]

    def sample_source(self, i: int) -> tuple[str, str]:
        return str(self.path), f"cloud {int(self.rows[i])}"

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pts = self.points[i]
        if self.npoints < pts.shape[0]:
            pts = pts[_resample(pts.shape[0], self.npoints, self.item_generator(i))]
        if self.normalize:
            pts = normalize_unit_sphere(pts)
        return {"points": pts.clone(), "label": self.labels[i]}


# ----------------------------------------------------------------------------------------------
# ShapeNetPart
# ----------------------------------------------------------------------------------------------


class ShapeNetPart(EpochDraws, ListedFiles):
    """ShapeNetPart (``shapenetcore_partanno_segmentation_benchmark_v0_normal``).

    Layout under `root`::

        synsetoffset2category.txt                 '<Category>\\t<synset>' lines (16 officially)
        train_test_split/shuffled_train_file_list.json   ["shape_data/<synset>/<id>", ...]
        train_test_split/shuffled_val_file_list.json
        train_test_split/shuffled_test_file_list.json
        <synset>/<id>.txt                         lines 'x y z nx ny nz part' (part as a float)

    ``cls_label`` is the category's line index in ``synsetoffset2category.txt`` and ``seg`` the
    global part id in 0..49 (:data:`SHAPENETPART_SEG_CLASSES`). Categories without shapes in the
    split are fine, and so is a split with no shapes at all (a warning is logged; the real
    sample's val list is empty). The files of the split are parsed, validated (seven columns,
    finite, every part label in its category's part set, else an error naming the file and
    line) and normalised once into a cache, like :class:`ModelNet`'s. Each item resamples
    `npoints` points: by default at random without replacement when the shape has enough,
    otherwise with repeats; ``sample_replace=True`` draws all `npoints` independently with
    replacement, as the official loader does for every split (Point-MAE
    ``segmentation/dataset.py``), so a shape with more points than `npoints` may still repeat some.

    Args:
        root: the dataset folder.
        split: ``train``, ``val``, ``test`` or ``trainval``.
        npoints: points per item (2048 for Point-MAE).
        use_normals: also return ``normals``.
        cache_dir, write_cache: as for :class:`ModelNet`.
        seed: fixed per-item sampling (see the module docstring).
        sample_replace: draw the `npoints` points with replacement always (the official
            loader), not only when the shape has fewer.
        max_failure_ratio, drop_nonfinite: as for :class:`ModelNet`.
    """

    def __init__(self, root: str | Path,
                 split: Literal["train", "val", "test", "trainval"] = "train",
                 npoints: int = 2048, *, use_normals: bool = False,
                 cache_dir: str | Path | None = None, write_cache: bool = True,
                 seed: int | None = None, sample_replace: bool = False,
                 max_failure_ratio: float = 0.0, drop_nonfinite: bool = True) -> None:
        splits = {"train": ["train"], "val": ["val"], "test": ["test"],
                  "trainval": ["train", "val"]}
        if split not in splits:
            raise ValueError(f"ShapeNetPart split must be one of {list(splits)}, got {split!r}")
        self.root = Path(root)
        self.npoints, self.use_normals, self.seed = int(npoints), bool(use_normals), seed
        self.sample_replace, self.drop_nonfinite = bool(sample_replace), drop_nonfinite
        cat_file = self.root / "synsetoffset2category.txt"
        self.categories: list[str] = []
        synset_to_cat: dict[str, int] = {}
        for line_no, line in read_list_lines(cat_file):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{cat_file}, line {line_no}: expected '<Category> <synset>', "
                                 f"got {line!r}")
            name, synset = parts
            if name not in SHAPENETPART_SEG_CLASSES:
                raise ValueError(f"{cat_file}, line {line_no}: unknown category {name!r}; "
                                 f"known: {', '.join(SHAPENETPART_SEG_CLASSES)}")
            synset_to_cat[synset] = len(self.categories)
            self.categories.append(name)

        self.paths: list[Path] = []
        self.where: list[str] = []
        self.dropped: list[BadSample] = []
        cls_labels: list[int] = []
        present: dict[Path, set[str]] = {}
        for s in splits[split]:
            list_file = self.root / "train_test_split" / f"shuffled_{s}_file_list.json"
            if not list_file.is_file():
                raise FileNotFoundError(f"ShapeNetPart split list not found: {list_file}")
            try:
                entries = json.loads(list_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{list_file}: not valid JSON ({e})") from None
            for k, entry in enumerate(entries):
                bits = str(entry).strip("/").split("/")
                if len(bits) < 2:
                    raise ValueError(f"{list_file}, entry {k}: {entry!r} is not "
                                     f"'shape_data/<synset>/<id>'")
                synset, shape_id = bits[-2], bits[-1]
                if synset not in synset_to_cat:
                    raise ValueError(f"{list_file}, entry {k}: synset {synset} of {entry!r} is "
                                     f"not in {cat_file}")
                if not file_present(self.root / synset, f"{shape_id}.txt", present):
                    self.dropped.append(BadSample(str(self.root / synset / f"{shape_id}.txt"),
                                                  f"{list_file}, entry {k}", MISSING))
                    continue
                self.paths.append(self.root / synset / f"{shape_id}.txt")
                self.where.append(f"{list_file}, entry {k}")
                cls_labels.append(synset_to_cat[synset])
        if not self.paths and not self.dropped:  # e.g. the real sample's empty val list: allowed, but said
            log.warning("ShapeNetPart %s: the split lists under %s name no shapes", split,
                        self.root / "train_test_split")
        self.cls_labels = torch.tensor(cls_labels, dtype=torch.long)

        key = {"kind": "shapenetpart", "version": 1, "root": str(self.root.resolve()),
               "split": split, "categories": self.categories,
               "files": [[str(p.relative_to(self.root)), p.stat().st_size] for p in self.paths]}
        if not drop_nonfinite:
            key["nonfinite"] = "error"
        dirs = cache_dirs(self.root, cache_dir) if write_cache else []
        arrays, self.cache_path, self.cache_hit = load_or_build_cache(
            f"shapenetpart_{split}", key, dirs, self._build_cache)
        keep, bad = restore_bad(arrays, self.paths, self.where)
        self.dropped += bad
        self.paths, self.where = [p for p, k in zip(self.paths, keep) if k], [w for w, k in zip(self.where, keep) if k]
        self.cls_labels = self.cls_labels[torch.from_numpy(keep)]
        self.points = arrays["points"]    # (total points, 6) float32, normalised per shape
        self.seg = arrays["seg"]          # (total points,) int16
        self.offsets = arrays["offsets"]  # (num shapes + 1,) int64
        FailureBudget(len(self.paths) + len(self.dropped), max_failure_ratio, noun="ShapeNetPart files",
                      logger=log).leave_out(self.dropped)

    def _build_cache(self) -> dict[str, np.ndarray]:
        log.info("parsing %d ShapeNetPart files", len(self.paths))
        points, segs, offsets, bad = [], [], [0], {}
        for i, (path, cat) in enumerate(zip(self.paths, self.cls_labels.tolist())):
            try:
                arr = read_text_points(path, columns=7, drop_nonfinite=self.drop_nonfinite)
                seg = self._check_parts(path, arr[:, 6], self.categories[cat])
            except READ_ERRORS as e:
                bad[i] = bad_sample(path, "", e).reason
                continue
            xyz = normalize_unit_sphere(torch.from_numpy(arr[:, :3])).numpy()
            points.append(np.concatenate([xyz, arr[:, 3:6]], axis=1))
            segs.append(seg)
            offsets.append(offsets[-1] + arr.shape[0])
        if not points:
            return {"points": np.zeros((0, 6), np.float32), "seg": np.zeros(0, np.int16),
                    "offsets": np.zeros(1, np.int64), **store_bad(bad)}
        return {"points": np.concatenate(points).astype(np.float32),
                "seg": np.concatenate(segs).astype(np.int16),
                "offsets": np.asarray(offsets, dtype=np.int64), **store_bad(bad)}

    @staticmethod
    def _check_parts(path: Path, labels: np.ndarray, category: str) -> np.ndarray:
        """Integer part ids, or ValueError naming the first line outside the category's set."""
        allowed = np.zeros(SHAPENETPART_NUM_PARTS, dtype=bool)
        allowed[SHAPENETPART_SEG_CLASSES[category]] = True
        ids = np.rint(labels).astype(np.int64)
        ok = (ids == labels) & (ids >= 0) & (ids < SHAPENETPART_NUM_PARTS)
        ok[ok] = allowed[ids[ok]]
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"{path}, line {data_row_line(path, row)}: part label "
                             f"{labels[row]:g} is not in the {category} part set "
                             f"{SHAPENETPART_SEG_CLASSES[category]}")
        return ids

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        generator = self.item_generator(i)
        if self.sample_replace:  # npoints independent uniform draws, repeats allowed (official)
            idx = torch.randint(hi - lo, (self.npoints,), generator=generator).numpy() + lo
        else:
            idx = _resample(hi - lo, self.npoints, generator).numpy() + lo
        pts = torch.from_numpy(self.points[idx])
        item = {"points": pts[:, :3], "cls_label": self.cls_labels[i],
                "seg": torch.from_numpy(self.seg[idx].astype(np.int64))}
        if self.use_normals:
            item["normals"] = pts[:, 3:6]
        return item


# ----------------------------------------------------------------------------------------------
# A folder of the user's own scans
# ----------------------------------------------------------------------------------------------


class PointFolder(EpochDraws, ListedFiles):
    """Every point-cloud file under `root` (recursively), as unlabeled pretraining data.

    Files are read with :func:`mm3d.pointcloud.io.read_points` (``.ply``, ``.pcd``, ``.xyz``,
    ``.txt``, ``.npy``, raw float32 ``.bin``); only ``x y z`` are kept. Each item samples
    `npoints` points (random, with repeats for smaller files, or FPS), then is centred and
    scaled to the unit sphere.

    Args:
        root: the folder.
        npoints: points per item.
        extensions: file extensions to include (case-insensitive).
        bin_columns: float32 values per point in ``.bin`` files (KITTI 4, ScanNet 6); None reads
            4 and warns when the files' sizes fit other counts too.
        sample: ``random`` or ``fps`` (FPS is slow on CPU for large scans).
        seed: fixed per-item sampling (see the module docstring).
        max_failure_ratio, drop_nonfinite: bad files (replaced by the next readable one, see
            the module docstring) and non-finite points.
    """

    def __init__(self, root: str | Path, npoints: int = 1024, *,
                 extensions: Sequence[str] = (".ply", ".pcd", ".xyz", ".npy", ".bin"),
                 bin_columns: int | None = None, sample: Literal["random", "fps"] = "random",
                 seed: int | None = None, max_failure_ratio: float = 0.0,
                 drop_nonfinite: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"PointFolder: folder not found: {self.root}")
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        unknown = exts - set(POINT_EXTENSIONS)
        if unknown:
            raise ValueError(f"PointFolder: unsupported extensions {sorted(unknown)}; "
                             f"supported: {', '.join(POINT_EXTENSIONS)}")
        self.files = sorted(p for p in self.root.rglob("*")
                            if p.is_file() and p.suffix.lower() in exts)
        if not self.files:
            raise ValueError(f"PointFolder: no {', '.join(sorted(exts))} files under {self.root}")
        if sample not in ("random", "fps"):
            raise ValueError(f"PointFolder sample must be 'random' or 'fps', got {sample!r}")
        self.npoints, self.bin_columns, self.sample, self.seed = (
            int(npoints), bin_columns_for(self.files, bin_columns), sample, seed)
        self.drop_nonfinite, self.dropped = drop_nonfinite, []
        self.paths, self.where = self.files, [""] * len(self.files)
        self.budget = FailureBudget(len(self.files), max_failure_ratio, noun="point-cloud files", logger=log)

    def __len__(self) -> int:
        return len(self.files)

    def check_sample(self, i: int) -> torch.Tensor:
        """The (N, 3) points of file `i`, read directly (no replacement)."""
        return torch.from_numpy(np.ascontiguousarray(read_points(
            self.files[i], bin_columns=self.bin_columns, drop_nonfinite=self.drop_nonfinite)[:, :3]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i, pts = read_or_replace(i, len(self), self.check_sample, self.budget, self.sample_source, READ_ERRORS)
        gen = self.item_generator(i)
        if self.sample == "fps" and pts.shape[0] >= self.npoints:
            idx = sample_indices(pts, self.npoints, "fps")
        else:
            idx = _resample(pts.shape[0], self.npoints, gen)
        return {"points": normalize_unit_sphere(pts[idx])}
