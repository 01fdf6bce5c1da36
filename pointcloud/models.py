"""Point-MAE: patch grouping, mini-PointNet patch embedding, masked pretraining, classification.

The architecture follows Pang et al., "Masked Autoencoders for Point Cloud Self-supervised
Learning" (ECCV 2022) and its official release, with the same parameter names and shapes where a
weight exists in both (so :mod:`mm3d.pointcloud.convert` maps official checkpoints by renaming):

* :class:`Group` picks G patch centres by farthest point sampling and K nearest neighbours per
  centre; each patch is expressed relative to its centre.
* :class:`PatchEmbed` is the official mini-PointNet (``first_conv`` / ``second_conv``).
* :class:`PointMAEEncoder` holds the patch embedding, the positional MLP on the centres (added
  before *every* block, as in the official ``TransformerEncoder``), timm blocks and a final norm.
* :class:`PointMAEPretrain` encodes the visible patches only, decodes mask tokens and predicts the
  masked patches' target (``model.target``, :mod:`mm3d.pointcloud.targets`): by default the K points
  of every masked patch with the Chamfer distance (L2 or L1); also PCP-MAE's centres, or the patch
  features of a frozen or EMA teacher.
* :class:`PointMAEClassifier` adds a cls token / position and the official head.

Axes: B batch, N points, G groups (patches), V visible and M masked groups, K points per group,
D model width, C classes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm3d.checkpoint import load_checkpoint
from mm3d.config import config_from_dict
from mm3d.layers import init_trunc_normal, init_xavier, run_blocks, token_mask_count, vit_blocks
from mm3d.masking import num_masked, point_mask
from mm3d.pointcloud.checkpoints import load_encoder_checkpoint
from mm3d.pointcloud.ops import chamfer_distance, farthest_point_sample, gather_points, knn
from mm3d.pointcloud.targets import CENTER_CODES, PointTarget, center_code, target_for_model
from mm3d.registry import register_variant
from mm3d.targets import TargetConfig
from mm3d.task import ModelOutput
from mm3d.teacher import FrozenModule, load_frozen_teacher

log = logging.getLogger(__name__)

MaskType = Literal["random", "block"]
LossType = Literal["cdl2", "cdl1"]
PosEncoding = Literal["xyz", "sincos"]


# --------------------------------------------------------------------------------------------
# Config and variants
# --------------------------------------------------------------------------------------------


@dataclass
class PointMAEConfig:
    """The ``model`` section of Point-MAE runs (pretraining and classification).

    Defaults are the official ``pointmae_small`` values (``cfgs/pretrain.yaml``). ``embed_dim`` is
    the official ``trans_dim``; configs stored in checkpoints of earlier versions that still say
    ``trans_dim`` load (``renamed_keys``).
    """

    renamed_keys: ClassVar[dict[str, str]] = {"trans_dim": "embed_dim"}

    variant: str = ""
    embed_dim: int = 384  # transformer width D
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = False  # the official blocks have no qkv bias
    drop_path: float = 0.1  # stochastic depth, linearly increasing over the blocks
    encoder_dims: int = 384  # mini-PointNet output (== embed_dim officially; else a Linear maps it)
    pointnet_dims: tuple[int, int, int] = (128, 256, 512)  # mini-PointNet hidden widths
    pos_hidden: int = 128  # hidden width of the positional MLP on the centres
    # what the positional MLP reads: "xyz" the centre (Point-MAE), "sincos" PCP-MAE's fixed sine-cosine code
    # of it (embed_dim wide, embed_dim % 6 == 0); a classifier must use the pretraining's value
    pos_encoding: PosEncoding = "xyz"
    num_group: int = 64  # G patches
    group_size: int = 32  # K points per patch
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    mask_ratio: float = 0.6
    mask_type: MaskType = "random"
    loss: LossType = "cdl2"
    # what the masked patches predict (kind: points | center | teacher | ema) and its loss; see mm3d.pointcloud.targets
    target: TargetConfig = field(default_factory=TargetConfig)
    # classification (PointMAEClassifier)
    num_classes: int = 0  # 0: taken from the dataset
    cls_head_dims: tuple[int, ...] = (256, 256)
    cls_dropout: float = 0.5
    label_smoothing: float = 0.0  # the official fine-tuning uses plain cross-entropy

    def check_npoints(self, npoints: int) -> None:
        """ValueError unless clouds of `npoints` points can be grouped (G centres, K neighbours)."""
        need = max(self.num_group, self.group_size)
        if npoints < need:
            raise ValueError(f"data.npoints={npoints} is fewer than model.num_group={self.num_group} "
                             f"/ group_size={self.group_size} need")

    def validate(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "encoder_dims", "pos_hidden",
                     "num_group", "group_size", "decoder_num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.decoder_depth < 0:
            raise ValueError(f"decoder_depth must be >= 0, got {self.decoder_depth}")
        if any(d <= 0 for d in self.pointnet_dims):
            raise ValueError(f"pointnet_dims must be positive, got {self.pointnet_dims}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_encoding not in CENTER_CODES:
            raise ValueError(f"model.pos_encoding must be one of {sorted(CENTER_CODES)}, got {self.pos_encoding!r}")
        if self.pos_encoding == "sincos" and self.embed_dim % 6:
            raise ValueError(f"model.pos_encoding=sincos needs embed_dim divisible by 6 (a sine and a cosine "
                             f"per axis), got {self.embed_dim}")
        if self.embed_dim % self.decoder_num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by decoder_num_heads "
                             f"{self.decoder_num_heads}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        masked = int(self.mask_ratio * self.num_group + 1e-9)
        if not 0 < masked < self.num_group:
            raise ValueError(f"mask_ratio {self.mask_ratio} of num_group {self.num_group} masks "
                             f"{masked} patches; need at least one masked and one visible")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if not 0.0 <= self.cls_dropout < 1.0:
            raise ValueError(f"cls_dropout must be in [0, 1), got {self.cls_dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: from the dataset), got {self.num_classes}")
        if any(d <= 0 for d in self.cls_head_dims):
            raise ValueError(f"cls_head_dims must be positive, got {self.cls_head_dims}")


register_variant(
    "pointmae_small", "pointcloud", PointMAEConfig(),
    "Official Point-MAE: width 384, depth 12, 6 heads, decoder 4 blocks x 6 heads, "
    "64 groups x 32 points (1024 input points), drop path 0.1; encoder 21.8M parameters (29.0M with the decoder, 22.1M as a classifier)")
register_variant(
    "pointmae_tiny", "pointcloud",
    PointMAEConfig(embed_dim=96, depth=4, num_heads=3, encoder_dims=96, pointnet_dims=(32, 64, 128),
                   pos_hidden=64, num_group=32, group_size=16, decoder_depth=2, decoder_num_heads=3,
                   drop_path=0.0),
    "Demo Point-MAE for CPUs: width 96, depth 4, 3 heads, decoder 2 blocks, "
    "32 groups x 16 points (512 input points)")
register_variant(
    "pointmae_tiny_test", "pointcloud",
    PointMAEConfig(embed_dim=32, depth=2, num_heads=2, encoder_dims=32, pointnet_dims=(16, 32, 64),
                   pos_hidden=16, num_group=16, group_size=8, decoder_depth=1, decoder_num_heads=2,
                   drop_path=0.0, cls_head_dims=(32, 32)),
    "Test-size Point-MAE: width 32, depth 2, 2 heads, 16 groups x 8 points (256 input points)")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class Grouped(NamedTuple):
    """Point patches. neighborhood: (B, G, K, 3) points relative to their centre; center: (B, G, 3)."""

    neighborhood: torch.Tensor
    center: torch.Tensor


class Group(nn.Module):
    """FPS centres + KNN patches, batched (no parameters).

    The first centre is point 0 of every cloud, as in the official CUDA FPS; datasets shuffle or
    resample the points, so this is not a bias. Under ``torch.export`` the two ops trace as
    static-shape graphs (FPS unrolled over the G centres, with the same picks; KNN as one top-k), so
    an exported model (``mm3d export``) groups the raw points it is given.
    """

    def __init__(self, num_group: int, group_size: int) -> None:
        super().__init__()
        self.num_group = num_group
        self.group_size = group_size

    @torch.no_grad()
    def _indices(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, G) centre indices (FPS) and (B, G, K) neighbour indices (KNN, nearest first)."""
        center_idx = farthest_point_sample(points, self.num_group)  # (B, G)
        center = gather_points(points, center_idx)
        nn_idx = knn(center, points, self.group_size).idx  # (B, G, K), nearest first
        return center_idx, nn_idx

    def forward(self, points: torch.Tensor) -> Grouped:
        """points: (B, N, 3) -> Grouped(neighborhood (B, G, K, 3), center (B, G, 3))."""
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must be a (B, N, 3) tensor, got shape {tuple(points.shape)}")
        n = points.shape[1]
        if n < self.num_group or n < self.group_size:
            raise ValueError(f"a cloud of {n} points cannot be split into {self.num_group} groups of "
                             f"{self.group_size} points; use more points or fewer/smaller groups")
        center_idx, nn_idx = self._indices(points)
        center = gather_points(points, center_idx)
        neighborhood = gather_points(points, nn_idx) - center.unsqueeze(2)
        return Grouped(neighborhood, center)


