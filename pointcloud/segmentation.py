"""Point-MAE part segmentation (ShapeNetPart): the official head on top of our encoder.

The architecture follows the official ``segmentation/models/pt.py`` of Pang-Yatian/Point-MAE:

1. the cloud (B, N, 3) is split into G patches (FPS + KNN, 128 x 32 officially) and encoded by
   the shared :class:`~mm3d.pointcloud.models.PointMAEEncoder` (no cls token, no masking);
2. the outputs of three blocks (4, 8 and 12 of 12, i.e. 0-based 3, 7, 11), each through the final
   norm, are concatenated per patch: (B, G, 3D);
3. a global feature per shape: max- and mean-pooling of those patch features over G, plus a
   64-wide embedding of the one-hot object category (Conv1d without bias, BatchNorm, LeakyReLU 0.2);
4. the patch features are propagated to every point with inverse-distance three-nearest-neighbour
   interpolation (:func:`~mm3d.pointcloud.ops.three_nn_interpolate`), concatenated after the
   point's xyz and passed through a point-wise MLP (3 + 3D -> 4D -> 1024, BatchNorm + ReLU);
5. the head: [propagated (1024), global max (3D), global mean (3D), label (64)] -> 512 -> 256 ->
   P parts (Conv1d + BatchNorm + ReLU, dropout 0.5 after the first layer).

Module names follow the official ones where a weight exists in both (``label_conv``,
``propagation`` ~ ``propagation_0``, ``convs1..3`` / ``bns1..2``), and the encoder lives under
``encoder`` so our pretraining checkpoints initialise it by name.

Axes: B batch, N points, G patches, K points per patch, D width, P parts, C categories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from mm3d.layers import init_trunc_normal
from mm3d.pointcloud.models import Group, PointMAEConfig, PointMAEEncoder
from mm3d.pointcloud.ops import three_nn_interpolate
from mm3d.task import ModelOutput


@dataclass
class SegHeadConfig:
    """The ``head`` section of part-segmentation runs (official values by default)."""

    num_parts: int = 50
    num_categories: int = 16
    fetch_blocks: tuple[int, ...] = ()  # 0-based encoder blocks; () = the ends of the three thirds (3, 7, 11 of 12)
    label_dim: int = 64  # width of the category embedding
    propagation_dims: tuple[int, ...] = ()  # point-wise MLP after interpolation; () = (4 D, 1024)
    head_dims: tuple[int, ...] = (512, 256)
    dropout: float = 0.5

    def validate(self) -> None:
        if self.num_parts <= 0 or self.num_categories <= 0:
            raise ValueError(f"num_parts and num_categories must be positive, got {self.num_parts}, "
                             f"{self.num_categories}")
        if self.label_dim <= 0 or any(d <= 0 for d in (*self.propagation_dims, *self.head_dims)):
            raise ValueError("label_dim, propagation_dims and head_dims must be positive")
        if not self.head_dims:
            raise ValueError("head_dims needs at least one hidden width")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if any(b < 0 for b in self.fetch_blocks):
            raise ValueError(f"fetch_blocks must be >= 0, got {self.fetch_blocks}")


def default_fetch_blocks(depth: int) -> tuple[int, ...]:
    """The last block of each third of the encoder, 0-based: (3, 7, 11) for depth 12."""
    return tuple(max(0, round((i + 1) * depth / 3) - 1) for i in range(3))


@dataclass
class SegmentationOutput(ModelOutput):
    """loss: () cross-entropy over all points (None without ``batch["seg"]``);
    logits: (B, N, P) part scores (unrestricted; see :mod:`mm3d.pointcloud.seg_metrics`)."""

    logits: torch.Tensor


def _pointwise_mlp(in_dim: int, dims: Sequence[int]) -> nn.Sequential:
    """[Conv1d(k=1), BatchNorm1d, ReLU] per width, on (B, C, N)."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Conv1d(in_dim, d, 1), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
        in_dim = d
    return nn.Sequential(*layers)


