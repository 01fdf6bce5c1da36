"""Helpers shared by the test suite (and usable by downstream users' tests)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def realdata_dir() -> Path | None:
    """The real-data samples: ``$MM3D_REALDATA`` or ``../shared/realdata`` beside the project."""
    env = os.environ.get("MM3D_REALDATA")
    path = Path(env) if env else PROJECT_ROOT.parent / "shared" / "realdata"
    return path if path.is_dir() else None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-6,
                 rtol: float = 1e-5, msg: str = "") -> None:
    """Assert two tensors match; on failure report the largest difference and its index."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected, dtype=actual.dtype, device=actual.device)
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    diff = (actual.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    if bool(bad.any()):
        flat = int(diff.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
        raise AssertionError(
            f"{msg} {int(bad.sum())}/{diff.numel()} elements differ; largest |diff| "
            f"{float(diff.flatten()[flat]):.3e} at {idx}: actual {float(actual[idx])} "
            f"vs expected {float(expected[idx])} (atol={atol}, rtol={rtol})")


def train_losses(run_dir: str | Path, key: str = "loss") -> list[float]:
    """The training records' `key` values of a run's ``metrics.jsonl``, in order."""
    import json

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r.get("split") == "train"]


class SilentProgress:
    """A progress sink for ``Trainer.train_epoch`` called directly in tests."""

    def update(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def sigterm_after_step(trainer, step: int) -> None:
    """Make `trainer` stop as on SIGTERM once optimizer step `step` (0-based) is done: its model's
    ``after_optimizer_step`` hook runs, then the stop is requested (the run checkpoints and raises
    ``TrainingInterrupted``). The model must have the hook (e.g. a target with a teacher)."""
    import signal

    hook = trainer.model.after_optimizer_step

    def stop_after(done: int, total: int) -> None:
        hook(done, total)
        if done == step:
            trainer.signals.signum = signal.SIGTERM

    trainer.model.after_optimizer_step = stop_after
