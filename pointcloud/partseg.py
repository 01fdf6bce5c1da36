"""ShapeNetPart part segmentation with Point-MAE (task ``pointmae_partseg``).

The model is :mod:`mm3d.pointcloud.segmentation` (the official head on our encoder), scored by
class and instance mIoU (:mod:`mm3d.pointcloud.seg_metrics`); the report adds per-category IoU and
Open3D renders of test shapes, ground truth next to prediction (:func:`render_segmentation`).
The training split follows the honest protocol of :mod:`mm3d.pointcloud.protocol` with the
official val list: ``data.train_split: auto`` trains on train and selects on val when
``train.select_on=val``, and trains on trainval (as the papers) otherwise. Initialisation
(``init=``): see :func:`~mm3d.pointcloud.checkpoints.load_encoder_checkpoint`.

``protocol=paper`` runs Point-MAE's ``segmentation/main.py`` procedure
(:meth:`PointPartSegConfig.paper_protocol`): train on trainval, evaluate test after every epoch,
keep the checkpoint best on test by instance mIoU, report the maximum over epochs of instance
mIoU, class mIoU and accuracy each on its own (``<metric>_epoch_max``), draw every split's points
with replacement, and step the optimizer twice per batch (``optim.double_step``, see
:class:`~mm3d.engine.OptimizerStep`). Its LR schedule is stepped per epoch; ours per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset

from mm3d.config import RunConfig, TrainConfig
from mm3d.datacheck import account_missing, missing_markdown, unscored_samples
from mm3d.engine import SplitMeans, move_to_device
from mm3d.errors import UserError
from mm3d.registry import register_task
from mm3d.results import run_protocol_label, selection_split, write_results_md
from mm3d.task import EvalResult, Task
from mm3d.pointcloud.checkpoints import load_encoder_checkpoint
from mm3d.pointcloud.datasets import SHAPENETPART_CATEGORIES, SHAPENETPART_SEG_CLASSES, ShapeNetPart
from mm3d.pointcloud.models import PointMAEConfig
from mm3d.pointcloud.protocol import TABLE_INFO, table_info
from mm3d.pointcloud.seg_metrics import (SegmentationMeter, category_part_mask, part_ious, part_sets_for,
                                         restrict_to_category)
from mm3d.pointcloud.segmentation import SegHeadConfig, build_segmentation_model
from mm3d.pointcloud.splits import Indexed, require_root
from mm3d.pointcloud.tasks import cloud_preprocessing
from mm3d.pointcloud.transforms import PointAugmentation, training_batch_transform
from mm3d.pointcloud.visualize import CloudRenderer, show_interactive

log = logging.getLogger(__name__)


@dataclass
class PartSegDataConfig:
    """The ``data`` section of ShapeNetPart part segmentation."""

    root: str = ""  # shapenetcore_partanno_segmentation_benchmark_v0_normal
    npoints: int = 2048
    # "auto": train + official val selection for select_on=val, else train on trainval (as the papers)
    train_split: Literal["auto", "train", "trainval"] = "auto"
    augmentation: PointAugmentation = "scale_shift"  # official: isotropic scale U(0.8, 1.25) + shift U(-0.1, 0.1)
    scale_low: float = 0.8
    scale_high: float = 1.25
    translate_range: float = 0.1
    up_axis: Literal["x", "y", "z"] = "y"
    # draw each item's npoints with replacement always (the official loader, every split); false: without
    # replacement when the shape has enough points (every point at most once), repeats only for smaller shapes
    sample_replace: bool = False
    render_shapes: int = 4  # Open3D renders of test shapes in the report (0: none)
    max_failure_ratio: float = 0.01  # unreadable files are left out, named and counted; fail past this share
    drop_nonfinite: bool = True  # drop (and count) points with NaN/inf when reading files; false: an error

    def validate(self) -> None:
        if self.npoints <= 0:
            raise ValueError(f"npoints must be positive, got {self.npoints}")
        if not 0.0 <= self.max_failure_ratio <= 1.0:
            raise ValueError(f"max_failure_ratio must be in [0, 1], got {self.max_failure_ratio}")
        if not 0 < self.scale_low <= self.scale_high:
            raise ValueError(f"need 0 < scale_low <= scale_high, got {self.scale_low}, {self.scale_high}")
        if self.render_shapes < 0:
            raise ValueError(f"render_shapes must be >= 0, got {self.render_shapes}")


# what Point-MAE's segmentation script prints as its best numbers: each maximised over epochs on its own
PAPER_REPORT_MAX = ("instance_miou", "class_miou", "accuracy")
# the results.md columns
REPORT_COLUMNS = ("instance_miou", "class_miou", "accuracy", "loss", "num_samples", "num_missing")


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

    paper_reference: ClassVar[str] = "Point-MAE segmentation/main.py"

    def paper_protocol(self) -> dict[str, Any]:
        """Point-MAE ``segmentation/main.py``: trains on trainval, evaluates test after every epoch,
        saves the model best on test by instance mIoU, prints the best accuracy, class mIoU and
        instance mIoU each maximised over epochs on its own, samples every split's points with
        replacement (``segmentation/dataset.py``), steps the optimizer twice per batch and sets the
        rate once per epoch (timm ``CosineLRScheduler``, ``scheduler.step(epoch)`` after each)."""
        return {"train": {"select_on": "test", "eval_every": 1, "best_metric": "instance_miou", "best_mode": "max"},
                "data": {"train_split": "trainval", "sample_replace": True},
                "eval": {"report_max": list(PAPER_REPORT_MAX)},
                "optim": {"double_step": True, "schedule_unit": "epoch"}}

    def validate(self) -> None:
        super().validate()
        self.model.check_npoints(self.data.npoints)
        if self.optim.double_step and self.train.precision == "fp16":
            raise ValueError("optim.double_step=true does not run with train.precision=fp16: the official script's "
                             "second step has no GradScaler counterpart (use fp32 or bf16)")


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

    def preprocessing(self, cfg: PointPartSegConfig) -> dict[str, Any]:
        """``data.npoints`` points per shape (normalised once) and the shape's category as a second input."""
        draw = "with replacement" if cfg.data.sample_replace else "without repeats unless the shape has fewer points"
        return {**cloud_preprocessing(cfg.model, cfg.data.npoints, sampling=f"random, {draw}",
                                      normalisation="before sampling: each shape centred and scaled into the unit sphere"),
                "extra_inputs": {"cls_label": {"shape": [], "dtype": "int64",
                                               "meaning": "the shape's category, an index into categories",
                                               "categories": list(SHAPENETPART_CATEGORIES)}}}

    def train_split(self, cfg: PointPartSegConfig) -> str:
        if cfg.data.train_split != "auto":
            return cfg.data.train_split
        return "train" if cfg.train.select_on == "val" else "trainval"

    def build_datasets(self, cfg: PointPartSegConfig, splits: Iterable[str]) -> dict[str, Dataset]:
        root = require_root(cfg.data.root, "data.root")
        train_split = self.train_split(cfg)
        wanted = {"train": train_split, "test": "test"}
        if train_split == "train":
            wanted["val"] = "val"
        out: dict[str, Dataset] = {}
        for split in splits:
            if split not in wanted:
                continue
            ds = ShapeNetPart(root, wanted[split], cfg.data.npoints, seed=cfg.seed,  # train: + epoch (EpochDraws)
                              sample_replace=cfg.data.sample_replace, max_failure_ratio=cfg.data.max_failure_ratio,
                              drop_nonfinite=cfg.data.drop_nonfinite)
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
        d = cfg.data
        return training_batch_transform(d.augmentation, device, scale_low=d.scale_low, scale_high=d.scale_high,
                                        translate_range=d.translate_range, up_axis=d.up_axis)

    @staticmethod
    def _part_mask(categories: Sequence[str], num_parts: int) -> torch.Tensor:
        return category_part_mask(part_sets_for(categories, SHAPENETPART_SEG_CLASSES), num_parts)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: PointPartSegConfig, device: torch.device,
                 split: str) -> EvalResult:
        """Loss, point accuracy, class / instance mIoU and ``iou_<Category>`` (predictions
        restricted to each shape's category parts)."""
        model.eval()
        categories = getattr(getattr(loader, "dataset", None), "categories", None) or list(SHAPENETPART_CATEGORIES)
        meter = SegmentationMeter(self._part_mask(categories, model.num_parts), categories)
        means = SplitMeans(["loss"], device)
        for batch in loader:
            batch = move_to_device(batch, device)
            out = model(batch)
            means.update(batch["points"].shape[0], {"loss": out.loss})
            meter.update(out.logits, batch["seg"], batch["cls_label"].reshape(-1), batch.get("index"))
        res = meter.compute()
        metrics = {**means.compute(), **res.metrics}
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:  # every shape not scored is counted and named; a test split refuses
            account_missing(metrics, unscored_samples(dataset, res.index.tolist()), split,
                            allow_missing=cfg.eval.allow_missing)
        return EvalResult(metrics, {"shape_iou": res.shape_iou, "cls_label": res.cls_label, "categories": categories})

    def run_info(self, cfg: PointPartSegConfig, datasets: Mapping[str, Any]) -> dict[str, Any]:
        selected = selection_split(cfg.train.select_on, list(datasets))
        return {"config": cfg.name, "task": cfg.task, "seed": cfg.seed, "selected_on": selected,
                "protocol": run_protocol_label(cfg, selected), "voting": "off", "augmentation": cfg.data.augmentation,
                "train_split": self.train_split(cfg), "npoints": cfg.data.npoints,
                "sampling": "with replacement" if cfg.data.sample_replace else "without replacement",
                "double_step": cfg.optim.double_step, "init": cfg.init or "scratch"}

    def write_report(self, run_dir: Path, model: nn.Module, cfg: PointPartSegConfig,
                     results: dict[str, EvalResult], datasets: dict[str, Dataset], device: torch.device) -> list[Path]:
        """results.md with class/instance mIoU and per-category IoU; Open3D renders of test shapes."""
        info = self.run_info(cfg, datasets)
        files: list[Path] = []
        sections = []
        metrics = {s: r.metrics for s, r in results.items()}
        maxima = [f"{m}_epoch_max" for m in cfg.eval.report_max
                  if any(f"{m}_epoch_max" in split_metrics for split_metrics in metrics.values())]
        if maxima:
            split = next(s for s, m in metrics.items() if maxima[0] in m)
            sections.append(f"`*_epoch_max`: the maximum of each metric over the per-epoch evaluations of {split}, "
                            f"each maximised on its own (they may come from different epochs; results.json "
                            f"`epoch_max` names each epoch): the statistic {cfg.paper_reference} prints as its "
                            f"best. The other {split} columns score the one selected checkpoint.\n")
        if "test" in results:
            cats = sorted(k.removeprefix("iou_") for k in results["test"].metrics if k.startswith("iou_"))
            if cats:
                sections.append("## Per-category IoU (test)\n\n| category | IoU |\n|---|---|\n" + "\n".join(
                    f"| {c} | {results['test'].metrics['iou_' + c]:.4f} |" for c in cats) + "\n")
        files.append(write_results_md(run_dir, f"{cfg.name} ({cfg.task})", table_info(info), metrics,
                                      (*maxima, *REPORT_COLUMNS), extra_info=TABLE_INFO,
                                      sections=[*sections, *missing_markdown(metrics)]))
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
            show_interactive([([points], [part_colors(gt, parts)]), ([points], [part_colors(pred, parts)])],
                             title=f"mm3d: {cat} ground truth | prediction")
        return out

    def visualize(self, model: nn.Module, cfg: PointPartSegConfig, *, inputs: list[str], dataset_index: int | None,
                  out_dir: Path, interactive: bool, seed: int, device: torch.device) -> list[Path]:
        """``mm3d visualize --dataset-index I``: ground truth | predicted parts of test shape I (PNG)."""
        if inputs:
            raise NotImplementedError("part segmentation renders dataset shapes (their category and ground "
                                      "truth come from the dataset): use --dataset-index I with data.root=...")
        if dataset_index is None:
            raise UserError("give --dataset-index I (a shape of the test split)")
        dataset = self.build_datasets(cfg, ["test"]).get("test")
        if dataset is None or not 0 <= dataset_index < len(dataset):
            raise UserError(f"--dataset-index {dataset_index} is out of range: the test split of "
                            f"{cfg.data.root or '(data.root unset)'} has {len(dataset) if dataset else 0} shapes")
        return [self._render_one(model, dataset, dataset_index, Path(out_dir) / f"partseg_test_{dataset_index:05d}.png",
                                 CloudRenderer(400, 400, point_size=4.0), device, interactive)]



register_task(PointMAEPartSegTask())
