"""Linear-SVM probe of frozen Point-MAE features (task ``pointmae_svm``).

A scikit-learn SVM on pooled, frozen encoder tokens
(:meth:`~mm3d.pointcloud.models.PointMAEPretrain.forward_tokens`) of a classification dataset
(the ``data`` section of :class:`~mm3d.pointcloud.classification.ClsDataConfig`). No training
steps (``train.epochs: 0``): the trainer builds the model, loads the weights and calls
:meth:`PointSVMTask.evaluate` on the test split, which extracts train and test features, fits the
SVM on all of train and scores the test split. Run it as ``mm3d evaluate CONFIG
checkpoint=PRETRAIN.pt`` (strict load of a pretraining checkpoint) or ``mm3d finetune CONFIG
init=CKPT`` (encoder weights of any of our checkpoints).

Two ways to set the SVM up (``probe.preset``):

- ``""`` (ours): ``LinearSVC`` on [max, mean] of the patch tokens (2D values), C chosen among
  ``probe.cs`` on a validation part carved from train (honest, the default) or on test
  (``train.select_on=test``, labelled custom), see :mod:`mm3d.pointcloud.protocol`;
- a published setting, :data:`SVM_PRESETS`: ``recon`` (ReCon ``tools/runner_svm.py``:
  ``LinearSVC(C=0.075)``) or ``pointm2ae`` (Point-M2AE ``tools/runner_test_svm.py``:
  ``SVC(kernel="linear")``, C=0.012 on ModelNet40, 0.042 on ScanObjectNN OBJ_BG), both on
  max + mean of the patch tokens (D values). The preset fixes pooling, estimator and C, so
  ``probe.cs`` must be null and ``probe.standardize`` false with it.

Point-MAE publishes no SVM number, so ``protocol=paper`` needs a preset; it then also sets the
preset's point counts (``data.npoints``/``fps_points``) and clears ``probe.cs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mm3d.config import ConfigError, RunConfig, TrainConfig
from mm3d.data import ResumableSampler, build_loader
from mm3d.distributed import all_gather_cat, get_info
from mm3d.engine import move_to_device
from mm3d.metrics import ClassificationResult, confusion_matrix, mean_class_accuracy
from mm3d.registry import register_task
from mm3d.results import write_classification_split, write_results_md
from mm3d.task import EvalResult, Task
from mm3d.pointcloud.checkpoints import load_encoder_checkpoint
from mm3d.pointcloud.classification import (ClsDataConfig, build_cls_datasets, class_names, eval_points,
                                            majority_accuracy, resolve_num_classes)
from mm3d.pointcloud.models import PointMAEConfig, build_pretrain_model
from mm3d.pointcloud.protocol import TABLE_INFO, table_info
from mm3d.pointcloud.splits import stratified_split
from mm3d.pointcloud.tasks import cloud_preprocessing

log = logging.getLogger(__name__)


SvmKind = Literal["linear_svc", "svc_linear"]  # sklearn LinearSVC (one-vs-rest) | SVC(kernel="linear") (one-vs-one)
Pooling = Literal["max_mean_cat", "max_plus_mean"]  # [max, mean] (2D values) | max + mean (D values)
PresetName = Literal["", "recon", "pointm2ae"]


@dataclass(frozen=True)
class SvmPreset:
    """A published linear-SVM setting: feature pooling, estimator and the C it uses per dataset.

    Keys of `cs` and `npoints` are :func:`dataset_key` values (``modelnet40``, ``scanobjectnn/OBJ_BG``).
    """

    title: str  # for labels: "paper (<title>): C=... fixed"
    kind: SvmKind
    pooling: Pooling
    cs: Mapping[str, float]
    npoints: Mapping[str, int]  # points per cloud the official script feeds the encoder
    source: str  # the official lines this preset follows
    notes: tuple[str, ...] = ()  # where our encoder cannot follow the official feature (logged, in run_info)


SVM_PRESETS: dict[str, SvmPreset] = {
    "recon": SvmPreset(
        title="ReCon linear SVM", kind="linear_svc", pooling="max_plus_mean",
        cs={"modelnet40": 0.075}, npoints={"modelnet40": 1024},
        source="ReCon tools/runner_svm.py (LinearSVC(C=0.075)), models/transformer.py PointTransformerSVM.forward, "
               "cfgs/svm/modelnet40.yaml (npoints: 1024)",
        notes=("ReCon's feature is [max over its 3 special tokens (cls, image, text), max + mean over the patch "
               "tokens] (2D values); the Point-MAE pretraining encoder has no special tokens, so this preset uses "
               "the patch part alone (D values)",)),
    "pointm2ae": SvmPreset(
        title="Point-M2AE linear SVM", kind="svc_linear", pooling="max_plus_mean",
        cs={"modelnet40": 0.012, "scanobjectnn/OBJ_BG": 0.042},
        npoints={"modelnet40": 1024, "scanobjectnn/OBJ_BG": 2048},
        source="Point-M2AE tools/runner_test_svm.py (SVC(C=0.012 | 0.042, kernel='linear')), "
               "models/Point_M2AE.py forward(eval=True) (mean + max of the last scale's tokens)",
        notes=("Point-M2AE pools the tokens of its coarsest scale (64 groups of a 3-scale encoder); here they "
               "are the single-scale Point-MAE patch tokens",
               "Point-M2AE's ModelNet40 SVM reads modelnet40_ply_hdf5_2048 (the first 1024 of 2048 points); "
               "data.root here is modelnet40_normal_resampled (farthest 1024 points)")),
}


def dataset_key(data: ClsDataConfig) -> str:
    """The key a preset's C table uses: the dataset name, with the variant for ScanObjectNN."""
    return f"scanobjectnn/{data.scan_variant}" if data.dataset == "scanobjectnn" else data.dataset


