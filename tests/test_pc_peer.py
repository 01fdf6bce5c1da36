"""The official Point-MAE as ``mm3d bench``'s in-process peer (mm3d.pointcloud.peer).

The extension stand-ins are tested against brute force always; the official model itself only
when ``MM3D_POINTMAE_ROOT`` names a checkout of github.com/Pang-Yatian/Point-MAE (nothing of it
is stored here).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from mm3d.registry import load_modalities

load_modalities()

from mm3d.pointcloud.convert import PRETRAIN_RULES, _rename  # noqa: E402
from mm3d.pointcloud.models import PointMAEConfig, build_pretrain_model  # noqa: E402
from mm3d.pointcloud.ops import chamfer_distance, farthest_point_sample  # noqa: E402
from mm3d.pointcloud.peer import PeerUnavailable, build_official_pretrain, extension_shims, import_official  # noqa: E402

ROOT = os.environ.get("MM3D_POINTMAE_ROOT", "")
needs_checkout = pytest.mark.skipif(not ROOT, reason="set MM3D_POINTMAE_ROOT to a checkout of the official "
                                                     "Point-MAE (github.com/Pang-Yatian/Point-MAE) to test the peer")


@pytest.fixture(scope="module")
def shims():
    return extension_shims()


def test_fps_stand_in_starts_at_point_zero_and_returns_int32(shims):
    pts = torch.randn(3, 200, 3)
    idx = shims["pointnet2_ops.pointnet2_utils"].furthest_point_sample(pts, 16)
    assert idx.dtype == torch.int32 and idx.shape == (3, 16)
    assert (idx[:, 0] == 0).all()
    assert torch.equal(idx.long(), farthest_point_sample(pts, 16, start="first"))
    # each pick is the point farthest from those chosen before it (brute force)
    for b in range(3):
        chosen = [0]
        for _ in range(15):
            d = torch.cdist(pts[b], pts[b, chosen]).min(dim=1).values
            chosen.append(int(d.argmax()))
        assert idx[b].tolist() == chosen


def test_gather_operation_stand_in_and_its_gradient(shims):
    feats = torch.randn(2, 5, 40, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 40, (2, 7), dtype=torch.int32)
    gather = shims["pointnet2_ops.pointnet2_utils"].gather_operation
    out = gather(feats, idx)
    ref = torch.stack([feats[b][:, idx[b].long()] for b in range(2)])
    assert torch.equal(out, ref)
    torch.autograd.gradcheck(lambda f: gather(f, idx), (feats,))


def test_knn_stand_in_in_both_layouts(shims):
    ref, query = torch.randn(2, 100, 3), torch.randn(2, 9, 3)
    dist, idx = shims["knn_cuda"].KNN(k=4, transpose_mode=True)(ref, query)
    assert dist.shape == idx.shape == (2, 9, 4)
    brute = torch.cdist(query, ref)
    top = brute.topk(4, dim=-1, largest=False)
    assert torch.equal(idx, top.indices) and torch.allclose(dist, top.values, atol=1e-5)  # Euclidean, as KNN_CUDA
    dist_t, idx_t = shims["knn_cuda"].KNN(k=4, transpose_mode=False)(ref.transpose(1, 2), query.transpose(1, 2))
    assert torch.equal(idx_t, idx.transpose(1, 2)) and torch.allclose(dist_t, dist.transpose(1, 2))


def test_chamfer_stand_in_forward_and_backward_are_the_kernels(shims):
    chamfer = shims["chamfer"]
    x = torch.randn(4, 32, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 20, 3, dtype=torch.float64, requires_grad=True)
    d1, d2, i1, i2 = chamfer.forward(x, y)
    sq = torch.cdist(x, y) ** 2
    assert torch.allclose(d1, sq.min(dim=2).values) and torch.allclose(d2, sq.min(dim=1).values)
    assert torch.equal(i1.long(), sq.argmin(dim=2)) and torch.equal(i2.long(), sq.argmin(dim=1))
    # the official ChamferDistanceL2: mean(dist1) + mean(dist2), equal to our Chamfer L2 ...
    assert torch.allclose(d1.mean() + d2.mean(), chamfer_distance(x, y, kind="l2", reduction="mean"))
    # ... and the kernel's gradient equals autograd of the same expression
    g1, g2 = torch.rand(4, 32, dtype=torch.float64), torch.rand(4, 20, dtype=torch.float64)
    gx, gy = chamfer.backward(x.detach(), y.detach(), i1, i2, g1, g2)
    ax, ay = torch.autograd.grad((sq.min(dim=2).values * g1).sum() + (sq.min(dim=1).values * g2).sum(), (x, y))
    assert torch.allclose(gx, ax) and torch.allclose(gy, ay)


def test_a_folder_that_is_no_checkout_is_refused(tmp_path):
    with pytest.raises(PeerUnavailable, match="not a Point-MAE checkout"):
        import_official(tmp_path)


TINY = PointMAEConfig(embed_dim=96, encoder_dims=96, depth=2, num_heads=2, decoder_depth=1, decoder_num_heads=2,
                      drop_path=0.0)


@needs_checkout
def test_official_model_with_our_weights_gives_our_loss_and_gradients():
    """Same weights and mask (the official random mask replaced by ours): eval-mode loss and every
    gradient agree. (Training-mode BatchNorm statistics differ by design: our mini-PointNet embeds
    the visible patches only, the official one every patch.)"""
    torch.manual_seed(0)
    ours = build_pretrain_model(TINY).eval()
    peer = build_official_pretrain(ROOT, TINY, ours).eval()
    pts = torch.randn(3, 1024, 3)
    _, center = ours.group(pts)
    mask = ours.make_mask(center, torch.Generator().manual_seed(1))
    peer.MAE_encoder._mask_center_rand = lambda center, noaug=False: mask
    lo, lp = ours({"points": pts, "mask": mask}).loss, peer(pts)
    assert torch.allclose(lo, lp, rtol=1e-4, atol=1e-6), (lo.item(), lp.item())
    lo.backward()
    lp.backward()
    mine = dict(ours.named_parameters())
    for k, p in peer.named_parameters():
        q = mine[_rename(k, PRETRAIN_RULES)]
        assert torch.allclose(p.grad.reshape(q.shape), q.grad, rtol=1e-3, atol=1e-5), k
    # the official packages were imported under a temporary sys.modules and removed again
    assert not {"models", "utils", "knn_cuda", "chamfer"} & set(sys.modules)


@needs_checkout
def test_bench_reports_a_speedup_against_the_official_peer(tmp_path):
    from mm3d.bench import run_bench
    from mm3d.config import load_config
    from mm3d.pointcloud.synth import synth_shapenet55

    synth_shapenet55(tmp_path / "sn", scale="tiny")
    cfg = load_config(Path("configs/pointcloud/pointmae_small_bench.yaml"),
                      [f"data.root={tmp_path / 'sn'}", f"bench.peer_root={ROOT}", "train.batch_size=2",
                       "bench.steps=1", "bench.warmup=0", "model.depth=1", "model.decoder_depth=1"])
    result = run_bench(cfg)
    assert result["peer"].startswith("official Point-MAE")
    assert result["speedup_vs_peer"] > 0
