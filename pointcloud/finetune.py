"""Point-cloud fine-tuning and evaluation: classification, few-shot, SVM probe, part segmentation.

Tasks (the ``task:`` key of a config; every protocol has a config in ``configs/pointcloud/``):

``pointmae_classify``
    Point-MAE encoder + cls token + the official head, fine-tuned with the one trainer.
    ``data.dataset`` picks ModelNet40/10 (1k or 8k points), ScanObjectNN (``data.scan_variant``
    OBJ_BG, OBJ_ONLY, PB_T50_RS) or a few-shot ModelNet40 fold (``modelnet40_fewshot``).
    Training follows the official runner: each item carries ``data.fps_points`` farthest-point
    samples (ModelNet: the first points of the FPS cache, i.e. FPS 1200 for the 1k protocol) and
    :meth:`~PointMAEClassifyTask.batch_transform` draws a random ``data.npoints`` of them, then
    augments the batch on the device (``scale_translate`` or ``rotate``). Evaluation takes the
    FPS ``npoints`` (the cache prefix; FPS on the device for ScanObjectNN subsets) and, on the
    splits in ``data.vote_splits``, also a voting test: ``data.votes`` random subsets of the FPS
    pool, each scaled-and-translated, logits averaged (``vote_top1``...; plain ``top1`` beside it).
``pointmae_classify`` with ``data.dataset: modelnet40_fewshot``
    Few-shot: the fold files of :mod:`mm3d.pointcloud.fewshot` (``mm3d data fewshot``). The fold
    is ``data.fold``, or the run seed when it is -1, so ``seeds: [0, ..., 9]`` in the config runs
    the ten folds through the trainer's multi-seed runner and reports mean ± std over folds.
``pointmae_svm``
    Linear probe: scikit-learn ``LinearSVC`` on frozen max+mean pooled encoder features
    (:meth:`forward_features`). No training steps (``train.epochs: 0``): the trainer builds the
    model, loads the weights and calls :meth:`PointSVMTask.evaluate` on the test split, which
    extracts train and test features, picks C among ``probe.cs`` (on a validation part carved
    from train by default) and scores the test split. Run it as
    ``mm3d evaluate CONFIG checkpoint=PRETRAIN.pt`` (strict load of a pretraining checkpoint) or
    ``mm3d finetune CONFIG init=CKPT`` (encoder weights of any of our checkpoints).
``pointmae_partseg``
    ShapeNetPart part segmentation (:mod:`mm3d.pointcloud.segmentation`), class and instance
    mIoU (:mod:`mm3d.pointcloud.seg_metrics`), Open3D renders of test shapes.

The honest protocol. ``train.select_on`` (the papers' ``select_on_test``) decides which split
picks the reported checkpoint: ``val`` (default) carves a stratified validation split of
``data.val_fraction`` from train with the fixed ``data.val_seed`` (ShapeNetPart uses its official
val list) and reports the test metrics of the checkpoint best on it; ``test`` reproduces the
papers' protocol (train on all of train, select on test) and is labelled so in
``results.json`` (``selected_on``) and in the ``results.md`` table; ``last`` keeps the final
weights. ``results.md`` (written by :meth:`write_report`) carries config, seed, protocol,
voting and augmentation next to the metrics; classification also writes a confusion-matrix PNG
and per-class accuracy per split.

Initialisation (``init=``): our pretraining checkpoints, converted official checkpoints
(``mm3d convert --from pointmae-official``) or our fine-tuned ones — see
:func:`load_encoder_checkpoint`; ``init: ""`` trains from scratch.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mm3d.checkpoint import (CheckpointError, compare_state_dicts, extract_state_dict, load_checkpoint,
                             load_model_weights)
from mm3d.config import RunConfig, TrainConfig
from mm3d.registry import register_task
from mm3d.task import EvalResult, Task
from mm3d.pointcloud import fewshot  # also registers `mm3d data fewshot`
from mm3d.pointcloud.models import PointMAEConfig, build_classifier, build_pretrain_model
from mm3d.pointcloud.segmentation import SegHeadConfig, build_segmentation_model

log = logging.getLogger(__name__)

Augmentation = Literal["scale_translate", "rotate", "none"]
SegAugmentation = Literal["scale_shift", "scale_translate", "rotate", "none"]


# ================================================================================================
# Shared pieces
# ================================================================================================


class Indexed(Dataset):
    """A view of `base` (optionally a subset of its items) whose items also carry ``index``: ()
    their position in this view, used to count each sample once when DDP ranks gather results.

    Attributes of the base dataset that the tasks read (``classes``, ``categories``) are copied.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None) -> None:
        self.base = base
        self.indices = list(range(len(base))) if indices is None else [int(i) for i in indices]
        for attr in ("classes", "categories"):
            if hasattr(base, attr):
                setattr(self, attr, list(getattr(base, attr)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.base[self.indices[i]], "index": torch.tensor(i, dtype=torch.long)}


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(keep, held out) positions: about `fraction` of every class held out, chosen with `seed`.

    Classes with at least two samples give at least one held-out sample; a class with one sample
    stays in `keep`. The result depends only on (labels, fraction, seed).
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2 or fraction <= 0:
            continue
        n = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held += rng.choice(members, size=n, replace=False).tolist()
    held_set = set(held)
    keep = [i for i in range(len(labels)) if i not in held_set]
    return keep, sorted(held)


def effective_selection(cfg: RunConfig, datasets: Mapping[str, Any]) -> str:
    """The split that selects the reported checkpoint, with the trainer's fall-backs."""
    s = cfg.train.select_on
    if s in ("val", "test") and s not in datasets:
        return "last"
    return s


def protocol_label(cfg: RunConfig, selected_on: str) -> str:
    if cfg.checkpoint:
        return f"given checkpoint ({Path(cfg.checkpoint).name})"
    return {"val": "selected on val (honest)", "test": "selected on test (papers' protocol)",
            "last": "last checkpoint"}[selected_on]


def _official_hint(keys: Iterable[str]) -> str:
    if any(k.startswith(("MAE_encoder.", "MAE_decoder.", "blocks.blocks.", "cls_head_finetune.")) for k in keys):
        return (" It looks like an official Point-MAE checkpoint: convert it first with "
                "`mm3d convert --from pointmae-official IN OUT` and pass OUT.")
    return ""


def load_encoder_checkpoint(model: nn.Module, src: str | Path | Mapping[str, Any], *,
                            allow_pickle: bool = False) -> list[str]:
    """Initialise a fine-tuning model from any Point-MAE checkpoint of ours; return log notes.

    * Every ``encoder.*`` weight of `model` must be in the checkpoint with the same shape, and the
      checkpoint may hold no ``encoder.*`` weight the model lacks: otherwise
      :class:`~mm3d.checkpoint.CheckpointError` names the mismatching keys and shapes (the
      config's architecture differs from the checkpoint's).
    * Weights the model does not have (the pretraining decoder, ``mask_token``, another task's
      head) are dropped and listed.
    * Other weights of the model that the checkpoint has with the same shape (a fine-tuned
      head) are loaded; a head of another shape (another class count) is left at its
      initialisation and listed.
    """
    ckpt = load_checkpoint(src, allow_pickle=allow_pickle) if isinstance(src, (str, Path)) else src
    sd = {k.removeprefix("module."): v for k, v in extract_state_dict(ckpt).items()}
    expected = model.state_dict()
    where = f" {src}" if isinstance(src, (str, Path)) else ""
    enc_expected = {k: v for k, v in expected.items() if k.startswith("encoder.")}
    enc_given = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    if not enc_given:
        raise CheckpointError(f"checkpoint{where} holds no Point-MAE encoder weights (encoder.*); its keys "
                              f"start with {sorted({k.split('.')[0] for k in sd})[:12]}.{_official_hint(sd)}")
    missing, unexpected, mismatched = compare_state_dicts(enc_expected, enc_given)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("mismatching shapes: " + "; ".join(mismatched))
        if missing:
            parts.append(f"encoder keys missing from the checkpoint: {_short(missing)}")
        if unexpected:
            parts.append(f"encoder keys the model lacks: {_short(unexpected)}")
        raise CheckpointError(f"checkpoint{where} does not match the model architecture of the config "
                              f"(check model.variant / trans_dim / depth / encoder_dims): " + " | ".join(parts))
    notes = []
    unused = sorted(k for k in sd if k not in expected)
    if unused:
        notes.append(f"dropped {len(unused)} checkpoint tensors this {type(model).__name__} does not use: "
                     f"{_by_module(unused)}")
    reinit = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and not k.startswith("encoder.") and sd[k].shape != v.shape]
    if reinit:
        notes.append("left at initialisation (shape differs, e.g. another class count): " + "; ".join(reinit))
    usable = {k: v for k, v in sd.items() if k in expected and v.shape == expected[k].shape}
    new = sorted(k for k in expected if k not in usable and not k.startswith("encoder."))
    if new:
        notes.append(f"newly initialised (not in the checkpoint): {_by_module(new)}")
    notes += load_model_weights(model, {"model": usable}, strict=False)[-1:]
    return notes


