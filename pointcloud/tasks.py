"""Point-cloud tasks: Point-MAE pretraining (``pointmae_pretrain``).

Fine-tuning and evaluation tasks live beside it: :mod:`~mm3d.pointcloud.classification`
(with few-shot), :mod:`~mm3d.pointcloud.probe` (linear SVM) and :mod:`~mm3d.pointcloud.partseg`.

Augmentation is applied by the task's :meth:`~mm3d.task.Task.batch_transform` hook: the trainer
calls it on every *training* batch after moving it to the device, so the augmentation runs
batched on the GPU (or CPU) and evaluation batches are never augmented. Its draws come from a
generator on the batch's device, reseeded before every batch from torch's global generator
(:func:`~mm3d.pointcloud.transforms.reseed_from_global`): the trainer seeds that one per run and
rank and checkpoints it, so a resumed run continues the same augmentations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from mm3d.config import RunConfig
from mm3d.engine import SplitMeans, move_to_device, unwrap
from mm3d.errors import UserError
from mm3d.registry import register_task
from mm3d.task import EvalResult, Task
from mm3d.pointcloud import datasets as D
from mm3d.pointcloud.io import read_points
from mm3d.pointcloud.models import PointMAEConfig, PointMAEPretrain, build_pretrain_model
from mm3d.pointcloud.ops.bench import bench_ops
from mm3d.pointcloud.shards import check_shard_keys, pretrain_shard_datasets
from mm3d.pointcloud.splits import require_root
from mm3d.pointcloud.transforms import (ShapeAugmentation, normalize_unit_sphere, sample_indices,
                                        training_batch_transform)
from mm3d.pointcloud.visualize import CloudRenderer, write_reconstruction_figure

log = logging.getLogger(__name__)


@dataclass
class PointDataConfig:
    """The ``data`` section of point-cloud pretraining.

    dataset: ``shapenet55`` (Point-BERT's ShapeNet-55 layout, also what ``mm3d data synth
    shapenet55`` writes), ``modelnet40`` / ``modelnet10`` (``modelnet40_normal_resampled``
    layout) or ``folder`` (any ``.ply/.pcd/.xyz/.npy/.bin`` files, unlabeled).
    """

    dataset: Literal["shapenet55", "modelnet40", "modelnet10", "folder"] = "shapenet55"
    root: str = ""
    # files: read data.root in its official layout; shards: read prepared shards (mm3d data prepare)
    format: Literal["files", "shards"] = "files"
    shards: str = ""  # training shards: a folder, manifest, brace pattern, or a prepared root (dataset.json)
    val_shards: str = ""  # default: the val split of a prepared root in data.shards
    test_shards: str = ""  # default: the test split of a prepared root in data.shards
    shuffle_buffer: int = 1000  # shards: training samples are shuffled within windows of this many
    npoints: int = 1024
    use_both_splits: bool = False  # ShapeNet-55: pretrain on train + test (Point-BERT); no test split then
    split_dir: str = "ShapeNet-55"  # ShapeNet: folder of train.txt / test.txt ("ShapeNet-34" for that split)
    augmentation: ShapeAugmentation = "scale_translate"  # official pretraining: scale-and-translate
    scale_low: float = 2.0 / 3.0
    scale_high: float = 3.0 / 2.0
    translate_range: float = 0.2
    up_axis: Literal["x", "y", "z"] = "y"  # rotation axis of augmentation="rotate"
    cache_points: int = 8192  # ModelNet: FPS points cached per shape
    cache_dir: str = ""  # ModelNet: where the cache goes ("": <root>/.mm3d_cache, else a user cache)
    sample: Literal["random", "fps"] = "random"  # folder: how to pick npoints from each file
    # folder (and `mm3d visualize --bin-columns`): float32 values per point in raw .bin files; null reads 4
    # and warns when a file's size fits other counts too
    bin_columns: int | None = None
    drop_nonfinite: bool = True  # drop (and count) points with NaN/inf, as PCL marks invalid pixels; false: an error
    max_failure_ratio: float = 0.01  # unreadable files are skipped, named and counted; fail past this share
    report_shapes: int = 4  # reconstruction pictures written after training (0: none)

    def validate(self) -> None:
        check_shard_keys(self)
        if self.npoints <= 0:
            raise ValueError(f"npoints must be positive, got {self.npoints}")
        if not 0 < self.scale_low <= self.scale_high:
            raise ValueError(f"need 0 < scale_low <= scale_high, got {self.scale_low}, {self.scale_high}")
        if self.translate_range < 0:
            raise ValueError(f"translate_range must be >= 0, got {self.translate_range}")
        if self.report_shapes < 0:
            raise ValueError(f"report_shapes must be >= 0, got {self.report_shapes}")
        if not 0.0 <= self.max_failure_ratio <= 1.0:
            raise ValueError(f"max_failure_ratio must be in [0, 1], got {self.max_failure_ratio}")
        if self.bin_columns is not None and self.bin_columns < 3:
            raise ValueError(f"bin_columns must be >= 3 (x, y, z first) or null, got {self.bin_columns}")
        if self.dataset.startswith("modelnet") and self.npoints > self.cache_points:
            raise ValueError(f"npoints={self.npoints} exceeds cache_points={self.cache_points}")


@dataclass
class PointPretrainConfig(RunConfig):
    """A Point-MAE pretraining run."""

    task: str = "pointmae_pretrain"
    model: PointMAEConfig = field(default_factory=PointMAEConfig)
    data: PointDataConfig = field(default_factory=PointDataConfig)

    def validate(self) -> None:
        super().validate()
        self.model.check_npoints(self.data.npoints)


def build_pretrain_datasets(data: PointDataConfig, splits: Iterable[str], *, seed: int = 0) -> dict[str, Dataset]:
    """Datasets of the requested splits that exist: ``train`` always, ``test`` when held out.

    Evaluation splits sample their points with a fixed seed, so their loss is comparable
    between evaluations; the training split draws from (seed, epoch, index) once the trainer sets
    its epoch, so a resumed run sees the points the uninterrupted one saw. ``data.format: shards`` reads the same items from prepared shards
    (:func:`~mm3d.pointcloud.shards.pretrain_shard_datasets`).
    """
    if data.format == "shards":
        return pretrain_shard_datasets(data, splits, seed=seed)
    root = require_root(data.root, "data.root")
    splits = set(splits)
    out: dict[str, Dataset] = {}
    files = dict(max_failure_ratio=data.max_failure_ratio, drop_nonfinite=data.drop_nonfinite)
    if data.dataset == "shapenet55":
        def make(split: str, s: int | None) -> Dataset:
            return D.ShapeNet55(root, split, data.npoints, use_both_splits=data.use_both_splits and split == "train",
                                split_dir=data.split_dir, seed=s, **files)
        if "train" in splits:
            out["train"] = make("train", seed)  # (seed, epoch, index) draws once the trainer sets the epoch
        if "test" in splits:
            if data.use_both_splits:
                log.info("data.use_both_splits: the ShapeNet-55 test list is trained on; no test split")
            else:
                out["test"] = make("test", seed)
    elif data.dataset in ("modelnet40", "modelnet10"):
        n = 40 if data.dataset == "modelnet40" else 10
        for split in ("train", "test"):
            if split in splits:
                out[split] = D.ModelNet(root, split, num_classes=n, npoints=data.npoints,
                                        cache_points=data.cache_points, cache_dir=data.cache_dir or None, **files)
    elif data.dataset == "folder":
        if "train" in splits:
            out["train"] = D.PointFolder(root, data.npoints, bin_columns=data.bin_columns, sample=data.sample,
                                         seed=seed, **files)
        if "test" in splits:
            out["test"] = D.PointFolder(root, data.npoints, bin_columns=data.bin_columns, sample=data.sample,
                                        seed=seed, **files)
            log.info("data.dataset=folder has no held-out split: 'test' re-reads the training files")
    else:  # guarded by the config's Literal
        raise ValueError(f"unknown data.dataset {data.dataset!r}")
    return out


def prepare_points(points: torch.Tensor, npoints: int, *, seed: int = 0) -> torch.Tensor:
    """A raw (N, C) cloud -> (npoints, 3): random points (repeats when N < npoints) on the unit sphere,
    as the datasets prepare their items."""
    xyz = torch.as_tensor(points, dtype=torch.float32)[:, :3]
    idx = sample_indices(xyz, npoints, "random", generator=torch.Generator().manual_seed(seed))
    return normalize_unit_sphere(xyz[idx])


def cloud_preprocessing(model: PointMAEConfig, npoints: int, *, sampling: str,
                        normalisation: str = "after sampling: centred on the centroid, scaled so that the "
                                              "farthest point is at distance 1") -> dict[str, Any]:
    """The model card's input recipe of a Point-MAE model (:meth:`mm3d.task.Task.preprocessing`):
    `npoints` points chosen by `sampling`, normalised by `normalisation`; the grouping is the model's."""
    return {"input": "points", "shape": [npoints, 3], "layout": "N xyz", "dtype": "float32", "npoints": npoints,
            "columns": "x y z (further columns dropped)", "sampling": sampling, "normalisation": normalisation,
            "grouping": {"groups": model.num_group, "group_size": model.group_size,
                         "centres": "farthest point sampling from point 0", "neighbours": "k nearest",
                         "where": "inside the model (and its exports)"}}