def preset_c(name: str, data: ClsDataConfig) -> float:
    """The C that preset `name` uses on `data`'s dataset; ConfigError naming both when it has none."""
    preset = SVM_PRESETS[name]
    key = dataset_key(data)
    if key not in preset.cs:
        raise ConfigError(f"probe.preset={name} ({preset.title}) has no published C for {key} (data.dataset="
                          f"{data.dataset}); it has one for {', '.join(preset.cs)}. Drop the preset and choose C "
                          f"among probe.cs instead")
    return preset.cs[key]


@dataclass
class ProbeConfig:
    """The ``probe`` section of the linear-SVM evaluation."""

    preset: PresetName = ""  # a published setting (SVM_PRESETS); "" = ours (C chosen among cs)
    cs: list[float] | None = field(default_factory=lambda: [0.01, 0.1, 1.0])  # candidate C values (null: preset)
    max_iter: int = 20000  # LinearSVC iterations (SVC runs libsvm to its tolerance, as Point-M2AE's script)
    standardize: bool = False  # z-score the features (fitted on the training features)

    def validate(self) -> None:
        if self.cs is not None and (not self.cs or any(c <= 0 for c in self.cs)):
            raise ValueError(f"cs must be a non-empty list of positive numbers (or null with a preset), got {self.cs}")
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
    paper_reference: ClassVar[str] = ("ReCon tools/runner_svm.py or Point-M2AE tools/runner_test_svm.py, "
                                      "by probe.preset (Point-MAE publishes no SVM number)")

    def svm_preset(self) -> SvmPreset | None:
        return SVM_PRESETS[self.probe.preset] if self.probe.preset else None

    def svm_cs(self) -> list[float]:
        """The C candidates of this run: the preset's one C, else ``probe.cs``."""
        return [preset_c(self.probe.preset, self.data)] if self.probe.preset else list(self.probe.cs or [])

    def paper_protocol(self) -> dict[str, Any]:
        """The preset's procedure: its C (``probe.cs`` cleared), unscaled features and its point count."""
        if not self.probe.preset:
            raise ConfigError("protocol=paper: Point-MAE publishes no linear-SVM number, so the SVM probe has no "
                              "paper procedure of its own; choose a published one with probe.preset=recon "
                              "(ReCon, ModelNet40) or probe.preset=pointm2ae (Point-M2AE, ModelNet40 and "
                              "ScanObjectNN OBJ_BG)")
        preset_c(self.probe.preset, self.data)
        n = SVM_PRESETS[self.probe.preset].npoints[dataset_key(self.data)]
        return {"probe": {"cs": None, "standardize": False}, "data": {"npoints": n, "fps_points": n}}

    def validate(self) -> None:
        super().validate()
        if self.train.epochs != 0 or self.train.max_steps:
            raise ValueError("the SVM probe trains no network: keep train.epochs at 0 (and max_steps unset)")
        if self.probe.preset:
            preset_c(self.probe.preset, self.data)
            if self.protocol != "paper":  # under protocol=paper, paper_protocol() clears them
                fixed = f"probe.preset={self.probe.preset} fixes C ({self.svm_cs()[0]} on {dataset_key(self.data)})"
                if self.probe.cs is not None:
                    raise ValueError(f"probe.cs={self.probe.cs} is not used: {fixed}; set probe.cs=null, or drop "
                                     f"the preset to choose C among probe.cs")
                if self.probe.standardize:
                    raise ValueError(f"probe.standardize=true: {fixed} on unscaled features, as the official "
                                     f"script; set probe.standardize=false, or drop the preset")
        elif self.probe.cs is None:
            raise ValueError("probe.cs is null: give candidate C values, or a published setting with "
                             "probe.preset=recon|pointm2ae")
        elif len(self.probe.cs) > 1 and self.train.select_on == "last":
            raise ValueError(f"probe.cs has {len(self.probe.cs)} values: choose C with train.select_on=val "
                             f"(honest) or test (labelled custom), or give one value")