def _short(keys: Sequence[str], n: int = 10) -> str:
    keys = list(keys)
    return "[" + ", ".join(keys[:n]) + (f", … {len(keys) - n} more" if len(keys) > n else "") + "]"


def _by_module(keys: Sequence[str]) -> str:
    """Keys summarised by their first name component: ``decoder.* (16), mask_token``."""
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(".", 1)[0]
        groups[head + (".*" if "." in k else "")] = groups.get(head + (".*" if "." in k else ""), 0) + 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in sorted(groups.items()))


def _metric_table(cfg: RunConfig, info: Mapping[str, Any], results: Mapping[str, EvalResult],
                  columns: Sequence[str]) -> str:
    """The results.md table: one row per split, with the run's protocol description."""
    head = ["config", "task", "seed", "protocol", "voting", "augmentation", "split", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split in ("val", "test"):
        if split not in results:
            continue
        m = results[split].metrics
        vals = [f"{m[c]:.4f}" if isinstance(m.get(c), float) else ("–" if c not in m else str(m[c])) for c in columns]
        voting = info.get("voting", "–")
        if isinstance(voting, dict):
            voting = f"{voting['votes']} votes on {'/'.join(voting['splits'])}" if voting["votes"] else "off"
        lines.append("| " + " | ".join([str(info["config"]), str(info["task"]), str(info["seed"]), info["protocol"],
                                         str(voting), str(info.get("augmentation", "–")), split, *vals]) + " |")
    return "\n".join(lines) + "\n"


def _write_results_md(run_dir: Path, cfg: RunConfig, info: Mapping[str, Any], results: Mapping[str, EvalResult],
                      columns: Sequence[str], extra: str = "") -> Path:
    path = Path(run_dir) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {cfg.name} ({cfg.task})\n\n" + _metric_table(cfg, info, results, columns) + extra)
    return path


def _eval_loader(dataset: Dataset, cfg: RunConfig, collate: Callable | None = None):
    """An ordered, rank-sharded loader without padding (each sample scored once overall)."""
    from mm3d.data import ResumableSampler, build_loader
    from mm3d.distributed import get_info

    info = get_info()
    sampler = ResumableSampler(len(dataset), shuffle=False, rank=info.rank, world_size=info.world_size, pad=False)
    return build_loader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.train.num_workers,
                        collate_fn=collate, drop_last=False, pin_memory=False, seed=cfg.seed)


# ================================================================================================
# Classification data
# ================================================================================================


@dataclass
class ClsDataConfig:
    """The ``data`` section of point-cloud classification (fine-tuning, few-shot, SVM probe)."""

    dataset: Literal["modelnet40", "modelnet10", "scanobjectnn", "modelnet40_fewshot"] = "modelnet40"
    root: str = ""  # ModelNet root (also for few-shot) or ScanObjectNN root
    # ScanObjectNN variant (not called `variant`: that key names a model preset in the config system)
    scan_variant: Literal["OBJ_BG", "OBJ_ONLY", "PB_T50_RS"] = "OBJ_BG"
    npoints: int = 1024  # points the model sees
    fps_points: int = 1200  # FPS pool per item: training draws npoints at random from it (official 1200 for 1k)
    cache_points: int = 8192  # ModelNet: FPS points cached per shape
    classes: list[str] = field(default_factory=list)  # expected class names in label order ([]: from the data)
    val_fraction: float = 0.1  # carved from train (stratified) when train.select_on == "val"
    val_seed: int = 0  # fixed: every run seed sees the same validation split
    augmentation: Augmentation = "scale_translate"
    scale_low: float = 2.0 / 3.0
    scale_high: float = 3.0 / 2.0
    translate_range: float = 0.2
    up_axis: Literal["x", "y", "z"] = "y"
    votes: int = 10  # voting test: scale-and-translate votes (0: off)
    vote_splits: list[str] = field(default_factory=lambda: ["test"])
    fewshot_root: str = ""  # folder written by `mm3d data fewshot`
    way: int = 5
    shot: int = 10
    fold: int = -1  # -1: the run seed is the fold (seeds: [0..9] runs all ten)

    def validate(self) -> None:
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


