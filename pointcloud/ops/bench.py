"""Timings of the point ops against brute-force NumPy and, when importable, pytorch3d.

``bench_ops`` returns one row per (op, shape, implementation); ``mm3d bench`` prints them and
BENCHMARKS.md records them. The NumPy rows are the straightforward full-distance-matrix
versions (chunked over rows so that 20k x 20k fits in memory), run on the CPU.
"""

from __future__ import annotations

import statistics
from typing import Callable

import numpy as np
import torch

from mm3d.bench import time_steps
from mm3d.pointcloud.ops import fps_triton
from mm3d.pointcloud.ops._backend import pytorch3d_available
from mm3d.pointcloud.ops.chamfer import chamfer_distance
from mm3d.pointcloud.ops.fps import farthest_point_sample
from mm3d.pointcloud.ops.knn import knn

_NUMPY_ROWS = 1024


def numpy_fps(points: np.ndarray, num_samples: int) -> np.ndarray:
    """(B, G) FPS indices from (B, N, 3), one cloud and one step at a time."""
    out = np.zeros((points.shape[0], num_samples), dtype=np.int64)
    for b, cloud in enumerate(points):
        nearest = np.full(cloud.shape[0], np.inf)
        for g in range(1, num_samples):
            diff = cloud - cloud[out[b, g - 1]]
            nearest = np.minimum(nearest, (diff * diff).sum(-1))
            out[b, g] = nearest.argmax()
    return out


def _numpy_sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = a[:, :, None, :] - b[:, None, :, :]
    return (diff * diff).sum(-1)


def numpy_knn(query: np.ndarray, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """dist2, idx (B, M, k) from a full distance matrix and a sort."""
    dist = _numpy_sqdist(query, points)
    idx = np.argsort(dist, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(dist, idx, -1), idx


def numpy_chamfer_l2(x: np.ndarray, y: np.ndarray) -> float:
    """Batch mean of mean_x min d + mean_y min d, rows of x in chunks."""
    to_y, to_x = [], np.full(y.shape[:2], np.inf)
    for start in range(0, x.shape[1], _NUMPY_ROWS):
        dist = _numpy_sqdist(x[:, start:start + _NUMPY_ROWS], y)
        to_y.append(dist.min(-1))
        to_x = np.minimum(to_x, dist.min(1))
    return float((np.concatenate(to_y, 1).mean(-1) + to_x.mean(-1)).mean())


def _time_ms(fn: Callable[[], object], repeats: int, device: torch.device, *,
             warmup: bool = True) -> float:
    """Median wall time in ms of ``repeats`` calls, after one untimed call if ``warmup``."""
    return statistics.median(time_steps(fn, device, int(warmup), repeats)) * 1000


def bench_ops(device: str | torch.device = "cpu", repeats: int = 5,
              numpy_repeats: int = 1, batch: int = 32, large: bool = True) -> list[dict]:
    """Time FPS, KNN and Chamfer at Point-MAE's sizes; rows ``{op, shape, impl, ms}``.

    Cases (B = `batch`, 32 by default): FPS (B, N=1024 -> G=64, and N=8192 -> G=512); KNN (B, M=64
    centres, N=1024, k=32); Chamfer L2 over the masked patches of a batch (38 B pairs of 32-point
    patches) and between two 20k-point clouds. ``impl`` is ``"torch"``, ``"pytorch3d"`` (when
    importable), ``"triton"`` (FPS on CUDA) or ``"numpy_bruteforce"`` (CPU, timed ``numpy_repeats``
    times, 0: none; not for the 8192-point FPS). ``large=False`` leaves out the 8192-point FPS and
    the 20k-point Chamfer.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)

    def cloud(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, 3, generator=gen)

    fps_points, fps_large = cloud(batch, 1024), cloud(batch, 8192)
    centres, knn_points = cloud(batch, 64), cloud(batch, 1024)
    patch_x, patch_y = cloud(38 * batch, 32), cloud(38 * batch, 32)
    big_x, big_y = cloud(1, 20_000), cloud(1, 20_000)
    cases = [
        ("fps", f"B={batch} N=1024 G=64",
         lambda p, backend: farthest_point_sample(p, 64, backend=backend),
         lambda p: numpy_fps(p, 64), (fps_points,)),
        ("fps", f"B={batch} N=8192 G=512",
         lambda p, backend: farthest_point_sample(p, 512, backend=backend), None, (fps_large,)),
        ("knn", f"B={batch} M=64 N=1024 k=32",
         lambda q, p, backend: knn(q, p, 32, backend=backend),
         lambda q, p: numpy_knn(q, p, 32), (centres, knn_points)),
        ("chamfer_l2", f"B={38 * batch} N=32 M=32",
         lambda x, y, backend: chamfer_distance(x, y, backend=backend),
         numpy_chamfer_l2, (patch_x, patch_y)),
        ("chamfer_l2", "B=1 N=20000 M=20000",
         lambda x, y, backend: chamfer_distance(x, y, backend=backend),
         numpy_chamfer_l2, (big_x, big_y)),
    ]
    if not large:
        cases = [c for c in cases if c[1] not in (f"B={batch} N=8192 G=512", "B=1 N=20000 M=20000")]
    backends = ["torch"] + (["pytorch3d"] if pytorch3d_available() else [])
    rows = []
    for op, shape, torch_fn, numpy_fn, inputs in cases:
        on_device = tuple(t.to(device) for t in inputs)
        extra = ["triton"] if op == "fps" and fps_triton.usable(on_device[0]) else []
        for backend in backends + extra:
            ms = _time_ms(lambda: torch_fn(*on_device, backend=backend), repeats, device)
            rows.append({"op": op, "shape": shape, "impl": backend, "device": str(device),
                         "ms": round(ms, 3)})
        if numpy_fn is None or numpy_repeats == 0:
            continue
        arrays = tuple(t.numpy() for t in inputs)
        ms = _time_ms(lambda: numpy_fn(*arrays), numpy_repeats, torch.device("cpu"),
                      warmup=False)
        rows.append({"op": op, "shape": shape, "impl": "numpy_bruteforce", "device": "cpu",
                     "ms": round(ms, 3)})
    return rows
