"""A toy regression task that exercises the trainer without any modality.

Used by the core tests (DDP, resume, accumulation, NaN stop) and as the smallest example of the
task contract: a dataset of dicts, a model returning a :class:`ModelOutput`, a config class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from mm3d.config import RunConfig
from mm3d.registry import TASKS, register_task
from mm3d.task import ModelOutput, Task


@dataclass
class ToyModelConfig:
    in_dim: int = 8
    hidden: int = 32
    dropout: float = 0.1
    nan_at_call: int = -1  # testing aid: produce a NaN loss at this forward call (-1: never)
    step_sleep: float = 0.0  # testing aid: seconds each training forward sleeps (a signal lands mid-run)

    run_neutral_keys: ClassVar[tuple[str, ...]] = ("step_sleep",)  # may differ when resuming


@dataclass
class ToyDataConfig:
    num_train: int = 64
    num_val: int = 16
    noise: float = 0.05


@dataclass
class ToyConfig(RunConfig):
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)


class ToyDataset(Dataset):
    """`n` samples ``{"x": (in_dim,), "y": ()}`` with y = x·w + noise, fixed by `seed`."""

    def __init__(self, n: int, in_dim: int, noise: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        w = torch.linspace(-1, 1, in_dim)
        self.x = torch.randn(n, in_dim, generator=g)
        self.y = self.x @ w + noise * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


@dataclass
class ToyOutput(ModelOutput):
    pred: torch.Tensor  # (B,)


class ToyRegressor(nn.Module):
    """MLP with dropout (so resume tests cover RNG restoration)."""

    def __init__(self, in_dim: int, hidden: int, dropout: float, nan_at_call: int = -1,
                 step_sleep: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.nan_at_call, self.step_sleep, self.calls = nan_at_call, step_sleep, 0

    def forward(self, batch: dict[str, torch.Tensor]) -> ToyOutput:
        pred = self.net(batch["x"]).squeeze(-1)
        loss = nn.functional.mse_loss(pred, batch["y"])
        if self.training:
            self.calls += 1
            if self.step_sleep:
                time.sleep(self.step_sleep)
            if self.calls == self.nan_at_call:
                loss = loss * float("nan")
        return ToyOutput(loss=loss, pred=pred)


class ToyTask(Task):
    name = "toy_regression"
    modality = "core"
    config_class = ToyConfig
    description = "toy regression for testing the trainer"

    def build_model(self, cfg: ToyConfig) -> nn.Module:
        m = cfg.model
        return ToyRegressor(m.in_dim, m.hidden, m.dropout, m.nan_at_call, m.step_sleep)

    def build_datasets(self, cfg: ToyConfig, splits: Iterable[str]) -> dict[str, Dataset]:
        d, n = cfg.data, {"train": cfg.data.num_train, "val": cfg.data.num_val}
        return {s: ToyDataset(n[s], cfg.model.in_dim, d.noise, seed=i) for i, s in enumerate(("train", "val"))
                if s in splits and n[s] > 0}


if "toy_regression" not in TASKS:
    register_task(ToyTask())
