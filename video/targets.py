"""VideoMAE's prediction targets (``model.target.kind``) and the motion-guided mask's scores.

Every target maps the clip, plus what the model exposes, to one vector per *decoded* token; the
decoder's head is ``out_dim`` wide and the loss comes from :data:`mm3d.registry.LOSSES`
(``model.target.loss``, else the kind's ``default_loss``). The model calls every kind the same way
(:meth:`VideoTarget.forward`), so neither the model nor the trainer branches on the kind.

========  ==================================================================  ============
kind      per-token target                                                    default loss
========  ==================================================================  ============
pixel     the tubelet's pixels, per-tubelet normalised with ``norm_pix``      mse
          (VideoMAE; the default, exactly today's loss)
hog       HOG of the tubelet's first frame, per colour channel (MaskFeat)     mse
teacher   features of a frozen encoder over the full clip (SIGMA / MVD)       mse
ema       top-K block average of an EMA copy of the student (data2vec)        smooth_l1
========  ==================================================================  ============

Token layout: a clip (B, C, T, H, W) gives L = T'H'W' tubelets of ``tubelet x patch x patch``
pixels in (t, h, w) order (:func:`mm3d.video.tokens.patchify`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from mm3d.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_model_weights
from mm3d.config import ConfigError, config_from_dict
from mm3d.layers import gather_tokens
from mm3d.registry import register_target
from mm3d.targets import Target, TargetConfig
from mm3d.teacher import FrozenModule, ema_momentum, ema_update_, frozen_copy, layer_average, teacher_layers
from mm3d.video.tokens import adapt_pos_embeds, pixel_target

__all__ = [
    "VideoTarget",
    "PixelTarget",
    "HOGTarget",
    "TeacherTarget",
    "EMATarget",
    "hog",
    "motion_scores",
    "load_teacher_encoder",
]


# --------------------------------------------------------------------------------------------
# Base
# --------------------------------------------------------------------------------------------


class VideoTarget(Target):
    """A VideoMAE target. Subclasses set ``default_loss`` and ``uses_teacher``, pass ``out_dim``
    and the configured loss to :class:`~mm3d.targets.Target`, and implement :meth:`compute`;
    :meth:`forward` runs it under ``no_grad``.

    ``start(student)`` is called once by the model after its own initialisation, with the student
    encoder (the EMA target copies it there; others ignore it).
    """

    def start(self, student: nn.Module) -> None:
        """Called once with the freshly initialised student encoder."""

    def forward(self, video: torch.Tensor, patches: torch.Tensor, decoded: torch.Tensor,
                num_decoded: int) -> torch.Tensor:
        """video: (B, C, T, H, W) normalised clip; patches: (B, L, K) its tubelets
        (:func:`~mm3d.video.tokens.patchify`); decoded: (B, L) bool, True at the tokens to predict,
        `num_decoded` of them in every row. Returns (B, num_decoded, out_dim) targets in token order."""
        with torch.no_grad():
            return self.compute(video, patches, decoded, num_decoded)

    def compute(self, video: torch.Tensor, patches: torch.Tensor, decoded: torch.Tensor,
                num_decoded: int) -> torch.Tensor:
        raise NotImplementedError


def _unnormalise(video: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """video: (B, C, T, H, W) normalised with mean/std (C,). Returns it in [0, 1] pixel units, float."""
    v = video.float()
    return v * std.to(v)[:, None, None, None] + mean.to(v)[:, None, None, None]


# --------------------------------------------------------------------------------------------
# pixel (VideoMAE)
# --------------------------------------------------------------------------------------------


@register_target("video", "pixel", default=True)
class PixelTarget(VideoTarget):
    """VideoMAE's target: the tubelet's pixels in [0, 1], each tubelet normalised per channel over
    its ``tubelet * patch^2`` pixels when ``norm_pix`` (:func:`~mm3d.video.tokens.pixel_target`).
    ``out_dim = tubelet * patch^2 * C`` in (pt ph pw c) order."""

    default_loss: ClassVar[str] = "mse"
    uses_teacher: ClassVar[bool] = False

    def __init__(self, *, in_chans: int, tubelet_size: int, patch_size: int, pixel_mean: tuple[float, ...],
                 pixel_std: tuple[float, ...], norm_pix: bool, loss: str = "", loss_beta: float = 1.0) -> None:
        super().__init__(in_chans * tubelet_size * patch_size ** 2, loss=loss, loss_beta=loss_beta)
        self.in_chans, self.norm_pix = in_chans, norm_pix
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_config(cls, tcfg: TargetConfig, **facts: Any) -> "PixelTarget":
        norm_pix = facts["norm_pix_loss"] if tcfg.norm_pix is None else tcfg.norm_pix
        return cls(in_chans=facts["in_chans"], tubelet_size=facts["tubelet_size"], patch_size=facts["patch_size"],
                   pixel_mean=facts["pixel_mean"], pixel_std=facts["pixel_std"], norm_pix=norm_pix,
                   loss=tcfg.loss, loss_beta=tcfg.loss_beta)

    def compute(self, video, patches, decoded, num_decoded):
        return pixel_target(gather_tokens(patches, decoded, num_decoded), self.in_chans, self.pixel_mean,
                            self.pixel_std, self.norm_pix)


# --------------------------------------------------------------------------------------------
# hog (MaskFeat)
# --------------------------------------------------------------------------------------------

GradientKernel = Literal["sobel", "central"]


def _gaussian_window(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size, size) Gaussian with std size / 2 centred on the window (MaskFeat's ``get_gkern``),
    scaled to sum 1 (the scale cancels in the per-cell L2 normalisation)."""
    n = torch.arange(size, device=device, dtype=dtype)
    g = torch.exp(-0.5 * ((n - n.mean()) / (size // 2)) ** 2)
    w = torch.outer(g, g)
    return w / w.sum()


def hog(frames: torch.Tensor, *, bins: int = 9, cell: int = 8, window: int = 0,
        kernel: GradientKernel = "sobel") -> torch.Tensor:
    """Per-channel histograms of oriented gradients, MaskFeat's variant (SlowFast ``HOGLayerC``).

    frames: (N, C, H, W) images (any per-channel affine scaling of the pixels gives the same
    result up to the normalisation's eps, since each channel's cells are normalised on their own).
    Gradients by a 3x3 ``kernel`` per channel (``sobel`` as MaskFeat; ``central`` [-1, 0, 1]
    differences as :func:`skimage.feature.hog`) after reflect padding; unsigned orientations
    (0-180 degrees) hard-assigned to `bins` equal bins, weighted by the gradient magnitude (times a
    `window` x `window` Gaussian tiled over the image when `window` > 0); summed over
    `cell` x `cell` cells; each cell's histogram L2-normalised per channel (no block normalisation).
    Angles are measured as MaskFeat's ``atan2(gx, gy)``.

    Returns (N, C, bins, H / cell, W / cell).
    """
    if frames.dim() != 4:
        raise ValueError(f"frames must be (N, C, H, W), got shape {tuple(frames.shape)}")
    n, c, h, w = frames.shape
    if h % cell or w % cell:
        raise ValueError(f"HOG cells of {cell} pixels do not tile {h}x{w} frames")
    if window and (h % window or w % window):
        raise ValueError(f"a HOG Gaussian window of {window} pixels does not tile {h}x{w} frames")
    with torch.autocast(frames.device.type, enabled=False):  # angles and bins in full precision
        return _hog(frames.float() if frames.dtype in (torch.float16, torch.bfloat16) else frames,
                    bins=bins, cell=cell, window=window, kernel=kernel)


def _hog(frames: torch.Tensor, *, bins: int, cell: int, window: int, kernel: GradientKernel) -> torch.Tensor:
    n, c, h, w = frames.shape
    x = F.pad(rearrange(frames, "n c h w -> (n c) 1 h w"), (1, 1, 1, 1), mode="reflect")
    if kernel == "sobel":
        kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    elif kernel == "central":
        kx = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    else:
        raise ValueError(f"unknown gradient kernel {kernel!r}; expected 'sobel' or 'central'")
    weight = torch.stack([kx, kx.T])[:, None].to(x)  # (2, 1, 3, 3): d/dx, d/dy
    gx, gy = F.conv2d(x, weight).unbind(dim=1)  # (NC, H, W) each
    magnitude = torch.hypot(gx, gy)
    if window:
        magnitude = magnitude * _gaussian_window(window, x.device, x.dtype).repeat(h // window, w // window)
    phase = torch.atan2(gx, gy) * (bins / math.pi)  # in [-bins, bins]: unsigned after mod bins
    index = torch.remainder(torch.floor(phase), bins).long()  # (NC, H, W)
    hist = torch.zeros(n * c, bins, h, w, device=x.device, dtype=x.dtype)
    hist.scatter_add_(1, index[:, None], magnitude[:, None])
    cells = reduce(hist, "(n c) k (h ch) (w cw) -> n c k h w", "sum", n=n, ch=cell, cw=cell)
    return F.normalize(cells, p=2, dim=2)


@register_target("video", "hog")
class HOGTarget(VideoTarget):
    """MaskFeat's target (Wei et al., CVPR 2022): HOG of the masked tubelets.

    As MaskFeat's video model (SlowFast ``MaskMViT._get_hog_label_3d``), a tubelet's target is the
    HOG of its *first* frame (the clip is subsampled with the tubelet's temporal stride), per RGB
    channel: the ``(patch / cell)^2`` cells of its patch, ``bins`` orientations each, flattened as
    (c bins ch cw). ``out_dim = C * bins * (patch / cell)^2`` (108 for ViT-B/16 with MaskFeat's
    8-pixel cells and 9 bins). Computed on the un-normalised frames, in float32 even under autocast.
    Config: ``model.target.hog_bins`` (9), ``hog_cell`` (8), ``hog_window`` (0: no Gaussian
    weighting, as MaskFeat's SlowFast code; mmselfsup's re-implementation uses 16).
    """

    default_loss: ClassVar[str] = "mse"
    uses_teacher: ClassVar[bool] = False

    def __init__(self, *, in_chans: int, tubelet_size: int, patch_size: int, img_size: int,
                 pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...], bins: int, cell: int,
                 window: int, loss: str = "", loss_beta: float = 1.0) -> None:
        if bins <= 0 or cell <= 0 or window < 0:
            raise ConfigError(f"model.target.hog_bins and hog_cell must be positive and hog_window >= 0, got "
                              f"{bins}, {cell}, {window}")
        if patch_size % cell:
            raise ConfigError(f"model.target.hog_cell={cell} must divide model.patch_size={patch_size}")
        if window and img_size % window:
            raise ConfigError(f"model.target.hog_window={window} must divide model.img_size={img_size} "
                              f"(the window is tiled over the frame; 0 disables it)")
        super().__init__(in_chans * bins * (patch_size // cell) ** 2, loss=loss, loss_beta=loss_beta)
        self.tubelet_size, self.patch_size = tubelet_size, patch_size
        self.bins, self.cell, self.window = bins, cell, window
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_config(cls, tcfg: TargetConfig, **facts: Any) -> "HOGTarget":
        return cls(in_chans=facts["in_chans"], tubelet_size=facts["tubelet_size"], patch_size=facts["patch_size"],
                   img_size=facts["img_size"], pixel_mean=facts["pixel_mean"], pixel_std=facts["pixel_std"],
                   bins=tcfg.hog_bins, cell=tcfg.hog_cell, window=tcfg.hog_window, loss=tcfg.loss,
                   loss_beta=tcfg.loss_beta)

    def token_hog(self, video: torch.Tensor) -> torch.Tensor:
        """video: (B, C, T, H, W) normalised clip. Returns (B, L, out_dim): every token's HOG."""
        frames = _unnormalise(video[:, :, ::self.tubelet_size], self.pixel_mean, self.pixel_std)  # (B, C, T', H, W)
        b = frames.shape[0]
        h = hog(rearrange(frames, "b c t h w -> (b t) c h w"), bins=self.bins, cell=self.cell,
                window=self.window)  # (BT', C, bins, H / cell, W / cell)
        k = self.patch_size // self.cell
        return rearrange(h, "(b t) c n (h ch) (w cw) -> b (t h w) (c n ch cw)", b=b, ch=k, cw=k)

    def compute(self, video, patches, decoded, num_decoded):
        return gather_tokens(self.token_hog(video), decoded, num_decoded)


# --------------------------------------------------------------------------------------------
# Teacher features (frozen: SIGMA / MVD; EMA: data2vec)
# --------------------------------------------------------------------------------------------


def teacher_features(encoder: nn.Module, video: torch.Tensor, tcfg: TargetConfig,
                     final_norm: nn.Module | None) -> torch.Tensor:
    """encoder: a VideoMAEEncoder; video: (B, C, T, H, W) normalised full clip. Returns (B, L, D)
    float32: the average of the blocks :func:`~mm3d.teacher.teacher_layers` names, each
    instance-normalised over the tokens (or passed through `final_norm` with
    ``target.final_norm``), see :func:`~mm3d.teacher.layer_average`."""
    hidden = encoder.forward_hidden(video, teacher_layers(len(encoder.blocks), tcfg))  # [(B, L, D)] * layers
    return layer_average(hidden, tcfg, final_norm)


def _final_layer_norm(encoder: nn.Module, extra: nn.Module | None) -> nn.Module | None:
    """The teacher's final LayerNorm: the encoder's own, else a classifier's ``fc_norm``."""
    if isinstance(encoder.norm, nn.LayerNorm):
        return encoder.norm
    return extra if isinstance(extra, nn.LayerNorm) else None


def load_teacher_encoder(path: str, *, grid: tuple[int, int, int], tubelet_size: int, patch_size: int,
                         in_chans: int, allow_pickle: bool = False) -> tuple[nn.Module, nn.Module | None, list[str]]:
    """The encoder of a VideoMAE checkpoint, for a student with token grid `grid`.

    `path`: one of our checkpoints (pretraining or classification, trained or converted with
    ``mm3d convert``: its stored ``config.model`` describes it), an official VideoMAE ``.pth``
    (architecture read from the weights), or a Hugging Face VideoMAE directory. Position tables of
    another grid are resized to `grid`; tubelet, patch and channels must match the student's.
    Returns (encoder, its final LayerNorm — the encoder's own or a classifier's ``fc_norm``, None
    if neither —, notes).
    """
    from mm3d.video.convert import hf_to_ours, load_hf_dir, official_to_ours
    from mm3d.video.models import VideoMAEConfig, build_classifier, build_pretrain_model

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model.target.checkpoint={path}: no such file or directory")
    if p.is_dir():
        conv = hf_to_ours(*load_hf_dir(p, allow_pickle=allow_pickle))
        cfg, sd = conv.config, conv.state_dict
    else:
        ck = load_checkpoint(p, allow_pickle=allow_pickle)
        stored = ck.get("config") if isinstance(ck.get("config"), dict) else None
        if stored and isinstance(stored.get("model"), dict):
            model_cfg = {k: v for k, v in stored["model"].items() if k != "target"}  # the teacher's own target is moot
            cfg = config_from_dict(VideoMAEConfig, model_cfg, file=f"{path} (stored config)")
            sd = {k.removeprefix("module."): v for k, v in extract_state_dict(ck).items()}
        else:
            conv = official_to_ours(extract_state_dict(ck, ("model", "module", "state_dict")))
            cfg, sd = conv.config, conv.state_dict
    for name, mine in (("tubelet_size", tubelet_size), ("patch_size", patch_size), ("in_chans", in_chans)):
        if getattr(cfg, name) != mine:
            raise ConfigError(f"model.target.checkpoint={path}: the teacher's {name} is {getattr(cfg, name)}, the "
                              f"student's {mine}; their tokens must cover the same pixels")
    old_grid = cfg.grid
    cfg.num_frames, cfg.img_size = grid[0] * tubelet_size, grid[1] * patch_size
    cfg.target = TargetConfig()
    if "encoder_to_decoder.weight" in sd:
        model, extra = build_pretrain_model(cfg), None
    else:
        model = build_classifier(cfg, num_classes=0)
        extra = model.fc_norm
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "fc_norm."))}
    if not any(k.startswith("encoder.blocks.") for k in sd):
        raise CheckpointError(f"model.target.checkpoint={path}: no VideoMAE encoder weights (encoder.blocks.*)")
    notes = adapt_pos_embeds(sd, model, old_grid)
    missing = [k for k in model.state_dict() if k.startswith(("encoder.", "fc_norm.")) and k not in sd]
    if missing:
        raise CheckpointError(f"model.target.checkpoint={path}: the teacher encoder's weights lack {missing[:8]}")
    notes += load_model_weights(model, sd, strict=False)
    return model.encoder, _final_layer_norm(model.encoder, extra), notes


@register_target("video", "teacher")
class TeacherTarget(VideoTarget):
    """Token features of a frozen encoder over the full clip (SIGMA, Salehi et al. 2024; MVD, Wang et
    al. 2023): the teacher runs in eval mode without gradients; ``out_dim`` is its width.

    The teacher's weights are not part of the model's state dict (non-persistent
    :class:`~mm3d.teacher.FrozenModule`): they are loaded again from ``model.target.checkpoint``
    whenever the model is built.
    """

    default_loss: ClassVar[str] = "mse"
    uses_teacher: ClassVar[bool] = True

    def __init__(self, *, teacher: nn.Module, final_norm: nn.Module | None, tcfg: TargetConfig) -> None:
        super().__init__(teacher.embed_dim, loss=tcfg.loss, loss_beta=tcfg.loss_beta)
        teacher_layers(len(teacher.blocks), tcfg)  # a bad layer choice fails when the model is built
        self.tcfg = tcfg
        self.teacher = FrozenModule(teacher, persistent=False)
        self.teacher_norm = FrozenModule(final_norm, persistent=False) if final_norm is not None else None

    @classmethod
    def from_config(cls, tcfg: TargetConfig, **facts: Any) -> "TeacherTarget":
        if not tcfg.checkpoint:
            raise ConfigError("model.target.kind=teacher needs model.target.checkpoint=PATH (a VideoMAE "
                              "checkpoint, converted weights, an official .pth or a Hugging Face directory)")
        enc, norm, _ = load_teacher_encoder(tcfg.checkpoint, grid=facts["grid"], tubelet_size=facts["tubelet_size"],
                                            patch_size=facts["patch_size"], in_chans=facts["in_chans"],
                                            allow_pickle=facts.get("allow_pickle", False))
        return cls(teacher=enc, final_norm=norm, tcfg=tcfg)

    def compute(self, video, patches, decoded, num_decoded):
        feats = teacher_features(self.teacher.module, video, self.tcfg, self.teacher_norm)
        return gather_tokens(feats, decoded, num_decoded)


@register_target("video", "ema")
class EMATarget(VideoTarget):
    """data2vec (Baevski et al., ICML 2022): the average of the top ``layers`` blocks of an EMA copy
    of the student encoder over the full clip, each block's output instance-normalised over the
    tokens. The copy starts equal to the student (:meth:`start`) and follows it after every optimizer
    step with the decay of :func:`mm3d.teacher.ema_momentum`; its weights are in the state dict
    (``target.teacher.module.*``), so a resumed run continues exactly."""

    default_loss: ClassVar[str] = "smooth_l1"
    uses_teacher: ClassVar[bool] = True

    def __init__(self, *, embed_dim: int, depth: int, tcfg: TargetConfig) -> None:
        super().__init__(embed_dim, loss=tcfg.loss, loss_beta=tcfg.loss_beta)
        teacher_layers(depth, tcfg)
        self.tcfg = tcfg
        self.teacher: FrozenModule | None = None

    @classmethod
    def from_config(cls, tcfg: TargetConfig, **facts: Any) -> "EMATarget":
        return cls(embed_dim=facts["embed_dim"], depth=facts["depth"], tcfg=tcfg)

    def start(self, student: nn.Module) -> None:
        self.teacher = frozen_copy(student)

    def _teacher(self) -> FrozenModule:
        if self.teacher is None:
            raise RuntimeError("EMATarget.start(student) was never called")
        return self.teacher

    def after_optimizer_step(self, step: int, total_steps: int, student: nn.Module) -> None:
        ema_update_(self._teacher().module, student, ema_momentum(step, total_steps, self.tcfg))

    def compute(self, video, patches, decoded, num_decoded):
        enc = self._teacher().module
        norm = enc.norm if isinstance(enc.norm, nn.LayerNorm) else None
        return gather_tokens(teacher_features(enc, video, self.tcfg, norm), decoded, num_decoded)


# --------------------------------------------------------------------------------------------
# Motion scores (the `motion` mask)
# --------------------------------------------------------------------------------------------


def motion_scores(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """Per-token motion of a clip: the mean absolute frame difference over the token's pixels.

    video: (B, C, T, H, W). Frame differences ``|x_t - x_(t-1)|`` (the first frame takes the first
    difference) are averaged over each tubelet's ``tubelet x patch x patch`` pixels and channels, so
    a tubelet scores the motion within it and into its first frame from the previous tubelet.
    Returns (B, L) non-negative float scores, tokens in (t, h, w) order.
    """
    if video.shape[2] < 2:
        raise ValueError(f"motion scores need at least 2 frames, got shape {tuple(video.shape)}")
    v = video.float()
    diff = (v[:, :, 1:] - v[:, :, :-1]).abs()  # (B, C, T - 1, H, W)
    diff = torch.cat([diff[:, :, :1], diff], dim=2)  # (B, C, T, H, W)
    return reduce(diff, "b c (t pt) (h ph) (w pw) -> b (t h w)", "mean", pt=tubelet, ph=patch, pw=patch)
