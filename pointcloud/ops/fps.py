"""Iterative farthest point sampling (FPS), batched."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from einops import rearrange

from mm3d.pointcloud.ops import fps_triton
from mm3d.pointcloud.ops._backend import (check_cloud, check_positive_int,
                                          compute_dtype, resolve_backend)
from mm3d.pointcloud.ops.gather import gather_points

Start = Literal["first", "random"]
FPSBackend = Literal["auto", "torch", "pytorch3d", "triton"]


def farthest_point_sample(points: torch.Tensor, num_samples: int, *, start: Start = "first",
                          generator: torch.Generator | None = None,
                          backend: FPSBackend = "auto") -> torch.Tensor:
    """Select ``num_samples`` points per cloud, each farthest from those already chosen.

    Rules (those of the pointnet2 CUDA kernel Point-MAE uses): the first sample is point 0
    (``start="first"``) or a point drawn from ``generator`` (``start="random"``); every later
    sample is the point whose squared distance to its nearest chosen point is largest, ties going
    to the lowest index. The kernel's quirk of never choosing points within 0.032 of the origin
    (``|p|^2 <= 1e-3``) is not reproduced. Once every point lies on a chosen one (a cloud with
    fewer distinct points than ``num_samples``), index 0 is repeated. Under ``torch.export`` the
    samples are traced as a static-shape graph (:func:`_fps_traced`, the same picks) and `backend`
    is not used.

    Args:
        points: (B, N, 3) point clouds (any coordinate count works).
        num_samples: G, the number of samples, 1 <= G <= N.
        start: how the first sample is chosen.
        generator: random source for ``start="random"``.
        backend: ``"auto"`` uses pytorch3d's kernel when importable, else for CUDA clouds of 3-D
            points our Triton kernel (:mod:`~mm3d.pointcloud.ops.fps_triton`, the whole loop in one
            launch), else the PyTorch loop; ``"triton"`` insists on the Triton kernel.

    Returns:
        (B, G) int64 indices into the N axis, in selection order; never differentiable.
    """
    check_cloud("points", points)
    num_samples = check_positive_int("num_samples", num_samples)
    batch, num_points, _ = points.shape
    if num_samples > num_points:
        raise ValueError(f"num_samples={num_samples} exceeds the {num_points} points per cloud")
    if start not in get_args(Start):
        raise ValueError(f"start must be one of {get_args(Start)}, got {start!r}")
    if backend not in get_args(FPSBackend):
        raise ValueError(f"backend must be one of {get_args(FPSBackend)}, got {backend!r}")
    resolved = "triton" if backend == "triton" else resolve_backend(backend)

    points = points.detach().to(compute_dtype(points))
    if start == "random":
        device = generator.device if generator is not None else points.device
        first = torch.randint(num_points, (batch,), generator=generator, device=device)
        first = first.to(points.device)
    else:
        first = torch.zeros(batch, dtype=torch.long, device=points.device)

    if torch.compiler.is_exporting():  # torch.export / ONNX: a graph of static-shape ops
        return _fps_traced(points, num_samples, first)
    if resolved == "pytorch3d":
        return _fps_pytorch3d(points, num_samples, first)
    if resolved == "triton" or (backend == "auto" and points.is_cuda and fps_triton.usable(points)):
        return fps_triton.fps_triton(points, num_samples, first)
    return _fps_torch(points, num_samples, first)


def _fps_torch(points: torch.Tensor, num_samples: int, first: torch.Tensor,
               in_place: bool | None = None) -> torch.Tensor:
    """Greedy FPS looping over the G samples, vectorised over B and N.

    Each step adds the squared distance of every point to the newest sample, coordinate by
    coordinate, into preallocated (B, N) buffers (on the CPU in place, which is 3x faster than
    materialising (B, C, N) differences; one fused expression elsewhere, where kernel launches
    dominate; `in_place` None picks by device); the sums are the same either way:
    ``(dx^2 + dy^2) + dz^2``.
    """
    batch, num_points, channels = points.shape
    nearest = points.new_full((batch, num_points), float("inf"))
    chosen = torch.empty(batch, num_samples, dtype=torch.long, device=points.device)
    chosen[:, 0] = current = first
    rows = torch.arange(batch, device=points.device)
    if in_place if in_place is not None else points.device.type == "cpu":
        planes = rearrange(points, "b n c -> c b n").contiguous()  # one (B, N) plane per coordinate
        dist, term = torch.empty_like(nearest), torch.empty_like(nearest)
        for i in range(1, num_samples):
            centre = points[rows, current]                                # (B, C)
            torch.sub(planes[0], centre[:, :1], out=dist).square_()
            for c in range(1, channels):
                dist.add_(torch.sub(planes[c], centre[:, c:c + 1], out=term).square_())
            torch.minimum(nearest, dist, out=nearest)
            current = nearest.max(dim=-1).indices                         # the first maximum wins ties
            chosen[:, i] = current
        return chosen
    coords = rearrange(points, "b n c -> b c n").contiguous()
    for i in range(1, num_samples):
        centre = rearrange(points[rows, current], "b c -> b c 1")
        nearest = torch.minimum(nearest, (coords - centre).square().sum(1))     # (B, N)
        current = nearest.max(dim=-1).indices                             # the first maximum wins ties
        chosen[:, i] = current
    return chosen


def _fps_traced(points: torch.Tensor, num_samples: int, first: torch.Tensor) -> torch.Tensor:
    """Greedy FPS written for tracing (``torch.export``, then ONNX): G - 1 repetitions of
    static-shape tensor ops, with no buffer written in place and no value read back to Python,
    so a traced graph holds the loop unrolled, one copy per sample (the count comes from the
    model's config). The distances are summed in :func:`_fps_torch`'s order,
    ``(dx^2 + dy^2) + dz^2``, and ``argmax`` takes the first maximum as ``max`` does there, so
    the picks are the same.

    points: (B, N, C); first: (B,) start indices. Returns (B, G) int64 indices.
    """
    planes = rearrange(points, "b n c -> c b n")                        # one (B, N) plane per coordinate
    nearest = torch.full_like(planes[0], float("inf"))
    current, chosen = first, [first]
    for _ in range(1, num_samples):
        centre = gather_points(points, current[:, None])[:, 0]           # (B, C)
        dist = (planes[0] - centre[:, :1]).square()
        for c in range(1, points.shape[-1]):
            dist = dist + (planes[c] - centre[:, c:c + 1]).square()
        nearest = torch.minimum(nearest, dist)
        current = nearest.argmax(dim=-1)                                 # the first maximum wins ties
        chosen.append(current)
    return torch.stack(chosen, dim=1)


def _fps_pytorch3d(points: torch.Tensor, num_samples: int, first: torch.Tensor) -> torch.Tensor:
    """pytorch3d's kernel always starts at index 0: swap each start point into slot 0."""
    from pytorch3d.ops import sample_farthest_points

    batch, num_points, _ = points.shape
    order = torch.arange(num_points, device=points.device).expand(batch, -1).clone()
    order.scatter_(1, first[:, None], 0)
    order[:, 0] = first
    _, idx = sample_farthest_points(gather_points(points, order), K=num_samples)
    return order.gather(1, idx.long())