class PointMAEPretrainTask(Task):
    """Point-MAE pretraining: masked patch reconstruction with a Chamfer loss."""

    name = "pointmae_pretrain"
    modality = "pointcloud"
    stage = "pretrain"
    config_class = PointPretrainConfig
    description = "Point-MAE masked point-patch pretraining (ShapeNet-55, ModelNet, a folder of scans)"

    def build_model(self, cfg: PointPretrainConfig) -> nn.Module:
        return build_pretrain_model(cfg.model)

    def preprocessing(self, cfg: PointPretrainConfig) -> dict[str, Any]:
        """``data.npoints`` random points of a file (repeats when it has fewer), as the datasets draw them."""
        return cloud_preprocessing(cfg.model, cfg.data.npoints,
                                   sampling="random, without repeats unless the file has fewer points")

    def build_datasets(self, cfg: PointPretrainConfig, splits: Iterable[str]) -> dict[str, Dataset]:
        return build_pretrain_datasets(cfg.data, splits, seed=cfg.seed)

    def batch_transform(self, cfg: PointPretrainConfig, device: torch.device) -> Callable[[Any], Any] | None:
        d = cfg.data
        return training_batch_transform(d.augmentation, device, scale_low=d.scale_low, scale_high=d.scale_high,
                                        translate_range=d.translate_range, up_axis=d.up_axis)

    def bench_extra(self, cfg: PointPretrainConfig, device: torch.device) -> list[dict[str, Any]]:
        """`mm3d bench`: FPS, KNN and Chamfer at Point-MAE's sizes vs brute force (and pytorch3d)."""
        return bench_ops(device)

    def bench_peer(self, cfg: PointPretrainConfig, model: nn.Module, batch: Any, device: torch.device
                   ) -> tuple[str, Callable[[], Any]] | None:
        """The official Point-MAE pretraining step, imported from the checkout at ``bench.peer_root``
        (see :mod:`mm3d.pointcloud.peer`); no peer without one."""
        if cfg.bench.peer == "hf":
            log.warning("no peer timing: Hugging Face has no Point-MAE; bench.peer=official (or true) with "
                        "bench.peer_root=<a checkout of github.com/Pang-Yatian/Point-MAE>")
            return None
        if not cfg.bench.peer_root:
            log.info("no peer timing: give bench.peer_root=<a checkout of github.com/Pang-Yatian/Point-MAE>")
            return None
        from mm3d.bench import peer_or_none
        from mm3d.pointcloud.peer import pretrain_peer_step

        return peer_or_none(pretrain_peer_step, cfg.bench.peer_root, cfg, model, batch, device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: PointPretrainConfig,
                 device: torch.device, split: str) -> EvalResult:
        """The loss and the target's metrics (Chamfer L2 and L1 of the predicted patches for the point
        targets) on the masked patches, masks drawn from a fixed seed."""
        model.eval()
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        means = SplitMeans(["loss", *unwrap(model).metric_names], device)
        for batch in loader:
            batch = move_to_device(batch, device)
            out = model(batch, generator=gen)
            means.update(out.pred.shape[0], {"loss": out.loss, **out.metrics})
        return EvalResult(means.compute())

    def _report_items(self, datasets: dict[str, Dataset], count: int) -> list[tuple[str, torch.Tensor]]:
        split = "test" if "test" in datasets else "train"
        ds = datasets.get(split)
        if ds is None or count == 0:
            return []
        step = max(len(ds) // count, 1)
        return [(f"{split}_{i:05d}", ds[i]["points"]) for i in range(0, len(ds), step)[:count]]

    def write_report(self, run_dir: Path, model: nn.Module, cfg: PointPretrainConfig,
                     results: dict[str, EvalResult], datasets: dict[str, Dataset],
                     device: torch.device) -> list[Path]:
        """Reconstruction pictures (PNG + PLY) of a few held-out shapes in ``run_dir/plots``."""
        items = self._report_items(datasets, cfg.data.report_shapes)
        if not items or not isinstance(model, PointMAEPretrain) or not model.target.predicts_points:
            return []  # feature targets (teacher, ema) predict no points to draw
        try:
            renderer = CloudRenderer(480, 480)
        except (ImportError, RuntimeError) as e:  # no Open3D / no offscreen rendering here
            log.warning("no reconstruction pictures: Open3D offscreen rendering failed (%s)", e)
            return []
        files: list[Path] = []
        for i, (name, points) in enumerate(items):
            files += write_reconstruction_figure(model, points, run_dir / "plots", seed=cfg.seed + i,
                                                 name=f"reconstruction_{name}", renderer=renderer)
        return files

    def visualize(self, model: nn.Module, cfg: PointPretrainConfig, *, inputs: list[str],
                  dataset_index: int | None, out_dir: Path, interactive: bool, seed: int,
                  device: torch.device) -> list[Path]:
        """``mm3d visualize``: reconstruction figures of point-cloud files or a dataset item."""
        clouds: list[tuple[str, torch.Tensor]] = []
        for path in inputs:
            try:
                raw = read_points(path, bin_columns=cfg.data.bin_columns, drop_nonfinite=cfg.data.drop_nonfinite)
            except (OSError, ValueError) as e:
                raise UserError(f"--input: {e}") from None
            clouds.append((Path(path).stem, prepare_points(torch.from_numpy(raw), cfg.data.npoints, seed=seed)))
        if dataset_index is not None:
            ds = build_pretrain_datasets(cfg.data, ["train", "test"], seed=seed)
            split = "test" if "test" in ds else "train"
            if not 0 <= dataset_index < len(ds[split]):
                raise UserError(f"--dataset-index {dataset_index} is out of range: the {split} split of "
                                f"{cfg.data.root} has {len(ds[split])} items")
            clouds.append((f"{split}_{dataset_index:05d}", ds[split][dataset_index]["points"]))
        if not clouds:
            raise UserError("nothing to visualise: give input files or a dataset index")
        renderer = CloudRenderer(480, 480)
        files: list[Path] = []
        for name, points in clouds:
            files += write_reconstruction_figure(model, points, out_dir, seed=seed, name=name,
                                                 interactive=interactive, renderer=renderer)
        return files


register_task(PointMAEPretrainTask())