class PointwiseConv(nn.Conv1d):
    """The official 1x1 ``Conv1d`` (same parameters, shapes and initialisation: weight (out, in, 1))
    applied as a ``Linear`` to channels-last rows: x (..., in) -> (..., out).

    On the CPU a 1x1 convolution goes through mkldnn convolution, whose backward cost about 15% of a
    Point-MAE step; a matmul on (rows, channels) computes the same function faster (BENCHMARKS.md)
    and keeps every checkpoint and converted official weight loading unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.squeeze(-1), self.bias)


class PatchEmbed(nn.Module):
    """Official mini-PointNet: per-point MLP, max-pool, concat global, per-point MLP, max-pool.

    Parameter names and shapes match the official ``Encoder`` (``first_conv.{0,1,3}``,
    ``second_conv.{0,1,3}``, 1x1 convolutions); the per-point layers run channels-last as matmuls
    (:class:`PointwiseConv`), BatchNorm over every point of every patch as the official layers.

    The first layer of ``second_conv`` reads ``cat([global, local])``, whose global half is the same
    for every point of a patch: it is applied once per patch and added to the per-point half
    (``W [g; f] + b = W_g g + b + W_f f``), which halves that layer's matmul and never builds the
    concatenation. Pooling is ``torch.max`` over the points, as the official code (the gradient goes
    to one point per channel).
    """

    def __init__(self, out_dim: int, dims: Sequence[int] = (128, 256, 512)) -> None:
        super().__init__()
        h1, h2, h3 = dims
        self.out_dim = out_dim
        self.first_conv = nn.Sequential(
            PointwiseConv(3, h1), nn.BatchNorm1d(h1), nn.ReLU(inplace=True), PointwiseConv(h1, h2))
        self.second_conv = nn.Sequential(
            PointwiseConv(2 * h2, h3), nn.BatchNorm1d(h3), nn.ReLU(inplace=True), PointwiseConv(h3, out_dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (B, G, K, 3) -> tokens (B, G, out_dim)."""
        b, g, k, _ = patches.shape
        x = self.first_conv(rearrange(patches, "b g k c -> (b g k) c"))  # (BGK, h2)
        x = rearrange(x, "(bg k) c -> bg k c", k=k)
        pooled = x.max(dim=1).values  # (BG, h2)
        fuse = self.second_conv[0]
        w = fuse.weight.squeeze(-1)  # (h3, 2 h2): columns for [global, local]
        h2 = x.shape[-1]
        per_patch = F.linear(pooled, w[:, :h2], fuse.bias)  # (BG, h3)
        x = F.linear(x, w[:, h2:]) + per_patch.unsqueeze(1)  # (BG, K, h3)
        x = self.second_conv[1:](rearrange(x, "bg k c -> (bg k) c"))  # (BGK, out_dim)
        return rearrange(x, "(b g k) d -> b g k d", b=b, g=g).max(dim=2).values


