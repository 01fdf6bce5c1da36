"""Linear-SVM probe of frozen Point-MAE features (task ``pointmae_svm``).

scikit-learn ``LinearSVC`` on frozen max+mean pooled encoder features
(:meth:`~mm3d.pointcloud.models.PointMAEPretrain.forward_features`) of a classification dataset
(the ``data`` section of :class:`~mm3d.pointcloud.classification.ClsDataConfig`). No training
steps (``train.epochs: 0``): the trainer builds the model, loads the weights and calls
:meth:`PointSVMTask.evaluate` on the test split, which extracts train and test features, picks C
among ``probe.cs`` (on a validation part carved from train by default, see
:mod:`mm3d.pointcloud.protocol`) and scores the test split. Run it as
``mm3d evaluate CONFIG checkpoint=PRETRAIN.pt`` (strict load of a pretraining checkpoint) or
``mm3d finetune CONFIG init=CKPT`` (encoder weights of any of our checkpoints).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mm3d.config import RunConfig, TrainConfig
from mm3d.data import ResumableSampler, build_loader
from mm3d.distributed import all_gather_cat, get_info
from mm3d.engine import move_to_device
from mm3d.metrics import ClassificationResult, confusion_matrix, mean_class_accuracy
from mm3d.registry import register_task
from mm3d.results import write_classification_split, write_results_md
from mm3d.task import EvalResult, Task
from mm3d.pointcloud.checkpoints import load_encoder_checkpoint
from mm3d.pointcloud.classification import (ClsDataConfig, build_cls_datasets, eval_points, majority_accuracy,
                                            resolve_num_classes)
from mm3d.pointcloud.models import PointMAEConfig, build_pretrain_model
from mm3d.pointcloud.protocol import TABLE_INFO, table_info
from mm3d.pointcloud.splits import stratified_split

log = logging.getLogger(__name__)


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
    trains_nothing: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
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


def _eval_loader(dataset: Dataset, cfg: RunConfig, collate: Callable | None = None):
    """An ordered, rank-sharded loader without padding (each sample scored once overall)."""
    info = get_info()
    sampler = ResumableSampler(len(dataset), shuffle=False, rank=info.rank, world_size=info.world_size, pad=False)
    return build_loader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.train.num_workers,
                        collate_fn=collate, drop_last=False, pin_memory=False, seed=cfg.seed)


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
        hard = ClassificationResult(metrics, torch.zeros(0, num_classes), test_y, torch.arange(len(test_y)), conf)
        return EvalResult(metrics, {"classification": hard, "classes": classes, "c_scores": res.scores})

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
        """The common results layout (:mod:`mm3d.results`); an SVM gives hard predictions, so per
        split only per_class.csv and confusion.png."""
        files = []
        info = self.run_info(cfg, datasets)
        for split, res in results.items():
            art = res.artifacts or {}
            if art.get("classification") is not None:
                conf = art["classification"].confusion
                names = art.get("classes") or [str(i) for i in range(conf.shape[0])]
                files += write_classification_split(run_dir, split, art["classification"], names,
                                                    title=f"{cfg.name}: linear SVM, {split}")
        files.append(write_results_md(run_dir, f"{cfg.name} ({cfg.task})", table_info(info),
                                      {s: r.metrics for s, r in results.items()},
                                      ("top1", "mean_class_acc", "C", "select_top1", "chance_top1", "num_samples"),
                                      extra_info=TABLE_INFO))
        return files


register_task(PointSVMTask())
