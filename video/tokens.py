"""VideoMAE's tokens: tubelets of a clip, the pixel target, and the fixed position tables.

A clip (B, C, T, H, W) is cut into tubelets of ``tubelet x patch x patch`` pixels
(:func:`patchify`, a reshape), giving (B, L, K) tokens in (t, h, w) order on the (T', H', W')
grid of :func:`token_grid`; the position tables are 1-D (VideoMAE) or 3-D sin-cos tables over
that grid, interpolated when a checkpoint of another grid is loaded (:func:`adapt_pos_embeds`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

PosEmbedKind = Literal["sincos_1d", "sincos_3d"]


def token_grid(num_frames: int, img_size: int, tubelet_size: int, patch_size: int) -> tuple[int, int, int]:
    """(T', H', W') token grid of a ``num_frames x img_size^2`` clip."""
    return num_frames // tubelet_size, img_size // patch_size, img_size // patch_size


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """Cut clips into tubelets.

    video: (B, C, T, H, W). Returns (B, L, K) with L = T'H'W' tokens in (t, h, w) order and
    K = tubelet * patch^2 * C pixels flattened as (pt ph pw c).
    """
    if video.dim() != 5:
        raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(video.shape)}")
    _, _, t, h, w = video.shape
    if t % tubelet or h % patch or w % patch:
        raise ValueError(f"video of {t}x{h}x{w} (T x H x W) is not divisible into "
                         f"{tubelet}x{patch}x{patch} tubelets")
    return rearrange(video, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)",
                     pt=tubelet, ph=patch, pw=patch)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], tubelet: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify`. tokens: (B, L, K) with L = T'H'W'. Returns (B, C, T, H, W)."""
    t, h, w = grid
    return rearrange(tokens, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                     t=t, h=h, w=w, pt=tubelet, ph=patch, pw=patch)


def pixel_target(patches: torch.Tensor, channels: int, mean: torch.Tensor, std: torch.Tensor,
                 norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """VideoMAE's reconstruction target for tubelets of a normalised clip.

    patches: (B, L, K) tubelets from :func:`patchify` (pixels normalised with `mean`/`std`).
    mean, std: (C,) normalisation to undo (pixels back in [0, 1]).
    With `norm_pix`, each tubelet is normalised per channel over its ``tubelet * patch^2``
    pixels: ``(x - mean) / (unbiased std + eps)``.
    Returns (B, L, K) in the same (pt ph pw c) layout.
    """
    x = rearrange(patches, "b l (p c) -> b l p c", c=channels)
    std = std.to(x)
    if not norm_pix:
        return rearrange(x * std + mean.to(x), "b l p c -> b l (p c)")
    # Undoing the normalisation is affine per channel (s x + m, s > 0), so the normalised tubelet is
    # s (x - mean x) / (s std x + eps): no un-normalised copy. Two passes over the tubelet (mean,
    # then the centred sum of squares) keep near-flat tubelets exact; torch.var over this strided
    # axis costs about twice as much.
    d = x - x.mean(dim=-2, keepdim=True)
    var = (d * d).sum(dim=-2, keepdim=True) / (x.shape[-2] - 1)
    return rearrange(d * (std / (var.sqrt() * std + eps)), "b l p c -> b l (p c)")


def _sincos(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE-style 1-D sin-cos of positions pos: (N,) float64. Returns (N, dim), [sin | cos]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = pos[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_1d_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed table over flattened token indices (interleaved sin/cos). Returns (1, L, D)."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angles = pos / 10000.0 ** (2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.empty_like(angles)
    table[:, 0::2] = angles[:, 0::2].sin()
    table[:, 1::2] = angles[:, 1::2].cos()
    return table.float()[None]


def sincos_3d_table(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Separable 3-D sin-cos table: ``2 * (dim // 6)`` channels each for h and w, the rest for t.

    Returns (1, T'H'W', D), tokens in (t, h, w) order.
    """
    if dim % 2 or dim < 6:
        raise ValueError(f"sincos_3d needs an even width >= 6, got {dim}")
    t, h, w = grid
    d_hw = 2 * (dim // 6)
    d_t = dim - 2 * d_hw
    emb_t = _sincos(torch.arange(t, dtype=torch.float64), d_t)
    emb_h = _sincos(torch.arange(h, dtype=torch.float64), d_hw)
    emb_w = _sincos(torch.arange(w, dtype=torch.float64), d_hw)
    table = torch.cat([repeat(emb_t, "t d -> t h w d", h=h, w=w),
                       repeat(emb_h, "h d -> t h w d", t=t, w=w),
                       repeat(emb_w, "w d -> t h w d", t=t, h=h)], dim=-1)
    return rearrange(table, "t h w d -> 1 (t h w) d").float()


def build_pos_embed(kind: PosEmbedKind, grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """The fixed position table of `kind` for a (T', H', W') grid. Returns (1, T'H'W', D)."""
    if kind == "sincos_1d":
        return sincos_1d_table(math.prod(grid), dim)
    if kind == "sincos_3d":
        return sincos_3d_table(grid, dim)
    raise ValueError(f"unknown pos_embed {kind!r}; expected 'sincos_1d' or 'sincos_3d'")


def interpolate_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int, int],
                          new_grid: tuple[int, int, int]) -> torch.Tensor:
    """Resize a position table to another token grid (frame count and/or resolution).

    pos: (1, L, D) with L = prod(old_grid), tokens in (t, h, w) order. The table is viewed as a
    (D, T', H', W') volume and trilinearly interpolated (align_corners=False). The identity
    (the same tensor) when the grids are equal. Returns (1, prod(new_grid), D).
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1] != math.prod(old_grid):
        raise ValueError(f"pos must be (1, {math.prod(old_grid)}, D) for grid {old_grid}, got "
                         f"shape {tuple(pos.shape)}")
    if old_grid == new_grid:
        return pos
    t, h, w = old_grid
    vol = rearrange(pos, "1 (t h w) d -> 1 d t h w", t=t, h=h, w=w)
    vol = F.interpolate(vol.float(), size=new_grid, mode="trilinear", align_corners=False)
    return rearrange(vol, "1 d t h w -> 1 (t h w) d").to(pos.dtype)


def adapt_pos_embeds(state_dict: dict[str, torch.Tensor], model: nn.Module,
                     old_grid: tuple[int, int, int]) -> list[str]:
    """Fit every ``*pos_embed`` table of `state_dict` to `model`'s token grid, in place.

    Tables of another length are interpolated from `old_grid` (:func:`interpolate_pos_embed`),
    except for models with ``sincos_3d`` tables, whose own freshly computed table is used
    (recomputing is exact there). Returns one note per key changed.
    """
    notes = []
    new_grid = model.grid
    own = model.state_dict()
    for key, target in own.items():
        if not key.endswith("pos_embed") or key not in state_dict:
            continue
        given = state_dict[key]
        if tuple(given.shape) == tuple(target.shape):
            continue
        if getattr(model, "pos_embed_kind", "sincos_1d") == "sincos_3d":
            state_dict[key] = target.clone()
            notes.append(f"{key}: recomputed sincos_3d table for grid {new_grid} "
                         f"(checkpoint {tuple(given.shape)})")
        else:
            state_dict[key] = interpolate_pos_embed(given, old_grid, new_grid)
            notes.append(f"{key}: interpolated {tuple(given.shape)} (grid {tuple(old_grid)}) -> "
                         f"{tuple(target.shape)} (grid {new_grid})")
    return notes
