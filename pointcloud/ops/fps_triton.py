"""Farthest point sampling as one Triton kernel (CUDA): the whole greedy loop on the device.

The PyTorch loop (:func:`mm3d.pointcloud.ops.fps._fps_torch`) launches a handful of kernels per
sample, so on a GPU it is bound by launches (G = 64 samples of B = 32 clouds took 5.6 ms on an
H200). Here one program per cloud keeps the cloud's coordinates and its nearest-sample distances in
registers and runs all G - 1 steps itself: a distance update and an arg-max per step, no launch, no
host read. The picks are the reference's: squared distances summed as ``(dx^2 + dy^2) + dz^2``, the
largest wins, ties to the lowest index, the start point given per cloud.

Used by :func:`~mm3d.pointcloud.ops.fps.farthest_point_sample` for CUDA tensors of 3-D points with at
most :data:`MAX_POINTS` points when Triton is importable. ``TRITON_INTERPRET=1`` runs the same kernel
on CPU tensors (slowly): the tests compare it with the reference that way on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

MAX_POINTS = 16384  # one program holds the whole cloud (x, y, z, distance) in registers

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(points: torch.Tensor) -> bool:
    """Whether the kernel can sample `points` (B, N, C): Triton present, CUDA tensors (or the
    interpreter), C == 3, N <= MAX_POINTS, a float type of at most 32 bits."""
    return (triton is not None and (points.is_cuda or interpreting()) and points.shape[-1] == 3
            and points.shape[1] <= MAX_POINTS and points.dtype in (torch.float32, torch.float16, torch.bfloat16))


if triton is not None:

    @triton.jit
    def _fps_kernel(points_ptr, first_ptr, out_ptr, num_points, num_samples, stride_b, stride_n,
                    BLOCK: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid = offs < num_points
        base = points_ptr + b.to(tl.int64) * stride_b
        x = tl.load(base + offs * stride_n, mask=valid, other=0.0).to(tl.float32)
        y = tl.load(base + offs * stride_n + 1, mask=valid, other=0.0).to(tl.float32)
        z = tl.load(base + offs * stride_n + 2, mask=valid, other=0.0).to(tl.float32)
        # padding lanes carry -1 and can never be the farthest (real distances are >= 0)
        nearest = tl.where(valid, float("inf"), -1.0)
        current = tl.load(first_ptr + b)
        out = out_ptr + b.to(tl.int64) * num_samples
        tl.store(out, current)
        for i in range(1, num_samples):
            cx = tl.load(base + current * stride_n).to(tl.float32)
            cy = tl.load(base + current * stride_n + 1).to(tl.float32)
            cz = tl.load(base + current * stride_n + 2).to(tl.float32)
            dx, dy, dz = x - cx, y - cy, z - cz
            dist = (dx * dx + dy * dy) + dz * dz
            nearest = tl.minimum(nearest, dist)
            farthest = tl.max(nearest, axis=0)
            current = tl.min(tl.where(nearest == farthest, offs, BLOCK), axis=0).to(tl.int64)
            tl.store(out + i, current)


def fps_triton(points: torch.Tensor, num_samples: int, first: torch.Tensor) -> torch.Tensor:
    """points: (B, N, 3) (see :func:`usable`); first: (B,) start indices -> (B, G) int64 indices."""
    if not usable(points):
        raise ValueError(f"the Triton FPS kernel needs CUDA (B, N, 3) float tensors with N <= {MAX_POINTS}; "
                         f"got {points.dtype} {tuple(points.shape)} on {points.device}")
    points = points.contiguous()
    batch, num_points, _ = points.shape
    out = torch.empty(batch, num_samples, dtype=torch.long, device=points.device)
    block = triton.next_power_of_2(num_points)
    warps = 4 if block <= 2048 else (8 if block <= 4096 else 16)
    _fps_kernel[(batch,)](points, first.to(device=points.device, dtype=torch.long).contiguous(), out,
                          num_points, num_samples, points.stride(0), points.stride(1), BLOCK=block,
                          num_warps=warps)
    return out


__all__ = ["MAX_POINTS", "fps_triton", "interpreting", "usable"]
