"""Chamfer distance between batched point clouds, with Point-MAE's L1 and L2 definitions."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from mm3d.pointcloud.ops._backend import (Backend, check_cloud, check_pair, compute_dtype,
                                          pairwise_distance_key, resolve_backend,
                                          rows_per_chunk, squared_norm)
from mm3d.pointcloud.ops.gather import gather_points

Kind = Literal["l2", "l1"]
Reduction = Literal["mean", "none"]


def chamfer_distance(x: torch.Tensor, y: torch.Tensor, *, kind: Kind = "l2",
                     reduction: Reduction = "mean", chunk_size: int | None = None,
                     backend: Backend = "auto") -> torch.Tensor:
    """Symmetric Chamfer distance, as Point-MAE's ``ChamferDistanceL2`` / ``ChamferDistanceL1``.

    With d_x(i) the squared distance from x_i to its nearest point of y, and d_y(j) likewise:

    - ``kind="l2"``: mean_i d_x(i) + mean_j d_y(j)  (squared distances, no 1/2);
    - ``kind="l1"``: (mean_i sqrt(d_x(i)) + mean_j sqrt(d_y(j))) / 2.

    Nearest neighbours are found without gradients, in chunks of x rows that each hold at most
    :data:`~mm3d.pointcloud.ops._backend.PAIR_BUDGET` distances, so 100k x 100k clouds need
    under 300 MiB beyond the inputs. The distances of the chosen pairs are then recomputed
    exactly, and the gradient flows through them to both clouds (as the official CUDA
    kernel's backward does).
    For ``l1`` the square root is taken as sqrt(d) where d > 0 and 0 where d == 0, with a
    gradient of 0 at coincident points instead of NaN; the value has no epsilon added.
    Computed in float32 (float64 for float64 input).

    Args:
        x: (B, N, 3) first clouds.
        y: (B, M, 3) second clouds.
        kind: ``"l2"`` or ``"l1"`` as above.
        reduction: ``"mean"`` averages the per-cloud values over the batch (equal to the
            official all-points mean, since every cloud in a batch has N and M points);
            ``"none"`` returns them.
        chunk_size: x rows per chunk of the PyTorch search; None picks it from the budget.
        backend: ``"auto"`` searches with pytorch3d's ``knn_points`` when importable.

    Returns:
        Scalar for ``reduction="mean"``, (B,) for ``reduction="none"``.
    """
    check_cloud("x", x)
    check_cloud("y", y)
    check_pair("x", x, "y", y)
    if kind not in get_args(Kind):
        raise ValueError(f"kind must be one of {get_args(Kind)}, got {kind!r}")
    if reduction not in get_args(Reduction):
        raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {reduction!r}")
    dtype = compute_dtype(x, y)
    x, y = x.to(dtype), y.to(dtype)

    with torch.no_grad():
        if resolve_backend(backend) == "pytorch3d":
            from pytorch3d.ops import knn_points

            nearest_in_y = knn_points(x.detach(), y.detach(), K=1).idx[..., 0]
            nearest_in_x = knn_points(y.detach(), x.detach(), K=1).idx[..., 0]
        else:
            nearest_in_y, nearest_in_x = _nearest_both(x.detach(), y.detach(), chunk_size)

    dist_x = squared_norm(x - gather_points(y, nearest_in_y.long()))          # (B, N)
    dist_y = squared_norm(y - gather_points(x, nearest_in_x.long()))          # (B, M)
    if kind == "l2":
        per_cloud = dist_x.mean(-1) + dist_y.mean(-1)
    else:
        per_cloud = (_sqrt_zero_grad(dist_x).mean(-1) + _sqrt_zero_grad(dist_y).mean(-1)) / 2
    return per_cloud.mean() if reduction == "mean" else per_cloud


def _nearest_both(x: torch.Tensor, y: torch.Tensor,
                  chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour indices x -> y (B, N) and y -> x (B, M) in one chunked pass over x.

    Equal distances resolve to the lowest index in both directions.
    """
    batch, num_y, _ = y.shape
    rows = rows_per_chunk(chunk_size, batch, num_y)
    best_dist = y.new_full((batch, num_y), float("inf"))
    best_idx = torch.zeros(batch, num_y, dtype=torch.long, device=y.device)
    nearest_in_y = []
    offset = 0
    for chunk in x.split(rows, dim=1):
        dist = pairwise_distance_key(chunk, y)                         # (B, n, M)
        nearest_in_y.append(dist.argmin(-1))
        chunk_best, chunk_idx = dist.min(dim=1)                         # (B, M)
        del dist  # free before the next chunk is computed
        better = chunk_best < best_dist
        best_dist = torch.where(better, chunk_best, best_dist)
        best_idx = torch.where(better, chunk_idx + offset, best_idx)
        offset += chunk.shape[1]
    return torch.cat(nearest_in_y, dim=1), best_idx


def _sqrt_zero_grad(dist2: torch.Tensor) -> torch.Tensor:
    """sqrt(dist2), with value and gradient 0 where dist2 == 0 (no NaN from sqrt'(0))."""
    positive = dist2 > 0
    safe = torch.where(positive, dist2, torch.ones_like(dist2))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(dist2))