def _pos_mlp(hidden: int, dim: int) -> nn.Sequential:
    """Positional MLP on centres: Linear(3, hidden), GELU, Linear(hidden, dim) (official layout)."""
    return nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, dim))


class CenterCode(nn.Module):
    """The fixed (parameter-free) code of patch centres the positional MLP reads: center (B, L, 3) ->
    (B, L, P), P = :attr:`dim` (see :func:`mm3d.pointcloud.targets.center_code`)."""

    def __init__(self, kind: PosEncoding, embed_dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.dim = 3 if kind == "xyz" else embed_dim

    def forward(self, center: torch.Tensor) -> torch.Tensor:
        return center_code(center, self.kind, self.dim)


def _blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
            drop_path: float) -> nn.ModuleList:
    """timm ViT blocks (SDPA attention) with torch LayerNorm (eps 1e-5, as the official model)."""
    return vit_blocks(dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      drop_path=drop_path, norm_layer=nn.LayerNorm)


class BlockFeatures(NamedTuple):
    """Per-patch features of chosen blocks. features: tuple of (B, G, D), each after the final
    norm (as the official segmentation model); center: (B, G, 3); neighborhood: (B, G, K, 3)."""

    features: tuple[torch.Tensor, ...]
    center: torch.Tensor
    neighborhood: torch.Tensor