def _modelnet_n(data: ClsDataConfig) -> int:
    return 10 if data.dataset == "modelnet10" else 40


def _require_root(path: str, what: str) -> Path:
    if not path:
        raise ValueError(f"{what} is empty: give the dataset folder (e.g. {what}=DIR on the command line)")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {p} is not a folder")
    return p


def resolve_num_classes(cfg: Any) -> int:
    """The class count: ``model.num_classes``, else ``data.classes``, the few-shot way, ScanObjectNN's
    15, or the lines of the ModelNet class list."""
    from mm3d.pointcloud.datasets import SCANOBJECTNN_CLASSES

    d = cfg.data
    if cfg.model.num_classes > 0:
        return cfg.model.num_classes
    if d.classes:
        return len(d.classes)
    if d.dataset == "modelnet40_fewshot":
        return d.way
    if d.dataset == "scanobjectnn":
        return len(SCANOBJECTNN_CLASSES)
    names = Path(d.root) / f"modelnet{_modelnet_n(d)}_shape_names.txt"
    if not names.is_file():
        raise ValueError(f"cannot tell the number of classes: {names} does not exist; set model.num_classes "
                         f"(or data.root)")
    return sum(1 for s in names.read_text().splitlines() if s.strip())


def class_names(cfg: Any, label_map: str | None = None) -> list[str] | None:
    """Class names for reports and `mm3d predict`: a label map file, ``data.classes``, the dataset's
    list, or None when none of them is at hand."""
    from mm3d.pointcloud.datasets import SCANOBJECTNN_CLASSES

    d = cfg.data
    if label_map:
        path = Path(label_map)
        if not path.is_file():
            raise FileNotFoundError(f"--label-map {path} does not exist")
        return [s.strip() for s in path.read_text().splitlines() if s.strip()]
    if d.classes:
        return list(d.classes)
    if d.dataset == "scanobjectnn":
        return list(SCANOBJECTNN_CLASSES)
    if d.dataset == "modelnet40_fewshot":
        path = fewshot.fold_path(d.fewshot_root, d.way, d.shot, d.fold if d.fold >= 0 else cfg.seed)
        return list(fewshot.read_fold(path)["classes"]) if path.is_file() else None
    names = Path(d.root) / f"modelnet{_modelnet_n(d)}_shape_names.txt"
    return [s.strip() for s in names.read_text().splitlines() if s.strip()] if names.is_file() else None


def _base_datasets(cfg: Any, splits: set[str]) -> dict[str, Dataset]:
    """The raw train/test datasets of a classification config (no carving, no index)."""
    from mm3d.pointcloud import datasets as D

    d = cfg.data
    root = _require_root(d.root, "data.root")
    out: dict[str, Dataset] = {}
    for split in ("train", "test"):
        if split not in splits:
            continue
        if d.dataset == "scanobjectnn":
            out[split] = D.ScanObjectNN(root, d.scan_variant, split, d.fps_points,
                                        seed=None if split == "train" else cfg.seed)
        else:
            base = D.ModelNet(root, split, num_classes=_modelnet_n(d), npoints=d.fps_points,
                              cache_points=d.cache_points)
            if d.dataset == "modelnet40_fewshot":
                fold = d.fold if d.fold >= 0 else cfg.seed
                _require_root(d.fewshot_root, "data.fewshot_root")
                base = fewshot.FewShotModelNet(base, fewshot.fold_path(d.fewshot_root, d.way, d.shot, fold), split)
            out[split] = base
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
    if cfg.model.num_classes and cfg.model.num_classes != len(classes):
        raise ValueError(f"model.num_classes={cfg.model.num_classes} disagrees with the {len(classes)} classes "
                         f"of the data under {d.root} ({', '.join(classes[:6])}{'…' if len(classes) > 6 else ''})")
    if d.dataset == "modelnet40_fewshot" and len(classes) != d.way:
        raise ValueError(f"the fold file lists {len(classes)} classes, but data.way={d.way}")
    return classes


def build_cls_datasets(cfg: Any, splits: Iterable[str], *, carve_val: bool = True) -> dict[str, Dataset]:
    """Train / val / test datasets of a classification config, each wrapped in :class:`Indexed`.

    The validation split is carved from train (stratified, ``data.val_seed``) when it is asked
    for, ``carve_val`` is set and the run selects on val; the papers' protocol trains on all of
    train.
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
                    out["train"] = Indexed(train, keep)
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


def random_subset(points: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """points: (B, P, C) -> (B, n, C): n distinct points of every cloud at random (batched)."""
    b, p = points.shape[:2]
    if n >= p:
        if n > p:
            raise ValueError(f"cannot draw {n} distinct points from clouds of {p}")
        n = p
    device = generator.device if generator is not None else points.device
    idx = torch.rand(b, p, generator=generator, device=device).argsort(dim=1)[:, :n].to(points.device)
    return torch.gather(points, 1, idx.unsqueeze(-1).expand(-1, -1, points.shape[-1]))


def cls_augmentation(data: ClsDataConfig, kind: str | None = None,
                     generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Batched augmentation of (B, N, 3) points (``kind`` overrides ``data.augmentation``)."""
    from mm3d.pointcloud import transforms as T

    kind = kind or data.augmentation
    if kind == "scale_translate":
        return lambda p: T.scale_and_translate(p, scale_low=data.scale_low, scale_high=data.scale_high,
                                               translate_range=data.translate_range, generator=generator)
    if kind == "rotate":
        return lambda p: T.rotate_up_axis(p, up_axis=data.up_axis, generator=generator)
    return None


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
    from mm3d.pointcloud.transforms import sample_points

    return sample_points(points, n, "fps")


