"""Tests for mm3d.masking: counts, each kind vs a slow reference, seeding, validation."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
import torch

from mm3d import masking
from mm3d.masking import (
    POINT_MASK_KINDS,
    RUNNING_CELL_RATIOS,
    VIDEO_MASK_KINDS,
    block_mask,
    frame_mask,
    num_masked,
    point_block_mask,
    point_mask,
    point_random_mask,
    random_mask,
    running_cell_mask,
    tube_mask,
    video_mask,
    video_num_masked,
)

GRIDS = [(1, 2, 2), (2, 4, 6), (3, 5, 4), (4, 2, 8)]
RATIOS = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
EVEN_GRIDS = [g for g in GRIDS if g[1] % 2 == 0 and g[2] % 2 == 0]


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def supported(kind: str, grid: tuple[int, int, int], ratio: float) -> bool:
    if kind != "running_cell":
        return True
    return ratio in RUNNING_CELL_RATIOS and grid[1] % 2 == 0 and grid[2] % 2 == 0


# ------------------------------------------------------------------------------------ num_masked


@pytest.mark.parametrize("num_tokens, ratio, expected", [
    (10, 0.9, 9), (64, 0.6, 38), (196, 0.9, 176), (1568, 0.9, 1411), (1568, 0.75, 1176),
    (100, 0.29, 29), (100, 0.57, 57), (3, 1 / 3, 1), (10, 0.7, 7), (64, 0.0, 0), (64, 1.0, 64),
    (7, 0.5, 3), (1, 0.99, 0), (1, 1, 1),
])
def test_num_masked(num_tokens, ratio, expected):
    assert num_masked(num_tokens, ratio) == expected


def test_num_masked_matches_exact_floor():
    # Against exact rational arithmetic on decimal ratios, where ratio * L is exact in decimal.
    from fractions import Fraction
    for num_tokens in (1, 7, 10, 64, 100, 196, 1568):
        for percent in range(101):
            exact = int(Fraction(percent, 100) * num_tokens)
            assert num_masked(num_tokens, percent / 100) == exact, (num_tokens, percent)


@pytest.mark.parametrize("ratio", [-0.1, 1.0001, float("nan"), float("inf"), -float("inf")])
def test_num_masked_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        num_masked(10, ratio)


@pytest.mark.parametrize("num_tokens", [0, -3])
def test_num_masked_bad_tokens(num_tokens):
    with pytest.raises(ValueError, match=str(num_tokens)):
        num_masked(num_tokens, 0.5)


def test_bad_types():
    with pytest.raises(TypeError):
        num_masked(10, "0.5")
    with pytest.raises(TypeError):
        num_masked(10, True)
    with pytest.raises(TypeError):
        random_mask(2.0, 4, 0.5)
    with pytest.raises(TypeError):
        point_random_mask([[[0.0, 0.0, 0.0]]], 0.5)
    with pytest.raises(TypeError):
        random_mask(2, 4, 0.5, generator=0)
    with pytest.raises(TypeError):
        point_block_mask(torch.zeros(2, 4, 3, dtype=torch.long), 0.5)


# ------------------------------------------------------------------------ counts, shape, dtype


ALL_VIDEO_CASES = list(itertools.product(VIDEO_MASK_KINDS, GRIDS, RATIOS))


@pytest.mark.parametrize("kind, grid, ratio", ALL_VIDEO_CASES)
def test_video_exact_counts(kind, grid, ratio):
    if not supported(kind, grid, ratio):
        with pytest.raises(ValueError):
            video_mask(kind, 3, grid, ratio, generator=gen())
        return
    t, h, w = grid
    mask = video_mask(kind, 3, grid, ratio, generator=gen())
    assert mask.shape == (3, t * h * w) and mask.dtype == torch.bool
    expected = {
        "random": num_masked(t * h * w, ratio),
        "block": num_masked(t * h * w, ratio),
        "tube": t * num_masked(h * w, ratio),
        "frame": num_masked(t, ratio) * h * w,
        "running_cell": round(ratio * t * h * w),
    }[kind]
    assert video_num_masked(kind, grid, ratio) == expected
    assert mask.sum(1).tolist() == [expected] * 3


@pytest.mark.parametrize("kind", [k for k in VIDEO_MASK_KINDS if k != "running_cell"])
def test_ratio_zero_and_one(kind):
    assert not video_mask(kind, 2, (2, 4, 4), 0.0, generator=gen()).any()
    assert video_mask(kind, 2, (2, 4, 4), 1.0, generator=gen()).all()


@pytest.mark.parametrize("kind", POINT_MASK_KINDS)
def test_point_ratio_zero_and_one(kind):
    centers = torch.randn(2, 9, 3, generator=gen())
    assert not point_mask(kind, centers, 0.0, generator=gen()).any()
    assert point_mask(kind, centers, 1.0, generator=gen()).all()


@pytest.mark.parametrize("kind, grid, ratio, expected", [
    ("tube", (8, 14, 14), 0.9, 8 * 176),
    ("random", (8, 14, 14), 0.9, 1411),
    ("random", (8, 14, 14), 0.75, 1176),
    ("block", (8, 14, 14), 0.9, 1411),
    ("tube", (2, 8, 8), 0.6, 2 * 38),
    ("frame", (5, 2, 2), 0.5, 2 * 4),
    ("frame", (10, 1, 1), 0.9, 9),
    ("running_cell", (8, 14, 14), 0.5, 784),
])
def test_rounding(kind, grid, ratio, expected):
    mask = video_mask(kind, 2, grid, ratio, generator=gen())
    assert mask.sum(1).tolist() == [expected, expected]


@pytest.mark.parametrize("kind", POINT_MASK_KINDS)
@pytest.mark.parametrize("groups, ratio", [(1, 0.5), (7, 0.5), (64, 0.6), (64, 0.9), (10, 0.9)])
def test_point_exact_counts(kind, groups, ratio):
    centers = torch.randn(4, groups, 3, generator=gen(1))
    mask = point_mask(kind, centers, ratio, generator=gen())
    assert mask.shape == (4, groups) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [num_masked(groups, ratio)] * 4


# ---------------------------------------------------------------------------- structure per kind


@pytest.mark.parametrize("grid, ratio", list(itertools.product(GRIDS, [0.25, 0.5, 0.9])))
def test_tube_constant_across_time(grid, ratio):
    t, h, w = grid
    mask = tube_mask(5, grid, ratio, generator=gen()).view(5, t, h * w)
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert mask[:, 0].sum(1).tolist() == [num_masked(h * w, ratio)] * 5


@pytest.mark.parametrize("grid, ratio", list(itertools.product(GRIDS, [0.25, 0.5, 0.9])))
def test_frame_masks_whole_slices(grid, ratio):
    t, h, w = grid
    mask = frame_mask(5, grid, ratio, generator=gen()).view(5, t, h * w)
    per_slice = mask.sum(2)
    assert ((per_slice == 0) | (per_slice == h * w)).all()
    assert (per_slice == h * w).sum(1).tolist() == [num_masked(t, ratio)] * 5


def _block_keys(grid, seed):
    """(T*H*W,) reference (L_inf, L_1) distance keys of every token from token index ``seed``."""
    t, h, w = grid
    coords = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1)
    coords = coords.reshape(-1, 3)
    diff = np.abs(coords - coords[seed])
    return [(int(d.max()), int(d.sum())) for d in diff]


def _is_connected(grid, flat_mask):
    """Slow reference: is the set of True tokens 6-connected on the (T, H, W) grid?"""
    t, h, w = grid
    cube = flat_mask.reshape(t, h, w)
    cells = {tuple(c) for c in np.argwhere(cube)}
    if not cells:
        return True
    start = next(iter(cells))
    seen, todo = {start}, deque([start])
    while todo:
        c = todo.popleft()
        for axis, step in itertools.product(range(3), (-1, 1)):
            n = list(c)
            n[axis] += step
            n = tuple(n)
            if n in cells and n not in seen:
                seen.add(n)
                todo.append(n)
    return len(seen) == len(cells)


@pytest.mark.parametrize("grid, ratio", list(itertools.product(
    [(1, 4, 4), (2, 4, 6), (3, 5, 4), (4, 3, 3)], [0.1, 0.3, 0.5, 0.75, 0.9])))
def test_block_is_nearest_k_and_connected(grid, ratio):
    t, h, w = grid
    num_tokens = t * h * w
    masks = block_mask(6, grid, ratio, generator=gen(3)).numpy()
    k = num_masked(num_tokens, ratio)
    for flat in masks:
        # Some seed must explain the mask: it is masked and every masked token is no farther
        # than every unmasked one in the (L_inf, L_1) order.
        explained = False
        for seed in np.flatnonzero(flat):
            keys = _block_keys(grid, seed)
            inside = max(keys[i] for i in np.flatnonzero(flat))
            outside = min((keys[i] for i in np.flatnonzero(~flat)), default=(10**9, 0))
            if inside <= outside:
                explained = True
                break
        assert explained or k == 0, flat.reshape(grid)
        assert _is_connected(grid, flat), flat.reshape(grid)


def test_block_is_a_cube_when_count_fits():
    # 27 = 3x3x3: the nearest-27 set around an interior seed is exactly the L_inf ball of radius 1.
    grid = (5, 5, 5)
    mask = block_mask(16, grid, 27 / 125, generator=gen(4)).view(16, *grid)
    for cube in mask:
        idx = torch.nonzero(cube)
        lo, hi = idx.min(0).values, idx.max(0).values
        box = (hi - lo + 1).prod()
        # A clipped seed near a border gives a partial shell, so only check interior seeds.
        if bool((lo > 0).all() and (hi < 4).all()):
            assert int(box) == 27


def _official_running_cell_maps(grid, per_cell):
    """Slow reference of VideoMAE V2's running-cell patterns: (4, T, H*W) 0/1, one per offset.

    A 4-slot queue (``per_cell`` ones then zeros) with a pointer; for each offset the pointer
    starts there, advances once before each time slice, and the slice is the queue read from the
    pointer, laid out as a 2x2 cell and tiled over the plane.
    """
    t, h, w = grid
    queue = [1] * per_cell + [0] * (4 - per_cell)
    maps = []
    for offset in range(4):
        pointer = offset
        frames = []
        for _ in range(t):
            pointer += 1
            cell = np.array([queue[(i + pointer) % 4] for i in range(4)]).reshape(2, 2)
            frames.append(np.tile(cell, (h // 2, w // 2)).reshape(-1))
        maps.append(np.stack(frames))
    return np.stack(maps)


@pytest.mark.parametrize("grid, ratio", list(itertools.product(
    EVEN_GRIDS + [(8, 14, 14)], RUNNING_CELL_RATIOS)))
def test_running_cell_matches_official_patterns(grid, ratio):
    t, h, w = grid
    reference = _official_running_cell_maps(grid, round(4 * ratio))
    reference = torch.from_numpy(reference.reshape(4, t * h * w)).bool()
    mask = running_cell_mask(64, grid, ratio, generator=gen(5))
    match = (mask[:, None, :] == reference[None]).all(-1)  # (B, 4)
    assert match.any(1).all(), "a sample is not one of the official patterns"
    if t > 1 or ratio != 0.5:  # each offset gives a distinct pattern; all are drawn
        assert match.any(0).all(), "an offset is never drawn"


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.6, 0.9, 1.0])
def test_running_cell_rejects_unsupported_ratios(ratio):
    with pytest.raises(ValueError, match="running_cell"):
        running_cell_mask(2, (2, 4, 4), ratio)


@pytest.mark.parametrize("grid", [(2, 3, 4), (2, 4, 5), (1, 1, 1)])
def test_running_cell_rejects_odd_plane(grid):
    with pytest.raises(ValueError, match="even"):
        running_cell_mask(2, grid, 0.5)


@pytest.mark.parametrize("groups, ratio", [(8, 0.25), (16, 0.5), (32, 0.6), (64, 0.9)])
def test_point_block_is_nearest_to_a_seed(groups, ratio):
    centers = torch.randn(5, groups, 3, generator=gen(2), dtype=torch.float64)
    masks = point_block_mask(centers, ratio, generator=gen()).numpy()
    pts = centers.numpy()
    for xyz, flat in zip(pts, masks):
        dist = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)  # (G, G)
        explained = any(
            dist[seed, flat].max() <= dist[seed, ~flat].min(initial=np.inf)
            for seed in np.flatnonzero(flat))
        assert explained


# ------------------------------------------------------------------------------ randomness


CASES = [(kind, (4, 4, 6), 0.5) for kind in VIDEO_MASK_KINDS]


@pytest.mark.parametrize("kind, grid, ratio", CASES)
def test_video_deterministic_under_seed(kind, grid, ratio):
    a = video_mask(kind, 8, grid, ratio, generator=gen(7))
    b = video_mask(kind, 8, grid, ratio, generator=gen(7))
    assert torch.equal(a, b)
    torch.manual_seed(11)
    c = video_mask(kind, 8, grid, ratio)
    torch.manual_seed(11)
    d = video_mask(kind, 8, grid, ratio)
    assert torch.equal(c, d)


@pytest.mark.parametrize("kind, grid, ratio", CASES)
def test_video_differs_across_batch_and_seeds(kind, grid, ratio):
    mask = video_mask(kind, 32, grid, ratio, generator=gen(0))
    assert len(torch.unique(mask, dim=0)) > 1
    other = video_mask(kind, 32, grid, ratio, generator=gen(1))
    assert not torch.equal(mask, other)


@pytest.mark.parametrize("kind", POINT_MASK_KINDS)
def test_point_deterministic_and_varied(kind):
    centers = torch.randn(16, 32, 3, generator=gen(9))
    a = point_mask(kind, centers, 0.6, generator=gen(7))
    assert torch.equal(a, point_mask(kind, centers, 0.6, generator=gen(7)))
    assert len(torch.unique(a, dim=0)) > 1
    assert not torch.equal(a, point_mask(kind, centers, 0.6, generator=gen(8)))


def test_random_mask_is_uniform():
    # Every token is masked with probability k / L: per-token frequencies over many samples.
    mask = random_mask(4000, 10, 0.3, generator=gen(0)).float().mean(0)
    assert torch.allclose(mask, torch.full_like(mask, 0.3), atol=0.04), mask


def test_block_seed_covers_grid():
    # The seed is uniform: every token is masked by some sample at a small ratio.
    mask = block_mask(400, (2, 3, 4), 0.05, generator=gen(0))
    assert mask.any(0).all()


# --------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("grid", [(0, 2, 2), (2, -1, 2), (2, 2), (2, 2, 2, 2), (2.0, 2, 2),
                                  (2, True, 2), "224", None])
@pytest.mark.parametrize("kind", VIDEO_MASK_KINDS)
def test_bad_grid(kind, grid):
    with pytest.raises(ValueError, match="grid"):
        video_mask(kind, 2, grid, 0.5)


@pytest.mark.parametrize("ratio", [-0.5, 1.5, float("nan")])
@pytest.mark.parametrize("kind", VIDEO_MASK_KINDS)
def test_bad_ratio_video(kind, ratio):
    with pytest.raises(ValueError, match="ratio"):
        video_mask(kind, 2, (2, 4, 4), ratio)


@pytest.mark.parametrize("ratio", [-0.5, 1.5, float("nan")])
@pytest.mark.parametrize("kind", POINT_MASK_KINDS)
def test_bad_ratio_point(kind, ratio):
    with pytest.raises(ValueError, match="ratio"):
        point_mask(kind, torch.zeros(2, 4, 3), ratio)


@pytest.mark.parametrize("batch_size", [0, -2])
@pytest.mark.parametrize("kind", VIDEO_MASK_KINDS)
def test_bad_batch_size(kind, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        video_mask(kind, batch_size, (2, 4, 4), 0.5)


def test_bad_kind():
    with pytest.raises(ValueError, match="'cube'"):
        video_mask("cube", 2, (2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="'cube'"):
        video_num_masked("cube", (2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="'tube'"):
        point_mask("tube", torch.zeros(2, 4, 3), 0.5)


@pytest.mark.parametrize("shape", [(4, 3), (2, 4, 2), (2, 4, 3, 1), (0, 4, 3), (2, 0, 3)])
@pytest.mark.parametrize("kind", POINT_MASK_KINDS)
def test_bad_centers(kind, shape):
    with pytest.raises(ValueError, match=r"\(B, G, 3\)"):
        point_mask(kind, torch.zeros(shape), 0.5)


def test_generator_device_mismatch():
    with pytest.raises(ValueError, match="generator"):
        random_mask(2, 8, 0.5, generator=gen(), device="meta")
    with pytest.raises(ValueError, match="generator"):
        point_random_mask(torch.zeros(2, 4, 3, device="meta"), 0.5, generator=gen())


def test_device_follows_generator_and_centers():
    assert random_mask(2, 8, 0.5, generator=gen()).device.type == "cpu"
    assert tube_mask(2, (2, 2, 2), 0.5, device="cpu").device.type == "cpu"
    assert point_random_mask(torch.zeros(2, 4, 3), 0.5).device.type == "cpu"


def test_public_api():
    for name in masking.__all__:
        assert hasattr(masking, name), name


# ---------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", VIDEO_MASK_KINDS)
def test_video_cuda(kind):
    grid = (4, 4, 6)
    mask = video_mask(kind, 8, grid, 0.5, generator=gen(3, "cuda"))
    assert mask.is_cuda
    assert mask.sum(1).tolist() == [video_num_masked(kind, grid, 0.5)] * 8
    assert torch.equal(mask, video_mask(kind, 8, grid, 0.5, generator=gen(3, "cuda")))
    default = video_mask(kind, 8, grid, 0.5, device="cuda")
    assert default.is_cuda and default.sum(1).tolist() == mask.sum(1).tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", POINT_MASK_KINDS)
def test_point_cuda(kind):
    centers = torch.randn(8, 32, 3, device="cuda")
    mask = point_mask(kind, centers, 0.6, generator=gen(3, "cuda"))
    assert mask.is_cuda and mask.sum(1).tolist() == [num_masked(32, 0.6)] * 8
    assert torch.equal(mask, point_mask(kind, centers, 0.6, generator=gen(3, "cuda")))
    with pytest.raises(ValueError, match="generator"):
        point_mask(kind, centers, 0.6, generator=gen())