class PointMAEEncoder(nn.Module):
    """Patch embedding, positional MLP, transformer blocks and final norm (no masking, no cls).

    Shared by pretraining and classification under the attribute name ``encoder``, so a
    pretraining checkpoint initialises a classifier by name.
    """

    def __init__(self, *, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_path: float = 0.1,
                 encoder_dims: int = 384, pointnet_dims: Sequence[int] = (128, 256, 512),
                 pos_hidden: int = 128, pos_encoding: PosEncoding = "xyz") -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_embed = PatchEmbed(encoder_dims, pointnet_dims)
        self.patch_proj = nn.Identity() if encoder_dims == embed_dim else nn.Linear(encoder_dims, embed_dim)
        self.code = CenterCode(pos_encoding, embed_dim)
        if pos_encoding == "xyz":  # official names pos_embed.{0,2}
            self.pos_embed = _pos_mlp(pos_hidden, embed_dim)
        else:  # PCP-MAE: the MLP reads the sine-cosine code (pos_embed.{1,3}; index 0 is the code)
            self.pos_embed = nn.Sequential(self.code, nn.Linear(self.code.dim, pos_hidden), nn.GELU(),
                                           nn.Linear(pos_hidden, embed_dim))
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path)
        self.norm = nn.LayerNorm(embed_dim)
        self.grad_checkpointing = False
        self.apply(init_trunc_normal)

    def embed(self, neighborhood: torch.Tensor) -> torch.Tensor:
        """neighborhood: (B, G, K, 3) relative patches -> tokens (B, G, D)."""
        return self.patch_proj(self.patch_embed(neighborhood))

    def embed_code(self, code: torch.Tensor) -> torch.Tensor:
        """code: (B, L, P) centre codes (:attr:`code`) -> positional embeddings (B, L, D); ``pos_embed(center)
        == embed_code(code(center))``. PCP-MAE feeds its predicted codes of masked centres here."""
        return self.pos_embed(code) if self.code.kind == "xyz" else self.pos_embed[1:](code)

    def transform(self, x: torch.Tensor, pos: torch.Tensor, fetch: Sequence[int] = (), *,
                  attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x, pos: (B, L, D) -> normed tokens (B, L, D) and the raw outputs of blocks `fetch`.

        attn_mask: optional (L, L) additive float mask (0 = attend, -inf = not), the same for every sample
        and block (PCP-MAE's centre-prediction stream, :meth:`PointMAEPretrain.forward`)."""
        if attn_mask is None:
            x, fetched = run_blocks(self.blocks, x, pos=pos, grad_checkpointing=self.grad_checkpointing,
                                    taps=fetch)
            return self.norm(x), fetched
        fetched = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x + pos, attn_mask, use_reentrant=False)
            else:
                x = blk(x + pos, attn_mask=attn_mask)
            if i in fetch:
                fetched.append(x)
        return self.norm(x), fetched

    def hidden_states(self, neighborhood: torch.Tensor, center: torch.Tensor) -> list[torch.Tensor]:
        """neighborhood: (B, L, K, 3), center: (B, L, 3) of the patches (all of them for a teacher) ->
        the raw outputs of every block, `depth` tensors (B, L, D) (before the final norm)."""
        _, fetched = run_blocks(self.blocks, self.embed(neighborhood), pos=self.pos_embed(center),
                                grad_checkpointing=self.grad_checkpointing, taps=range(self.depth))
        return fetched

    def forward(self, neighborhood: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """neighborhood: (B, L, K, 3), center: (B, L, 3) of the patches to encode -> (B, L, D)."""
        return self.transform(self.embed(neighborhood), self.pos_embed(center))[0]

    def block_features(self, grouped: Grouped, blocks: Sequence[int]) -> BlockFeatures:
        """Outputs of `blocks` (0-based) for all patches, each passed through the final norm."""
        for b in blocks:
            if not 0 <= b < self.depth:
                raise ValueError(f"block index {b} out of range for depth {self.depth}")
        x = self.embed(grouped.neighborhood)
        _, fetched = run_blocks(self.blocks, x, pos=self.pos_embed(grouped.center),
                                grad_checkpointing=self.grad_checkpointing, taps=sorted(set(blocks)))
        by_index = dict(zip(sorted(set(blocks)), fetched))
        return BlockFeatures(tuple(self.norm(by_index[b]) for b in blocks), grouped.center,
                             grouped.neighborhood)


class PointMAEDecoder(nn.Module):
    """Transformer decoder: x = block(x + pos), then the final norm of the last `num_last` tokens."""

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop_path: float = 0.1) -> None:
        super().__init__()
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path)
        self.norm = nn.LayerNorm(embed_dim)
        self.grad_checkpointing = False
        self.apply(init_xavier)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, num_last: int) -> torch.Tensor:
        """x, pos: (B, L, D) -> (B, num_last, D)."""
        x, _ = run_blocks(self.blocks, x, pos=pos, grad_checkpointing=self.grad_checkpointing)
        return self.norm(x[:, x.shape[1] - num_last:])


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, G, ...), idx: (B, L) group indices -> (B, L, ...)."""
    index = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


def _check_points(batch: dict | torch.Tensor) -> torch.Tensor:
    """The (B, N, 3) points of a batch dict (``batch["points"]``) or of a points tensor."""
    if isinstance(batch, torch.Tensor):
        batch = {"points": batch}
    if not isinstance(batch, dict) or "points" not in batch:
        raise TypeError("the batch must be a (B, N, 3) points tensor or a dict with a 'points' (B, N, 3) tensor")
    points = batch["points"]
    if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[-1] < 3:
        raise ValueError(f"batch['points'] must be a (B, N, 3) tensor, got "
                         f"{getattr(points, 'shape', type(points).__name__)}")
    return points[..., :3]


def chamfer_loss(pred: torch.Tensor, target: torch.Tensor, kind: LossType) -> torch.Tensor:
    """Point-MAE's reconstruction loss over the masked patches.

    pred, target: (B, M, K, 3). Every patch is its own cloud: the result is the official
    ``ChamferDistanceL2/L1`` on (B*M, K, 3), i.e. the mean over patches of the per-patch Chamfer
    distance (every patch has K points, so this equals the official global means).
    """
    x = rearrange(pred.float(), "b m k c -> (b m) k c")  # fp32 distances under mixed precision
    y = rearrange(target.float(), "b m k c -> (b m) k c")
    return chamfer_distance(x, y, kind="l2" if kind == "cdl2" else "l1", reduction="mean")


def _teacher_architecture(checkpoint: str, student: PointMAEEncoder) -> dict:
    """PointMAEEncoder keyword arguments of a teacher checkpoint: its stored ``model`` config when it has
    one (our checkpoints, converted official pretraining weights), else the student's architecture."""
    ckpt = load_checkpoint(checkpoint)
    model = (ckpt.get("config") or {}).get("model") if isinstance(ckpt.get("config"), dict) else None
    if isinstance(model, dict):
        cfg = config_from_dict(PointMAEConfig, {k: v for k, v in model.items() if k != "target"})
        kw = _encoder_kwargs(cfg)
        kw.pop("num_group"), kw.pop("group_size")
        return {**kw, "drop_path": 0.0}
    blk = student.blocks[0]
    return dict(embed_dim=student.embed_dim, depth=student.depth, num_heads=blk.attn.num_heads,
                mlp_ratio=blk.mlp.fc1.out_features / student.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
                drop_path=0.0, encoder_dims=student.patch_embed.out_dim,
                pointnet_dims=(student.patch_embed.first_conv[0].out_channels,
                               student.patch_embed.first_conv[3].out_channels,
                               student.patch_embed.second_conv[0].out_channels),
                pos_hidden=student.pos_embed[-1].in_features, pos_encoding=student.code.kind)


