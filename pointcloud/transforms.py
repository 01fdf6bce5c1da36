"""Batched point-cloud transforms: normalisation, sampling and Point-MAE's augmentations.

Every function takes ``points`` as a (B, N, C) batch or a single (N, C) cloud (returned with the
same layout), works on any device without per-sample Python loops, and draws its randomness
from an optional ``torch.Generator`` (on any device; the draws are moved to the points' device).
The first three channels are ``x y z``; the other channels (normals, colours) pass through
unchanged unless a function says otherwise. Inputs are never modified in place.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch

from mm3d.pointcloud.ops import farthest_point_sample

Axis = Literal["x", "y", "z"]
_AXES = {"x": 0, "y": 1, "z": 2}

# The kinds of :func:`build_point_augmentation`. Pretraining and classification offer the first
# three (Point-MAE's); part segmentation also offers ``scale_shift`` (the official ShapeNetPart one).
ShapeAugmentation = Literal["scale_translate", "rotate", "none"]
PointAugmentation = Literal["scale_shift", ShapeAugmentation]


def _batched(points: torch.Tensor, name: str = "points") -> tuple[torch.Tensor, bool]:
    """Return a (B, N, C) view of `points` and whether the input had no batch axis."""
    if points.dim() == 2:
        points = points.unsqueeze(0)
        single = True
    elif points.dim() == 3:
        single = False
    else:
        raise ValueError(f"{name} must be (B, N, C) or (N, C), got shape {tuple(points.shape)}")
    if points.shape[-1] < 3:
        raise ValueError(f"{name} needs x, y, z in its first 3 channels, got shape "
                         f"{tuple(points.shape)}")
    return points, single


def _unbatch(points: torch.Tensor, single: bool) -> torch.Tensor:
    return points.squeeze(0) if single else points


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """U[0, 1) draws of `shape` made on the generator's device (float32), then moved to
    `like`'s device with `like`'s floating dtype (or `dtype`)."""
    device = generator.device if generator is not None else like.device
    dtype = dtype or (like.dtype if like.is_floating_point() else torch.float32)
    return torch.rand(shape, generator=generator, device=device).to(like.device, dtype)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor
           ) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.randn(shape, generator=generator, device=device).to(like.device, dtype)


def _with_xyz(points: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
    """`points` with its first three channels replaced by `xyz` (same leading shape)."""
    if points.shape[-1] == 3:
        return xyz
    return torch.cat([xyz, points[..., 3:]], dim=-1)


def normalize_unit_sphere(points: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Centre each cloud on its centroid and scale it so the farthest point is at distance 1.

    Args:
        points: (B, N, C) or (N, C); only ``x y z`` are changed.
        eps: floor on the scale, so a degenerate cloud (all points equal) maps to the origin.
    Returns:
        The normalised clouds, same shape as `points`.
    """
    pts, single = _batched(points)
    xyz = pts[..., :3]
    xyz = xyz - xyz.mean(dim=1, keepdim=True)
    radius = xyz.norm(dim=-1).amax(dim=1).clamp_min(eps)  # (B,)
    xyz = xyz / radius[:, None, None]
    return _unbatch(_with_xyz(pts, xyz), single)


def sample_indices(points: torch.Tensor, num_samples: int,
                   method: Literal["random", "fps"] = "random", *,
                   generator: torch.Generator | None = None,
                   fps_start: Literal["first", "random"] = "first") -> torch.Tensor:
    """Indices of `num_samples` points per cloud.

    ``random`` draws without replacement when ``num_samples <= N`` (every point at most once)
    and otherwise keeps all N points in random order plus ``num_samples - N`` random repeats.
    ``fps`` is farthest point sampling on ``x y z``
    (:func:`mm3d.pointcloud.ops.farthest_point_sample`) and needs ``num_samples <= N``.

    Args:
        points: (B, N, C) or (N, C).
        num_samples: G, points to keep per cloud.
        method: ``random`` or ``fps``.
        generator: randomness for ``random`` (and for ``fps`` with ``fps_start="random"``).
        fps_start: the first FPS point: index 0 or a random one.
    Returns:
        (B, G) long indices (or (G,) for an (N, C) input).
    """
    pts, single = _batched(points)
    b, n = pts.shape[:2]
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if method == "random":
        order = _rand((b, n), generator, pts, torch.float32).argsort(dim=1)
        if num_samples <= n:
            idx = order[:, :num_samples]
        else:
            extra = (_rand((b, num_samples - n), generator, pts, torch.float64) * n).long()
            extra = extra.clamp_max(n - 1)
            idx = torch.cat([order, extra], dim=1)
    elif method == "fps":
        if num_samples > n:
            raise ValueError(f"fps cannot pick {num_samples} points from clouds of {n}; use "
                             f"method='random' to sample with repeats")
        xyz = pts[..., :3].contiguous()
        if fps_start == "first":
            idx = farthest_point_sample(xyz, num_samples, start="first")
        else:
            idx = farthest_point_sample(xyz, num_samples, start="random", generator=generator)
    else:
        raise ValueError(f"unknown sampling method {method!r}; use 'random' or 'fps'")
    return _unbatch(idx, single)