# ================================================================================================
# Classification task
# ================================================================================================


def _cls_train_defaults() -> TrainConfig:
    return TrainConfig(best_metric="top1", best_mode="max")


@dataclass
class PointClassifyConfig(RunConfig):
    """A Point-MAE classification fine-tuning run (ModelNet, ScanObjectNN, few-shot)."""

    task: str = "pointmae_classify"
    model: PointMAEConfig = field(default_factory=PointMAEConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    train: TrainConfig = field(default_factory=_cls_train_defaults)

    def validate(self) -> None:
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

    def build_datasets(self, cfg: PointClassifyConfig, splits: Iterable[str]) -> dict[str, Dataset]:
        return build_cls_datasets(cfg, splits)

    def init_weights(self, model: nn.Module, path: str, cfg: PointClassifyConfig) -> list[str]:
        return load_encoder_checkpoint(model, path, allow_pickle=cfg.allow_pickle)

    def batch_transform(self, cfg: PointClassifyConfig, device: torch.device) -> Callable[[Any], Any]:
        aug = cls_augmentation(cfg.data)
        n = cfg.data.npoints

        def transform(batch: dict[str, Any]) -> dict[str, Any]:
            pts = batch["points"]
            if pts.shape[1] > n:  # the official FPS-pool-then-random draw
                pts = random_subset(pts, n)
            return {**batch, "points": aug(pts) if aug is not None else pts}

        return transform

    @torch.no_grad()
    def vote_logits(self, model: nn.Module, points: torch.Tensor, cfg: PointClassifyConfig,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """points: (B, P, 3) FPS pools -> (B, C) logits averaged over ``data.votes`` random subsets of
        ``npoints``, each scaled-and-translated (the official voting test)."""
        aug = cls_augmentation(cfg.data, "scale_translate", generator)
        total = None
        for _ in range(cfg.data.votes):
            x = random_subset(points, cfg.data.npoints, generator) if points.shape[1] > cfg.data.npoints else points
            logits = model({"points": aug(x)}).logits.float()
            total = logits if total is None else total + logits
        return total / cfg.data.votes

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: PointClassifyConfig, device: torch.device,
                 split: str) -> EvalResult:
        """Cross-entropy, top-1/5 and mean class accuracy on FPS inputs, ``chance_top1`` (the
        majority-class accuracy); with voting on ``data.vote_splits``: ``vote_top1``,
        ``vote_top5``, ``vote_mean_class_acc``."""
        from mm3d.distributed import all_reduce_sum
        from mm3d.metrics import ClassificationMeter
        from mm3d.trainer import move_to_device

        model.eval()
        num_classes = model.num_classes
        meter = ClassificationMeter(num_classes, (1, 5))
        voting = cfg.data.votes > 0 and split in cfg.data.vote_splits
        vote_meter = ClassificationMeter(num_classes, (1, 5)) if voting else None
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
        loss = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in loader:
            batch = move_to_device(batch, device)
            pool, label = batch["points"], batch["label"].reshape(-1)
            index = batch.get("index")
            out = model({"points": eval_points(pool, cfg.data), "label": label})
            loss += torch.stack([out.loss.double() * len(label), torch.tensor(float(len(label)), dtype=torch.float64,
                                                                              device=device)])
            meter.update(out.logits, label, index)
            if vote_meter is not None:
                vote_meter.update(self.vote_logits(model, pool, cfg, gen), label, index)
        loss = all_reduce_sum(loss)
        res = meter.compute()
        metrics = {"loss": float(loss[0] / loss[1].clamp(min=1)), **res.metrics,
                   "chance_top1": majority_accuracy(res.confusion)}
        classes = getattr(getattr(loader, "dataset", None), "classes", None)
        artifacts: dict[str, Any] = {"confusion": res.confusion, "classes": classes}
        if vote_meter is not None:
            vres = vote_meter.compute()
            metrics.update({f"vote_{k}": v for k, v in vres.metrics.items() if k != "num_samples"})
            artifacts["vote_confusion"] = vres.confusion
        return EvalResult(metrics, artifacts)

    def run_info(self, cfg: PointClassifyConfig, datasets: Mapping[str, Any]) -> dict[str, Any]:
        """How the run was done, for every results file: protocol, voting, augmentation."""
        selected = effective_selection(cfg, datasets)
        info = {"config": cfg.name, "task": cfg.task, "seed": cfg.seed, "selected_on": selected,
                "protocol": protocol_label(cfg, selected), "dataset": cfg.data.dataset,
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
        """results.md (protocol table), and per split a confusion-matrix PNG and per-class accuracy CSV."""
        from mm3d.metrics import per_class_accuracy, plot_confusion

        files: list[Path] = []
        info = self.run_info(cfg, datasets)
        per_class_md = ""
        for split, res in results.items():
            art = res.artifacts or {}
            conf = art.get("confusion")
            if conf is None:
                continue
            names = art.get("classes") or getattr(datasets.get(split), "classes", None) or \
                [str(i) for i in range(conf.shape[0])]
            files.append(plot_confusion(conf, names, Path(run_dir) / "plots" / f"confusion_{split}.png",
                                        title=f"{cfg.name}: {split} ({info['protocol']})"))
            acc = per_class_accuracy(conf)
            csv_path = Path(run_dir) / f"per_class_accuracy_{split}.csv"
            with csv_path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["label", "class", "samples", "correct", "accuracy"])
                for i, name in enumerate(names):
                    w.writerow([i, name, int(conf[i].sum()), int(conf[i, i]),
                                "" if torch.isnan(acc[i]) else f"{float(acc[i]):.4f}"])
            files.append(csv_path)
            if split == "test":
                cell = ["–" if torch.isnan(a) else f"{float(a):.4f}" for a in acc]
                rows = [f"| {name} | {int(conf[i].sum())} | {cell[i]} |" for i, name in enumerate(names)]
                per_class_md = "\n## Per-class accuracy (test)\n\n| class | samples | accuracy |\n|---|---|---|\n" + \
                    "\n".join(rows) + "\n"
        columns = ["top1", "vote_top1", "mean_class_acc", "vote_mean_class_acc", "top5", "chance_top1", "loss",
                   "num_samples"]
        files.append(_write_results_md(run_dir, cfg, info, results, columns, per_class_md))
        return files

    def predict(self, model: nn.Module, cfg: PointClassifyConfig, inputs: list[str], *, topk: int,
                label_map: str | None, device: torch.device) -> list[dict[str, Any]]:
        """Classify point-cloud files (.txt/.xyz/.ply/.pcd/.npy/.bin): FPS ``data.npoints`` points on
        the unit sphere, as the test protocol; returns the top-k classes with probabilities."""
        from mm3d.pointcloud.io import read_points
        from mm3d.pointcloud.transforms import normalize_unit_sphere, sample_indices

        names = class_names(cfg, label_map)
        num_classes = model.num_classes
        if names is None:
            names = [f"class_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names ({label_map or 'from the config/data'}) for a model of "
                             f"{num_classes} classes")
        clouds = []
        for path in inputs:
            xyz = torch.from_numpy(np.ascontiguousarray(read_points(path)[:, :3]))
            n = cfg.data.npoints
            idx = sample_indices(xyz, n, "fps") if xyz.shape[0] >= n else \
                sample_indices(xyz, n, "random", generator=torch.Generator().manual_seed(cfg.seed))
            clouds.append(normalize_unit_sphere(xyz[idx]))
        model.eval()
        with torch.no_grad():
            probs = model({"points": torch.stack(clouds).to(device)}).logits.float().softmax(dim=-1).cpu()
        k = min(topk, num_classes)
        top = probs.topk(k, dim=-1)
        return [{"input": str(path), "topk": [(names[int(j)], float(p)) for p, j in zip(top.values[r], top.indices[r])]}
                for r, path in enumerate(inputs)]


# ================================================================================================
# Linear SVM probe
# ================================================================================================


@dataclass
class ProbeConfig:
    """The ``probe`` section of the linear-SVM evaluation."""

    cs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # candidate C values
    max_iter: int = 20000
    standardize: bool = False  # z-score the features (fitted on the training features)

    def validate(self) -> None:
        if not self.cs or any(c <= 0 for c in self.cs):
            raise ValueError(f"cs must be a non-empty list of positive numbers, got {self.cs}")
        if self.max_iter <= 0:
            raise ValueError(f"max_iter must be positive, got {self.max_iter}")


def _svm_train_defaults() -> TrainConfig:
    return TrainConfig(epochs=0, best_metric="top1", best_mode="max", save_every=0, eval_every=0)


@dataclass
class PointSVMConfig(RunConfig):
    """Linear SVM on frozen Point-MAE features (no training steps: ``train.epochs`` stays 0)."""

    task: str = "pointmae_svm"
    model: PointMAEConfig = field(default_factory=PointMAEConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=_svm_train_defaults)

    def validate(self) -> None:
        if self.train.epochs != 0 or self.train.max_steps:
            raise ValueError("the SVM probe trains no network: keep train.epochs at 0 (and max_steps unset)")
        if len(self.probe.cs) > 1 and self.train.select_on == "last":
            raise ValueError(f"probe.cs has {len(self.probe.cs)} values: choose C with train.select_on=val "
                             f"(honest) or test (papers' protocol), or give one value")


@dataclass
class ProbeResult:
    """The fitted probe: chosen C, its validation accuracy (None without selection), test accuracy,
    predicted (S,) labels."""

    c: float
    val_accuracy: float | None
    scores: dict[float, float]  # selection accuracy of every candidate C
    pred: np.ndarray


def fit_linear_svm(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                   cs: Sequence[float], select_on: str, val_fraction: float = 0.1, val_seed: int = 0,
                   max_iter: int = 20000, standardize: bool = False) -> ProbeResult:
    """Fit ``LinearSVC`` on (S, F) features; choose C on a stratified val part of train
    (`select_on` = ``val``), on the test set (``test``, the papers' protocol) or take the only one."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    def make(c: float):
        svc = LinearSVC(C=c, max_iter=max_iter, dual="auto")
        return make_pipeline(StandardScaler(), svc) if standardize else svc

    scores: dict[float, float] = {}
    if len(cs) == 1:
        best, val_acc = float(cs[0]), None
    else:
        if select_on == "val":
            keep, held = stratified_split(train_y.tolist(), val_fraction, val_seed)
            if not held:
                raise ValueError("too few training samples to carve a validation part for choosing C")
            fit_x, fit_y, sel_x, sel_y = train_x[keep], train_y[keep], train_x[held], train_y[held]
        elif select_on == "test":
            fit_x, fit_y, sel_x, sel_y = train_x, train_y, test_x, test_y
        else:
            raise ValueError(f"several C values need select_on 'val' or 'test', got {select_on!r}")
        for c in cs:
            scores[float(c)] = float((make(c).fit(fit_x, fit_y).predict(sel_x) == sel_y).mean())
        best = max(scores, key=lambda c: (scores[c], -c))  # ties: the smaller C (stronger regularisation)
        val_acc = scores[best]
    clf = make(best).fit(train_x, train_y)
    return ProbeResult(best, val_acc, scores, clf.predict(test_x))


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable[Any], data: ClsDataConfig,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 2D) max+mean pooled features and (S,) labels of every sample once (DDP-gathered,
    ordered by sample index)."""
    from mm3d.distributed import all_gather_cat
    from mm3d.trainer import move_to_device

    model.eval()
    feats, labels, index = [], [], []
    for batch in loader:
        batch = move_to_device(batch, device)
        feats.append(model.forward_features(eval_points(batch["points"], data)).float())
        labels.append(batch["label"].reshape(-1).long())
        index.append(batch["index"].long())
    f = all_gather_cat(torch.cat(feats))
    y, i = all_gather_cat(torch.cat(labels)), all_gather_cat(torch.cat(index))
    uniq, inverse = torch.unique(i, return_inverse=True)
    first = torch.full((len(uniq),), len(i), dtype=torch.long, device=i.device).scatter_reduce(
        0, inverse, torch.arange(len(i), device=i.device), reduce="amin")
    return f[first].cpu(), y[first].cpu()


class PointSVMTask(Task):
    """Linear SVM probe on frozen pooled features (see the module docstring)."""

    name = "pointmae_svm"
    modality = "pointcloud"
    stage = "finetune"
    config_class = PointSVMConfig
    description = "Linear SVM probe on frozen Point-MAE features (ModelNet40, ScanObjectNN)"

    def build_model(self, cfg: PointSVMConfig) -> nn.Module:
        return build_pretrain_model(cfg.model)

    def build_datasets(self, cfg: PointSVMConfig, splits: Iterable[str]) -> dict[str, Dataset]:
        splits = set(splits) - {"val"}  # C is chosen inside evaluate, on features
        return build_cls_datasets(cfg, splits, carve_val=False)

    def init_weights(self, model: nn.Module, path: str, cfg: PointSVMConfig) -> list[str]:
        return load_encoder_checkpoint(model, path, allow_pickle=cfg.allow_pickle)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: PointSVMConfig, device: torch.device,
                 split: str) -> EvalResult:
        """Fit the probe on the training features and score `split`: ``top1``, ``mean_class_acc``,
        the chosen ``C`` and its selection accuracy ``select_top1``."""
        from mm3d.metrics import confusion_matrix, mean_class_accuracy

        train_ds = build_cls_datasets(cfg, ["train"], carve_val=False)["train"]
        train_x, train_y = extract_features(model, _eval_loader(train_ds, cfg), cfg.data, device)
        test_x, test_y = extract_features(model, loader, cfg.data, device)
        select = cfg.train.select_on if cfg.train.select_on in ("val", "test") else "last"
        res = fit_linear_svm(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), cs=cfg.probe.cs,
                             select_on=select, val_fraction=cfg.data.val_fraction, val_seed=cfg.data.val_seed,
                             max_iter=cfg.probe.max_iter, standardize=cfg.probe.standardize)
        num_classes = resolve_num_classes(cfg)
        conf = confusion_matrix(torch.from_numpy(res.pred), test_y, num_classes)
        metrics = {"top1": float((res.pred == test_y.numpy()).mean()), "mean_class_acc": mean_class_accuracy(conf),
                   "chance_top1": majority_accuracy(conf),
                   "C": res.c, "num_samples": float(len(test_y)), "train_samples": float(len(train_y))}
        if res.val_accuracy is not None:
            metrics["select_top1"] = res.val_accuracy
        log.info("SVM probe on %s: C=%g (candidates %s) -> top1 %.4f", split, res.c, res.scores or cfg.probe.cs,
                 metrics["top1"])
        classes = getattr(getattr(loader, "dataset", None), "classes", None)
        return EvalResult(metrics, {"confusion": conf, "classes": classes, "c_scores": res.scores})

    def run_info(self, cfg: PointSVMConfig, datasets: Mapping[str, Any]) -> dict[str, Any]:
        sel = cfg.train.select_on if len(cfg.probe.cs) > 1 else "last"
        protocol = {"val": "C chosen on val carved from train (honest)",
                    "test": "C chosen on test (papers' protocol)", "last": f"fixed C={cfg.probe.cs[0]}"}[sel]
        if cfg.checkpoint:
            protocol += f"; checkpoint {Path(cfg.checkpoint).name}"
        return {"config": cfg.name, "task": cfg.task, "seed": cfg.seed, "selected_on": sel, "protocol": protocol,
                "voting": "off", "augmentation": "none (frozen features)", "dataset": cfg.data.dataset,
                "cs": list(cfg.probe.cs), "init": cfg.init or cfg.checkpoint or "scratch"}

    def write_report(self, run_dir: Path, model: nn.Module, cfg: PointSVMConfig, results: dict[str, EvalResult],
                     datasets: dict[str, Dataset], device: torch.device) -> list[Path]:
        from mm3d.metrics import plot_confusion

        files = []
        info = self.run_info(cfg, datasets)
        for split, res in results.items():
            art = res.artifacts or {}
            if art.get("confusion") is not None:
                files.append(plot_confusion(art["confusion"], art.get("classes"),
                                            Path(run_dir) / "plots" / f"svm_confusion_{split}.png",
                                            title=f"{cfg.name}: linear SVM, {split}"))
        files.append(_write_results_md(run_dir, cfg, info, results,
                                       ["top1", "mean_class_acc", "C", "select_top1", "chance_top1", "num_samples"]))
        return files