def load_teacher_encoder(checkpoint: str, *, student: PointMAEEncoder) -> tuple[FrozenModule, list[str]]:
    """The frozen teacher encoder of ``model.target.kind=teacher``, from ``model.target.checkpoint``.

    Any Point-MAE checkpoint whose encoder :func:`~mm3d.pointcloud.checkpoints.load_encoder_checkpoint`
    reads (our pretraining or classification checkpoints, converted official weights). Its architecture
    comes from the checkpoint's config, else is taken to be the student's (a mismatch is an error naming
    the keys). Returns (the teacher, not in the student's state dict; the loader's notes)."""
    def build() -> PointMAEEncoder:
        return PointMAEEncoder(**_teacher_architecture(checkpoint, student))

    def load(encoder: nn.Module, path: str) -> list[str]:
        holder = nn.Module()
        holder.encoder = encoder
        return load_encoder_checkpoint(holder, path)

    return load_frozen_teacher(build, checkpoint, load=load)


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


@dataclass
class PointMAEPretrainOutput(ModelOutput):
    """loss: () the target's loss (the default: Chamfer distance of the masked patches);
    pred: the prediction of the masked patches' targets, (B, M, K, 3) points relative to their centres
    for the point kinds (``points``, ``center``), (B, M, F) features for the teacher kinds;
    target: the same shape, the targets; mask: (B, G) bool, True = masked; center: (B, G, 3);
    neighborhood: (B, G, K, 3) all patches (relative);
    center_pred / center_target: (B, M, P) PCP-MAE's predicted and true centre codes of the masked
    patches (``center`` kind; None otherwise); metrics: batch means for evaluation
    (:attr:`PointMAEPretrain.metric_names`)."""

    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    center: torch.Tensor
    neighborhood: torch.Tensor
    center_pred: torch.Tensor | None = None
    center_target: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class PointMAEReconstruction(NamedTuple):
    """Absolute coordinates for pictures. visible: (B, V, K, 3) visible patches; masked:
    (B, M, K, 3) the true masked patches; predicted: (B, M, K, 3) their reconstruction;
    mask: (B, G) bool; center: (B, G, 3); loss: () tensor."""

    visible: torch.Tensor
    masked: torch.Tensor
    predicted: torch.Tensor
    mask: torch.Tensor
    center: torch.Tensor
    loss: torch.Tensor


