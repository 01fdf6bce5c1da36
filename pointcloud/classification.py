"""Point-MAE shape classification: ModelNet40/10, ScanObjectNN and few-shot ModelNet40.

Task ``pointmae_classify`` (the ``task:`` key of a config; every protocol has a config in
``configs/pointcloud/``): the Point-MAE encoder + cls token + the official head, fine-tuned with
the one trainer. ``data.dataset`` picks ModelNet40/10 (1k or 8k points), ScanObjectNN
(``data.scan_variant`` OBJ_BG, OBJ_ONLY, PB_T50_RS) or a few-shot ModelNet40 fold
(``modelnet40_fewshot``).

Training follows the official loaders and runner: each training item carries every stored point
(ModelNet: the 8192-point FPS cache; ScanObjectNN: the 2048 stored points) and
:meth:`~PointMAEClassifyTask.batch_transform` shuffles every cloud anew (so the FPS start and the
patch partition change every epoch), takes FPS ``data.fps_points`` of it when it has more (1200
for ModelNet 1k), a random ``data.npoints`` of those, then augments the batch on the device
(``scale_translate`` or ``rotate``), all from the run's generator. Evaluation takes the FPS
``npoints`` (the cache prefix; FPS on the device for ScanObjectNN subsets) and, in the reported
evaluation on the splits in ``data.vote_splits``, a voting test: ``data.votes`` random subsets of
the FPS pool, each scaled-and-translated, logits averaged, repeated ``eval.vote_runs`` times
(``vote_top1`` mean, ``_std``, ``_max``, ``_min``; plain ``top1`` beside it).

Few-shot (``data.dataset: modelnet40_fewshot``): the fold files of :mod:`mm3d.pointcloud.fewshot`
(``mm3d data fewshot``). The fold is ``data.fold``, or the run seed when it is -1, so
``seeds: [0, ..., 9]`` in the config runs the ten folds through the trainer's multi-seed runner
and reports mean ± std over folds.

The reported checkpoint follows the honest protocol of :mod:`mm3d.pointcloud.protocol`;
:meth:`~PointMAEClassifyTask.write_report` also writes a confusion-matrix PNG and per-class
accuracy per split. Initialisation (``init=``): see
:func:`~mm3d.pointcloud.checkpoints.load_encoder_checkpoint`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mm3d.config import RunConfig, TrainConfig
from mm3d.datacheck import account_missing, missing_markdown, unscored_samples
from mm3d.distributed import all_gather_cat
from mm3d.engine import SplitMeans, move_to_device
from mm3d.errors import UserError
from mm3d.metrics import ClassificationMeter
from mm3d.registry import register_task
from mm3d.results import (per_class_markdown, run_protocol_label, selection_split, write_classification_split,
                          write_results_md)
from mm3d.task import EvalResult, Task
from mm3d.pointcloud import datasets as D
from mm3d.pointcloud import fewshot
from mm3d.pointcloud.checkpoints import load_encoder_checkpoint
from mm3d.pointcloud.io import read_points
from mm3d.pointcloud.models import PointMAEConfig, build_classifier
from mm3d.pointcloud.protocol import TABLE_INFO, table_info
from mm3d.pointcloud.shards import check_shard_keys, cls_shard_datasets, shard_classes
from mm3d.pointcloud.splits import Indexed, require_root, stratified_split
from mm3d.pointcloud.tasks import cloud_preprocessing
from mm3d.pointcloud.transforms import (ShapeAugmentation, build_point_augmentation, normalize_unit_sphere,
                                        random_subset, sample_indices, sample_points, training_batch_transform)

log = logging.getLogger(__name__)

REPORT_COLUMNS = ("top1", "vote_top1", "vote_top1_std", "vote_top1_max", "top1_epoch_max", "mean_class_acc",
                  "vote_mean_class_acc", "top5", "chance_top1", "loss", "num_samples", "num_missing")  # of results.md


@dataclass
class ClsDataConfig:
    """The ``data`` section of point-cloud classification (fine-tuning, few-shot, SVM probe)."""

    dataset: Literal["modelnet40", "modelnet10", "scanobjectnn", "modelnet40_fewshot"] = "modelnet40"
    root: str = ""  # ModelNet root (also for few-shot) or ScanObjectNN root
    # files: read data.root in its official layout; shards: read prepared shards (mm3d data prepare)
    format: Literal["files", "shards"] = "files"
    shards: str = ""  # training shards: a folder, manifest, brace pattern, or a prepared root (dataset.json)
    val_shards: str = ""  # default: the val split of a prepared root in data.shards
    test_shards: str = ""  # default: the test split of a prepared root in data.shards
    shuffle_buffer: int = 1000  # shards: training samples are shuffled within windows of this many
    # ScanObjectNN variant (not called `variant`: that key names a model preset in the config system)
    scan_variant: Literal["OBJ_BG", "OBJ_ONLY", "PB_T50_RS"] = "OBJ_BG"
    npoints: int = 1024  # points the model sees
    fps_points: int = 1200  # FPS pool per item: training draws npoints at random from it (official 1200 for 1k)
    cache_points: int = 8192  # ModelNet: FPS points cached per shape
    classes: list[str] = field(default_factory=list)  # expected class names in label order ([]: from the data)
    val_fraction: float = 0.1  # carved from train (stratified) when train.select_on == "val"
    val_seed: int = 0  # fixed: every run seed sees the same validation split
    augmentation: ShapeAugmentation = "scale_translate"
    scale_low: float = 2.0 / 3.0
    scale_high: float = 3.0 / 2.0
    translate_range: float = 0.2
    up_axis: Literal["x", "y", "z"] = "y"
    votes: int = 10  # voting test: scale-and-translate votes (0: off)
    vote_splits: list[str] = field(default_factory=lambda: ["test"])
    fewshot_root: str = ""  # folder of fold files: `mm3d data fewshot` (.json, or .pkl) or the official .pkl
    # which fold files to read: "auto" takes <fold>.json, else the official <fold>.pkl (needs allow_pickle)
    fewshot_format: Literal["auto", "json", "pkl"] = "auto"
    way: int = 5
    shot: int = 10
    fold: int = -1  # -1: the run seed is the fold (seeds: [0..9] runs all ten)
    max_failure_ratio: float = 0.01  # unreadable files (clouds) are left out, named and counted; fail past this share
    drop_nonfinite: bool = True  # drop (and count) points with NaN/inf when reading files; false: an error
    bin_columns: int | None = None  # `mm3d predict --bin-columns`: float32 values per point in raw .bin files

    def validate(self) -> None:
        check_shard_keys(self)
        if self.npoints <= 0 or self.fps_points < self.npoints:
            raise ValueError(f"need 0 < npoints <= fps_points, got npoints={self.npoints}, "
                             f"fps_points={self.fps_points}")
        if self.dataset.startswith("modelnet") and self.fps_points > self.cache_points:
            raise ValueError(f"fps_points={self.fps_points} exceeds cache_points={self.cache_points}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 < self.scale_low <= self.scale_high:
            raise ValueError(f"need 0 < scale_low <= scale_high, got {self.scale_low}, {self.scale_high}")
        if self.votes < 0:
            raise ValueError(f"votes must be >= 0, got {self.votes}")
        bad = [s for s in self.vote_splits if s not in ("val", "test")]
        if bad:
            raise ValueError(f"vote_splits may hold 'val' and 'test', got {bad}")
        if self.dataset == "modelnet40_fewshot" and (self.way <= 0 or self.shot <= 0):
            raise ValueError(f"way and shot must be positive, got {self.way}, {self.shot}")
        if not 0.0 <= self.max_failure_ratio <= 1.0:
            raise ValueError(f"max_failure_ratio must be in [0, 1], got {self.max_failure_ratio}")
        if self.bin_columns is not None and self.bin_columns < 3:
            raise ValueError(f"bin_columns must be >= 3 (x, y, z first) or null, got {self.bin_columns}")


def _modelnet_n(data: ClsDataConfig) -> int:
    return 10 if data.dataset == "modelnet10" else 40


def resolve_num_classes(cfg: Any) -> int:
    """The class count: ``model.num_classes``, else ``data.classes``, the few-shot way, ScanObjectNN's
    15, or the lines of the ModelNet class list."""
    d = cfg.data
    if cfg.model.num_classes > 0:
        return cfg.model.num_classes
    if d.classes:
        return len(d.classes)
    if d.dataset == "modelnet40_fewshot":
        return d.way
    if d.dataset == "scanobjectnn":
        return len(D.SCANOBJECTNN_CLASSES)
    if d.format == "shards":
        names_in_shards = shard_classes(d)
        if names_in_shards is None:
            raise ValueError(f"cannot tell the number of classes: the manifest of {d.shards} names none; set "
                             f"model.num_classes")
        return len(names_in_shards)
    names = Path(d.root) / f"modelnet{_modelnet_n(d)}_shape_names.txt"
    if not names.is_file():
        raise ValueError(f"cannot tell the number of classes: {names} does not exist; set model.num_classes "
                         f"(or data.root)")
    return sum(1 for s in names.read_text().splitlines() if s.strip())


def class_names(cfg: Any, label_map: str | None = None) -> list[str] | None:
    """Class names for reports and `mm3d predict`: a label map file, ``data.classes``, the dataset's
    list, or None when none of them is at hand."""
    d = cfg.data
    if label_map:
        path = Path(label_map)
        if not path.is_file():
            raise FileNotFoundError(f"--label-map {path} does not exist")
        return [s.strip() for s in path.read_text().splitlines() if s.strip()]
    if d.classes:
        return list(d.classes)
    if d.dataset == "scanobjectnn":
        return list(D.SCANOBJECTNN_CLASSES)
    if d.dataset == "modelnet40_fewshot":
        return fewshot.fold_classes(d, d.fold if d.fold >= 0 else cfg.seed, allow_pickle=cfg.allow_pickle)
    if d.format == "shards":
        return shard_classes(d)
    names = Path(d.root) / f"modelnet{_modelnet_n(d)}_shape_names.txt"
    return [s.strip() for s in names.read_text().splitlines() if s.strip()] if names.is_file() else None


def _base_datasets(cfg: Any, splits: set[str]) -> dict[str, Dataset]:
    """The raw train/test datasets of a classification config (no carving, no index).

    Training items carry every stored point (the FPS cache of ModelNet, all points of a
    ScanObjectNN cloud or a few-shot fold entry): the batch transform shuffles them and draws the
    pool from them anew each time, as the official loaders do. Evaluation items carry the pool
    (``data.fps_points``; a prefix of the FPS-ordered cache for ModelNet)."""
    d = cfg.data
    out: dict[str, Dataset] = {}
    wanted = [s for s in ("train", "test") if s in splits]
    if d.format == "shards":  # the same items from prepared shards
        return cls_shard_datasets(cfg, wanted)

    def modelnet(split: str) -> D.ModelNet:
        return D.ModelNet(require_root(d.root, "data.root"), split, num_classes=_modelnet_n(d),
                          npoints=d.cache_points if split == "train" else d.fps_points, cache_points=d.cache_points,
                          max_failure_ratio=d.max_failure_ratio, drop_nonfinite=d.drop_nonfinite)

    if d.dataset == "modelnet40_fewshot":  # a fold file: ids of a ModelNet40 root (.json) or the points (.pkl)
        require_root(d.fewshot_root, "data.fewshot_root")
        fold = d.fold if d.fold >= 0 else cfg.seed
        for split in wanted:
            out[split] = fewshot.open_fold_split(d, split, fold, allow_pickle=cfg.allow_pickle, modelnet=modelnet,
                                                 npoints=d.cache_points if split == "train" else d.fps_points)
        return out
    root = require_root(d.root, "data.root")
    for split in wanted:
        if d.dataset == "scanobjectnn":
            out[split] = D.ScanObjectNN(root, d.scan_variant, split, None if split == "train" else d.fps_points,
                                        seed=None if split == "train" else cfg.seed,
                                        max_failure_ratio=d.max_failure_ratio)
        else:
            out[split] = modelnet(split)
    return out


def _check_classes(cfg: Any, datasets: Mapping[str, Dataset]) -> list[str]:
    """The class list, after checking it against the config and across splits (errors before training)."""
    d = cfg.data
    lists = {s: list(getattr(ds, "classes")) for s, ds in datasets.items()}
    first_split, classes = next(iter(lists.items()))
    for split, names in lists.items():
        if names != classes:
            raise ValueError(f"the {split} split's classes {names[:5]}… differ from the {first_split} split's "
                             f"{classes[:5]}…")
    if d.classes and list(d.classes) != classes:
        diff = next((i for i, (a, b) in enumerate(zip(d.classes, classes)) if a != b),
                    min(len(d.classes), len(classes)))
        raise ValueError(f"data.classes ({len(d.classes)} names) disagrees with the data under {d.root} "
                         f"({len(classes)} classes): first difference at label {diff}: config "
                         f"{d.classes[diff] if diff < len(d.classes) else '(none)'!r} vs data "
                         f"{classes[diff] if diff < len(classes) else '(none)'!r}")
    wide_head = d.dataset == "modelnet40_fewshot" and cfg.model.num_classes >= len(classes)  # official: 40 outputs
    if cfg.model.num_classes and cfg.model.num_classes != len(classes) and not wide_head:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} disagrees with the {len(classes)} classes "
                         f"of the data under {d.root} ({', '.join(classes[:6])}{'…' if len(classes) > 6 else ''})")
    if d.dataset == "modelnet40_fewshot" and len(classes) != d.way:
        raise ValueError(f"the fold file lists {len(classes)} classes, but data.way={d.way}")
    return classes


def build_cls_datasets(cfg: Any, splits: Iterable[str], *, carve_val: bool = True) -> dict[str, Dataset]:
    """Train / val / test datasets of a classification config, each wrapped in :class:`Indexed`.

    The validation split is carved from train (stratified, ``data.val_seed``) when it is asked
    for, ``carve_val`` is set and the run selects on val; selecting on test (``protocol=paper``)
    trains on all of train.
    """
    splits = set(splits)
    base = _base_datasets(cfg, splits | ({"train"} if "val" in splits else set()))
    _check_classes(cfg, base)
    out: dict[str, Dataset] = {}
    if "train" in base:
        train = base["train"]
        carve = carve_val and "val" in splits and cfg.train.select_on == "val" and cfg.data.val_fraction > 0
        if carve:
            labels = [int(train[i]["label"]) for i in range(len(train))] if not hasattr(train, "labels") \
                else [int(x) for x in train.labels]
            keep, held = stratified_split(labels, cfg.data.val_fraction, cfg.data.val_seed)
            if held and keep:
                if "train" in splits:
                    out["train"] = Indexed(train, keep, dropped=getattr(train, "dropped", []))
                out["val"] = Indexed(train, held)
                log.info("validation split: %d of %d training shapes (val_fraction=%g, val_seed=%d)",
                         len(held), len(labels), cfg.data.val_fraction, cfg.data.val_seed)
            else:
                log.warning("the training split is too small to carve a validation split from")
        if "train" in splits and "train" not in out:
            out["train"] = Indexed(train)
    if "test" in base:
        out["test"] = Indexed(base["test"])
    return out


def majority_accuracy(conf: torch.Tensor) -> float:
    """Accuracy of always predicting the split's most frequent class (the chance level to beat);
    conf: (C, C) confusion counts."""
    support = conf.sum(dim=1)
    return float(support.max() / support.sum().clamp(min=1)) if support.numel() else 0.0


def eval_pool(points: torch.Tensor, data: ClsDataConfig) -> torch.Tensor:
    """(B, P, 3) evaluation items -> (B, fps_points, 3) voting pools. ModelNet items are prefixes
    of the FPS cache, so the first ``fps_points`` are the FPS pool (items of a validation split
    carved from train carry the whole cache); other items are the pool."""
    if data.dataset.startswith("modelnet") and points.shape[1] > data.fps_points:
        return points[:, :data.fps_points]
    return points


def eval_points(points: torch.Tensor, data: ClsDataConfig) -> torch.Tensor:
    """The deterministic evaluation input: (B, P, 3) pool -> (B, npoints, 3) farthest points.

    ModelNet pools are FPS-ordered (a prefix of the FPS cache), so the first ``npoints`` are the
    FPS sample; other pools are farthest-point sampled on the device.
    """
    n = data.npoints
    if points.shape[1] == n:
        return points
    if data.dataset.startswith("modelnet"):
        return points[:, :n]
    return sample_points(points, n, "fps")


class VoteRuns:
    """Accumulates the predictions of `runs` independent voting tests (each its own draws of
    subsets and augmentations) and reports their spread.

    ``update(preds (R, B), labels (B,), index (B,))`` per batch; ``compute()`` gathers across ranks,
    counts every sample once and returns, over the R runs, ``vote_top1`` (mean), ``vote_top1_std``,
    ``vote_top1_max`` (the statistic of Point-MAE's published ModelNet number: the best of 300
    runs), ``vote_top1_min``, ``vote_mean_class_acc`` (mean) and ``vote_mean_class_acc_max``.
    """

    def __init__(self, runs: int, num_classes: int) -> None:
        self.runs, self.num_classes = runs, num_classes
        self.preds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []

    def update(self, preds: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        self.preds.append(preds.t().long())  # (B, R): gathered along the sample axis
        self.labels.append(labels.long())
        self.index.append(index.long())

    def compute(self) -> dict[str, float]:
        preds, labels = all_gather_cat(torch.cat(self.preds)), all_gather_cat(torch.cat(self.labels))
        index = all_gather_cat(torch.cat(self.index))
        uniq, inverse = torch.unique(index, return_inverse=True)
        first = torch.full((len(uniq),), len(index), dtype=torch.long, device=index.device).scatter_reduce(
            0, inverse, torch.arange(len(index), device=index.device), reduce="amin")
        preds, labels = preds[first].t().cpu(), labels[first].cpu()  # (R, S), (S,)
        c = self.num_classes
        top1 = (preds == labels).double().mean(dim=1)  # (R,)
        cells = torch.arange(self.runs)[:, None] * c * c + labels[None] * c + preds  # (R, S)
        conf = torch.bincount(cells.reshape(-1), minlength=self.runs * c * c).reshape(self.runs, c, c).double()
        support = conf.sum(dim=2)  # (R, C)
        recall = conf.diagonal(dim1=1, dim2=2) / support.clamp(min=1)
        present = support[0] > 0
        mca = recall[:, present].mean(dim=1) if present.any() else torch.zeros(self.runs, dtype=torch.float64)
        return {"vote_runs": float(self.runs), "vote_top1": float(top1.mean()),
                "vote_top1_std": float(top1.std()) if self.runs > 1 else 0.0,
                "vote_top1_max": float(top1.max()), "vote_top1_min": float(top1.min()),
                "vote_mean_class_acc": float(mca.mean()), "vote_mean_class_acc_max": float(mca.max())}


def read_eval_cloud(path: str | Path, data: Any, *, seed: int = 0) -> torch.Tensor:
    """A point-cloud file (.txt/.xyz/.ply/.pcd/.npy/.bin) as the test protocol feeds it: (npoints, 3) float.

    The farthest-point sample of ``data.npoints`` of its points (from its first point; a random draw with
    repeats, seeded by `seed`, when the file has fewer), centred and scaled into the unit sphere. `data`:
    a classification or pretraining ``data`` section (``npoints``, ``bin_columns``, ``drop_nonfinite``).
    Unreadable files raise OSError or ValueError naming the file. Used by
    :meth:`PointMAEClassifyTask.predict` and :func:`mm3d.pointcloud.load_cloud`.
    """
    points = read_points(path, bin_columns=data.bin_columns, drop_nonfinite=data.drop_nonfinite)
    if points.ndim != 2 or points.shape[1] < 3 or points.shape[0] == 0:
        raise ValueError(f"{path}: expected points with x, y, z first, read an array of shape {points.shape}")
    xyz = torch.from_numpy(np.ascontiguousarray(points[:, :3]))
    n = data.npoints
    idx = sample_indices(xyz, n, "fps") if xyz.shape[0] >= n else \
        sample_indices(xyz, n, "random", generator=torch.Generator().manual_seed(seed))
    return normalize_unit_sphere(xyz[idx])


def _cls_train_defaults() -> TrainConfig:
    return TrainConfig(best_metric="top1", best_mode="max")


@dataclass
class PointClassifyConfig(RunConfig):
    """A Point-MAE classification fine-tuning run (ModelNet, ScanObjectNN, few-shot)."""

    task: str = "pointmae_classify"
    model: PointMAEConfig = field(default_factory=PointMAEConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    train: TrainConfig = field(default_factory=_cls_train_defaults)
    paper_reference: ClassVar[str] = "Point-MAE tools/runner_finetune.py"

    def paper_protocol(self) -> dict[str, Any]:
        """Point-MAE's fine-tuning procedure (``tools/runner_finetune.py``, ``cfgs/*.yaml``):

        - every benchmark trains on all of train and keeps the checkpoint best on test;
        - ModelNet40: the published number is the best of 300 voting runs (``test()``: a
          ``range(1, 300)`` loop of 10-vote tests on the best checkpoint; we run 300);
        - ScanObjectNN: no voting (``validate_vote`` has no 2048-point branch);
        - few-shot: evaluated every epoch, the maximum reported, a 40-output head
          (``cfgs/fewshot.yaml``: ``cls_dim: 40``) whatever the way, no voting;
        - the rate is set once per epoch (timm ``CosineLRScheduler``, ``scheduler.step(epoch)``
          after each epoch: ``optim.schedule_unit=epoch``).
        """
        d = self.data
        preset: dict[str, Any] = {"train": {"select_on": "test", "best_metric": "top1", "best_mode": "max"},
                                  "optim": {"schedule_unit": "epoch"}}
        if d.dataset == "modelnet40_fewshot":
            preset["train"]["eval_every"] = 1
            preset["model"] = {"num_classes": 40}
            preset["data"] = {"votes": 0}
            preset["eval"] = {"report_max": ["top1"]}
        elif d.dataset == "scanobjectnn":
            preset["data"] = {"votes": 0}
        else:
            preset["train"]["eval_every"] = 1
            preset["data"] = {"votes": 10, "vote_splits": ["test"]}
            preset["eval"] = {"vote_runs": 300}
        return preset

    def validate(self) -> None:
        super().validate()
        self.model.check_npoints(self.data.npoints)


class PointMAEClassifyTask(Task):
    """Fine-tune Point-MAE for shape classification (see the module docstring)."""

    name = "pointmae_classify"
    modality = "pointcloud"
    stage = "finetune"
    config_class = PointClassifyConfig
    description = "Point-MAE classification: ModelNet40/10 (1k, 8k), ScanObjectNN, few-shot folds; voting test"

    def build_model(self, cfg: PointClassifyConfig) -> nn.Module:
        return build_classifier(cfg.model, resolve_num_classes(cfg))

    def preprocessing(self, cfg: PointClassifyConfig) -> dict[str, Any]:
        """What ``mm3d predict`` does to a file (:func:`read_eval_cloud`)."""
        return cloud_preprocessing(cfg.model, cfg.data.npoints, sampling="farthest point sampling from point 0 "
                                   "(random, with repeats, when the file has fewer points)")

    def class_names(self, cfg: PointClassifyConfig) -> list[str] | None:
        return class_names(cfg)

    def build_datasets(self, cfg: PointClassifyConfig, splits: Iterable[str]) -> dict[str, Dataset]:
        return build_cls_datasets(cfg, splits)

    def init_weights(self, model: nn.Module, path: str, cfg: PointClassifyConfig) -> list[str]:
        return load_encoder_checkpoint(model, path, allow_pickle=cfg.allow_pickle)

    def batch_transform(self, cfg: PointClassifyConfig, device: torch.device) -> Callable[[Any], Any]:
        """The official training input, drawn anew for every item every time: its stored points
        shuffled, FPS ``data.fps_points`` of them (from the shuffled order's first point) when it has
        more, a random ``data.npoints`` of those, then the augmentation."""
        d = cfg.data
        return training_batch_transform(d.augmentation, device, shuffle=True, fps_pool=d.fps_points,
                                        subset=d.npoints, scale_low=d.scale_low, scale_high=d.scale_high,
                                        translate_range=d.translate_range, up_axis=d.up_axis)

    @torch.no_grad()
    def vote_logits(self, model: nn.Module, points: torch.Tensor, cfg: PointClassifyConfig,
                    generator: torch.Generator) -> torch.Tensor:
        """points: (B, P, 3) FPS pools -> (B, C) logits averaged over ``data.votes`` random subsets of
        ``npoints``, each scaled-and-translated (the official voting test), all drawn from `generator`."""
        d = cfg.data
        aug = build_point_augmentation("scale_translate", scale_low=d.scale_low, scale_high=d.scale_high,
                                       translate_range=d.translate_range, generator=generator)
        total = None
        for _ in range(cfg.data.votes):
            x = random_subset(points, cfg.data.npoints, generator) if points.shape[1] > cfg.data.npoints else points
            logits = model({"points": aug(x)}).logits.float()
            total = logits if total is None else total + logits
        return total / cfg.data.votes

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: PointClassifyConfig, device: torch.device,
                 split: str) -> EvalResult:
        """A per-epoch evaluation: cross-entropy, top-1/5 and mean class accuracy on FPS inputs and
        ``chance_top1`` (the majority-class accuracy). It votes only when the checkpoint is ranked
        on a vote metric (``train.best_metric: vote_top1``), as the official ``--vote`` runs do;
        the reported evaluation (:meth:`final_evaluate`) votes on ``data.vote_splits``."""
        votes = cfg.train.best_metric.startswith("vote_") and split in cfg.data.vote_splits
        return self._evaluate(model, loader, cfg, device, split, runs=1 if votes else 0)

    @torch.no_grad()
    def final_evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: PointClassifyConfig,
                       device: torch.device, split: str) -> EvalResult:
        """The reported evaluation: :meth:`evaluate`'s metrics and, on ``data.vote_splits``, the
        voting test (``data.votes`` random subsets of the FPS pool, each scaled-and-translated,
        logits averaged) repeated ``eval.vote_runs`` times: ``vote_top1`` is the mean over the
        runs, with ``vote_top1_std``, ``vote_top1_max`` (the paper's statistic) and ``vote_top1_min``
        (see :class:`VoteRuns`); one run also gives ``vote_top5`` and the vote confusion matrix."""
        voting = cfg.data.votes > 0 and split in cfg.data.vote_splits
        return self._evaluate(model, loader, cfg, device, split, runs=cfg.eval.vote_runs if voting else 0)

    def _evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: PointClassifyConfig, device: torch.device,
                  split: str, *, runs: int) -> EvalResult:
        model.eval()
        num_classes = model.num_classes
        meter = ClassificationMeter(num_classes, (1, 5))
        vote_meter = ClassificationMeter(num_classes, (1, 5)) if runs == 1 else None
        vote_runs = VoteRuns(runs, num_classes) if runs > 1 else None
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
        means = SplitMeans(["loss"], device)
        for batch in loader:
            batch = move_to_device(batch, device)
            pool, label = eval_pool(batch["points"], cfg.data), batch["label"].reshape(-1)
            index = batch.get("index")
            out = model({"points": eval_points(pool, cfg.data), "label": label})
            means.update(len(label), {"loss": out.loss})
            meter.update(out.logits, label, index)
            if vote_meter is not None:
                vote_meter.update(self.vote_logits(model, pool, cfg, gen), label, index)
            if vote_runs is not None:
                ids = index if index is not None else torch.arange(len(label), device=label.device)
                preds = torch.stack([self.vote_logits(model, pool, cfg, gen).argmax(dim=-1) for _ in range(runs)])
                vote_runs.update(preds, label, ids)
        res = meter.compute()
        metrics = {**means.compute(), **res.metrics, "chance_top1": majority_accuracy(res.confusion)}
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:  # every sample not scored is counted and named; a test split refuses
            account_missing(metrics, unscored_samples(dataset, res.index.tolist()), split,
                            allow_missing=cfg.eval.allow_missing)
        classes = getattr(dataset, "classes", None)
        artifacts: dict[str, Any] = {"classification": res, "classes": classes}
        if vote_meter is not None:
            vres = vote_meter.compute()
            metrics.update({f"vote_{k}": v for k, v in vres.metrics.items() if k != "num_samples"})
            artifacts["vote_confusion"] = vres.confusion
        if vote_runs is not None:
            metrics.update(vote_runs.compute())
            log.info("%s: %d voting runs of %d votes: vote_top1 %.4f ± %.4f (max %.4f, min %.4f)", split, runs,
                     cfg.data.votes, metrics["vote_top1"], metrics["vote_top1_std"], metrics["vote_top1_max"],
                     metrics["vote_top1_min"])
        return EvalResult(metrics, artifacts)

    def run_info(self, cfg: PointClassifyConfig, datasets: Mapping[str, Any]) -> dict[str, Any]:
        """How the run was done, for every results file: protocol, voting, augmentation."""
        selected = selection_split(cfg.train.select_on, list(datasets))
        info = {"config": cfg.name, "task": cfg.task, "seed": cfg.seed, "selected_on": selected,
                "protocol": run_protocol_label(cfg, selected), "dataset": cfg.data.dataset,
                "voting": {"votes": cfg.data.votes, "splits": list(cfg.data.vote_splits),
                           "augmentation": "scale_translate"},
                "augmentation": cfg.data.augmentation, "npoints": cfg.data.npoints, "fps_points": cfg.data.fps_points,
                "init": cfg.init or "scratch"}
        if cfg.data.dataset == "scanobjectnn":
            info["variant"] = cfg.data.scan_variant
        if cfg.data.dataset == "modelnet40_fewshot":
            info["fewshot"] = {"way": cfg.data.way, "shot": cfg.data.shot,
                               "fold": cfg.data.fold if cfg.data.fold >= 0 else cfg.seed}
        return info

    def write_report(self, run_dir: Path, model: nn.Module, cfg: PointClassifyConfig,
                     results: dict[str, EvalResult], datasets: dict[str, Dataset], device: torch.device) -> list[Path]:
        """The common results layout (:mod:`mm3d.results`): results.md (protocol table and the test
        split's per-class accuracy) and per split predictions, per-class accuracy and confusion matrix."""
        files: list[Path] = []
        info = self.run_info(cfg, datasets)
        sections = []
        for split, res in results.items():
            art = res.artifacts or {}
            cls_res = art.get("classification")
            if cls_res is None:
                continue
            n = cls_res.confusion.shape[0]
            names = list(art.get("classes") or getattr(datasets.get(split), "classes", None) or [])
            names += [f"(output {i}: no class)" for i in range(len(names), n)]  # few-shot's 40-output paper head
            files += write_classification_split(run_dir, split, cls_res, names,
                                                title=f"{cfg.name}: {split} ({info['protocol']})")
            if split == "test":
                sections.append(per_class_markdown(cls_res.confusion, names, split))
        files.append(write_results_md(run_dir, f"{cfg.name} ({cfg.task})", table_info(info),
                                      {s: r.metrics for s, r in results.items()}, REPORT_COLUMNS,
                                      extra_info=TABLE_INFO, sections=[*sections, *missing_markdown(
                                          {s: r.metrics for s, r in results.items()})]))
        return files

    def predict(self, model: nn.Module, cfg: PointClassifyConfig, inputs: list[str], *, topk: int,
                label_map: str | None, device: torch.device) -> list[dict[str, Any]]:
        """Classify point-cloud files (.txt/.xyz/.ply/.pcd/.npy/.bin): FPS ``data.npoints`` points on
        the unit sphere, as the test protocol; returns the top-k classes with probabilities. A file
        that cannot be read gives ``{"input", "error", "topk": []}`` (the caller reports it); a
        label map that is missing or of the wrong length raises a UserError."""
        try:
            names = class_names(cfg, label_map)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        num_classes = model.num_classes
        if names is None:
            names = [f"class_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise UserError(f"{len(names)} class names ({label_map or 'from the config/data'}) for a model of "
                            f"{num_classes} classes")
        rows: list[dict[str, Any]] = []
        clouds, read = [], []
        for path in inputs:
            try:
                clouds.append(read_eval_cloud(path, cfg.data, seed=cfg.seed))
            except (OSError, ValueError) as e:
                rows.append({"input": str(path), "error": str(e), "topk": []})
                continue
            read.append(len(rows))
            rows.append({"input": str(path), "topk": []})
        if clouds:
            model.eval()
            with torch.no_grad():
                probs = model({"points": torch.stack(clouds).to(device)}).logits.float().softmax(dim=-1).cpu()
            top = probs.topk(min(topk, num_classes), dim=-1)
            for r, i in enumerate(read):
                rows[i]["topk"] = [(names[int(j)], float(p)) for p, j in zip(top.values[r], top.indices[r])]
        return rows



register_task(PointMAEClassifyTask())
