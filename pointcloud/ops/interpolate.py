"""Inverse-distance feature propagation from the three nearest known points (PointNet++ FP)."""

from __future__ import annotations

import torch

from mm3d.pointcloud.ops._backend import Backend, check_cloud, check_pair
from mm3d.pointcloud.ops.gather import gather_points
from mm3d.pointcloud.ops.knn import knn

EPS = 1e-8


def three_nn_interpolate(unknown: torch.Tensor, known: torch.Tensor, feats: torch.Tensor, *,
                         backend: Backend = "auto") -> torch.Tensor:
    """Features at ``unknown`` points, blended from their three nearest ``known`` points.

    Follows Point-MAE's segmentation ``PointNetFeaturePropagation``: with d_j the *squared*
    distance to neighbour j, weights are w_j = 1 / (d_j + 1e-8), normalised to sum to 1. When a
    cloud has fewer than three known points (M < 3), all M are used; for M == 1 this is the
    official "repeat the single feature" case, and M == 2 (which the official code cannot
    handle) blends the two.

    Args:
        unknown: (B, N, 3) points that receive features.
        known: (B, M, 3) points that carry features, M >= 1.
        feats: (B, M, C) features of the known points.
        backend: neighbour search backend, as in :func:`~mm3d.pointcloud.ops.knn`.

    Returns:
        (B, N, C) interpolated features in the dtype of ``feats`` (float32 at least);
        differentiable with respect to all three inputs.
    """
    check_cloud("unknown", unknown)
    check_cloud("known", known)
    check_pair("unknown", unknown, "known", known)
    if feats.ndim != 3 or feats.shape[:2] != known.shape[:2]:
        raise ValueError(f"feats must have shape (B, M, C) = {tuple(known.shape[:2])} + (C,), "
                         f"got {tuple(feats.shape)}")
    neighbours = knn(unknown, known, min(3, known.shape[1]), backend=backend)
    weight = 1.0 / (neighbours.dist2 + EPS)                               # (B, N, k)
    weight = weight / weight.sum(-1, keepdim=True)
    gathered = gather_points(feats, neighbours.idx)                       # (B, N, k, C)
    dtype = torch.promote_types(feats.dtype, weight.dtype)
    return (gathered.to(dtype) * weight.to(dtype)[..., None]).sum(-2)
