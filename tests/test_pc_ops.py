"""Point ops (mm3d.pointcloud.ops) against slow, loop-by-loop NumPy references."""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
import torch

from mm3d.pointcloud.ops import (KNNResult, chamfer_distance, farthest_point_sample,
                                 gather_points, knn, pytorch3d_available, three_nn_interpolate)
from mm3d.pointcloud.ops._backend import pairwise_distance_key, pairwise_sqdist
from mm3d.testing import assert_close

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_pytorch3d = pytest.mark.skipif(not pytorch3d_available(), reason="pytorch3d not installed")

BATCHES = (1, 3)
SIZES = (1, 5, 17, 64)
KINDS = ("random", "duplicates", "identical", "collinear", "grid")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- clouds


def make_cloud(kind: str, batch: int, num: int, seed: int) -> np.ndarray:
    """(B, N, 3) float64 cloud. "grid" has integer coordinates, so its many ties are exact."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=(batch, num, 3))
    if kind == "duplicates":
        pool = rng.normal(size=(batch, max(1, num // 3), 3))
        pick = rng.integers(0, pool.shape[1], size=(batch, num))
        return np.take_along_axis(pool, pick[..., None], axis=1)
    if kind == "identical":
        return np.broadcast_to(rng.normal(size=(batch, 1, 3)), (batch, num, 3)).copy()
    if kind == "collinear":
        origin, direction = rng.normal(size=(batch, 1, 3)), rng.normal(size=(batch, 1, 3))
        return origin + rng.uniform(-1, 1, size=(batch, num, 1)) * direction
    if kind == "grid":
        return rng.integers(0, 3, size=(batch, num, 3)).astype(np.float64)
    raise AssertionError(kind)


def sqdist(a, b) -> float:
    return sum((float(a[c]) - float(b[c])) ** 2 for c in range(len(a)))


# ----------------------------------------------------------------------------- references


def ref_fps(points: np.ndarray, num_samples: int, first: list[int]) -> np.ndarray:
    """Greedy FPS, one point at a time; ties go to the lowest index."""
    out = []
    for b, cloud in enumerate(points):
        chosen = [first[b]]
        nearest = [math.inf] * len(cloud)
        while len(chosen) < num_samples:
            best, best_i = -1.0, -1
            for i, p in enumerate(cloud):
                nearest[i] = min(nearest[i], sqdist(p, cloud[chosen[-1]]))
                if nearest[i] > best:
                    best, best_i = nearest[i], i
            chosen.append(best_i)
        out.append(chosen)
    return np.array(out)


def ref_knn(query: np.ndarray, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (distance, index) pairs per query; returns dist2 (B, M, k), idx (B, M, k)."""
    dist, idx = [], []
    for qs, ps in zip(query, points):
        rows = [sorted((sqdist(q, p), n) for n, p in enumerate(ps))[:k] for q in qs]
        dist.append([[d for d, _ in row] for row in rows])
        idx.append([[n for _, n in row] for row in rows])
    return np.array(dist), np.array(idx)