# ================================================================================================
# Part segmentation
# ================================================================================================


@dataclass
class PartSegDataConfig:
    """The ``data`` section of ShapeNetPart part segmentation."""

    root: str = ""  # shapenetcore_partanno_segmentation_benchmark_v0_normal
    npoints: int = 2048
    # "auto": train + official val selection for select_on=val, else train on trainval (as the papers)
    train_split: Literal["auto", "train", "trainval"] = "auto"
    augmentation: SegAugmentation = "scale_shift"  # official: isotropic scale U(0.8, 1.25) + shift U(-0.1, 0.1)
    scale_low: float = 0.8
    scale_high: float = 1.25
    translate_range: float = 0.1
    up_axis: Literal["x", "y", "z"] = "y"
    render_shapes: int = 4  # Open3D renders of test shapes in the report (0: none)

    def validate(self) -> None:
        if self.npoints <= 0:
            raise ValueError(f"npoints must be positive, got {self.npoints}")
        if not 0 < self.scale_low <= self.scale_high:
            raise ValueError(f"need 0 < scale_low <= scale_high, got {self.scale_low}, {self.scale_high}")
        if self.render_shapes < 0:
            raise ValueError(f"render_shapes must be >= 0, got {self.render_shapes}")


def _seg_train_defaults() -> TrainConfig:
    return TrainConfig(best_metric="instance_miou", best_mode="max")


