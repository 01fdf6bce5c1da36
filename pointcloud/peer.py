"""The official Point-MAE model as an in-process peer for ``mm3d bench`` (``bench.peer_root=CHECKOUT``).

The user points at a checkout of https://github.com/Pang-Yatian/Point-MAE; its ``models/Point_MAE.py``
is imported unmodified. Its three compiled CUDA extensions are replaced, at the import level, by
modules built on our ops with the official semantics:

- ``pointnet2_ops.pointnet2_utils``: ``furthest_point_sample(xyz (B, N, 3), G) -> (B, G) int32``
  starting from point 0 (the kernel's rule), ``gather_operation(features (B, C, N), idx (B, G)) ->
  (B, C, G)`` with its gradient;
- ``knn_cuda.KNN(k, transpose_mode)``: ``knn(ref, query) -> (dist (B, M, k), idx (B, M, k))`` in
  transpose mode (point-major tensors), ``(B, k, M)`` otherwise; distances are Euclidean, as the
  KNN_CUDA kernel returns them;
- ``chamfer`` (the extension behind ``extensions.chamfer_dist``): ``forward(xyz1, xyz2) -> dist1
  (B, N), dist2 (B, M), idx1, idx2`` of squared nearest distances, and ``backward`` with the kernel's
  gradient, so the official ``ChamferDistanceL2`` module runs as written.

Nothing of the official project is stored in this repository: without a checkout there is no peer.
The checkout's own pure-Python requirements (``easydict``, ``termcolor``, timm) must be installed.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mm3d.bench import PeerUnavailable, import_from_checkout
from mm3d.engine import unwrap
from mm3d.pointcloud.convert import PRETRAIN_RULES, _rename
from mm3d.pointcloud.ops import farthest_point_sample, knn

# top-level names the official code imports; they are generic ("utils", "models"), so they are
# imported under a temporary sys.modules and removed again afterwards
_OFFICIAL_PACKAGES = ("models", "utils", "extensions", "datasets")


class _GatherOperation(torch.autograd.Function):
    """pointnet2's gather_operation: features (B, C, N), idx (B, G) int -> (B, C, G); gradient scattered back."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.num_points = features.shape[2]
        index = idx.long().unsqueeze(1).expand(-1, features.shape[1], -1)
        return features.gather(2, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        index = idx.long().unsqueeze(1).expand(-1, grad.shape[1], -1)
        out = grad.new_zeros(grad.shape[0], grad.shape[1], ctx.num_points)
        return out.scatter_add_(2, index, grad), None


def _pointnet2_utils() -> types.ModuleType:
    mod = types.ModuleType("pointnet2_ops.pointnet2_utils")
    mod.__doc__ = "mm3d stand-in for pointnet2_ops.pointnet2_utils (FPS from point 0, gather)"

    def furthest_point_sample(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
        """xyz (B, N, 3) -> (B, npoint) int32 indices, the first one point 0 (the CUDA kernel's start)."""
        return farthest_point_sample(xyz, npoint, start="first").int()

    mod.furthest_point_sample = furthest_point_sample
    mod.gather_operation = _GatherOperation.apply
    return mod


class _KNN(nn.Module):
    """KNN_CUDA's ``KNN(k, transpose_mode)``: forward(ref, query) -> (dist, idx)."""

    def __init__(self, k: int, transpose_mode: bool = False) -> None:
        super().__init__()
        self.k, self.transpose_mode = k, transpose_mode

    def forward(self, ref: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.transpose_mode:  # (B, 3, N) channel-major in and (B, k, M) out
            ref, query = ref.transpose(1, 2), query.transpose(1, 2)
        res = knn(query, ref, self.k)
        dist, idx = res.dist2.sqrt(), res.idx
        if not self.transpose_mode:
            dist, idx = dist.transpose(1, 2), idx.transpose(1, 2)
        return dist, idx


def _chamfer() -> types.ModuleType:
    mod = types.ModuleType("chamfer")
    mod.__doc__ = "mm3d stand-in for the chamfer CUDA extension (squared nearest distances both ways)"

    def forward(xyz1: torch.Tensor, xyz2: torch.Tensor) -> list[torch.Tensor]:
        """xyz1 (B, N, 3), xyz2 (B, M, 3) -> dist1 (B, N), dist2 (B, M), idx1 (B, N) int32, idx2 (B, M) int32."""
        with torch.no_grad():
            a, b = knn(xyz1, xyz2, 1), knn(xyz2, xyz1, 1)
        return [a.dist2[..., 0], b.dist2[..., 0], a.idx[..., 0].int(), b.idx[..., 0].int()]

    def backward(xyz1, xyz2, idx1, idx2, grad_dist1, grad_dist2) -> list[torch.Tensor]:
        """The kernel's gradient of sum(g1 * dist1) + sum(g2 * dist2) w.r.t. both clouds."""
        def near(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return points.gather(1, idx.long().unsqueeze(-1).expand(-1, -1, points.shape[-1]))

        d1 = 2 * (xyz1 - near(xyz2, idx1)) * grad_dist1.unsqueeze(-1)  # (B, N, 3)
        d2 = 2 * (xyz2 - near(xyz1, idx2)) * grad_dist2.unsqueeze(-1)  # (B, M, 3)
        grad1 = d1.scatter_add(1, idx2.long().unsqueeze(-1).expand_as(d2), -d2)
        grad2 = d2.scatter_add(1, idx1.long().unsqueeze(-1).expand_as(d1), -d1)
        return [grad1, grad2]

    mod.forward, mod.backward = forward, backward
    return mod


def extension_shims() -> dict[str, types.ModuleType]:
    """The stand-in modules, by the name the official code imports."""
    utils = _pointnet2_utils()
    pkg = types.ModuleType("pointnet2_ops")
    pkg.pointnet2_utils = utils
    knn_mod = types.ModuleType("knn_cuda")
    knn_mod.KNN = _KNN
    return {"pointnet2_ops": pkg, "pointnet2_ops.pointnet2_utils": utils, "knn_cuda": knn_mod, "chamfer": _chamfer()}


def import_official(root: str | Path) -> types.ModuleType:
    """Import ``models/Point_MAE.py`` of the checkout at `root` with our extension stand-ins.

    Raises:
        PeerUnavailable naming the checkout and what is missing.
    """
    return import_from_checkout(root, "models.Point_MAE", marker="models/Point_MAE.py", what="Point-MAE",
                                packages=_OFFICIAL_PACKAGES, replace=extension_shims(),
                                hint="give bench.peer_root=<a clone of github.com/Pang-Yatian/Point-MAE>; "
                                     "its requirements.txt: pip install easydict termcolor")


def official_config(model_cfg: Any) -> Any:
    """The official ``config.model`` (an EasyDict) for our PointMAEConfig `model_cfg`.

    Raises:
        PeerUnavailable when our model differs from what the official file can build.
    """
    from easydict import EasyDict

    m = model_cfg
    if tuple(m.pointnet_dims) != (128, 256, 512) or m.pos_hidden != 128 or m.mlp_ratio != 4 or m.qkv_bias:
        raise PeerUnavailable("the official Point-MAE fixes pointnet_dims=(128, 256, 512), pos_hidden=128, "
                              f"mlp_ratio=4 and qkv_bias=False; this model has {tuple(m.pointnet_dims)}, "
                              f"{m.pos_hidden}, {m.mlp_ratio}, {m.qkv_bias}")
    if m.encoder_dims != m.embed_dim:
        raise PeerUnavailable(f"the official pretraining model feeds the mini-PointNet's output to the "
                              f"transformer as is: encoder_dims ({m.encoder_dims}) must equal embed_dim ({m.embed_dim})")
    if m.mask_type != "random":
        raise PeerUnavailable(f"model.mask_type={m.mask_type!r}: the peer is timed with the official random mask")
    return EasyDict(NAME="Point_MAE", group_size=m.group_size, num_group=m.num_group,
                    loss="cdl2" if m.loss == "cdl2" else "cdl1",
                    transformer_config=EasyDict(mask_ratio=m.mask_ratio, mask_type="rand", trans_dim=m.embed_dim,
                                                encoder_dims=m.encoder_dims, depth=m.depth,
                                                drop_path_rate=m.drop_path, num_heads=m.num_heads,
                                                decoder_depth=m.decoder_depth,
                                                decoder_num_heads=m.decoder_num_heads))


def ours_to_official(ours: dict[str, torch.Tensor], official_keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our pretraining weights renamed (and reshaped) to the official model's keys (the converter's
    rules read backwards). Every official key must be found."""
    out, missing = {}, []
    for k, like in official_keys.items():
        name = _rename(k, PRETRAIN_RULES)
        if name is None or name not in ours:
            missing.append(k)
            continue
        out[k] = ours[name].detach().reshape(like.shape).clone()
    if missing:
        raise PeerUnavailable(f"our weights have nothing for official keys {missing[:5]}")
    return out


def build_official_pretrain(root: str | Path, model_cfg: Any, ours: nn.Module) -> nn.Module:
    """The official ``Point_MAE`` of the checkout at `root`, configured as `model_cfg`, with the
    weights of our pretraining model `ours` (buffers such as BatchNorm statistics included)."""
    module = import_official(root)
    with contextlib.redirect_stdout(None):
        peer = module.Point_MAE(official_config(model_cfg))
    sd = ours_to_official(ours.state_dict(), peer.state_dict())
    peer.load_state_dict(sd, strict=True)
    return peer


def pretrain_peer_step(root: str | Path, cfg: Any, model: nn.Module, batch: dict[str, Any],
                       device: torch.device) -> tuple[str, Callable[[], None]]:
    """``mm3d bench``'s peer: one official pretraining step (forward, backward, optimizer step) on
    `batch`'s clouds, with `model`'s weights and the trainer's optimizer settings and precision.

    The official model draws its own random mask (a per-cloud numpy shuffle) every step, as in its
    training; its grouping, encoder, decoder and Chamfer loss run as the checkout defines them.
    """
    from mm3d.engine import OptimizerStep, autocast
    from mm3d.trainer import build_optimizer, peak_lr

    peer = build_official_pretrain(root, cfg.model, unwrap(model)).to(device).train()
    opt_step = OptimizerStep(build_optimizer(peer, cfg, peak_lr(cfg, 1), fused=False), device=device,
                             precision=cfg.train.precision, clip_grad=cfg.optim.clip_grad,
                             double_step=cfg.optim.double_step)
    points = batch["points"].contiguous()

    def step() -> None:
        with autocast(device, cfg.train.precision):
            loss = peer(points)
        opt_step.backward(loss)
        opt_step.step()

    return f"official Point-MAE ({Path(root).name}: models/Point_MAE.py, our FPS/KNN/Chamfer ops)", step


__all__ = ["pretrain_peer_step", "PeerUnavailable", "extension_shims", "import_official", "official_config", "ours_to_official",
           "build_official_pretrain"]
