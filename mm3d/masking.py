"""Token masks for masked modeling, shared by the video and point-cloud models.

Conventions, common to every function here:

- A mask is a ``(B, L)`` ``torch.bool`` tensor; ``True`` means *masked*: the token is hidden from
  the encoder (for :func:`running_cell_mask`, which is a decoder mask: not reconstructed).
- Every sample of a batch has exactly the same number of masked tokens, so the visible tokens
  gather into a dense ``(B, L_vis, D)`` tensor with ``x[~mask].reshape(B, -1, D)``. Each function
  documents its count; :func:`video_num_masked` returns it without building a mask.
- The number of masked tokens out of ``L`` at ratio ``r`` is :func:`num_masked` ``= floor(r * L)``
  (the ``int(ratio * L)`` of the reference code), made robust to float error (``0.29 * 100`` is 29,
  not 28).
- Video tokens come from a ``(T, H, W)`` grid of tubelets/patches (``T, H, W`` here are the token
  grid sizes, not pixels) and are ordered ``(t, h, w)`` row-major, i.e. token
  ``l = (t * H + h) * W + w`` -- the order of ``rearrange(x, "b d t h w -> b (t h w) d")``.
- Point tokens are ``G`` patch centers given as a ``(B, G, 3)`` tensor.
- Everything is batched and built on the device; there is no loop over samples. Randomness
  comes from ``generator`` when given (so a seeded ``torch.Generator`` reproduces the masks; its
  device must be the device the mask is built on), otherwise from torch's default generator of
  that device. Video masks are built on ``device`` (default: the generator's device, else CPU);
  point masks on ``centers.device``.
- Bad input raises ``ValueError`` (a value out of range or a wrong shape) or ``TypeError`` (a wrong
  type), naming the offending value.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, get_args

import torch
from einops import rearrange, repeat

__all__ = [
    "VideoMaskKind",
    "PointMaskKind",
    "VIDEO_MASK_KINDS",
    "POINT_MASK_KINDS",
    "RUNNING_CELL_RATIOS",
    "num_masked",
    "video_num_masked",
    "random_mask",
    "tube_mask",
    "frame_mask",
    "block_mask",
    "running_cell_mask",
    "video_mask",
    "point_random_mask",
    "point_block_mask",
    "point_mask",
    "scored_mask",
]

VideoMaskKind = Literal["tube", "random", "frame", "block", "running_cell"]
PointMaskKind = Literal["random", "block"]
VIDEO_MASK_KINDS: tuple[str, ...] = get_args(VideoMaskKind)
POINT_MASK_KINDS: tuple[str, ...] = get_args(PointMaskKind)

# Ratios of the 2x2 running cell: 1, 2 or 3 of its 4 tokens masked.
RUNNING_CELL_RATIOS: tuple[float, ...] = (0.25, 0.5, 0.75)

# Slack for float error in ratio * L (ratio * L is exact to ~1e-16 relative; 1e-9 absolute covers
# any token count below ~1e6 while never rounding up a genuine fraction such as 0.6 * 64 = 38.4).
_FLOAT_SLACK = 1e-9


# ----------------------------------------------------------------------------------- validation


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"mask ratio must be a real number in [0, 1], got {ratio!r}")
    value = float(ratio)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio!r}")
    return value


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return int(value)


def _check_grid(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 3:
        raise ValueError(f"grid must be a (T, H, W) tuple of 3 positive ints, got {grid!r}")
    if any(isinstance(g, bool) or not isinstance(g, numbers.Integral) or g <= 0 for g in grid):
        raise ValueError(f"grid must be a (T, H, W) tuple of 3 positive ints, got {grid!r}")
    t, h, w = (int(g) for g in grid)
    return t, h, w


def _resolve_device(generator: torch.Generator | None,
                    device: torch.device | str | None) -> torch.device:
    """The device to build on: ``device``, else the generator's, else CPU; they must agree."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None:
        _check_generator_device(generator, device)
    return device