class PointMAEPretrain(nn.Module):
    """Masked point-patch autoencoder (Point-MAE pretraining) with a configurable target.

    forward(batch) takes ``batch["points"]``: (B, N, 3) and optionally ``batch["mask"]``: (B, G)
    bool (True = masked, the same count in every row); otherwise the mask is drawn with
    :func:`mm3d.masking.point_mask` (from `generator` when given).

    The target (``model.target``, :mod:`mm3d.pointcloud.targets`) says what the masked patches
    predict; the head's width is its ``out_dim`` and the loss its configured one. With the
    ``center`` target (PCP-MAE) the encoder also runs the masked patches' shapes as a second
    stream, which predicts their centres; the decoder then places the mask tokens at the predicted
    centres (gradient stopped), never at the true ones.

    Unlike the official code, the mini-PointNet embeds only the visible patches (all patches with
    ``center``, as PCP-MAE), so its BatchNorm statistics come from those; the weights are the same.
    """

    def __init__(self, *, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_path: float = 0.1,
                 encoder_dims: int = 384, pointnet_dims: Sequence[int] = (128, 256, 512),
                 pos_hidden: int = 128, pos_encoding: PosEncoding = "xyz", num_group: int = 64,
                 group_size: int = 32, decoder_depth: int = 4, decoder_num_heads: int = 6,
                 mask_ratio: float = 0.6, mask_type: MaskType = "random", loss: LossType = "cdl2",
                 target: TargetConfig | None = None) -> None:
        super().__init__()
        if loss not in ("cdl2", "cdl1"):
            raise ValueError(f"loss must be 'cdl2' or 'cdl1', got {loss!r}")
        if mask_type not in ("random", "block"):
            raise ValueError(f"mask_type must be 'random' or 'block', got {mask_type!r}")
        self.num_group, self.group_size = num_group, group_size
        self.mask_ratio, self.mask_type, self.loss_type = mask_ratio, mask_type, loss
        self.group = Group(num_group, group_size)
        self.encoder = PointMAEEncoder(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, drop_path=drop_path, encoder_dims=encoder_dims,
            pointnet_dims=pointnet_dims, pos_hidden=pos_hidden, pos_encoding=pos_encoding)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.target: PointTarget = target_for_model(
            target or TargetConfig(), encoder=self.encoder, group_size=group_size, point_loss=loss,
            load_teacher=functools.partial(load_teacher_encoder, student=self.encoder))
        # PCP-MAE places every decoder token with the encoder's positional MLP; Point-MAE has its own
        self.decoder_pos_embed = None if self.target.predicts_centers else _pos_mlp(pos_hidden, embed_dim)
        self.decoder = PointMAEDecoder(embed_dim=embed_dim, depth=decoder_depth, num_heads=decoder_num_heads,
                                       mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path)
        # official `increase_dim`: Conv1d(D, 3K, 1) for the points (channels (K, 3), xyz fastest); the
        # target's width otherwise
        self.recon_head = nn.Conv1d(embed_dim, self.target.out_dim, 1)
        trunc_normal_(self.mask_token, std=0.02)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Keys of :attr:`PointMAEPretrainOutput.metrics` (evaluation reports their means)."""
        return self.target.metric_names

    def make_mask(self, center: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """center: (B, G, 3) -> (B, G) bool mask of this model's kind and ratio."""
        return point_mask(self.mask_type, center, self.mask_ratio, generator=generator)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer after every optimizer step: the EMA target updates its teacher."""
        self.target.after_optimizer_step(step, total_steps, self.encoder)

    def _encode_with_centers(self, neighborhood: torch.Tensor, vis_idx: torch.Tensor, mask_idx: torch.Tensor,
                             vis_center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PCP-MAE's shared encoder: the visible patches attend to each other only (their output is
        Point-MAE's); the masked patches' shapes, placed by a learned mask position token instead of
        their centres, attend to every patch. Returns (x_vis (B, V, D), x_mask (B, M, D))."""
        tokens = self.encoder.embed(neighborhood)  # (B, G, D): one BatchNorm batch over all patches
        num_vis, num_mask = vis_idx.shape[1], mask_idx.shape[1]
        x = torch.cat([_take(tokens, vis_idx), _take(tokens, mask_idx)], dim=1)
        b = x.shape[0]
        pos = torch.cat([self.encoder.pos_embed(vis_center),
                         self.target.mask_pos_token.expand(b, num_mask, -1).to(x.dtype)], dim=1)
        g = num_vis + num_mask
        blocked = torch.zeros(g, g, dtype=torch.bool, device=x.device)
        blocked[:num_vis, num_vis:] = True  # visible queries never see the masked stream
        attn_mask = torch.zeros(g, g, dtype=x.dtype, device=x.device).masked_fill(blocked, float("-inf"))
        x, _ = self.encoder.transform(x, pos, attn_mask=attn_mask)
        return x[:, :num_vis], x[:, num_vis:]

    def forward(self, batch: dict, *, generator: torch.Generator | None = None) -> PointMAEPretrainOutput:
        points = _check_points(batch)
        neighborhood, center = self.group(points)
        b, g, k, _ = neighborhood.shape
        mask = batch.get("mask")
        if mask is None:
            mask = self.make_mask(center, generator)
            num_mask = num_masked(g, self.mask_ratio)
        else:  # a mask from outside: read and checked (see mm3d.layers.token_mask_count)
            num_mask = token_mask_count(mask, b, g, "mask", allow_all=False)
            mask = mask.to(center.device)
        num_vis = g - num_mask
        # group indices: the visible ones, then the masked ones, each in group order (no host sync)
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
        vis_idx, mask_idx = order[:, :num_vis], order[:, num_vis:]
        vis_center = _take(center, vis_idx)  # (B, V, 3)

        center_pred = center_target = None
        if self.target.predicts_centers:  # PCP-MAE
            x_vis, x_mask = self._encode_with_centers(neighborhood, vis_idx, mask_idx, vis_center)
            center_pred = self.target.center_head(x_mask)  # (B, M, P) predicted centre codes
            center_target = self.target.center_codes(center, mask_idx, self.encoder.code)
            # the mask tokens sit at the predicted centres, gradient stopped (PCP-MAE's `add_detach`)
            pos = torch.cat([self.encoder.pos_embed(vis_center),
                             self.encoder.embed_code(center_pred.detach())], dim=1)
        else:  # Point-MAE: the encoder sees the visible patches only, the decoder the true centres
            x_vis = self.encoder(_take(neighborhood, vis_idx), vis_center)  # (B, V, D)
            pos = self.decoder_pos_embed(torch.cat([vis_center, _take(center, mask_idx)], dim=1))

        x = torch.cat([x_vis, self.mask_token.expand(b, num_mask, -1)], dim=1)
        x_rec = self.decoder(x, pos, num_mask)  # (B, M, D)
        out = rearrange(self.recon_head(rearrange(x_rec, "b m d -> b d m")), "b f m -> b m f")  # (B, M, F)
        pred = self.target.unflatten(out)  # (B, M, K, 3) points or (B, M, F) features
        target = self.target(neighborhood, center, mask_idx)  # the same shape, no gradient
        result = self.target.loss_and_metrics(pred, target, center_pred, center_target)
        return PointMAEPretrainOutput(loss=result.loss, pred=pred, target=target, mask=mask, center=center,
                                      neighborhood=neighborhood, center_pred=center_pred,
                                      center_target=center_target, metrics=result.metrics)

    @torch.no_grad()
    def reconstruct(self, points: torch.Tensor, *, mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> PointMAEReconstruction:
        """points: (B, N, 3) -> absolute visible, masked and predicted patches (for pictures)."""
        batch = {"points": points} if mask is None else {"points": points, "mask": mask}
        if not self.target.predicts_points:
            raise ValueError(f"model.target.kind={self.target.kind!r} predicts features, not points: "
                             "there is no reconstruction to show")
        out = self(batch, generator=generator)
        b, g, k, _ = out.neighborhood.shape
        m = out.pred.shape[1]
        absolute = out.neighborhood + out.center.unsqueeze(2)
        mask_center = out.center[out.mask].reshape(b, m, 1, 3)
        return PointMAEReconstruction(
            visible=absolute[~out.mask].reshape(b, g - m, k, 3),
            masked=absolute[out.mask].reshape(b, m, k, 3),
            predicted=out.pred + mask_center,
            mask=out.mask, center=out.center, loss=out.loss)

    def forward_tokens(self, points: torch.Tensor) -> torch.Tensor:
        """points: (B, N, 3) -> normed tokens (B, G, D) of all patches (no masking, no special tokens);
        the linear-SVM probe pools them its own way (:func:`mm3d.pointcloud.probe.pool_patch_tokens`)."""
        return self.encoder(*self.group(points))

    # timm's feature interface. The pretraining model has no classifier (num_classes 0, as a timm model
    # made with num_classes=0): forward_head returns the pooled feature.
    num_classes = 0

    @property
    def num_features(self) -> int:
        """Width 2D of the pooled feature (:meth:`forward_head`)."""
        return 2 * self.encoder.embed_dim

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """points: (B, N, 3) -> normed tokens (B, G, D) of all patches, no masking (as :meth:`forward_tokens`)."""
        return self.forward_tokens(points)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: (B, G, D) patch tokens -> (B, 2D) [max, mean] over the patches (the SVM probe's
        default feature); no head, so `pre_logits` changes nothing."""
        return torch.cat([features.amax(dim=1), features.mean(dim=1)], dim=-1)

    def reset_classifier(self, num_classes: int) -> None:
        """Only 0 (no head) fits a pretraining model; build a classifier for classes
        (``mm3d.create_model(..., num_classes=N)`` loads these weights into one)."""
        if num_classes != 0:
            raise ValueError(f"a Point-MAE pretraining model has no classifier to reset to {num_classes} classes; "
                             f"build the classifier with mm3d.create_model(..., num_classes={num_classes})")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        # official `add_weight_decay`: 1-D params, biases and names containing "token" skip decay
        return {"mask_token", *(f"target.{n}" for n in self.target.no_weight_decay())}


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


@dataclass
class PointClassifierOutput(ModelOutput):
    """loss: () cross-entropy (None without ``batch["label"]``); logits: (B, C)."""

    logits: torch.Tensor


def _cls_head(in_dim: int, hidden: Sequence[int], num_classes: int, dropout: float) -> nn.Sequential:
    """Official ``cls_head_finetune``: [Linear, BatchNorm1d, ReLU, Dropout] per hidden width, Linear.

    With hidden (256, 256) the indices (0, 1, 4, 5, 8) match the official state-dict names.
    """
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_dim = h
    layers.append(nn.Linear(in_dim, num_classes))
    return nn.Sequential(*layers)


class PointMAEClassifier(nn.Module):
    """Point-MAE encoder + cls token/position + official head on [cls token, max-pooled tokens].

    forward(batch) takes ``batch["points"]`` (or `batch` itself, a tensor): (B, N, 3) and optionally
    ``batch["label"]``: (B,). With ``num_classes=0`` there is no head (``logits`` is then the pooled
    (B, 2D) feature).
    """

    def __init__(self, *, num_classes: int, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_path: float = 0.1,
                 encoder_dims: int = 384, pointnet_dims: Sequence[int] = (128, 256, 512),
                 pos_hidden: int = 128, pos_encoding: PosEncoding = "xyz", num_group: int = 64,
                 group_size: int = 32, cls_head_dims: Sequence[int] = (256, 256), cls_dropout: float = 0.5,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no head), got {num_classes}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.cls_head_dims, self.cls_dropout = tuple(cls_head_dims), cls_dropout
        self.group = Group(num_group, group_size)
        self.encoder = PointMAEEncoder(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, drop_path=drop_path, encoder_dims=encoder_dims,
            pointnet_dims=pointnet_dims, pos_hidden=pos_hidden, pos_encoding=pos_encoding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.num_features = 2 * embed_dim  # width of the pooled feature the head reads
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.cls_pos, std=0.02)

    def forward_tokens(self, points: torch.Tensor) -> torch.Tensor:
        """points: (B, N, 3) -> normed tokens (B, 1 + G, D), cls token first."""
        neighborhood, center = self.group(points)
        b = points.shape[0]
        x = torch.cat([repeat(self.cls_token, "1 1 d -> b 1 d", b=b), self.encoder.embed(neighborhood)], dim=1)
        pos = torch.cat([repeat(self.cls_pos, "1 1 d -> b 1 d", b=b), self.encoder.pos_embed(center)], dim=1)
        return self.encoder.transform(x, pos)[0]

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """points: (B, N, 3) -> the normed tokens (B, 1 + G, D) the head reads, cls token first, no masking
        (as :meth:`forward_tokens`)."""
        return self.forward_tokens(points)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: (B, 1 + G, D) from :meth:`forward_features` -> (B, 2D) [cls token, max over the patch
        tokens] with `pre_logits`, else (B, num_classes) logits."""
        pooled = torch.cat([features[:, 0], features[:, 1:].amax(dim=1)], dim=-1)
        return pooled if pre_logits else self.head(pooled)

    def forward_head_input(self, points: torch.Tensor) -> torch.Tensor:
        """points: (B, N, 3) -> (B, 2D) = [cls token, max over patch tokens] (the head's input)."""
        return self.forward_head(self.forward_features(points), pre_logits=True)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new official head (``cls_head_dims``, ``cls_dropout``) for `num_classes` classes, initialised
        as the constructor does; 0: no head (:meth:`forward` then returns the pooled feature as ``logits``)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        if num_classes == 0:
            self.head = nn.Identity()
            return
        self.head = _cls_head(self.num_features, self.cls_head_dims, num_classes, self.cls_dropout)
        self.head.apply(init_trunc_normal)
        self.head.to(self.cls_token.device)

    def forward(self, batch: dict | torch.Tensor) -> PointClassifierOutput:
        points = _check_points(batch)
        logits = self.forward_head(self.forward_features(points))
        loss = None
        if isinstance(batch, dict) and batch.get("label") is not None:
            label = batch["label"].reshape(-1).long()
            if label.shape[0] != logits.shape[0]:
                raise ValueError(f"batch['label'] has {label.shape[0]} entries for {logits.shape[0]} clouds")
            loss = F.cross_entropy(logits, label, label_smoothing=self.label_smoothing)
        return PointClassifierOutput(loss=loss, logits=logits)

    def forward_block_features(self, points: torch.Tensor,
                               blocks: Sequence[int] = (3, 7, 11)) -> BlockFeatures:
        """points: (B, N, 3) -> normed outputs of `blocks` (0-based) for all G patches (no cls)."""
        return self.encoder.block_features(self.group(points), blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        # official `add_weight_decay`: names containing "token" skip decay (cls_pos is decayed)
        return {"cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style parameter groups for layer-wise LR decay (stem, blocks, then the head)."""
        return {
            "stem": r"^cls_token|^cls_pos|^encoder\.patch_embed|^encoder\.patch_proj|^encoder\.pos_embed",
            "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))],
        }


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _encoder_kwargs(cfg: PointMAEConfig) -> dict:
    return dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop_path=cfg.drop_path,
                encoder_dims=cfg.encoder_dims, pointnet_dims=tuple(cfg.pointnet_dims),
                pos_hidden=cfg.pos_hidden, pos_encoding=cfg.pos_encoding, num_group=cfg.num_group,
                group_size=cfg.group_size)


def build_pretrain_model(cfg: PointMAEConfig) -> PointMAEPretrain:
    """The pretraining model of a ``model`` config section."""
    cfg.validate()
    return PointMAEPretrain(**_encoder_kwargs(cfg), decoder_depth=cfg.decoder_depth,
                            decoder_num_heads=cfg.decoder_num_heads, mask_ratio=cfg.mask_ratio,
                            mask_type=cfg.mask_type, loss=cfg.loss, target=cfg.target)


def build_classifier(cfg: PointMAEConfig, num_classes: int | None = None) -> PointMAEClassifier:
    """The classifier of a ``model`` config section; `num_classes` overrides ``cfg.num_classes`` (0 given
    here: no head, as :meth:`PointMAEClassifier.reset_classifier`; 0 in the config means "from the data")."""
    cfg.validate()
    n = num_classes if num_classes is not None else cfg.num_classes
    if n < 0 or (num_classes is None and n == 0):
        raise ValueError(f"the classifier needs num_classes > 0 (config or dataset), got {n}")
    if cfg.num_classes and num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(f"model.num_classes={cfg.num_classes} disagrees with the dataset's "
                         f"{num_classes} classes")
    return PointMAEClassifier(**_encoder_kwargs(cfg), num_classes=n, cls_head_dims=tuple(cfg.cls_head_dims),
                              cls_dropout=cfg.cls_dropout, label_smoothing=cfg.label_smoothing)
