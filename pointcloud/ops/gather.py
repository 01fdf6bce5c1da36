"""Batched gathering of points (or per-point features) by index."""

from __future__ import annotations

import torch


def gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick rows of each cloud by index.

    Args:
        points: (B, N, C) points or per-point features.
        idx: (B, ...) integer indices into the N axis, any trailing shape; e.g. (B, G) FPS
            centres or (B, G, K) neighbourhoods. Values must lie in [0, N).

    Returns:
        (B, ..., C) tensor with ``out[b, ...] = points[b, idx[b, ...]]``; differentiable with
        respect to ``points``.
    """
    if points.ndim != 3:
        raise ValueError(f"points must have shape (B, N, C), got {tuple(points.shape)}")
    if idx.dtype not in (torch.int64, torch.int32) or idx.ndim < 1:
        raise TypeError(f"idx must be an int64/int32 tensor of shape (B, ...), got "
                        f"{idx.dtype} {tuple(idx.shape)}")
    if idx.shape[0] != points.shape[0]:
        raise ValueError(f"idx {tuple(idx.shape)} and points {tuple(points.shape)} must share "
                         f"the batch size")
    batch, _, channels = points.shape
    flat = idx.reshape(batch, -1, 1).long().expand(-1, -1, channels)
    return torch.gather(points, 1, flat).reshape(*idx.shape, channels)