def _seg_model_defaults() -> PointMAEConfig:
    return PointMAEConfig(num_group=128, group_size=32)


@dataclass
class PointPartSegConfig(RunConfig):
    """A Point-MAE ShapeNetPart part-segmentation run."""

    task: str = "pointmae_partseg"
    model: PointMAEConfig = field(default_factory=_seg_model_defaults)
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    data: PartSegDataConfig = field(default_factory=PartSegDataConfig)
    train: TrainConfig = field(default_factory=_seg_train_defaults)

    def validate(self) -> None:
        self.model.check_npoints(self.data.npoints)


def seg_augmentation(data: PartSegDataConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Batched augmentation of (B, N, 3) points for segmentation training."""
    from mm3d.pointcloud import transforms as T

    if data.augmentation == "scale_shift":
        def scale_shift(p: torch.Tensor) -> torch.Tensor:
            b = p.shape[0]
            scale = torch.empty(b, 1, 1, device=p.device, dtype=p.dtype).uniform_(data.scale_low, data.scale_high)
            shift = torch.empty(b, 1, 3, device=p.device, dtype=p.dtype).uniform_(-data.translate_range,
                                                                                  data.translate_range)
            return p * scale + shift
        return scale_shift
    if data.augmentation == "scale_translate":
        return lambda p: T.scale_and_translate(p, scale_low=data.scale_low, scale_high=data.scale_high,
                                               translate_range=data.translate_range)
    if data.augmentation == "rotate":
        return lambda p: T.rotate_up_axis(p, up_axis=data.up_axis)
    return None


PART_PALETTE = np.array([  # colours of a category's parts, in part order
    (0.85, 0.16, 0.15), (0.16, 0.47, 0.80), (0.20, 0.65, 0.25), (0.95, 0.60, 0.05),
    (0.55, 0.27, 0.70), (0.10, 0.70, 0.70), (0.55, 0.35, 0.15)], dtype=np.float32)


def part_colors(parts: np.ndarray, category_parts: Sequence[int]) -> np.ndarray:
    """(N,) global part ids -> (N, 3) RGB, the i-th part of the category in ``PART_PALETTE[i]``."""
    first = int(min(category_parts))
    local = np.clip(parts.astype(np.int64) - first, 0, None) % len(PART_PALETTE)
    return PART_PALETTE[local]


def render_segmentation(points: np.ndarray, gt: np.ndarray, pred: np.ndarray, category_parts: Sequence[int],
                        path: str | Path, *, title: str = "", renderer: Any = None, size: int = 400) -> Path:
    """PNG with the ground truth (left) next to the prediction (right), coloured by part.

    points: (N, 3); gt, pred: (N,) global part ids; category_parts: the shape category's part ids.
    """
    from PIL import Image, ImageDraw

    from mm3d.pointcloud.visualize import CloudRenderer

    renderer = renderer or CloudRenderer(size, size, point_size=4.0)
    left = renderer.render([points], [part_colors(gt, category_parts)])
    right = renderer.render([points], [part_colors(pred, category_parts)])
    caption = Image.new("RGB", (left.shape[1] * 2, 28), (255, 255, 255))
    draw = ImageDraw.Draw(caption)
    draw.text((8, 8), f"ground truth {title}".strip(), fill=(0, 0, 0))
    draw.text((left.shape[1] + 8, 8), "prediction", fill=(0, 0, 0))
    image = np.concatenate([np.asarray(caption), np.concatenate([left, right], axis=1)], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


class PointMAEPartSegTask(Task):
    """ShapeNetPart part segmentation with the official Point-MAE head (see the module docstring)."""

    name = "pointmae_partseg"
    modality = "pointcloud"
    stage = "finetune"
    config_class = PointPartSegConfig
    description = "Point-MAE ShapeNetPart part segmentation (class / instance mIoU, Open3D renders)"

    def build_model(self, cfg: PointPartSegConfig) -> nn.Module:
        return build_segmentation_model(cfg.model, cfg.head)

    def train_split(self, cfg: PointPartSegConfig) -> str:
        if cfg.data.train_split != "auto":
            return cfg.data.train_split
        return "train" if cfg.train.select_on == "val" else "trainval"

    def build_datasets(self, cfg: PointPartSegConfig, splits: Iterable[str]) -> dict[str, Dataset]:
        from mm3d.pointcloud.datasets import SHAPENETPART_SEG_CLASSES, ShapeNetPart

        root = _require_root(cfg.data.root, "data.root")
        train_split = self.train_split(cfg)
        wanted = {"train": train_split, "test": "test"}
        if train_split == "train":
            wanted["val"] = "val"
        out: dict[str, Dataset] = {}
        for split in splits:
            if split not in wanted:
                continue
            ds = ShapeNetPart(root, wanted[split], cfg.data.npoints, seed=None if split == "train" else cfg.seed)
            if len(ds.categories) > cfg.head.num_categories:
                raise ValueError(f"{root / 'synsetoffset2category.txt'} lists {len(ds.categories)} categories, "
                                 f"more than head.num_categories={cfg.head.num_categories}")
            top = max(max(SHAPENETPART_SEG_CLASSES[c]) for c in ds.categories) + 1
            if top > cfg.head.num_parts:
                raise ValueError(f"the categories of {root} use part ids up to {top - 1}, but head.num_parts="
                                 f"{cfg.head.num_parts}")
            if len(ds) == 0:
                log.warning("ShapeNetPart %s split (%s) is empty under %s: left out", split, wanted[split], root)
                continue
            out[split] = Indexed(ds)
        if "val" in splits and cfg.train.select_on == "val" and "val" not in out:
            log.warning("no validation shapes: the reported checkpoint is the last one (select_on falls back to last)")
        return out

    def init_weights(self, model: nn.Module, path: str, cfg: PointPartSegConfig) -> list[str]:
        return load_encoder_checkpoint(model, path, allow_pickle=cfg.allow_pickle)

    def batch_transform(self, cfg: PointPartSegConfig, device: torch.device) -> Callable[[Any], Any] | None:
        aug = seg_augmentation(cfg.data)
        if aug is None:
            return None
        return lambda batch: {**batch, "points": aug(batch["points"])}

    @staticmethod
    def _part_mask(categories: Sequence[str], num_parts: int) -> torch.Tensor:
        from mm3d.pointcloud.datasets import SHAPENETPART_SEG_CLASSES
        from mm3d.pointcloud.seg_metrics import category_part_mask, part_sets_for

        return category_part_mask(part_sets_for(categories, SHAPENETPART_SEG_CLASSES), num_parts)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: PointPartSegConfig, device: torch.device,
                 split: str) -> EvalResult:
        """Loss, point accuracy, class / instance mIoU and ``iou_<Category>`` (predictions
        restricted to each shape's category parts)."""
        from mm3d.distributed import all_reduce_sum
        from mm3d.pointcloud.datasets import SHAPENETPART_CATEGORIES
        from mm3d.pointcloud.seg_metrics import SegmentationMeter
        from mm3d.trainer import move_to_device

        model.eval()
        categories = getattr(getattr(loader, "dataset", None), "categories", None) or list(SHAPENETPART_CATEGORIES)
        meter = SegmentationMeter(self._part_mask(categories, model.num_parts), categories)
        loss = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in loader:
            batch = move_to_device(batch, device)
            out = model(batch)
            n = batch["points"].shape[0]
            loss += torch.stack([out.loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=device)])
            meter.update(out.logits, batch["seg"], batch["cls_label"].reshape(-1), batch.get("index"))
        loss = all_reduce_sum(loss)
        res = meter.compute()
        return EvalResult({"loss": float(loss[0] / loss[1].clamp(min=1)), **res.metrics},
                          {"shape_iou": res.shape_iou, "cls_label": res.cls_label, "categories": categories})

    def run_info(self, cfg: PointPartSegConfig, datasets: Mapping[str, Any]) -> dict[str, Any]:
        selected = effective_selection(cfg, datasets)
        return {"config": cfg.name, "task": cfg.task, "seed": cfg.seed, "selected_on": selected,
                "protocol": protocol_label(cfg, selected), "voting": "off", "augmentation": cfg.data.augmentation,
                "train_split": self.train_split(cfg), "npoints": cfg.data.npoints, "init": cfg.init or "scratch"}

    def write_report(self, run_dir: Path, model: nn.Module, cfg: PointPartSegConfig,
                     results: dict[str, EvalResult], datasets: dict[str, Dataset], device: torch.device) -> list[Path]:
        """results.md with class/instance mIoU and per-category IoU; Open3D renders of test shapes."""
        info = self.run_info(cfg, datasets)
        files: list[Path] = []
        extra = ""
        if "test" in results:
            cats = sorted(k.removeprefix("iou_") for k in results["test"].metrics if k.startswith("iou_"))
            if cats:
                extra = "\n## Per-category IoU (test)\n\n| category | IoU |\n|---|---|\n" + "\n".join(
                    f"| {c} | {results['test'].metrics['iou_' + c]:.4f} |" for c in cats) + "\n"
        files.append(_write_results_md(run_dir, cfg, info, results,
                                       ["instance_miou", "class_miou", "accuracy", "loss", "num_samples"], extra))
        files += self.render_shapes(model, cfg, datasets.get("test"), Path(run_dir) / "plots", device)
        return files

    @torch.no_grad()
    def render_shapes(self, model: nn.Module, cfg: PointPartSegConfig, dataset: Dataset | None, out_dir: Path,
                      device: torch.device) -> list[Path]:
        """Ground truth next to prediction for ``data.render_shapes`` test shapes (evenly spaced)."""
        count = cfg.data.render_shapes
        if dataset is None or count == 0 or len(dataset) == 0:
            return []
        try:
            from mm3d.pointcloud.visualize import CloudRenderer

            renderer = CloudRenderer(400, 400, point_size=4.0)
        except (ImportError, RuntimeError) as e:  # no Open3D or no offscreen rendering here
            log.warning("no segmentation renders: Open3D offscreen rendering failed (%s)", e)
            return []
        step = max(len(dataset) // count, 1)
        return [self._render_one(model, dataset, i, out_dir / f"partseg_test_{i:05d}.png", renderer, device)
                for i in list(range(0, len(dataset), step))[:count]]

    @torch.no_grad()
    def _render_one(self, model: nn.Module, dataset: Any, index: int, path: Path, renderer: Any,
                    device: torch.device, interactive: bool = False) -> Path:
        """Predict shape `index` of `dataset` and render ground truth | prediction to `path`."""
        from mm3d.pointcloud.datasets import SHAPENETPART_SEG_CLASSES
        from mm3d.pointcloud.seg_metrics import part_ious, restrict_to_category

        categories = dataset.categories
        mask = self._part_mask(categories, model.num_parts)
        model.eval()
        item = dataset[index]
        batch = {"points": item["points"][None].to(device), "cls_label": item["cls_label"].reshape(1).to(device)}
        pred = restrict_to_category(model(batch).logits, batch["cls_label"], mask)
        iou = float(part_ious(pred, item["seg"][None].to(device), batch["cls_label"], mask).shape_iou[0])
        cat = categories[int(item["cls_label"])]
        points, gt, pred = item["points"].numpy(), item["seg"].numpy(), pred[0].cpu().numpy()
        parts = SHAPENETPART_SEG_CLASSES[cat]
        out = render_segmentation(points, gt, pred, parts, path, title=f"({cat}, shape mIoU {iou:.3f})",
                                  renderer=renderer)
        if interactive:
            from mm3d.pointcloud.visualize import show_interactive

            show_interactive([([points], [part_colors(gt, parts)]), ([points], [part_colors(pred, parts)])],
                             title=f"mm3d: {cat} ground truth | prediction")
        return out

    def visualize(self, model: nn.Module, cfg: PointPartSegConfig, *, inputs: list[str], dataset_index: int | None,
                  out_dir: Path, interactive: bool, seed: int, device: torch.device) -> list[Path]:
        """``mm3d visualize --dataset-index I``: ground truth | predicted parts of test shape I (PNG)."""
        from mm3d.pointcloud.visualize import CloudRenderer

        if inputs:
            raise NotImplementedError("part segmentation renders dataset shapes (their category and ground "
                                      "truth come from the dataset): use --dataset-index I with data.root=...")
        if dataset_index is None:
            raise ValueError("give --dataset-index I (a shape of the test split)")
        dataset = self.build_datasets(cfg, ["test"]).get("test")
        if dataset is None or not 0 <= dataset_index < len(dataset):
            raise ValueError(f"--dataset-index {dataset_index} is out of range: the test split of "
                             f"{cfg.data.root or '(data.root unset)'} has {len(dataset) if dataset else 0} shapes")
        return [self._render_one(model, dataset, dataset_index, Path(out_dir) / f"partseg_test_{dataset_index:05d}.png",
                                 CloudRenderer(400, 400, point_size=4.0), device, interactive)]


register_task(PointMAEClassifyTask())
register_task(PointSVMTask())
register_task(PointMAEPartSegTask())