def _check_generator_device(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    gen = generator.device
    same_index = gen.index is None or device.index is None or gen.index == device.index
    if gen.type != device.type or not same_index:
        raise ValueError(f"generator is on {gen} but the mask is built on {device}; "
                         f"create the generator with torch.Generator(device={str(device)!r})")


def _check_centers(centers: torch.Tensor) -> tuple[int, int]:
    if not isinstance(centers, torch.Tensor):
        raise TypeError(f"centers must be a (B, G, 3) tensor, got {type(centers).__name__}")
    if centers.dim() != 3 or centers.shape[-1] != 3 or centers.shape[0] == 0 \
            or centers.shape[1] == 0:
        raise ValueError(f"centers must be a (B, G, 3) tensor with B, G > 0, "
                         f"got shape {tuple(centers.shape)}")
    return centers.shape[0], centers.shape[1]


# --------------------------------------------------------------------------------------- counts


def num_masked(num_tokens: int, ratio: float) -> int:
    """Number of masked tokens out of ``num_tokens`` at ``ratio``: ``floor(ratio * num_tokens)``.

    Robust to float error: ``num_masked(100, 0.29) == 29`` although ``0.29 * 100 < 29`` in
    floating point; ``num_masked(64, 0.6) == 38``; ``num_masked(196, 0.9) == 176``.
    """
    num_tokens = _check_positive_int(num_tokens, "num_tokens")
    ratio = _check_ratio(ratio)
    count = math.floor(ratio * num_tokens + _FLOAT_SLACK)
    return min(max(count, 0), num_tokens)


def _running_cell_per_cell(ratio: float) -> int:
    """Masked tokens per 2x2 cell (1, 2 or 3) for a ratio in :data:`RUNNING_CELL_RATIOS`."""
    ratio = _check_ratio(ratio)
    per_cell = round(4 * ratio)
    if abs(4 * ratio - per_cell) > _FLOAT_SLACK or not 0 < per_cell < 4:
        raise ValueError(
            f"running_cell masking supports ratios {RUNNING_CELL_RATIOS} (1, 2 or 3 of the 4 "
            f"tokens of a 2x2 cell), got {ratio!r}")
    return per_cell


def video_num_masked(kind: VideoMaskKind, grid: tuple[int, int, int], ratio: float) -> int:
    """Masked tokens per sample that :func:`video_mask` gives for ``kind`` on a ``(T, H, W)`` grid.

    ``random``/``block``: ``num_masked(T*H*W, ratio)``; ``tube``: ``T * num_masked(H*W, ratio)``;
    ``frame``: ``num_masked(T, ratio) * H*W``; ``running_cell``: ``ratio * T*H*W`` (exact).
    """
    t, h, w = _check_grid(grid)
    if kind in ("random", "block"):
        return num_masked(t * h * w, ratio)
    if kind == "tube":
        return t * num_masked(h * w, ratio)
    if kind == "frame":
        return num_masked(t, ratio) * h * w
    if kind == "running_cell":
        _check_even_hw(h, w)
        return _running_cell_per_cell(ratio) * t * (h // 2) * (w // 2)
    raise ValueError(f"unknown video mask kind {kind!r}; expected one of {VIDEO_MASK_KINDS}")


# -------------------------------------------------------------------------------- primitives


def _mask_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, L) bool mask, True at the ``k`` smallest ``scores`` of each row (scores: (B, L))."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    if k == scores.shape[1]:
        return mask.fill_(True)
    index = scores.topk(k, dim=1, largest=False, sorted=False).indices
    return mask.scatter_(1, index, True)


def _random_rows(batch_size: int, length: int, k: int, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """(B, L) bool, ``k`` uniformly random True per row: the ``k`` smallest of uniform noise."""
    noise = torch.rand(batch_size, length, generator=generator, device=device)
    return _mask_smallest(noise, k)


# ---------------------------------------------------------------------------------- video masks


def random_mask(batch_size: int, num_tokens: int, ratio: float, *,
                generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform random masking of each sample independently (MAE / MAE-ST).

    Each sample masks the ``num_masked(L, ratio)`` tokens with the smallest uniform noise (MAE's
    argsort of noise), i.e. a uniformly random subset of that size.

    Returns: (B, L) bool, True = masked, with ``L = num_tokens``.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    k = num_masked(num_tokens, ratio)
    device = _resolve_device(generator, device)
    return _random_rows(batch_size, num_tokens, k, generator, device)


def tube_mask(batch_size: int, grid: tuple[int, int, int], ratio: float, *,
              generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Tube masking (VideoMAE): one random spatial mask per sample, shared by every time slice.

    Each sample masks ``num_masked(H*W, ratio)`` of the ``H*W`` spatial positions in all ``T``
    slices: ``T * num_masked(H*W, ratio)`` tokens.

    grid: (T, H, W) token grid. Returns: (B, T*H*W) bool, True = masked, tokens (t, h, w) row-major.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    t, h, w = _check_grid(grid)
    k = num_masked(h * w, ratio)
    device = _resolve_device(generator, device)
    spatial = _random_rows(batch_size, h * w, k, generator, device)  # (B, H*W)
    return repeat(spatial, "b hw -> b (t hw)", t=t)


def frame_mask(batch_size: int, grid: tuple[int, int, int], ratio: float, *,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Frame masking: whole time slices masked.

    Each sample masks ``num_masked(T, ratio)`` random time slices entirely:
    ``num_masked(T, ratio) * H*W`` tokens.

    grid: (T, H, W) token grid. Returns: (B, T*H*W) bool, True = masked, tokens (t, h, w) row-major.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    t, h, w = _check_grid(grid)
    k = num_masked(t, ratio)
    device = _resolve_device(generator, device)
    frames = _random_rows(batch_size, t, k, generator, device)  # (B, T)
    return repeat(frames, "b t -> b (t hw)", hw=h * w)


def block_mask(batch_size: int, grid: tuple[int, int, int], ratio: float, *,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Block masking: one contiguous space-time cube per sample, grown around a random seed token.

    Each sample draws a seed token ``s`` uniformly from the grid and masks the
    ``k = num_masked(T*H*W, ratio)`` tokens ``x`` that come first in the order
    ``(L_inf(x - s), L_1(x - s), random)`` (distances in token units). So the mask is the cube
    ``L_inf < r`` around the seed (clipped at the grid border) plus part of the next shell
    ``L_inf == r``, filled from its L_1-nearest tokens outwards with random tie-breaks. The
    result is 6-connected: every masked token except the seed has a masked face neighbour closer
    to the seed. Exactly ``k`` tokens are masked in every sample.

    grid: (T, H, W) token grid. Returns: (B, T*H*W) bool, True = masked, tokens (t, h, w) row-major.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    t, h, w = _check_grid(grid)
    num_tokens = t * h * w
    k = num_masked(num_tokens, ratio)
    device = _resolve_device(generator, device)
    seed = torch.randint(num_tokens, (batch_size,), generator=generator, device=device)  # (B,)
    tiebreak = torch.randint(num_tokens, (batch_size, num_tokens), generator=generator,
                             device=device)  # (B, L)
    seed_t, seed_h, seed_w = seed // (h * w), (seed // w) % h, seed % w
    # Per-axis distances to the seed, broadcast to (B, T, H, W).
    dt = (torch.arange(t, device=device)[None, :] - seed_t[:, None]).abs()[:, :, None, None]
    dh = (torch.arange(h, device=device)[None, :] - seed_h[:, None]).abs()[:, None, :, None]
    dw = (torch.arange(w, device=device)[None, :] - seed_w[:, None]).abs()[:, None, None, :]
    linf = torch.maximum(torch.maximum(dt, dh), dw)
    l1 = dt + dh + dw  # < T + H + W, so (linf, l1) packs into one integer
    key = rearrange(linf * (t + h + w) + l1, "b t h w -> b (t h w)") * num_tokens + tiebreak
    return _mask_smallest(key, k)


def _check_even_hw(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"running_cell masking tiles 2x2 cells and needs even H and W, "
                         f"got H={h}, W={w}")


def running_cell_mask(batch_size: int, grid: tuple[int, int, int], ratio: float = 0.5, *,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Running-cell decoder masking (VideoMAE V2): True = *not* reconstructed by the decoder.

    The ``H x W`` plane is tiled by 2x2 cells; inside a cell the 4 tokens, numbered
    ``c = 2 * (h % 2) + (w % 2)``, are masked by a cyclic queue of ``m = 4 * ratio`` ones followed
    by ``4 - m`` zeros that advances by one step per time slice. With a per-sample offset
    ``p`` drawn uniformly from ``{0, 1, 2, 3}``, token ``(t, h, w)`` is masked iff
    ``(c + p + t + 1) % 4 < m`` -- the same patterns, indexed by ``p``, as the reference
    ``RunningCellMaskingGenerator``. Every 2x2 cell of every slice masks exactly ``m`` tokens, so a
    sample masks ``ratio * T*H*W`` tokens.

    ratio: one of :data:`RUNNING_CELL_RATIOS` (0.25, 0.5, 0.75). The reference floors ``4 * ratio``
    and would silently treat e.g. 0.6 as 0.5; here such ratios raise ``ValueError``.
    grid: (T, H, W) token grid with even ``H`` and ``W``.
    Returns: (B, T*H*W) bool, True = masked for the decoder, tokens (t, h, w) row-major.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    t, h, w = _check_grid(grid)
    per_cell = _running_cell_per_cell(ratio)
    _check_even_hw(h, w)
    device = _resolve_device(generator, device)
    offset = torch.randint(4, (batch_size,), generator=generator, device=device)  # (B,)
    hh = torch.arange(h, device=device)[:, None]
    ww = torch.arange(w, device=device)[None, :]
    cell = 2 * (hh % 2) + ww % 2  # (H, W) position inside the 2x2 cell
    step = torch.arange(t, device=device) + 1  # (T,) queue advanced once per slice
    phase = offset[:, None, None, None] + step[None, :, None, None] + cell[None, None]  # (B,T,H,W)
    return rearrange(phase % 4 < per_cell, "b t h w -> b (t h w)")


def video_mask(kind: VideoMaskKind, batch_size: int, grid: tuple[int, int, int], ratio: float,
               *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Mask of the given ``kind`` for a ``(T, H, W)`` token grid; see each ``*_mask`` function.

    Returns: (B, T*H*W) bool, True = masked, tokens (t, h, w) row-major, with
    ``video_num_masked(kind, grid, ratio)`` True per sample.
    """
    if kind == "random":
        t, h, w = _check_grid(grid)
        return random_mask(batch_size, t * h * w, ratio, generator=generator, device=device)
    builders = {"tube": tube_mask, "frame": frame_mask, "block": block_mask,
                "running_cell": running_cell_mask}
    if kind not in builders:
        raise ValueError(f"unknown video mask kind {kind!r}; expected one of {VIDEO_MASK_KINDS}")
    return builders[kind](batch_size, grid, ratio, generator=generator, device=device)


# ---------------------------------------------------------------------------------- point masks


def point_random_mask(centers: torch.Tensor, ratio: float, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random masking of point patches (Point-MAE ``rand``).

    centers: (B, G, 3) patch centers (only their shape and device are used).
    Returns: (B, G) bool on ``centers.device``, ``num_masked(G, ratio)`` True per sample.
    """
    batch_size, groups = _check_centers(centers)
    k = num_masked(groups, ratio)
    _check_generator_device(generator, centers.device)
    return _random_rows(batch_size, groups, k, generator, centers.device)


def point_block_mask(centers: torch.Tensor, ratio: float, *,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Block masking of point patches (Point-MAE ``block``): a contiguous region per sample.

    Each sample picks a seed center uniformly among its ``G`` centers and masks the
    ``num_masked(G, ratio)`` centers nearest to it in Euclidean distance (the seed included).

    centers: (B, G, 3) patch centers.
    Returns: (B, G) bool on ``centers.device``, ``num_masked(G, ratio)`` True per sample.
    """
    batch_size, groups = _check_centers(centers)
    if not centers.is_floating_point():
        raise TypeError(f"centers must be a floating-point tensor, got dtype {centers.dtype}")
    k = num_masked(groups, ratio)
    _check_generator_device(generator, centers.device)
    seed = torch.randint(groups, (batch_size,), generator=generator, device=centers.device)
    seed_xyz = centers[torch.arange(batch_size, device=centers.device), seed]  # (B, 3)
    # Squared distances from exact differences (cdist's matmul path would not give the seed 0).
    dist2 = (centers - seed_xyz[:, None, :]).square().sum(-1)  # (B, G)
    return _mask_smallest(dist2, k)


def point_mask(kind: PointMaskKind, centers: torch.Tensor, ratio: float, *,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Point-patch mask of the given ``kind`` (``random`` or ``block``).

    centers: (B, G, 3) patch centers.
    Returns: (B, G) bool, True = masked, ``num_masked(G, ratio)`` True per sample.
    """
    if kind == "random":
        return point_random_mask(centers, ratio, generator=generator)
    if kind == "block":
        return point_block_mask(centers, ratio, generator=generator)
    raise ValueError(f"unknown point mask kind {kind!r}; expected one of {POINT_MASK_KINDS}")


# --------------------------------------------------------------------------------- scored masks


def scored_mask(scores: torch.Tensor, ratio: float, *, generator: torch.Generator | None = None,
                temperature: float = 1.0) -> torch.Tensor:
    """Masking guided by per-token scores: higher-scored tokens are masked more often.

    Each sample masks ``k = num_masked(L, ratio)`` tokens drawn without replacement with
    probabilities proportional to ``score ** (1 / temperature)`` (successive draws renormalised
    over the tokens left): the Gumbel-top-k trick, i.e. the ``k`` largest
    ``log(score) / temperature + Gumbel noise``. With ``k = 1`` token ``i`` is masked with
    probability ``s_i^(1/T) / sum_j s_j^(1/T)``; equal scores give uniform random masking; a
    higher temperature flattens the preference, a lower one sharpens it. A zero (or
    negative) score is treated as the smallest positive float, so such tokens are masked only when the others
    run out (in random order among themselves).

    scores: (B, L) non-negative floating-point scores (e.g. the motion of each video token).
    generator: seeds the Gumbel noise (its device must be ``scores.device``).
    Returns: (B, L) bool on ``scores.device``, True = masked, ``num_masked(L, ratio)`` per sample.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a (B, L) tensor, got {type(scores).__name__}")
    if scores.dim() != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be a (B, L) tensor with B, L > 0, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    k = num_masked(scores.shape[1], ratio)
    _check_generator_device(generator, scores.device)
    scores = scores.detach().float()
    tiny = torch.finfo(torch.float32).tiny
    # uniform noise in (0, 1): log(-log(u)) is finite for every u
    u = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(min=tiny, max=1.0 - 2 ** -24)
    gumbel = -torch.log(-torch.log(u))
    key = scores.clamp(min=tiny).log() / temperature + gumbel  # (B, L)
    return _mask_smallest(-key, k)
