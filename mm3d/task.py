"""The contract between a task (what is learned) and the trainer (how it is run).

A *model* takes a batch (a dict of tensors, collated from dataset samples) and returns a
dataclass derived from :class:`ModelOutput` whose ``loss`` is a scalar tensor. A *task* is a
small object that knows how to build the model and datasets from its config and how to score a
model on a split. The trainer calls every task the same way and never branches on modality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from mm3d.checkpoint import load_model_weights
from mm3d.datacheck import SplitCheck, check_datasets, tolerant_config
from mm3d.engine import mean_loss
from mm3d.extract import EXTRACTORS, ExtractOptions, FeatureExtractor


@dataclass
class ModelOutput:
    """Base of every model output. `loss`: () scalar tensor (None only in pure inference)."""

    loss: torch.Tensor | None


@dataclass
class EvalResult:
    """Metrics of one split, plus optional per-sample artefacts a task wants to write.

    `metrics`: flat name -> float, e.g. ``{"loss": 0.1, "acc": 0.9}``.
    `artifacts`: anything the task's `write_report` understands (predictions, confusion).
    """

    metrics: dict[str, float]
    artifacts: dict[str, Any] | None = None


class Task:
    """Base class of a task. Subclasses set `name`, `config_class` and override the builders."""

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    description: ClassVar[str] = ""

    def build_model(self, cfg: Any) -> nn.Module:
        raise NotImplementedError

    def build_datasets(self, cfg: Any, splits: Iterable[str]) -> dict[str, Dataset]:
        """Return the requested splits (``train``, ``val``, ``test``) that exist for this task."""
        raise NotImplementedError

    def check_data(self, cfg: Any, splits: Iterable[str], *, limit: int = 0) -> dict[str, SplitCheck]:
        """``mm3d data check``: open every sample of `splits` directly and list every bad one.

        Default: the splits built with ``data.max_failure_ratio=1`` (a dataset that reads its files
        when built then leaves every bad one out and lists it, instead of failing at the first),
        then each sample opened through the dataset's ``check_sample`` (no replacement; see
        :mod:`mm3d.datacheck`). `limit` > 0 opens at most that many samples per split.
        """
        return check_datasets(self.build_datasets(tolerant_config(cfg), splits), limit)

    def run_info(self, cfg: Any, datasets: dict[str, Dataset]) -> dict[str, Any]:
        """Protocol facts written into every results file (e.g. augmentation, voting, selection)."""
        return {}

    def collate_fn(self, cfg: Any) -> Callable[[list[Any]], Any] | None:
        """Custom collate (None: torch's default stacking)."""
        return None

    def batch_transform(self, cfg: Any, device: torch.device) -> Callable[[Any], Any] | None:
        """Optional on-device transform of a training batch (e.g. mixup); None for none."""
        return None

    def evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: Any, device: torch.device,
                 split: str) -> EvalResult:
        """Default: the mean loss over the split (sample-weighted, reduced across ranks)."""
        return EvalResult(mean_loss(model, loader, device))

    def final_evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: Any, device: torch.device,
                       split: str) -> EvalResult:
        """The reported evaluation of the selected weights (after training, and ``mm3d evaluate``).
        Default: :meth:`evaluate`; a task may add what is too costly for every epoch (repeated
        voting runs)."""
        return self.evaluate(model, loader, cfg, device, split)

    def init_weights(self, model: nn.Module, path: str, cfg: Any) -> list[str]:
        """Load `cfg.init` weights into `model`; return human-readable notes for the log."""
        return load_model_weights(model, path, allow_pickle=cfg.allow_pickle)

    def load_trained(self, model: nn.Module, path: str, cfg: Any) -> list[str]:
        """Load weights to score (``mm3d evaluate``): every key must fit; return notes for the log.

        Unlike :meth:`init_weights` nothing is dropped; a task may adapt tables that depend only on
        the input size (position embeddings) to the configured one.
        """
        return load_model_weights(model, path, allow_pickle=cfg.allow_pickle)

    def write_report(self, run_dir: Path, model: nn.Module, cfg: Any, results: dict[str, EvalResult],
                     datasets: dict[str, Dataset], device: torch.device) -> list[Path]:
        """After training (rank 0 only): pictures and reports. Returns the files written."""
        return []

    def visualize(self, model: nn.Module, cfg: Any, *, inputs: list[str], dataset_index: int | None,
                  out_dir: Path, interactive: bool, seed: int, device: torch.device) -> list[Path]:
        """`mm3d visualize`: render reconstructions of files or dataset items; return files written."""
        raise NotImplementedError(f"task {self.name!r} has no visualisation")

    def predict(self, model: nn.Module, cfg: Any, inputs: list[str], *, topk: int,
                label_map: str | None, device: torch.device) -> list[dict[str, Any]]:
        """`mm3d predict`: one dict per input file: ``{"input", "topk": [(name, prob), ...]}``."""
        raise NotImplementedError(f"task {self.name!r} does not predict classes")

    def preprocessing(self, cfg: Any) -> dict[str, Any]:
        """The model card's input recipe (:mod:`mm3d.modelcard`), as plain data: what a file goes through
        before the model. ``input`` (the tensor's name) and ``shape`` (one sample's shape, without the
        batch axis) let ``mm3d export`` trace the model; the other keys are for people. {}: not stated."""
        return {}

    def class_names(self, cfg: Any) -> list[str] | None:
        """The model card's class names, in label order (None: unknown, or not a classifier)."""
        return None

    def feature_extractor(self, model: nn.Module, cfg: Any, options: ExtractOptions,
                          device: torch.device) -> FeatureExtractor:
        """`mm3d extract`: what the model gives for each input file (see :mod:`mm3d.extract`). Default: the
        extractor the task's modality registered (:data:`mm3d.extract.EXTRACTORS`)."""
        if self.modality not in EXTRACTORS:
            raise NotImplementedError(f"task {self.name!r} does not extract features")
        return EXTRACTORS.get(self.modality)(model, cfg, options, device)

    def bench_peer(self, cfg: Any, model: nn.Module, batch: Any, device: torch.device
                   ) -> tuple[str, Callable[[], Any]] | None:
        """`mm3d bench`: an equivalent training step of a peer implementation, timed alongside ours.

        Returns ``(name, step_fn)`` where ``step_fn()`` runs forward + backward + optimizer step.
        """
        return None

    def bench_extra(self, cfg: Any, device: torch.device) -> list[dict[str, Any]]:
        """`mm3d bench`: further timings (e.g. ops against brute force), one dict per row."""
        return []