@dataclass
class ProbeResult:
    """The fitted probe: chosen C, its validation accuracy (None without selection), test accuracy,
    predicted (S,) labels."""

    c: float
    val_accuracy: float | None
    scores: dict[float, float]  # selection accuracy of every candidate C
    pred: np.ndarray


def make_svm(kind: SvmKind, c: float, *, max_iter: int = 20000, standardize: bool = False):
    """The unfitted scikit-learn estimator: ``LinearSVC(C=c)`` (squared hinge, one-vs-rest; the
    solver scikit-learn picks, up to `max_iter` iterations) or ``SVC(C=c, kernel="linear")``
    (hinge, one-vs-one, libsvm to its tolerance), behind a StandardScaler when `standardize`."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    if kind == "linear_svc":
        svm = LinearSVC(C=c, max_iter=max_iter, dual="auto")
    elif kind == "svc_linear":
        svm = SVC(C=c, kernel="linear")
    else:
        raise ValueError(f"SVM kind must be 'linear_svc' or 'svc_linear', got {kind!r}")
    return make_pipeline(StandardScaler(), svm) if standardize else svm


def fit_linear_svm(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                   cs: Sequence[float], select_on: str, val_fraction: float = 0.1, val_seed: int = 0,
                   max_iter: int = 20000, standardize: bool = False, kind: SvmKind = "linear_svc") -> ProbeResult:
    """Fit a linear SVM (:func:`make_svm`) on (S, F) features; choose C on a stratified val part of
    train (`select_on` = ``val``), on the test set (``test``) or take the only one."""

    def make(c: float):
        return make_svm(kind, c, max_iter=max_iter, standardize=standardize)

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


def pool_patch_tokens(tokens: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """tokens: (B, G, D) patch tokens -> (B, 2D) [max, mean] over the G patches (``max_mean_cat``)
    or (B, D) max + mean (``max_plus_mean``, the published SVM features)."""
    if pooling == "max_mean_cat":
        return torch.cat([tokens.amax(dim=1), tokens.mean(dim=1)], dim=-1)
    if pooling == "max_plus_mean":
        return tokens.amax(dim=1) + tokens.mean(dim=1)
    raise ValueError(f"pooling must be 'max_mean_cat' or 'max_plus_mean', got {pooling!r}")


def feature_words(pooling: Pooling, dim: int) -> str:
    """The feature of `pooling` in words, for run_info."""
    return {"max_mean_cat": f"[max, mean] of the patch tokens ({2 * dim} values)",
            "max_plus_mean": f"max + mean of the patch tokens ({dim} values)"}[pooling]


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable[Any], data: ClsDataConfig, device: torch.device,
                     pooling: Pooling = "max_mean_cat") -> tuple[torch.Tensor, torch.Tensor]:
    """(S, F) pooled features (:func:`pool_patch_tokens`) and (S,) labels of every sample once
    (DDP-gathered, ordered by sample index)."""
    model.eval()
    feats, labels, index = [], [], []
    for batch in loader:
        batch = move_to_device(batch, device)
        tokens = model.forward_tokens(eval_points(batch["points"], data))
        feats.append(pool_patch_tokens(tokens, pooling).float())
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

    def preprocessing(self, cfg: PointSVMConfig) -> dict[str, Any]:
        """The evaluation clouds: ``data.npoints`` farthest points."""
        return cloud_preprocessing(cfg.model, cfg.data.npoints, sampling="farthest point sampling from point 0")

    def class_names(self, cfg: PointSVMConfig) -> list[str] | None:
        return class_names(cfg)

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
        preset = cfg.svm_preset()
        pooling: Pooling = preset.pooling if preset else "max_mean_cat"
        for note in preset.notes if preset else ():
            log.info("probe.preset=%s: %s", cfg.probe.preset, note)
        train_ds = build_cls_datasets(cfg, ["train"], carve_val=False)["train"]
        train_x, train_y = extract_features(model, _eval_loader(train_ds, cfg), cfg.data, device, pooling)
        test_x, test_y = extract_features(model, loader, cfg.data, device, pooling)
        cs = cfg.svm_cs()
        select = cfg.train.select_on if cfg.train.select_on in ("val", "test") else "last"
        res = fit_linear_svm(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), cs=cs,
                             select_on=select, val_fraction=cfg.data.val_fraction, val_seed=cfg.data.val_seed,
                             max_iter=cfg.probe.max_iter, standardize=cfg.probe.standardize,
                             kind=preset.kind if preset else "linear_svc")
        num_classes = resolve_num_classes(cfg)
        conf = confusion_matrix(torch.from_numpy(res.pred), test_y, num_classes)
        metrics = {"top1": float((res.pred == test_y.numpy()).mean()), "mean_class_acc": mean_class_accuracy(conf),
                   "chance_top1": majority_accuracy(conf),
                   "C": res.c, "num_samples": float(len(test_y)), "train_samples": float(len(train_y)),
                   "feature_dim": float(train_x.shape[1])}
        if res.val_accuracy is not None:
            metrics["select_top1"] = res.val_accuracy
        log.info("SVM probe on %s: C=%g (candidates %s) -> top1 %.4f", split, res.c, res.scores or cs, metrics["top1"])
        classes = getattr(getattr(loader, "dataset", None), "classes", None)
        hard = ClassificationResult(metrics, torch.zeros(0, num_classes), test_y, torch.arange(len(test_y)), conf)
        return EvalResult(metrics, {"classification": hard, "classes": classes, "c_scores": res.scores})

    def run_info(self, cfg: PointSVMConfig, datasets: Mapping[str, Any]) -> dict[str, Any]:
        preset = cfg.svm_preset()
        cs = cfg.svm_cs()
        dim = cfg.model.embed_dim
        if preset:
            sel = "last"
            svm = ("LinearSVC" if preset.kind == "linear_svc" else "SVC(kernel='linear')") + f", C={cs[0]} fixed"
            protocol = (f"paper ({preset.title}): C={cs[0]} fixed" if cfg.protocol == "paper" else
                        f"custom ({preset.title}): C={cs[0]} fixed (protocol=paper runs its whole procedure)")
        else:
            sel = cfg.train.select_on if len(cs) > 1 else "last"
            svm = "LinearSVC" + (", features standardized" if cfg.probe.standardize else "")
            protocol = {"val": "honest: C chosen on val carved from train",
                        "test": "custom: C chosen on test (no published Point-MAE SVM protocol; protocol=paper "
                                "with probe.preset=recon|pointm2ae runs a published one)",
                        "last": f"honest: fixed C={cs[0]}"}[sel]
        if cfg.checkpoint:
            protocol += f"; checkpoint {Path(cfg.checkpoint).name}"
        info = {"config": cfg.name, "task": cfg.task, "seed": cfg.seed, "selected_on": sel, "protocol": protocol,
                "voting": "off", "augmentation": "none (frozen features)", "dataset": cfg.data.dataset,
                "preset": cfg.probe.preset or "none", "svm": svm,
                "feature": feature_words(preset.pooling if preset else "max_mean_cat", dim),
                "cs": cs, "init": cfg.init or cfg.checkpoint or "scratch"}
        if preset:
            info["preset_source"] = preset.source
            info["preset_notes"] = list(preset.notes)
        return info

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
        preset = cfg.svm_preset()
        sections = [f"## Preset {cfg.probe.preset} ({preset.title})\n\nFollows {preset.source}.\n\n"
                    + "".join(f"- {note}\n" for note in preset.notes)] if preset else []
        files.append(write_results_md(run_dir, f"{cfg.name} ({cfg.task})", table_info(info),
                                      {s: r.metrics for s, r in results.items()},
                                      ("top1", "mean_class_acc", "C", "select_top1", "chance_top1", "num_samples"),
                                      extra_info=(*TABLE_INFO, "svm", "feature"), sections=sections))
        return files


register_task(PointSVMTask())