def ref_chamfer(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-cloud Chamfer distances (B,) of both kinds, Point-MAE's definitions."""
    out = {"l2": [], "l1": []}
    for xs, ys in zip(x, y):
        dx = [min(sqdist(p, q) for q in ys) for p in xs]
        dy = [min(sqdist(q, p) for p in xs) for q in ys]
        out["l2"].append(np.mean(dx) + np.mean(dy))
        out["l1"].append((np.mean(np.sqrt(dx)) + np.mean(np.sqrt(dy))) / 2)
    return {kind: np.array(values) for kind, values in out.items()}


def ref_interpolate(unknown: np.ndarray, known: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Inverse squared-distance weights over the min(3, M) nearest known points."""
    out = np.zeros(unknown.shape[:2] + feats.shape[2:])
    for b in range(unknown.shape[0]):
        for n, u in enumerate(unknown[b]):
            nearest = sorted((sqdist(u, p), m) for m, p in enumerate(known[b]))[:3]
            weights = [1.0 / (d + 1e-8) for d, _ in nearest]
            for w, (_, m) in zip(weights, nearest):
                out[b, n] += w / sum(weights) * feats[b, m]
    return out


# ----------------------------------------------------------------------------- gather


def test_gather_points_matches_indexing():
    points = torch.randn(2, 7, 4)
    idx = torch.randint(0, 7, (2, 3, 5))
    out = gather_points(points, idx)
    assert out.shape == (2, 3, 5, 4)
    for b, g, j in itertools.product(range(2), range(3), range(5)):
        assert torch.equal(out[b, g, j], points[b, idx[b, g, j]])


def test_gather_points_rejects_bad_input():
    with pytest.raises(ValueError, match="batch"):
        gather_points(torch.randn(2, 7, 3), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="idx"):
        gather_points(torch.randn(2, 7, 3), torch.zeros(2, 4))


# ----------------------------------------------------------------------------- FPS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
def test_fps_matches_reference(batch, num, kind):
    cloud = make_cloud(kind, batch, num, seed=num * 7 + batch)
    for num_samples in sorted({1, (num + 1) // 2, num}):
        idx = farthest_point_sample(torch.from_numpy(cloud), num_samples, backend="torch")
        assert idx.dtype == torch.int64 and idx.shape == (batch, num_samples)
        expected = ref_fps(cloud, num_samples, first=[0] * batch)
        np.testing.assert_array_equal(idx.numpy(), expected)
        if kind == "random":
            assert all(len(set(row)) == num_samples for row in idx.tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_fps_in_place_and_fused_loops_agree(kind):
    """The CPU loop (in place, coordinate by coordinate) and the fused one other devices run pick
    the same points, ties included."""
    from mm3d.pointcloud.ops.fps import _fps_torch

    cloud = torch.from_numpy(make_cloud(kind, 3, 300, seed=5)).float()
    first = torch.tensor([0, 7, 299])
    a = _fps_torch(cloud, 150, first, in_place=True)
    assert torch.equal(a, _fps_torch(cloud, 150, first, in_place=False))
    assert a.tolist() == ref_fps(cloud.numpy(), 150, first=first.tolist()).tolist()


def test_fps_float32_picks_distinct_spread_points():
    cloud = torch.randn(2, 256, 3)
    idx = farthest_point_sample(cloud, 32)
    assert all(len(set(row)) == 32 for row in idx.tolist())
    assert torch.equal(idx, farthest_point_sample(cloud.double(), 32))


def test_fps_identical_points_repeat_index_zero():
    idx = farthest_point_sample(torch.ones(2, 6, 3), 4)
    assert idx.tolist() == [[0, 0, 0, 0]] * 2


def test_fps_random_start_is_seeded_and_greedy():
    cloud = make_cloud("random", 3, 40, seed=1)
    runs = [farthest_point_sample(torch.from_numpy(cloud), 10, start="random",
                                  generator=torch.Generator().manual_seed(seed))
            for seed in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    starts = {tuple(r[:, 0].tolist()) for r in runs}
    assert len(starts) == 2
    for run in runs:
        expected = ref_fps(cloud, 10, first=run[:, 0].tolist())
        np.testing.assert_array_equal(run.numpy(), expected)


def test_fps_does_not_touch_gradients():
    cloud = torch.randn(1, 10, 3, requires_grad=True)
    assert not farthest_point_sample(cloud, 3).requires_grad


@pytest.mark.parametrize("num_samples, error", [(0, ValueError), (11, ValueError),
                                                (-1, ValueError), (2.0, TypeError)])
def test_fps_rejects_bad_num_samples(num_samples, error):
    with pytest.raises(error, match="num_samples"):
        farthest_point_sample(torch.randn(2, 10, 3), num_samples)


def test_fps_rejects_bad_modes():
    with pytest.raises(ValueError, match="start"):
        farthest_point_sample(torch.randn(2, 10, 3), 2, start="last")
    with pytest.raises(ValueError, match="backend"):
        farthest_point_sample(torch.randn(2, 10, 3), 2, backend="cuda")
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        farthest_point_sample(torch.randn(10, 3), 2)


@pytest.mark.skipif(pytorch3d_available(), reason="pytorch3d is installed")
def test_pytorch3d_backend_without_pytorch3d_raises_import_error():
    cloud = torch.randn(1, 10, 3)
    with pytest.raises(ImportError, match="pytorch3d"):
        farthest_point_sample(cloud, 2, backend="pytorch3d")
    with pytest.raises(ImportError, match="pytorch3d"):
        knn(cloud, cloud, 2, backend="pytorch3d")
    with pytest.raises(ImportError, match="pytorch3d"):
        chamfer_distance(cloud, cloud, backend="pytorch3d")


# ----------------------------------------------------------------------------- KNN


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_points", SIZES)
@pytest.mark.parametrize("num_query", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
def test_knn_matches_reference(batch, num_query, num_points, kind):
    query = make_cloud(kind, batch, num_query, seed=1)
    points = make_cloud(kind, batch, num_points, seed=2)
    for k in sorted({1, min(4, num_points)}):
        result = knn(torch.from_numpy(query), torch.from_numpy(points), k, backend="torch",
                     chunk_size=3)
        assert isinstance(result, KNNResult)
        assert result.dist2.shape == result.idx.shape == (batch, num_query, k)
        assert result.idx.dtype == torch.int64
        ref_dist, ref_idx = ref_knn(query, points, k)
        # Distances equal the k smallest ones, in order; the indices are k distinct points at
        # exactly those distances. Together these hold however ties are broken.
        assert_close(result.dist2, ref_dist, atol=1e-12, rtol=1e-12)
        idx = result.idx.numpy()
        for b, m in itertools.product(range(batch), range(num_query)):
            row = idx[b, m]
            assert len(set(row.tolist())) == k
            picked = [sqdist(query[b, m], points[b, n]) for n in row]
            np.testing.assert_allclose(picked, ref_dist[b, m], rtol=1e-12, atol=1e-12)
            # Equal distances are listed by index; a unique k-th distance fixes the set.
            pairs = list(zip(result.dist2[b, m].tolist(), row.tolist()))
            assert pairs == sorted(pairs)
            if k == num_points or ref_dist[b, m, -1] < sorted(
                    sqdist(query[b, m], p) for p in points[b])[k]:
                assert set(row.tolist()) == set(ref_idx[b, m].tolist())


def test_knn_float32_and_chunking():
    query, points = torch.randn(2, 50, 3), torch.randn(2, 70, 3)
    whole = knn(query, points, 8)
    for chunk_size in (1, 7, 1000):
        part = knn(query, points, 8, chunk_size=chunk_size)
        assert torch.equal(part.idx, whole.idx) and torch.equal(part.dist2, whole.dist2)
    ref_dist, _ = ref_knn(query.double().numpy(), points.double().numpy(), 8)
    assert_close(whole.dist2, ref_dist, atol=1e-5, rtol=1e-5)
    assert whole.dist2.dtype == torch.float32


def test_knn_self_query_finds_itself_at_zero():
    cloud = torch.randn(2, 30, 3)
    result = knn(cloud, cloud, 1)
    assert torch.equal(result.idx[..., 0], torch.arange(30).expand(2, 30))
    assert torch.equal(result.dist2, torch.zeros(2, 30, 1))


def test_knn_distances_are_differentiable():
    query = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    points = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, p: knn(q, p, 3).dist2, (query, points))


@pytest.mark.parametrize("k, error", [(0, ValueError), (6, ValueError), (1.5, TypeError)])
def test_knn_rejects_bad_k(k, error):
    with pytest.raises(error, match="k"):
        knn(torch.randn(1, 4, 3), torch.randn(1, 5, 3), k)


def test_knn_rejects_mismatched_clouds():
    with pytest.raises(ValueError, match="batch size"):
        knn(torch.randn(2, 4, 3), torch.randn(3, 5, 3), 1)
    with pytest.raises(ValueError, match="coordinate"):
        knn(torch.randn(2, 4, 3), torch.randn(2, 5, 2), 1)
    with pytest.raises(ValueError, match="at least 1 point"):
        knn(torch.randn(2, 4, 3), torch.randn(2, 0, 3), 1)
    with pytest.raises(ValueError, match="chunk_size"):
        knn(torch.randn(2, 4, 3), torch.randn(2, 5, 3), 1, chunk_size=0)


# ----------------------------------------------------------------------------- Chamfer


@pytest.mark.parametrize("kind", ("random", "duplicates", "identical", "grid"))
@pytest.mark.parametrize("num_y", SIZES)
@pytest.mark.parametrize("num_x", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
def test_chamfer_matches_reference(batch, num_x, num_y, kind):
    x = make_cloud(kind, batch, num_x, seed=3)
    y = make_cloud(kind, batch, num_y, seed=4)
    reference = ref_chamfer(x, y)
    for loss in ("l2", "l1"):
        expected = reference[loss]
        per_cloud = chamfer_distance(torch.from_numpy(x), torch.from_numpy(y), kind=loss,
                                     reduction="none", backend="torch")
        assert per_cloud.shape == (batch,)
        assert_close(per_cloud, expected, atol=1e-12, rtol=1e-12)
        mean = chamfer_distance(torch.from_numpy(x), torch.from_numpy(y), kind=loss,
                                chunk_size=2, backend="torch")
        assert mean.shape == ()
        assert_close(mean, expected.mean(), atol=1e-12, rtol=1e-12)


def test_chamfer_float32_matches_reference():
    x, y = torch.randn(3, 40, 3), torch.randn(3, 25, 3)
    reference = ref_chamfer(x.double().numpy(), y.double().numpy())
    for loss in ("l2", "l1"):
        expected = reference[loss]
        got = chamfer_distance(x, y, kind=loss, reduction="none")
        assert got.dtype == torch.float32
        assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss", ("l2", "l1"))
def test_chamfer_gradcheck(loss):
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: chamfer_distance(a, b, kind=loss, reduction="none"), (x, y))


@pytest.mark.parametrize("loss", ("l2", "l1"))
def test_chamfer_of_a_cloud_with_itself_is_zero_with_finite_gradient(loss):
    x = torch.randn(2, 16, 3, requires_grad=True)
    value = chamfer_distance(x, x.detach().clone(), kind=loss)
    value.backward()
    assert float(value.detach()) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_chamfer_gradient_reaches_both_clouds():
    x = torch.randn(2, 10, 3, requires_grad=True)
    y = torch.randn(2, 12, 3, requires_grad=True)
    chamfer_distance(x, y).backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


def test_chamfer_chunks_stay_within_budget_and_match(monkeypatch):
    chamfer_module = importlib.import_module("mm3d.pointcloud.ops.chamfer")
    backend_module = importlib.import_module("mm3d.pointcloud.ops._backend")
    x, y = torch.randn(2, 300, 3), torch.randn(2, 200, 3)
    whole = {loss: chamfer_distance(x, y, kind=loss, reduction="none", chunk_size=300)
             for loss in ("l2", "l1")}
    sizes = []
    original = chamfer_module.pairwise_distance_key

    def recording(a, b):
        out = original(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(chamfer_module, "pairwise_distance_key", recording)
    monkeypatch.setattr(backend_module, "PAIR_BUDGET", 2_000)
    for loss in ("l2", "l1"):
        assert torch.equal(chamfer_distance(x, y, kind=loss, reduction="none",
                                            backend="torch"), whole[loss])
    # 2_000 // (B * M) = 5 rows of x per chunk.
    assert max(sizes) <= 2_000 and len(sizes) == 2 * math.ceil(300 / 5)
    for chunk_size in (7, 64):
        assert torch.equal(chamfer_distance(x, y, chunk_size=chunk_size, backend="torch",
                                            reduction="none"), whole["l2"])


@pytest.mark.slow
def test_chamfer_100k_by_100k_in_chunks():
    # A shifted integer grid: every point's nearest neighbour is its own shifted copy.
    side = 47
    grid = torch.stack(torch.meshgrid(*[torch.arange(side, dtype=torch.float32)] * 3,
                                      indexing="ij"), -1).reshape(-1, 3)[:100_000]
    shift = torch.tensor([0.1, 0.2, -0.15])
    x = grid[None]
    y = (grid + shift)[torch.randperm(len(grid))][None]
    l2 = chamfer_distance(x, y, kind="l2", backend="torch")
    assert_close(l2, 2 * shift.square().sum(), atol=1e-5, rtol=1e-4)


def test_chamfer_rejects_bad_modes():
    x = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="kind"):
        chamfer_distance(x, x, kind="l3")
    with pytest.raises(ValueError, match="reduction"):
        chamfer_distance(x, x, reduction="sum")
    with pytest.raises(ValueError, match="batch size"):
        chamfer_distance(x, torch.randn(2, 4, 3))


# ----------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize("kind", ("random", "collinear"))
@pytest.mark.parametrize("num_known", (1, 2, 5, 17))
@pytest.mark.parametrize("num_unknown", (1, 5, 17))
@pytest.mark.parametrize("batch", BATCHES)
def test_three_nn_interpolate_matches_reference(batch, num_unknown, num_known, kind):
    unknown = make_cloud(kind, batch, num_unknown, seed=5)
    known = make_cloud(kind, batch, num_known, seed=6)
    feats = np.random.default_rng(7).normal(size=(batch, num_known, 4))
    out = three_nn_interpolate(*(torch.from_numpy(a) for a in (unknown, known, feats)))
    assert out.shape == (batch, num_unknown, 4)
    assert_close(out, ref_interpolate(unknown, known, feats), atol=1e-10, rtol=1e-10)


def test_three_nn_interpolate_copies_features_at_known_points():
    known = torch.randn(2, 12, 3)
    feats = torch.randn(2, 12, 5)
    assert_close(three_nn_interpolate(known, known, feats), feats, atol=1e-6)


def test_three_nn_interpolate_gradcheck():
    unknown = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    known = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(1, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(three_nn_interpolate, (unknown, known, feats))


def test_three_nn_interpolate_rejects_mismatched_features():
    with pytest.raises(ValueError, match="feats"):
        three_nn_interpolate(torch.randn(1, 4, 3), torch.randn(1, 6, 3), torch.randn(1, 5, 2))


# ----------------------------------------------------------------------------- accelerators


def test_pairwise_sqdist_matches_reference_and_keeps_ties():
    a = torch.from_numpy(make_cloud("duplicates", 2, 9, seed=8))
    b = torch.from_numpy(make_cloud("duplicates", 2, 7, seed=9))
    expected = [[[sqdist(p, q) for q in b[i].numpy()] for p in a[i].numpy()] for i in range(2)]
    assert_close(pairwise_sqdist(a, b), np.array(expected), atol=1e-12, rtol=1e-12)
    assert_close(pairwise_sqdist(a, b), pairwise_distance_key(a, b).square(), atol=1e-12)


@pytest.mark.parametrize("kind", ("random", "duplicates", "grid"))
def test_accelerator_search_path_matches_reference(kind, monkeypatch):
    """Off the CPU the searches rank by pairwise_sqdist; run that path here on the CPU."""
    for module in ("knn", "chamfer"):
        monkeypatch.setattr(importlib.import_module(f"mm3d.pointcloud.ops.{module}"),
                            "pairwise_distance_key", pairwise_sqdist)
    x, y = make_cloud(kind, 3, 17, seed=10), make_cloud(kind, 3, 64, seed=11)
    result = knn(torch.from_numpy(x), torch.from_numpy(y), 4, backend="torch", chunk_size=5)
    assert_close(result.dist2, ref_knn(x, y, 4)[0], atol=1e-12, rtol=1e-12)
    reference = ref_chamfer(x, y)
    for loss in ("l2", "l1"):
        assert_close(chamfer_distance(torch.from_numpy(x), torch.from_numpy(y), kind=loss,
                                      reduction="none", backend="torch", chunk_size=5),
                     reference[loss], atol=1e-12, rtol=1e-12)



@needs_cuda
def test_cuda_matches_cpu():
    cloud, other = torch.randn(2, 300, 3), torch.randn(2, 200, 3)
    feats = torch.randn(2, 200, 6)
    dev = torch.device("cuda")
    assert torch.equal(farthest_point_sample(cloud, 32, backend="torch"),
                       farthest_point_sample(cloud.to(dev), 32, backend="torch").cpu())
    cpu, gpu = knn(cloud, other, 8, backend="torch"), knn(cloud.to(dev), other.to(dev), 8,
                                                          backend="torch")
    assert_close(gpu.dist2.cpu(), cpu.dist2, atol=1e-5)
    assert torch.equal(gpu.idx.cpu(), cpu.idx)
    for loss in ("l2", "l1"):
        assert_close(chamfer_distance(cloud.to(dev), other.to(dev), kind=loss).cpu(),
                     chamfer_distance(cloud, other, kind=loss), atol=1e-5)
    assert_close(three_nn_interpolate(cloud.to(dev), other.to(dev), feats.to(dev)).cpu(),
                 three_nn_interpolate(cloud, other, feats), atol=1e-4)


@needs_pytorch3d
def test_pytorch3d_backend_agrees_with_torch():
    from pytorch3d.loss import chamfer_distance as p3d_chamfer

    cloud, other = torch.randn(3, 300, 3), torch.randn(3, 200, 3)
    for start in ("first", "random"):
        runs = [farthest_point_sample(cloud, 32, start=start, backend=backend,
                                      generator=torch.Generator().manual_seed(0))
                for backend in ("torch", "pytorch3d")]
        assert torch.equal(*runs)
    ours, theirs = knn(cloud, other, 8, backend="torch"), knn(cloud, other, 8,
                                                              backend="pytorch3d")
    assert_close(theirs.dist2, ours.dist2, atol=1e-6)
    assert torch.equal(theirs.idx, ours.idx)
    for loss in ("l2", "l1"):
        assert_close(chamfer_distance(cloud, other, kind=loss, backend="pytorch3d"),
                     chamfer_distance(cloud, other, kind=loss, backend="torch"), atol=1e-6)
    assert_close(chamfer_distance(cloud, other, backend="torch"), p3d_chamfer(cloud, other)[0],
                 atol=1e-5)