class PointMAESegmentation(nn.Module):
    """Point-MAE encoder + the official part-segmentation head (see the module docstring).

    forward(batch) takes ``batch["points"]``: (B, N, 3), ``batch["cls_label"]``: (B,) object
    category and optionally ``batch["seg"]``: (B, N) part ids for the loss.
    """

    def __init__(self, *, num_parts: int = 50, num_categories: int = 16, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path: float = 0.1, encoder_dims: int = 384,
                 pointnet_dims: Sequence[int] = (128, 256, 512), pos_hidden: int = 128,
                 num_group: int = 128, group_size: int = 32, fetch_blocks: Sequence[int] = (3, 7, 11),
                 label_dim: int = 64, propagation_dims: Sequence[int] = (1536, 1024),
                 head_dims: Sequence[int] = (512, 256), dropout: float = 0.5,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not fetch_blocks or any(not 0 <= b < depth for b in fetch_blocks):
            raise ValueError(f"fetch_blocks {tuple(fetch_blocks)} must be non-empty indices into the "
                             f"{depth} encoder blocks")
        if not propagation_dims:
            raise ValueError("propagation_dims needs at least one width")
        self.num_parts, self.num_categories = num_parts, num_categories
        self.fetch_blocks = tuple(int(b) for b in fetch_blocks)
        self.label_smoothing = label_smoothing
        self.group = Group(num_group, group_size)
        self.encoder = PointMAEEncoder(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            drop_path=drop_path, encoder_dims=encoder_dims, pointnet_dims=pointnet_dims, pos_hidden=pos_hidden)
        feat = embed_dim * len(self.fetch_blocks)  # concatenated block features per patch
        self.label_conv = nn.Sequential(nn.Conv1d(num_categories, label_dim, 1, bias=False),
                                        nn.BatchNorm1d(label_dim), nn.LeakyReLU(0.2))
        self.propagation = _pointwise_mlp(3 + feat, propagation_dims)
        head_in = propagation_dims[-1] + 2 * feat + label_dim
        h1, rest = head_dims[0], head_dims[1:]
        self.convs1 = nn.Conv1d(head_in, h1, 1)
        self.bns1 = nn.BatchNorm1d(h1)
        self.dp1 = nn.Dropout(dropout)
        self.hidden = _pointwise_mlp(h1, rest)  # official: convs2 + bns2 + ReLU
        self.convs3 = nn.Conv1d(head_dims[-1], num_parts, 1)
        for m in (self.label_conv, self.propagation, self.convs1, self.hidden, self.convs3):
            m.apply(init_trunc_normal)

    def forward_features(self, points: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
        """points: (B, N, 3), cls_label: (B,) -> per-point head input (B, C_in, N)."""
        b, n, _ = points.shape
        grouped = self.group(points)
        blocks = self.encoder.block_features(grouped, self.fetch_blocks)
        x = torch.cat(blocks.features, dim=-1)  # (B, G, 3D)
        global_feat = torch.cat([x.amax(dim=1), x.mean(dim=1)], dim=-1)  # (B, 6D)
        onehot = F.one_hot(cls_label.long(), self.num_categories).to(x.dtype)
        label = self.label_conv(rearrange(onehot, "b c -> b c 1"))  # (B, label_dim, 1)
        interp = three_nn_interpolate(points, grouped.center, x)  # (B, N, 3D)
        prop = self.propagation(rearrange(torch.cat([points, interp.to(points.dtype)], dim=-1), "b n c -> b c n"))
        glob = repeat(torch.cat([global_feat, rearrange(label, "b c 1 -> b c")], dim=-1), "b c -> b c n", n=n)
        return torch.cat([prop, glob], dim=1)

    def forward(self, batch: dict) -> SegmentationOutput:
        points, cls_label = _check_seg_batch(batch, self.num_categories)
        x = self.forward_features(points, cls_label)
        x = self.dp1(F.relu(self.bns1(self.convs1(x))))
        logits = rearrange(self.convs3(self.hidden(x)), "b p n -> b n p")
        loss = None
        if batch.get("seg") is not None:
            seg = batch["seg"].long()
            if seg.shape != logits.shape[:2]:
                raise ValueError(f"batch['seg'] must be (B, N) = {tuple(logits.shape[:2])}, got {tuple(seg.shape)}")
            loss = F.cross_entropy(rearrange(logits, "b n p -> b p n"), seg, label_smoothing=self.label_smoothing)
        return SegmentationOutput(loss=loss, logits=logits)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style groups for layer-wise LR decay: stem, encoder blocks, then the head."""
        return {
            "stem": r"^encoder\.patch_embed|^encoder\.patch_proj|^encoder\.pos_embed",
            "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))],
        }


def _check_seg_batch(batch: dict, num_categories: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, dict) or "points" not in batch or "cls_label" not in batch:
        raise TypeError("the batch must be a dict with 'points' (B, N, 3) and 'cls_label' (B,) tensors")
    points, cls_label = batch["points"], batch["cls_label"].reshape(-1)
    if points.dim() != 3 or points.shape[-1] < 3:
        raise ValueError(f"batch['points'] must be (B, N, 3), got {tuple(points.shape)}")
    if cls_label.shape[0] != points.shape[0]:
        raise ValueError(f"batch['cls_label'] has {cls_label.shape[0]} entries for {points.shape[0]} clouds")
    if cls_label.numel() and (int(cls_label.min()) < 0 or int(cls_label.max()) >= num_categories):
        raise ValueError(f"batch['cls_label'] values must lie in [0, {num_categories}), got "
                         f"{sorted(set(cls_label.tolist()))}")
    return points[..., :3].contiguous(), cls_label


def build_segmentation_model(model: PointMAEConfig, head: SegHeadConfig) -> PointMAESegmentation:
    """The part-segmentation model of a ``model`` (encoder) and ``head`` config section."""
    model.validate()
    head.validate()
    blocks = head.fetch_blocks or default_fetch_blocks(model.depth)
    prop = head.propagation_dims or (4 * model.embed_dim, 1024)
    return PointMAESegmentation(
        num_parts=head.num_parts, num_categories=head.num_categories, embed_dim=model.embed_dim,
        depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, qkv_bias=model.qkv_bias,
        drop_path=model.drop_path, encoder_dims=model.encoder_dims, pointnet_dims=tuple(model.pointnet_dims),
        pos_hidden=model.pos_hidden, num_group=model.num_group, group_size=model.group_size,
        fetch_blocks=blocks, label_dim=head.label_dim, propagation_dims=tuple(prop),
        head_dims=tuple(head.head_dims), dropout=head.dropout, label_smoothing=model.label_smoothing)
