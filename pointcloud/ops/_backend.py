"""Backend selection and input checks shared by the point ops.

Every op has a pure-PyTorch path. When ``backend="auto"`` and ``pytorch3d`` can be imported, the
neighbour *search* of FPS, KNN and Chamfer is delegated to pytorch3d's kernels; distances and
reductions are always computed here, so both backends share one definition.
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

import torch

Backend = Literal["auto", "torch", "pytorch3d"]
Resolved = Literal["torch", "pytorch3d"]

# Largest number of (query, point) pairs whose distances are held at once by the chunked
# searches: 2**25 pairs is 128 MiB of float32, and a search's peak extra memory is about twice
# that (measured: 129 MiB on CPU, 259 MiB on an H200 for a 100k x 100k Chamfer).
PAIR_BUDGET = 2**25


@functools.cache
def pytorch3d_available() -> bool:
    """Whether ``pytorch3d.ops`` imports (with its compiled kernels)."""
    try:
        import pytorch3d.ops  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def resolve_backend(backend: str) -> Resolved:
    """Map ``"auto"`` to ``"pytorch3d"`` when importable, else ``"torch"``; check the name."""
    if backend not in get_args(Backend):
        raise ValueError(f"backend must be one of {get_args(Backend)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if pytorch3d_available():
        return "pytorch3d"
    if backend == "pytorch3d":
        raise ImportError(
            "backend='pytorch3d' was requested but pytorch3d is not importable; install it "
            "(pip install 'mm3d[pytorch3d]', or see pytorch3d's INSTALL.md for a build that "
            "matches your torch/CUDA) or pass backend='torch' or 'auto'")
    return "torch"


def check_cloud(name: str, cloud: object, *, min_points: int = 1) -> torch.Tensor:
    """Check that ``cloud`` is a floating (B, N, C) tensor with at least ``min_points`` points."""
    if not isinstance(cloud, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cloud).__name__}")
    if cloud.ndim != 3:
        raise ValueError(f"{name} must have shape (B, N, C), got {tuple(cloud.shape)}")
    if not cloud.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {cloud.dtype}")
    if cloud.shape[1] < min_points:
        raise ValueError(f"{name} needs at least {min_points} point(s) per cloud, "
                         f"got shape {tuple(cloud.shape)}")
    return cloud


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Check that two clouds share batch size, coordinate count and device."""
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must agree "
                         f"in batch size and coordinate count")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive ``int`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def rows_per_chunk(chunk_size: int | None, batch: int, num_points: int) -> int:
    """Query rows per chunk: ``chunk_size`` if given, else as many as fit :data:`PAIR_BUDGET`."""
    if chunk_size is not None:
        return check_positive_int("chunk_size", chunk_size)
    return max(1, PAIR_BUDGET // max(1, batch * num_points))


def squared_norm(diff: torch.Tensor) -> torch.Tensor:
    """Sum of squares over the last (coordinate) axis: (..., C) -> (...).

    Adds the C coordinate slices one by one: for C = 3 this is several times faster on CPU than
    ``diff.square().sum(-1)``, whose reduction over a 3-wide innermost axis is not vectorised.
    """
    total = diff[..., 0].square()
    for c in range(1, diff.shape[-1]):
        total = total + diff[..., c].square()
    return total


def pairwise_sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances (B, N, M) between a (B, N, C) and b (B, M, C), from differences.

    Not ``|a|^2 + |b|^2 - 2ab``: this form is exact for duplicates, never negative, and gives
    identical points bit-identical distances, so ties stay ties. Peak memory is about twice the
    output.
    """
    dist = (a[:, :, None, 0] - b[:, None, :, 0]).square_()
    for c in range(1, a.shape[-1]):
        diff = a[:, :, None, c] - b[:, None, :, c]
        dist.addcmul_(diff, diff)
        del diff  # free before the next coordinate's difference is computed
    return dist


def pairwise_distance_key(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, N, M) values that increase with the distance between a[:, n] and b[:, m].

    Only the neighbour searches use it; their results are recomputed exactly afterwards. On CPU
    it is ``torch.cdist``'s direct (no matrix product) Euclidean distance, the fastest exact
    kernel there; elsewhere that kernel is slow (0.5 s for 20k x 20k on an H200), so it is
    :func:`pairwise_sqdist`. Both are exact up to rounding and keep duplicate points tied.
    """
    if a.device.type == "cpu":
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return pairwise_sqdist(a, b)
