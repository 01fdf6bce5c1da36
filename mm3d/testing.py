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
