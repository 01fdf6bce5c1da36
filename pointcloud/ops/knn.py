"""K nearest neighbours between two batched point clouds."""

from __future__ import annotations

from typing import NamedTuple

import torch

from mm3d.pointcloud.ops._backend import (Backend, check_cloud, check_pair, check_positive_int,
                                          compute_dtype, pairwise_distance_key, pairwise_sqdist,
                                          resolve_backend, rows_per_chunk, squared_norm)
from mm3d.pointcloud.ops.gather import gather_points


class KNNResult(NamedTuple):
    """dist2: (B, M, k) squared distances, ascending; idx: (B, M, k) int64 indices into N."""

    dist2: torch.Tensor
    idx: torch.Tensor


def knn(query: torch.Tensor, points: torch.Tensor, k: int, *, backend: Backend = "auto",
        chunk_size: int | None = None) -> KNNResult:
    """The k points of ``points`` nearest to each query point.

    The neighbour search runs without gradients (chunked over queries so that at most
    :data:`~mm3d.pointcloud.ops._backend.PAIR_BUDGET` distances live at once); the returned
    distances are then recomputed exactly from the chosen pairs as ``sum((q - p)^2)``, so they
    are never negative, are exactly 0 for duplicates, and carry gradients to both clouds.
    Rows are sorted by distance, equal distances by index. Which of several tied candidates
    fills the last slots is unspecified. Under ``torch.export`` the search is traced as one top-k
    (:func:`_knn_traced`; tied distances then in no particular order) and `backend` is not used.

    Args:
        query: (B, M, 3) query points.
        points: (B, N, 3) points searched.
        k: neighbours per query, 1 <= k <= N.
        backend: ``"auto"`` searches with pytorch3d's ``knn_points`` when importable.
        chunk_size: query rows per chunk of the PyTorch search; None picks it from the budget.

    Returns:
        KNNResult(dist2 (B, M, k), idx (B, M, k)); float32 (float64 for float64 input).
    """
    check_cloud("query", query)
    check_cloud("points", points)
    check_pair("query", query, "points", points)
    k = check_positive_int("k", k)
    if k > points.shape[1]:
        raise ValueError(f"k={k} exceeds the {points.shape[1]} points per cloud")
    dtype = compute_dtype(query, points)
    query, points = query.to(dtype), points.to(dtype)
    if torch.compiler.is_exporting():  # torch.export / ONNX: a graph of static-shape ops
        return _knn_traced(query, points, k)

    with torch.no_grad():
        if resolve_backend(backend) == "pytorch3d":
            from pytorch3d.ops import knn_points

            idx = knn_points(query.detach(), points.detach(), K=k, return_sorted=False).idx
        else:
            idx = _search_torch(query.detach(), points.detach(), k, chunk_size)
    return _exact_sorted(query, points, idx.long())


def _search_torch(query: torch.Tensor, points: torch.Tensor, k: int,
                  chunk_size: int | None) -> torch.Tensor:
    """(B, M, k) indices of the k nearest points, unordered; chunked over M."""
    batch, num_points, _ = points.shape
    rows = rows_per_chunk(chunk_size, batch, num_points)
    parts = []
    for chunk in query.split(rows, dim=1):
        dist = pairwise_distance_key(chunk, points)                   # (B, m, N)
        parts.append(dist.topk(k, dim=-1, largest=False, sorted=False).indices)
        del dist  # free before the next chunk is computed
    return torch.cat(parts, dim=1)


def _knn_traced(query: torch.Tensor, points: torch.Tensor, k: int) -> KNNResult:
    """KNN written for tracing (``torch.export``, then ONNX): one top-k over all (B, M, N) squared
    distances. No chunks (their count would depend on the batch size, which an export may leave
    open) and no stable sort (ONNX has none): rows are ascending, tied distances in an unspecified
    order. The neighbour sets are those of :func:`knn` up to ties at the k-th distance."""
    dist2, idx = pairwise_sqdist(query, points).topk(k, dim=-1, largest=False, sorted=True)
    return KNNResult(dist2, idx)


def _exact_sorted(query: torch.Tensor, points: torch.Tensor, idx: torch.Tensor) -> KNNResult:
    """Recompute squared distances of the chosen pairs; order by (distance, index)."""
    dist2 = squared_norm(query[:, :, None, :] - gather_points(points, idx))
    idx, order = idx.sort(dim=-1)
    dist2 = dist2.gather(-1, order)
    dist2, order = dist2.sort(dim=-1, stable=True)
    return KNNResult(dist2, idx.gather(-1, order))
