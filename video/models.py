"""VideoMAE: masked video pretraining (encoder over visible tubelets + light decoder) and the
action-recognition classifier built on the same encoder.

Token layout. A clip ``(B, C, T, H, W)`` is cut into tubelets of ``tubelet x patch x patch``
pixels, giving a ``(T', H', W') = (T / tubelet, H / patch, W / patch)`` token grid ordered
``(t, h, w)`` row-major (the order of :mod:`mm3d.masking`). A token's pixels are flattened in the
``(pt ph pw c)`` order of VideoMAE's reconstruction target, so ``K = tubelet * patch^2 * C``.

Patch embedding. The weights are those of VideoMAE's ``Conv3d`` (``patch_embed.proj``, kernel =
stride = ``(tubelet, patch, patch)``), but the encoder applies them as the equivalent linear map
to the *visible* tubelets only: the clip is cut into tubelets (a reshape), the visible ones are
gathered, then embedded. Masked tubelets are neither embedded nor attended to, so changing
masked pixels cannot change the encoder output (tested).

Position embedding. Fixed sin-cos tables, kept as persistent buffers (``encoder.pos_embed``,
``decoder_pos_embed``) so a checkpoint carries the table it was trained with:
``sincos_1d`` is the official VideoMAE / Hugging Face table over the flattened token index (the
default, needed for checkpoint parity); ``sincos_3d`` splits the width over ``t``, ``h`` and
``w``. The tokens, the pixel target and the tables live in :mod:`mm3d.video.tokens`, whose
:func:`~mm3d.video.tokens.adapt_pos_embeds` resizes a checkpoint's tables to another grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from torch import nn

from mm3d.layers import (
    SDPAAttention, gather_tokens, init_trunc_normal, init_xavier, run_blocks, token_mask_count, vit_blocks)
from mm3d.masking import RUNNING_CELL_RATIOS, num_masked, scored_mask, video_mask, video_num_masked
from mm3d.registry import register_variant
from mm3d.targets import TargetConfig, build_target
from mm3d.task import ModelOutput
from mm3d.video.targets import PixelTarget, VideoTarget, motion_scores
from mm3d.video.tokens import PosEmbedKind, build_pos_embed, patchify, pixel_target, token_grid, unpatchify


__all__ = [
    "VideoMAEConfig",
    "VideoMAEPretrain",
    "VideoMAEPretrainOutput",
    "VideoMAEClassifier",
    "VideoClassifierOutput",
    "VideoMAEEncoder",
    "VideoMAEDecoder",
    "QVBiasAttention",
    "TubeletEmbed",
    "build_pretrain_model",
    "build_classifier",
]

# "motion": tokens with more frame-difference motion are masked more often (MGMAE-like; sampled from the clip)
EncoderMaskKind = Literal["tube", "random", "frame", "block", "motion"]


def encoder_num_masked(kind: EncoderMaskKind, grid: tuple[int, int, int], ratio: float) -> int:
    """Tokens per sample that an encoder mask of `kind` hides on a (T', H', W') grid."""
    if kind == "motion":
        return num_masked(math.prod(grid), ratio)
    return video_num_masked(kind, grid, ratio)


# --------------------------------------------------------------------------------------------
# Config and variants
# --------------------------------------------------------------------------------------------


@dataclass
class VideoMAEConfig:
    """The ``model`` section of a VideoMAE run (pretraining and classification share it).

    Widths follow VideoMAE: ``embed_dim``/``depth``/``num_heads`` for the encoder,
    ``decoder_*`` for the pretraining decoder. ``norm_eps`` is the LayerNorm eps of every block
    and of the encoder's final norm (official 1e-6; Hugging Face's default 1e-12);
    ``head_norm_eps`` that of the decoder's final norm and of ``fc_norm`` (None: ``norm_eps``;
    Hugging Face hard-codes 1e-5).
    """

    variant: str = ""
    # input and tokens
    img_size: int = 224
    num_frames: int = 16
    tubelet_size: int = 2
    patch_size: int = 16
    in_chans: int = 3
    # encoder
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # VideoMAE's learnable q and v biases (k has none)
    norm_eps: float = 1e-6
    head_norm_eps: float | None = None
    drop_path: float = 0.0  # stochastic depth, linear over depth (decoder too, as official)
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    init_values: float | None = None  # layer-scale init (None or 0: no layer scale)
    pos_embed: PosEmbedKind = "sincos_1d"
    grad_checkpointing: bool = False
    # pretraining decoder and loss
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    norm_pix_loss: bool = True
    target: TargetConfig = field(default_factory=TargetConfig)  # what the decoder predicts (pixel by default)
    encoder_norm: bool = True  # pretraining: the encoder ends with a LayerNorm (official; HF: use_mean_pooling=False)
    mask_type: EncoderMaskKind = "tube"
    mask_ratio: float = 0.9
    decoder_mask_type: Literal["running_cell"] | None = None  # VideoMAEv2 dual masking
    decoder_mask_ratio: float = 0.5  # share of tokens the decoder does NOT reconstruct
    # classification
    num_classes: int = 400
    use_mean_pooling: bool = True  # mean of tokens + fc_norm; False: final norm, first token
    cls_token: bool = False  # prepend a learnable class token (classifier; pooled when not mean)
    head_drop: float = 0.0  # dropout before the linear head
    head_init_scale: float = 0.001  # official fine-tuning scales the initial head by this
    label_smoothing: float = 0.0

    @property
    def grid(self) -> tuple[int, int, int]:
        """(T', H', W') token grid."""
        return token_grid(self.num_frames, self.img_size, self.tubelet_size, self.patch_size)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def validate(self) -> None:
        for name in ("img_size", "num_frames", "tubelet_size", "patch_size", "in_chans", "embed_dim",
                     "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames {self.num_frames} is not divisible by tubelet_size "
                             f"{self.tubelet_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                             f"decoder_num_heads {self.decoder_num_heads}")
        if self.pos_embed == "sincos_3d":
            for name in ("embed_dim", "decoder_embed_dim"):
                if getattr(self, name) % 2 or getattr(self, name) < 6:
                    raise ValueError(f"pos_embed sincos_3d needs an even {name} >= 6, "
                                     f"got {getattr(self, name)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if encoder_num_masked(self.mask_type, self.grid, self.mask_ratio) == 0:
            raise ValueError(f"mask_ratio {self.mask_ratio} masks no token of the {self.grid} grid "
                             f"with mask_type {self.mask_type!r}")
        if self.decoder_mask_type is not None:
            if self.decoder_mask_ratio not in RUNNING_CELL_RATIOS:
                raise ValueError(f"decoder_mask_ratio must be one of {RUNNING_CELL_RATIOS} for "
                                 f"running_cell, got {self.decoder_mask_ratio}")
            if self.grid[1] % 2 or self.grid[2] % 2:
                raise ValueError(f"running_cell decoder masking needs an even token grid, got {self.grid}")
        for name in ("drop_path", "attn_drop", "proj_drop", "head_drop", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")


def _variant(name: str, description: str, **kw: Any) -> None:
    cfg = VideoMAEConfig(variant=name, **kw)
    cfg.validate()
    register_variant(name, "video", cfg, description)


# Official widths: MCG-NJU/VideoMAE modeling_pretrain.py (decoder 192/384/512/640 wide with
# 3/6/8/8 heads); decoder depth 4 for S/B, 12 for L/H (the released K400 scripts).
_variant("videomae_small", "VideoMAE ViT-S/16, 16x224^2, tubelet 2 (decoder 192 wide, 4 deep)",
         embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=192, decoder_num_heads=3)
_variant("videomae_base", "VideoMAE ViT-B/16, 16x224^2, tubelet 2 (decoder 384 wide, 4 deep)",
         embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384, decoder_num_heads=6)
_variant("videomae_large", "VideoMAE ViT-L/16, 16x224^2, tubelet 2 (decoder 512 wide, 12 deep)",
         embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_num_heads=8,
         decoder_depth=12)
_variant("videomae_huge", "VideoMAE ViT-H/16, 16x224^2, tubelet 2 (decoder 640 wide, 12 deep)",
         embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=640, decoder_num_heads=8,
         decoder_depth=12)
_variant("videomae_tiny", "tiny VideoMAE for the CPU demo: 8x64^2 clips, patch 8, width 128, depth 4, "
         "decoder 128 wide and 2 deep, 3-D sin-cos positions",
         img_size=64, num_frames=8, patch_size=8, embed_dim=128, depth=4, num_heads=4,
         decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, num_classes=9, pos_embed="sincos_3d")
_variant("videomae_tiny_test", "minimal VideoMAE for unit tests: 4x32^2 clips, patch 8, width 48, depth 2",
         img_size=32, num_frames=4, patch_size=8, embed_dim=48, depth=2, num_heads=3,
         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75, num_classes=5)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class QVBiasAttention(SDPAAttention):
    """timm's SDPA attention with VideoMAE's biases: learnable ``q_bias`` and ``v_bias``, none on k.

    The projection weights keep timm's fused ``qkv`` layout ((3 * D, D) ordered q, k, v), which
    is also VideoMAE's. Accepts timm ``Attention`` keyword arguments, so it plugs into timm's
    ``Block(attn_layer=...)``. x: (B, L, D) -> (B, L, D).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kwargs: Any) -> None:
        super().__init__(dim, num_heads=num_heads, qkv_bias=False, **kwargs)
        # `gate` exists from timm 1.0.28 and `attn_dim` from 1.0.23; read neither, so older timm works
        assert getattr(self, "gate", None) is None, "gated attention is not part of VideoMAE"
        attn_dim = self.num_heads * self.head_dim
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(attn_dim))
            self.v_bias = nn.Parameter(torch.zeros(attn_dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)

    def qkv_proj(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return F.linear(x, self.qkv.weight, bias)


def _blocks(*, dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_eps: float,
            drop_path: float, attn_drop: float, proj_drop: float, init_values: float | None) -> nn.ModuleList:
    """VideoMAE's block stack: timm blocks with q/v-bias attention and LayerNorm(eps=norm_eps)."""
    return vit_blocks(dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      drop_path=drop_path, norm_layer=partial(nn.LayerNorm, eps=norm_eps),
                      attn_layer=QVBiasAttention, init_values=init_values, attn_drop=attn_drop,
                      proj_drop=proj_drop)


class TubeletEmbed(nn.Module):
    """Tubelet embedding with VideoMAE's ``Conv3d`` weights (``proj``), applied as a linear map.

    Applying it to tokens from :func:`patchify` equals the strided convolution, token by token,
    so only the tokens that are passed in (the visible ones) are embedded.
    """

    def __init__(self, *, in_chans: int, embed_dim: int, tubelet_size: int, patch_size: int) -> None:
        super().__init__()
        self.tubelet_size, self.patch_size, self.in_chans = tubelet_size, patch_size, in_chans
        k = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (B, L, K) tubelets in (pt ph pw c) layout. Returns (B, L, D)."""
        weight = rearrange(self.proj.weight, "d c pt ph pw -> d (pt ph pw c)")
        return F.linear(patches, weight, self.proj.bias)


class VideoMAEEncoder(nn.Module):
    """ViT encoder over the visible tubelets (all of them when no mask is given)."""

    def __init__(self, *, img_size: int, num_frames: int, tubelet_size: int, patch_size: int, in_chans: int,
                 embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 norm_eps: float, drop_path: float, attn_drop: float, proj_drop: float,
                 init_values: float | None, pos_embed: PosEmbedKind, final_norm: bool,
                 cls_token: bool = False, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.grid = token_grid(num_frames, img_size, tubelet_size, patch_size)
        self.tubelet_size, self.patch_size, self.in_chans = tubelet_size, patch_size, in_chans
        self.embed_dim = embed_dim
        self.pos_embed_kind = pos_embed
        self.patch_embed = TubeletEmbed(in_chans=in_chans, embed_dim=embed_dim, tubelet_size=tubelet_size,
                                        patch_size=patch_size)
        self.register_buffer("pos_embed", build_pos_embed(pos_embed, self.grid, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.blocks = _blocks(dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                              qkv_bias=qkv_bias, norm_eps=norm_eps, drop_path=drop_path,
                              attn_drop=attn_drop, proj_drop=proj_drop, init_values=init_values)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm else nn.Identity()
        self.grad_checkpointing = grad_checkpointing

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def forward_patches(self, patches: torch.Tensor, mask: torch.Tensor | None = None, *,
                        num_masked: int | None = None) -> torch.Tensor:
        """patches: (B, L, K) from :func:`patchify`; mask: (B, L) bool, True = masked (dropped).
        `num_masked`: the masked count per sample when the mask came from our own generator (the
        mask is then not read back to the host; see :func:`mm3d.layers.token_mask_count`).

        Returns (B, L_vis (+1 with a class token first), D), visible tokens in token order.
        """
        if patches.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tubelets for grid {self.grid}, got "
                             f"{patches.shape[1]}; clips must be {self.grid[0] * self.tubelet_size}x"
                             f"{self.grid[1] * self.patch_size}x{self.grid[2] * self.patch_size} (T x H x W)")
        pos = self.pos_embed.to(patches.dtype)
        if mask is not None:
            n_vis = self.num_tokens - token_mask_count(mask, patches.shape[0], self.num_tokens, "mask",
                                                       expected=num_masked)
            patches, pos = gather_tokens(patches, ~mask, n_vis), gather_tokens(pos, ~mask, n_vis)
        x = self.patch_embed(patches) + pos
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x, _ = run_blocks(self.blocks, x, grad_checkpointing=self.grad_checkpointing)
        return self.norm(x)

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """video: (B, C, T, H, W) normalised clip; mask: (B, L) bool, True = masked.

        Returns (B, L_vis, D) (L_vis = L without a mask; one more with a class token).
        """
        if video.shape[1] != self.in_chans:
            raise ValueError(f"video must have {self.in_chans} channels on axis 1 (B, C, T, H, W), got "
                             f"shape {tuple(video.shape)}")
        return self.forward_patches(patchify(video, self.tubelet_size, self.patch_size), mask)

    def forward_hidden(self, video: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
        """The outputs of the blocks whose indices are in `blocks` for the FULL clip (no mask, no final
        norm; a class token dropped), as teachers read them. Blocks above the highest index are not run.

        video: (B, C, T, H, W) normalised clip. Returns one (B, L, D) tensor per index, in block order.
        """
        blocks = sorted(set(blocks))
        if not blocks or blocks[0] < 0 or blocks[-1] >= len(self.blocks):
            raise ValueError(f"block indices must lie in [0, {len(self.blocks)}), got {blocks}")
        patches = patchify(video, self.tubelet_size, self.patch_size)
        x = self.patch_embed(patches) + self.pos_embed.to(patches.dtype)
        skip = 0
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            skip = 1
        _, tapped = run_blocks(self.blocks[:blocks[-1] + 1], x, grad_checkpointing=self.grad_checkpointing,
                               taps=blocks)
        return [h[:, skip:] for h in tapped]


class VideoMAEDecoder(nn.Module):
    """Light transformer that predicts the pixels of the last `num_out` tokens of its input."""

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 norm_eps: float, head_norm_eps: float, drop_path: float, attn_drop: float,
                 proj_drop: float, init_values: float | None, out_dim: int,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.blocks = _blocks(dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                              qkv_bias=qkv_bias, norm_eps=norm_eps, drop_path=drop_path,
                              attn_drop=attn_drop, proj_drop=proj_drop, init_values=init_values)
        self.norm = nn.LayerNorm(embed_dim, eps=head_norm_eps)
        self.head = nn.Linear(embed_dim, out_dim)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor, num_out: int) -> torch.Tensor:
        """x: (B, L_in, D_dec). Returns (B, num_out, K) for the last `num_out` tokens."""
        x, _ = run_blocks(self.blocks, x, grad_checkpointing=self.grad_checkpointing)
        return self.head(self.norm(x[:, x.shape[1] - num_out:]))




# --------------------------------------------------------------------------------------------
# Pretraining model
# --------------------------------------------------------------------------------------------


@dataclass
class VideoMAEPretrainOutput(ModelOutput):
    """loss: () the target's loss (MSE for pixels) over the tokens that are both masked and decoded.

    pred: (B, L_dec, K) predictions for the decoded tokens, in token order; K is the target's
    ``out_dim`` (pixels: the (pt ph pw c) layout, per-tubelet normalised units with ``norm_pix``).
    target: (B, L_dec, K) the target of the same tokens.
    mask: (B, L) bool encoder mask, True = hidden from the encoder.
    decoded: (B, L) bool, True at the tokens `pred` covers (= `mask` without decoder masking).
    """

    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    decoded: torch.Tensor


class VideoMAEPretrain(nn.Module):
    """VideoMAE masked autoencoder (with optional VideoMAEv2 dual masking).

    State-dict names follow the official VideoMAE pretraining model (``encoder.*``,
    ``encoder_to_decoder``, ``mask_token``, ``decoder.*``) except timm's block internals
    (``ls1.gamma`` for ``gamma_1``) and the persistent position tables
    (``encoder.pos_embed``, ``decoder_pos_embed``).

    `target` (a :class:`~mm3d.video.targets.VideoTarget`; None: VideoMAE's pixels with
    ``norm_pix_loss``) gives what the decoder predicts, the head's width and the per-token loss
    (``target.loss``, from :data:`mm3d.registry.LOSSES`). The target is registered last, so its
    persistent state (an EMA teacher's ``target.teacher.*``) follows the official keys.
    """

    def __init__(self, *, img_size: int = 224, num_frames: int = 16, tubelet_size: int = 2,
                 patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-6,
                 head_norm_eps: float = 1e-6, drop_path: float = 0.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, init_values: float | None = None,
                 pos_embed: PosEmbedKind = "sincos_1d", decoder_embed_dim: int = 384, decoder_depth: int = 4,
                 decoder_num_heads: int = 6, norm_pix_loss: bool = True, mask_type: EncoderMaskKind = "tube",
                 mask_ratio: float = 0.9, decoder_mask_type: Literal["running_cell"] | None = None,
                 decoder_mask_ratio: float = 0.5, pixel_mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                 pixel_std: tuple[float, ...] = IMAGENET_DEFAULT_STD, grad_checkpointing: bool = False,
                 encoder_norm: bool = True, target: VideoTarget | None = None) -> None:
        super().__init__()
        if len(pixel_mean) != in_chans or len(pixel_std) != in_chans:
            raise ValueError(f"pixel_mean/pixel_std need {in_chans} values, got {pixel_mean}, {pixel_std}")
        if target is None:
            target = PixelTarget(in_chans=in_chans, tubelet_size=tubelet_size, patch_size=patch_size,
                                 pixel_mean=pixel_mean, pixel_std=pixel_std, norm_pix=norm_pix_loss)
        self.tubelet_size, self.patch_size, self.in_chans = tubelet_size, patch_size, in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mask_type, self.mask_ratio = mask_type, mask_ratio
        self.decoder_mask_type, self.decoder_mask_ratio = decoder_mask_type, decoder_mask_ratio
        self.pos_embed_kind = pos_embed
        self.encoder = VideoMAEEncoder(
            img_size=img_size, num_frames=num_frames, tubelet_size=tubelet_size, patch_size=patch_size,
            in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, norm_eps=norm_eps, drop_path=drop_path, attn_drop=attn_drop,
            proj_drop=proj_drop, init_values=init_values, pos_embed=pos_embed, final_norm=encoder_norm,
            grad_checkpointing=grad_checkpointing)
        self.grid = self.encoder.grid
        self.encoder_to_decoder = nn.Linear(embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", build_pos_embed(pos_embed, self.grid, decoder_embed_dim))
        self.decoder = VideoMAEDecoder(
            embed_dim=decoder_embed_dim, depth=decoder_depth, num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, norm_eps=norm_eps, head_norm_eps=head_norm_eps, drop_path=drop_path,
            attn_drop=attn_drop, proj_drop=proj_drop, init_values=init_values,
            out_dim=target.out_dim, grad_checkpointing=grad_checkpointing)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)
        self.apply(init_xavier)
        trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        self.target = target  # after the initialisation: a loaded teacher keeps its weights
        self.target.start(self.encoder)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """The trainer's hook after every optimizer step: the target follows the student (EMA)."""
        self.target.after_optimizer_step(step, total_steps, self.encoder)

    @property
    def reconstructs_pixels(self) -> bool:
        """Whether predictions are pixels (:meth:`reconstruct` and the reconstruction pictures need it)."""
        return isinstance(self.target, PixelTarget)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def sample_masks(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None, *,
                     video: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder mask (B, L), decoder mask (B, L) or None), both bool with True = masked.

        video: (B, C, T, H, W) normalised clip, needed by ``mask_type="motion"`` (tokens masked with
        probability increasing in their frame-difference motion, :func:`mm3d.masking.scored_mask`).
        """
        if self.mask_type == "motion":
            if video is None:
                raise ValueError("mask_type 'motion' samples its mask from the clip: pass video=")
            pixels = video.float() * self.pixel_std[:, None, None, None] + self.pixel_mean[:, None, None, None]
            mask = scored_mask(motion_scores(pixels, self.tubelet_size, self.patch_size), self.mask_ratio,
                               generator=generator)
        else:
            mask = video_mask(self.mask_type, batch_size, self.grid, self.mask_ratio, generator=generator,
                              device=device)
        dec = None
        if self.decoder_mask_type is not None:
            dec = video_mask(self.decoder_mask_type, batch_size, self.grid, self.decoder_mask_ratio,
                             generator=generator, device=device)
        return mask, dec

    def _num_decoded(self) -> int:
        """Tokens per sample that a sampled decoder mask leaves to reconstruct."""
        return self.num_tokens - video_num_masked(self.decoder_mask_type, self.grid, self.decoder_mask_ratio)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "encoder.pos_embed", "decoder_pos_embed"}

    # timm's feature interface. The pretraining model has no classifier (num_classes 0, as a timm model
    # made with num_classes=0): forward_head returns the pooled feature.
    num_classes = 0

    @property
    def num_features(self) -> int:
        """Width D of the pooled feature (:meth:`forward_head`)."""
        return self.encoder.embed_dim

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """video: (B, C, T, H, W) normalised clip. Returns the encoder's tokens (B, L, D) over the whole
        clip, no masking (after the final norm when the model has one)."""
        return self.encoder(video)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: (B, L, D) from :meth:`forward_features`. Returns their mean (B, D) (no head, so
        `pre_logits` changes nothing)."""
        return features.mean(dim=1)

    def reset_classifier(self, num_classes: int) -> None:
        """Only 0 (no head) fits a pretraining model; build a classifier for classes
        (``mm3d.create_model(..., num_classes=N)`` loads these weights into one)."""
        if num_classes != 0:
            raise ValueError(f"a VideoMAE pretraining model has no classifier to reset to {num_classes} classes; "
                             f"build the classifier with mm3d.create_model(..., num_classes={num_classes})")

    def forward(self, batch: dict[str, torch.Tensor]) -> VideoMAEPretrainOutput:
        """batch["video"]: (B, C, T, H, W) clip normalised with the ImageNet mean/std.

        Optional batch["mask"]: (B, L) bool encoder mask (True = masked), sampled from
        ``mask_type``/``mask_ratio`` when absent; optional batch["decoder_mask"]: (B, L) bool, True
        = not reconstructed (VideoMAEv2), sampled when ``decoder_mask_type`` is set.
        """
        video = batch["video"]
        b = video.shape[0]
        patches = patchify(video, self.tubelet_size, self.patch_size)  # (B, L, K)
        mask, dec_mask = batch.get("mask"), batch.get("decoder_mask")
        n_mask = n_dec = None  # counts our own generators guarantee (then no host read)
        if mask is None:
            mask, sampled_dec = self.sample_masks(b, video.device, video=video)
            n_mask = encoder_num_masked(self.mask_type, self.grid, self.mask_ratio)
            if dec_mask is None and sampled_dec is not None:
                dec_mask, n_dec = sampled_dec, self._num_decoded()
        elif dec_mask is None and self.decoder_mask_type is not None:
            dec_mask = video_mask(self.decoder_mask_type, b, self.grid, self.decoder_mask_ratio,
                                  device=video.device)
            n_dec = self._num_decoded()
        if dec_mask is None:
            n_dec = n_mask
        n_mask = token_mask_count(mask, b, self.num_tokens, "mask", expected=n_mask)
        decoded = mask if dec_mask is None else ~dec_mask
        num_dec = token_mask_count(decoded, b, self.num_tokens, "decoded tokens (~decoder_mask)", expected=n_dec)
        n_vis = self.num_tokens - n_mask

        x_vis = self.encoder_to_decoder(self.encoder.forward_patches(patches, mask, num_masked=n_mask))  # (B, V, Dd)
        pos = self.decoder_pos_embed.to(x_vis.dtype)
        x = torch.cat([x_vis + gather_tokens(pos, ~mask, n_vis),
                       self.mask_token.to(x_vis.dtype) + gather_tokens(pos, decoded, num_dec)], dim=1)
        pred = self.decoder(x, num_dec)  # (B, L_dec, K)

        target = self.target(video, patches, decoded, num_dec)  # (B, L_dec, K), no gradient
        weight = None
        if dec_mask is not None:  # VideoMAEv2: only tokens that are both hidden from the encoder and decoded count
            weight = gather_tokens(mask[..., None], decoded, num_dec)[..., 0].float()
        loss = self.target.loss(pred, target, weight)
        return VideoMAEPretrainOutput(loss=loss, pred=pred, target=target, mask=mask, decoded=decoded)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pixels of the masked tokens in the input's normalised space.

        video: (B, C, T, H, W) normalised clip; mask: (B, L) bool. Returns (B, C, T, H, W): the
        input where visible, the prediction where masked. With ``norm_pix_loss`` each predicted
        tubelet is un-normalised with its own true per-channel mean and std. Needs a pixel target.
        """
        if not self.reconstructs_pixels:
            raise ValueError(f"reconstruct needs pixel predictions; this model predicts "
                             f"model.target.kind={self.target.kind!r}")
        out = self.forward({"video": video, "mask": mask, "decoder_mask": ~mask})
        patches = patchify(video, self.tubelet_size, self.patch_size)
        pix = pixel_target(patches, self.in_chans, self.pixel_mean, self.pixel_std, norm_pix=False)
        pred = rearrange(out.pred.float(), "b l (p c) -> b l p c", c=self.in_chans)
        if self.target.norm_pix:
            true = rearrange(gather_tokens(pix, mask, out.pred.shape[1]), "b l (p c) -> b l p c", c=self.in_chans)
            pred = pred * (true.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6) \
                + true.mean(dim=-2, keepdim=True)
        pred = (pred - self.pixel_mean) / self.pixel_std  # back to the input's normalisation
        full = patches.clone().float()
        full[mask] = rearrange(pred, "b l p c -> (b l) (p c)")
        return unpatchify(full.to(video.dtype), self.grid, self.tubelet_size, self.patch_size)


# --------------------------------------------------------------------------------------------
# Classification model
# --------------------------------------------------------------------------------------------


@dataclass
class VideoClassifierOutput(ModelOutput):
    """loss: () cross-entropy (None without labels); logits: (B, num_classes)."""

    logits: torch.Tensor


class VideoMAEClassifier(nn.Module):
    """VideoMAE encoder over all tokens, pooled, then ``fc_norm``, dropout and a linear head.

    Pooling: the mean of the tokens followed by ``fc_norm`` (``use_mean_pooling``, the official
    default), else the encoder's final norm and the first token (the class token with
    ``cls_token``; the first tubelet otherwise, as the official and Hugging Face models do).
    """

    def __init__(self, *, num_classes: int, img_size: int = 224, num_frames: int = 16, tubelet_size: int = 2,
                 patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-6,
                 head_norm_eps: float = 1e-6, drop_path: float = 0.1, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, init_values: float | None = None,
                 pos_embed: PosEmbedKind = "sincos_1d", use_mean_pooling: bool = True, cls_token: bool = False,
                 head_drop: float = 0.0, head_init_scale: float = 0.001, label_smoothing: float = 0.0,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.num_classes, self.use_mean_pooling = num_classes, use_mean_pooling
        self.label_smoothing, self.head_init_scale = label_smoothing, head_init_scale
        self.pos_embed_kind = pos_embed
        self.encoder = VideoMAEEncoder(
            img_size=img_size, num_frames=num_frames, tubelet_size=tubelet_size, patch_size=patch_size,
            in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, norm_eps=norm_eps, drop_path=drop_path, attn_drop=attn_drop,
            proj_drop=proj_drop, init_values=init_values, pos_embed=pos_embed,
            final_norm=not use_mean_pooling, cls_token=cls_token, grad_checkpointing=grad_checkpointing)
        self.grid = self.encoder.grid
        self.num_features = embed_dim
        self.fc_norm = nn.LayerNorm(embed_dim, eps=head_norm_eps) if use_mean_pooling else None
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_trunc_normal)
        if self.encoder.cls_token is not None:
            trunc_normal_(self.encoder.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed", "encoder.cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm parameter grouping for layer-wise LR decay, as official VideoMAE fine-tuning:
        embeddings (layer 0), block i (layer i + 1), then the final norms and the head together
        (unmatched, so timm puts them in the last layer, LR scale 1)."""
        return {"stem": r"^encoder\.(?:cls_token|pos_embed|patch_embed)",
                "blocks": r"^encoder\.blocks\.(\d+)"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear head for `num_classes` classes, initialised as the constructor does
        (0: no head; :meth:`forward` then returns the pooled features as ``logits``)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        device = self.encoder.patch_embed.proj.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            init_trunc_normal(self.head)
            with torch.no_grad():
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """video: (B, C, T, H, W) normalised clip. Returns the encoder's tokens over the whole clip,
        no masking: (B, L, D), with the class token first (B, 1 + L, D) when the model has one."""
        return self.encoder(video)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: (B, L (+1), D) from :meth:`forward_features`. Returns the pooled (B, D) (mean of
        the tokens then ``fc_norm``, or the first token) with `pre_logits`, else (B, num_classes) logits."""
        if self.use_mean_pooling:
            tokens = features[:, 1:] if self.encoder.cls_token is not None else features
            pooled = self.fc_norm(tokens.mean(dim=1))
        else:
            pooled = features[:, 0]
        return pooled if pre_logits else self.head(self.head_drop(pooled))

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> VideoClassifierOutput:
        """batch["video"] (or `batch` itself, a tensor): (B, C, T, H, W); optional batch["label"]: (B,)
        class ids or (B, num_classes) soft targets (mixup). The loss is cross-entropy (soft-target CE
        for 2-D targets)."""
        if isinstance(batch, torch.Tensor):
            batch = {"video": batch}
        logits = self.forward_head(self.forward_features(batch["video"]))
        label = batch.get("label")
        loss = None
        if label is not None:
            if label.dim() == 2:
                if label.shape != logits.shape:
                    raise ValueError(f"soft targets must be {tuple(logits.shape)}, got {tuple(label.shape)}")
                loss = torch.sum(-label.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits.float(), label.long(), label_smoothing=self.label_smoothing)
        return VideoClassifierOutput(loss=loss, logits=logits)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _common_kwargs(cfg: VideoMAEConfig) -> dict[str, Any]:
    return dict(img_size=cfg.img_size, num_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size,
                patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_eps=cfg.norm_eps,
                head_norm_eps=cfg.norm_eps if cfg.head_norm_eps is None else cfg.head_norm_eps,
                drop_path=cfg.drop_path, attn_drop=cfg.attn_drop, proj_drop=cfg.proj_drop,
                init_values=cfg.init_values or None, pos_embed=cfg.pos_embed,
                grad_checkpointing=cfg.grad_checkpointing)


def build_pretrain_model(cfg: VideoMAEConfig) -> VideoMAEPretrain:
    """The pretraining model described by `cfg`."""
    cfg.validate()
    mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if cfg.in_chans == 3 else \
        ((0.0,) * cfg.in_chans, (1.0,) * cfg.in_chans)  # no un-normalisation beyond RGB
    target = build_target("video", cfg.target, in_chans=cfg.in_chans, tubelet_size=cfg.tubelet_size,
                          patch_size=cfg.patch_size, img_size=cfg.img_size, grid=cfg.grid, pixel_mean=tuple(mean),
                          pixel_std=tuple(std), norm_pix_loss=cfg.norm_pix_loss, embed_dim=cfg.embed_dim,
                          depth=cfg.depth)
    return VideoMAEPretrain(**_common_kwargs(cfg), decoder_embed_dim=cfg.decoder_embed_dim,
                            decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads,
                            norm_pix_loss=cfg.norm_pix_loss, mask_type=cfg.mask_type, mask_ratio=cfg.mask_ratio,
                            decoder_mask_type=cfg.decoder_mask_type, decoder_mask_ratio=cfg.decoder_mask_ratio,
                            pixel_mean=tuple(mean), pixel_std=tuple(std), encoder_norm=cfg.encoder_norm,
                            target=target)


def build_classifier(cfg: VideoMAEConfig, num_classes: int | None = None) -> VideoMAEClassifier:
    """The classifier described by `cfg` (`num_classes` overrides ``cfg.num_classes``)."""
    cfg.validate()
    return VideoMAEClassifier(**_common_kwargs(cfg), num_classes=cfg.num_classes if num_classes is None
                              else num_classes, use_mean_pooling=cfg.use_mean_pooling, cls_token=cfg.cls_token,
                              head_drop=cfg.head_drop, head_init_scale=cfg.head_init_scale,
                              label_smoothing=cfg.label_smoothing)
