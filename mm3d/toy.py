"""A toy regression task that exercises the trainer without any modality.

Used by the core tests (DDP, resume, accumulation, NaN stop, prepared shards) and as the smallest
example of the task contract: a dataset of dicts, a model returning a :class:`ModelOutput`, a
config class — and of a preparer (``mm3d data prepare --kind toy_regression``) with a dataset over
its shards (``data.format=shards``).
"""

from __future__ import annotations

import io
import os
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mm3d.config import RunConfig
from mm3d.errors import MissingFileError
from mm3d.registry import PREPARERS, TASKS, PrepareItem, register_task
from mm3d.shards import ShardSamples, has_split, resolve_shards, safe_key
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
    format: Literal["files", "shards"] = "files"  # shards: read `shards` (made by `mm3d data prepare`)
    shards: str = ""  # training split: shard folder, manifest, brace pattern, or a prepared root
    val_shards: str = ""  # default: the prepared root's val split, if it has one
    shuffle_buffer: int = 1000

    def validate(self) -> None:
        if self.format == "shards" and not self.shards:
            raise ValueError("format=shards needs data.shards (a shard folder, manifest, brace pattern "
                             "or prepared root)")


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


class ToyShardDataset(Dataset):
    """The toy samples read back from prepared shards: ``key.npy`` (in_dim,) + ``key.json`` {"y"}.

    Exposes ``shard_set``, so the trainer samples it with shard locality."""

    def __init__(self, spec: str, split: str) -> None:
        self.samples = ShardSamples(spec, split=split)
        self.shard_set = self.samples.shard_set

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        x = np.load(io.BytesIO(s["npy"]), allow_pickle=False)
        return {"x": torch.from_numpy(x), "y": torch.tensor(json.loads(s["json"])["y"], dtype=torch.float32)}


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
        if d.format == "shards":
            specs = {"train": d.shards, "val": d.val_shards or (d.shards if has_split(d.shards, "val") else "")}
            return {s: ToyShardDataset(specs[s], s) for s in ("train", "val") if s in splits and specs[s]}
        return {s: ToyDataset(n[s], cfg.model.in_dim, d.noise, seed=i) for i, s in enumerate(("train", "val"))
                if s in splits and n[s] > 0}


class ToyPreparer:
    """``mm3d data prepare --kind toy_regression``: toy samples into shards (``key.npy`` + ``key.json``).

    Command-line form: ``--list`` is a text file (as given, else under ``--root``) with one
    sample per line, ``y x_1 ... x_D`` (whitespace-separated numbers; ``#`` comments). Config form: the toy dataset a config builds
    (``data.num_train``, ``data.num_val``, ``model.in_dim``, ``data.noise``).
    Testing aids: an item whose ``info["fail"]`` is set raises in :meth:`convert`, like a corrupt input;
    one whose ``info["crash"]`` is set ends the (worker) process at once, like a decoder crashing in
    native code.
    """

    modality = "core"
    tasks = ("toy_regression",)

    def items(self, args: Any) -> list[PrepareItem]:
        path = Path(args.list)
        if not path.is_file() and getattr(args, "root", None):  # a list kept beside the data
            path = Path(args.root) / path
        if not path.is_file():
            raise MissingFileError(f"{path}: no such list file")
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if text:
                out.append(PrepareItem(safe_key(len(out), path.stem), str(path), f"{path.name}:{n}", {"row": text}))
        return out

    def settings(self, args: Any) -> dict[str, Any]:
        return {"dtype": "float32"}

    def from_config(self, cfg: ToyConfig, split: str) -> tuple[list[PrepareItem], dict[str, Any]] | None:
        n = {"train": cfg.data.num_train, "val": cfg.data.num_val}.get(split, 0)
        if n <= 0:
            return None
        ds = ToyDataset(n, cfg.model.in_dim, cfg.data.noise, seed=("train", "val").index(split))
        items = [PrepareItem(safe_key(i, split), f"toy:{split}", f"sample {i}",
                             {"x": ds.x[i].tolist(), "y": float(ds.y[i])}) for i in range(n)]
        return items, {"dtype": "float32"}

    def convert(self, item: PrepareItem, settings: dict[str, Any]) -> dict[str, bytes]:
        if item.info.get("fail"):
            raise ValueError(str(item.info["fail"]))
        if item.info.get("crash"):
            os._exit(70)
        if "row" in item.info:
            try:
                y, *x = (float(v) for v in item.info["row"].split())
            except ValueError as e:
                raise ValueError(f"not a row of numbers: {item.info['row']!r}") from e
            if not x:
                raise ValueError(f"a row needs y and at least one x, got {item.info['row']!r}")
        else:
            x, y = item.info["x"], item.info["y"]
        buf = io.BytesIO()
        np.save(buf, np.asarray(x, dtype=settings["dtype"]), allow_pickle=False)
        meta = {"y": y, "label": -1, "source": item.source, "line": item.line, "dim": len(x)}
        return {"npy": buf.getvalue(), "json": json.dumps(meta).encode()}


if "toy_regression" not in TASKS:
    register_task(ToyTask())
if "toy_regression" not in PREPARERS:
    PREPARERS.add("toy_regression", ToyPreparer())