def sample_points(points: torch.Tensor, num_samples: int,
                  method: Literal["random", "fps"] = "random", *,
                  generator: torch.Generator | None = None,
                  fps_start: Literal["first", "random"] = "first") -> torch.Tensor:
    """Keep `num_samples` points of each cloud (see :func:`sample_indices` for the methods).

    Args:
        points: (B, N, C) or (N, C).
    Returns:
        (B, G, C) (or (G, C)) sampled points, all channels kept.
    """
    pts, single = _batched(points)
    idx = sample_indices(pts, num_samples, method, generator=generator, fps_start=fps_start)
    out = torch.gather(pts, 1, idx.unsqueeze(-1).expand(-1, -1, pts.shape[-1]))
    return _unbatch(out, single)


def random_subset(points: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """points: (B, P, C) -> (B, n, C): n distinct points of every cloud at random (batched)."""
    b, p = points.shape[:2]
    if n >= p:
        if n > p:
            raise ValueError(f"cannot draw {n} distinct points from clouds of {p}")
        n = p
    device = generator.device if generator is not None else points.device
    idx = torch.rand(b, p, generator=generator, device=device).argsort(dim=1)[:, :n].to(points.device)
    return torch.gather(points, 1, idx.unsqueeze(-1).expand(-1, -1, points.shape[-1]))


def _scale_then_shift(points: torch.Tensor, scale_axes: int, scale_low: float, scale_high: float,
                      translate_range: float, generator: torch.Generator | None) -> torch.Tensor:
    """``xyz * s + t`` per cloud: `s` drawn for `scale_axes` axes (3: per axis, 1: isotropic) from
    U(scale_low, scale_high), then `t` per axis from U(-translate_range, translate_range)."""
    pts, single = _batched(points)
    b = pts.shape[0]
    scale = scale_low + (scale_high - scale_low) * _rand((b, 1, scale_axes), generator, pts)
    shift = translate_range * (2.0 * _rand((b, 1, 3), generator, pts) - 1.0)
    return _unbatch(_with_xyz(pts, pts[..., :3] * scale + shift), single)


def scale_and_translate(points: torch.Tensor, *, scale_low: float = 2.0 / 3.0,
                        scale_high: float = 3.0 / 2.0, translate_range: float = 0.2,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Point-MAE's ``PointcloudScaleAndTranslate``: ``xyz * s + t`` per cloud.

    ``s`` ~ U(scale_low, scale_high) and ``t`` ~ U(-translate_range, translate_range) are drawn
    independently for each cloud and each axis (defaults are the official 2/3, 3/2 and 0.2).

    Args:
        points: (B, N, C) or (N, C); only ``x y z`` change.
    Returns:
        The transformed clouds, same shape as `points`.
    """
    return _scale_then_shift(points, 3, scale_low, scale_high, translate_range, generator)


def scale_and_shift(points: torch.Tensor, *, scale_low: float = 0.8, scale_high: float = 1.25,
                    translate_range: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """The official ShapeNetPart augmentation: ``xyz * s + t`` per cloud with one isotropic scale.

    ``s`` ~ U(scale_low, scale_high) is drawn once per cloud (all axes alike, unlike
    :func:`scale_and_translate`) and ``t`` ~ U(-translate_range, translate_range) per cloud and
    axis (defaults are the official 0.8, 1.25 and 0.1).

    Args:
        points: (B, N, C) or (N, C); only ``x y z`` change.
    Returns:
        The transformed clouds, same shape as `points`.
    """
    return _scale_then_shift(points, 1, scale_low, scale_high, translate_range, generator)


def up_axis_rotation(angles: torch.Tensor, up_axis: Axis = "y") -> torch.Tensor:
    """Right-handed rotation matrices about `up_axis`, for column vectors (``p' = R p``).

    Args:
        angles: (B,) angles in radians.
    Returns:
        (B, 3, 3) rotation matrices.
    """
    if up_axis not in _AXES:
        raise ValueError(f"up_axis must be one of x, y, z, got {up_axis!r}")
    u = _AXES[up_axis]
    i, j = (u + 1) % 3, (u + 2) % 3  # (y, z) about x; (z, x) about y; (x, y) about z
    c, s = torch.cos(angles), torch.sin(angles)
    rot = torch.zeros(angles.shape[0], 3, 3, dtype=angles.dtype, device=angles.device)
    rot[:, u, u] = 1.0
    rot[:, i, i] = c
    rot[:, i, j] = -s
    rot[:, j, i] = s
    rot[:, j, j] = c
    return rot


def rotate_up_axis(points: torch.Tensor, *, up_axis: Axis = "y",
                   angles: torch.Tensor | None = None, rotate_normals: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each cloud about the up axis by a random angle ~ U(0, 2 pi).

    Point-MAE's ``PointcloudRotate`` rotates every cloud about y by an angle ~ U(0, 2 pi)
    (written there as ``pc @ R`` with a row-vector matrix, i.e. the angle's opposite, which over
    a uniform angle is the same distribution); ``up_axis="y"`` reproduces it.

    Args:
        points: (B, N, C) or (N, C).
        up_axis: the axis left unchanged.
        angles: optional (B,) angles in radians instead of random ones.
        rotate_normals: also rotate channels 3:6 (set it when they hold normals).
        generator: randomness for the angles.
    Returns:
        The rotated clouds, same shape as `points`.
    """
    pts, single = _batched(points)
    b = pts.shape[0]
    if angles is None:
        angles = 2.0 * math.pi * _rand((b,), generator, pts)
    angles = torch.as_tensor(angles, dtype=pts.dtype, device=pts.device).reshape(-1)
    if angles.shape[0] != b:
        raise ValueError(f"angles must have one entry per cloud ({b}), got {angles.shape[0]}")
    rot = up_axis_rotation(angles, up_axis)  # (B, 3, 3)
    # p' = R p for every point, as row vectors: p'^T = p^T R^T.
    out = _with_xyz(pts, pts[..., :3] @ rot.transpose(1, 2))
    if rotate_normals:
        if pts.shape[-1] < 6:
            raise ValueError(f"rotate_normals needs normals in channels 3:6, got shape "
                             f"{tuple(pts.shape)}")
        out = torch.cat([out[..., :3], pts[..., 3:6] @ rot.transpose(1, 2), pts[..., 6:]], -1)
    return _unbatch(out, single)


def jitter(points: torch.Tensor, *, sigma: float = 0.01, clip: float = 0.05,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Add clipped Gaussian noise N(0, sigma^2), clipped to [-clip, clip], to every coordinate.

    Args:
        points: (B, N, C) or (N, C); only ``x y z`` change.
    Returns:
        The jittered clouds, same shape as `points`.
    """
    pts, single = _batched(points)
    noise = (sigma * _randn(tuple(pts.shape[:2]) + (3,), generator, pts)).clamp(-clip, clip)
    return _unbatch(_with_xyz(pts, pts[..., :3] + noise), single)


def random_point_dropout(points: torch.Tensor, *, max_ratio: float = 0.875,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """PointNet++-style dropout: drop a random fraction of points, keeping N fixed.

    Each cloud draws a ratio r ~ U(0, max_ratio) and drops each point with probability r; a
    dropped point is replaced by the cloud's first point (all channels), so shapes stay fixed.

    Args:
        points: (B, N, C) or (N, C).
    Returns:
        The clouds with dropped points replaced, same shape as `points`.
    """
    if not 0.0 <= max_ratio < 1.0:
        raise ValueError(f"max_ratio must be in [0, 1), got {max_ratio}")
    pts, single = _batched(points)
    b, n = pts.shape[:2]
    ratio = max_ratio * _rand((b, 1), generator, pts, torch.float32)
    drop = _rand((b, n), generator, pts, torch.float32) < ratio  # (B, N)
    out = torch.where(drop.unsqueeze(-1), pts[:, :1, :].expand_as(pts), pts)
    return _unbatch(out, single)


def build_point_augmentation(kind: PointAugmentation, *, scale_low: float, scale_high: float,
                             translate_range: float, up_axis: Axis = "y", generator: torch.Generator
                             ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The batched augmentation `kind` of (B, N, C) points, drawing from `generator` only.

    ``scale_translate``: :func:`scale_and_translate`; ``scale_shift``: :func:`scale_and_shift`;
    ``rotate``: :func:`rotate_up_axis` about `up_axis`; ``none``: None. Each config section
    offers its own subset of the kinds (see ``ShapeAugmentation``). Build the generator on the
    device of the batches, so the draws are made where the points are.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if kind == "scale_translate":
        return lambda p: scale_and_translate(p, scale_low=scale_low, scale_high=scale_high,
                                             translate_range=translate_range, generator=generator)
    if kind == "scale_shift":
        return lambda p: scale_and_shift(p, scale_low=scale_low, scale_high=scale_high,
                                         translate_range=translate_range, generator=generator)
    if kind == "rotate":
        return lambda p: rotate_up_axis(p, up_axis=up_axis, generator=generator)
    if kind == "none":
        return None
    raise ValueError(f"unknown augmentation {kind!r}; one of scale_translate, scale_shift, rotate, none")


def reseed_from_global(generator: torch.Generator) -> torch.Generator:
    """Reseed `generator` from one draw of torch's global CPU generator; return it.

    The training batch transforms call it before every batch: their augmentations draw from
    their own generator on the batch's device, while its seeds come from the global generator,
    which the trainer seeds from the run seed and rank and saves in every checkpoint, so the
    ranks draw differently and a resumed run continues the same stream.
    """
    return generator.manual_seed(int(torch.randint(0, 2**62, (1,))))


def shuffle_points(points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """points: (B, N, C) -> (B, N, C): the points of every cloud in their own random order (batched).

    Point-MAE's training datasets shuffle each item every time it is served, so the first point,
    where farthest point sampling starts, and with it the patch partition, change every epoch."""
    b, n = points.shape[:2]
    device = generator.device if generator is not None else points.device
    order = torch.rand(b, n, generator=generator, device=device).argsort(dim=1).to(points.device)
    return torch.gather(points, 1, order.unsqueeze(-1).expand(-1, -1, points.shape[-1]))


def training_batch_transform(kind: str, device: torch.device, *, subset: int | None = None,
                             fps_pool: int | None = None, shuffle: bool = False, scale_low: float,
                             scale_high: float, translate_range: float, up_axis: int = 1
                             ) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """The ``batch_transform`` of the point-cloud training tasks, on ``batch["points"]`` (B, P, C):

    1. `shuffle`: every cloud in its own random order (:func:`shuffle_points`);
    2. `fps_pool`: farthest point sampling of that many points when P exceeds it, starting from the
       first (after shuffling: a random) point — Point-MAE's ModelNet pool, FPS 1200 of the shuffled
       8192-point cache;
    3. `subset`: a random `subset` of the points when there are more (the official
       pool-then-random draw; its order is random too);
    4. the augmentation `kind` (:func:`build_point_augmentation`).

    Every draw comes from a generator on `device`, reseeded before each batch by
    :func:`reseed_from_global`, so the stream is the run seed's and continues exactly on resume.
    None when there is nothing to do."""
    gen = torch.Generator(device=device)
    aug = build_point_augmentation(kind, scale_low=scale_low, scale_high=scale_high,
                                   translate_range=translate_range, up_axis=up_axis, generator=gen)
    if aug is None and subset is None and fps_pool is None and not shuffle:
        return None

    def transform(batch: dict[str, Any]) -> dict[str, Any]:
        reseed_from_global(gen)
        pts = batch["points"]
        if shuffle:
            pts = shuffle_points(pts, gen)
        if fps_pool is not None and pts.shape[1] > fps_pool:
            pts = sample_points(pts, fps_pool, "fps")
        if subset is not None and pts.shape[1] > subset:
            pts = random_subset(pts, subset, gen)
        return {**batch, "points": aug(pts) if aug is not None else pts}

    return transform
