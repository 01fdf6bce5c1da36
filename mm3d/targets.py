"""Masked-modeling targets: what the masked tokens are trained to predict (``model.target``).

A *target* is a small module that maps the unmasked input, plus what its model exposes (the
encoder, the patches, the patch centres), to one target per predicted token. Its kind is named
by config (``model.target.kind=hog``) and found in the :data:`mm3d.registry.TARGETS` registry
under ``"<modality>.<kind>"``; the modality's pretraining model calls :func:`build_target` once
and never branches on the kind. A new target is one file with a :class:`Target` subclass
decorated with :func:`mm3d.registry.register_target`.

The core holds what both modalities share: the config section (:class:`TargetConfig`), the base
class, the builder, the losses (:mod:`mm3d.losses`) and the teachers (:mod:`mm3d.teacher`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mm3d.config import ConfigError
from mm3d.losses import loss_names, token_loss
from mm3d.registry import LOSSES, TARGET_DEFAULTS, TARGETS, suggest, target_kinds

__all__ = ["TargetConfig", "Target", "build_target", "resolve_kind"]


@dataclass
class TargetConfig:
    """The ``model.target`` section of a pretraining model's config.

    Every default keeps today's model: ``kind=""`` is the modality's default target (video:
    ``pixel``, point clouds: ``points``) with its default loss.
    """

    kind: str = ""  # "" = the modality's default (video: "pixel", points: "points"); `mm3d models` lists kinds
    loss: str = ""  # "" = the kind's default loss; one of mm3d.registry.LOSSES (mse, l1, smooth_l1, cosine, chamfer_*)
    loss_beta: float = 1.0  # smooth_l1: where the loss turns from quadratic to linear (data2vec: loss_beta)
    # teacher / ema: token features of an encoder
    checkpoint: str = ""  # teacher: weights of the frozen teacher encoder (an mm3d or converted checkpoint)
    layers: int = 1  # average of the outputs of the top-K blocks ending at `layer` (data2vec: 8 of 12)
    layer: int = -1  # the top block used, 0-based (-1: the last)
    instance_norm: bool = True  # data2vec: instance-norm each block's output over the tokens before averaging
    final_norm: bool = False  # normalise each block's output by the encoder's final LayerNorm instead
    momentum: float = 0.999  # ema: teacher decay at the first optimizer step (data2vec: ema_decay)
    momentum_end: float = 0.9999  # ema: decay at the end of the ramp (data2vec: ema_end_decay)
    momentum_steps: int = 0  # ema: linear ramp length in optimizer steps (0: the whole run)
    # pixel
    norm_pix: bool | None = None  # None: the model's norm_pix_loss
    # hog (MaskFeat)
    hog_cell: int = 8  # pixels per HOG cell side (MaskFeat: 8)
    hog_bins: int = 9  # orientation bins over 0..180 degrees (MaskFeat: 9)
    # side of a Gaussian window weighting the gradient magnitudes, tiled over the frame (0: none, as
    # MaskFeat's SlowFast code, HOGLayerC's default; mmselfsup's re-implementation: 16)
    hog_window: int = 0
    # center (PCP-MAE)
    center_weight: float = 0.1  # weight of the centre-prediction loss beside the points loss (PCP-MAE's eta, `ita`)

    def validate(self) -> None:
        if self.layers < 1:
            raise ValueError(f"layers={self.layers} must be at least 1 (the number of top blocks averaged)")
        for name in ("momentum", "momentum_end"):
            value = getattr(self, name)
            if math.isnan(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1] (the EMA teacher's decay)")
        if self.momentum_steps < 0:
            raise ValueError(f"momentum_steps={self.momentum_steps} must be >= 0 (0: ramp over the whole run)")
        if math.isnan(self.loss_beta) or self.loss_beta < 0:
            raise ValueError(f"loss_beta={self.loss_beta} must be >= 0")
        for name in ("hog_cell", "hog_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.hog_window < 0:
            raise ValueError(f"hog_window={self.hog_window} must be >= 0 (0: no Gaussian window)")
        if math.isnan(self.center_weight) or self.center_weight < 0:
            raise ValueError(f"center_weight={self.center_weight} must be >= 0")


class Target(nn.Module):
    """Base of every target.

    A subclass sets the class attributes, implements :meth:`from_config` (config -> its typed
    constructor) and a ``forward`` taking what its modality's model passes, returning the
    targets of the tokens the model predicts, computed without gradients. ``kind`` and
    ``modality`` are set by :func:`mm3d.registry.register_target`.

    out_dim: the width of one token's prediction; the model sizes its head from it.
    loss_name, loss_beta: the loss of :meth:`loss` (``model.target.loss``, ``loss_beta``).
    """

    kind: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    default_loss: ClassVar[str] = "mse"
    # the losses this target's tokens can be compared with; () = every loss over feature vectors
    allowed_losses: ClassVar[tuple[str, ...]] = ()
    uses_teacher: ClassVar[bool] = False  # whether it holds a teacher encoder (frozen or EMA)

    def __init__(self, out_dim: int, *, loss: str = "", loss_beta: float = 1.0) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"{type(self).__name__}: out_dim must be positive, got {out_dim}")
        self.out_dim = int(out_dim)
        self.loss_name = resolve_loss(type(self), loss)
        self.loss_beta = float(loss_beta)

    @classmethod
    def from_config(cls, tcfg: TargetConfig, **model_facts: Any) -> "Target":
        """Build the target from its config section and the facts its model passes (widths,
        patch sizes, the student encoder, ...); each subclass maps them to its constructor."""
        raise NotImplementedError(f"{cls.__name__} must implement from_config(tcfg, **model_facts)")

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The configured loss averaged over tokens (see :func:`mm3d.losses.token_loss`).

        pred, target: (*tokens, *content); weight: optional (*tokens). Returns () float32.
        """
        return token_loss(pred, target, self.loss_name, weight, beta=self.loss_beta)

    def after_optimizer_step(self, step: int, total_steps: int, student: nn.Module) -> None:
        """Called by the model's own ``after_optimizer_step`` once per optimizer step (after the
        trainer's EMA-of-weights update). `step`: optimizer steps done before this one (0 for the
        first); `total_steps`: the run's length; `student`: the module a teacher follows. No-op
        here; the EMA target updates its teacher."""

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, out_dim={self.out_dim}, loss={self.loss_name!r}"


def resolve_kind(modality: str, kind: str) -> str:
    """The registered kind `kind` names for `modality` ("" -> the modality's default).

    Raises ConfigError naming ``model.target.kind`` and the modality's known kinds.
    """
    known = target_kinds(modality)
    if not kind:
        if modality not in TARGET_DEFAULTS:
            raise ConfigError(f"model.target.kind is empty and modality {modality!r} registers no default "
                              f"target; known: {', '.join(known) or '(none)'}")
        return TARGET_DEFAULTS[modality]
    if kind not in known:
        raise ConfigError(f"model.target.kind={kind!r} is not a {modality} target{suggest(kind, known)}; "
                          f"known: {', '.join(known) or '(none)'}")
    return kind


def resolve_loss(cls: type[Target], loss: str) -> str:
    """The loss name `cls` uses for ``model.target.loss=loss`` ("" -> its default); a ConfigError
    names the key and the losses allowed for that target."""
    allowed = list(cls.allowed_losses) or loss_names(token_dims=1)
    name = loss or cls.default_loss
    if name not in LOSSES or name not in allowed:
        what = f"the {cls.modality} target {cls.kind!r}" if cls.kind else cls.__name__
        raise ConfigError(f"model.target.loss={name!r} is not a loss for {what}{suggest(name, allowed)}; "
                          f"allowed: {', '.join(allowed)}")
    return name


def build_target(modality: str, tcfg: TargetConfig, **model_facts: Any) -> Target:
    """The target ``model.target`` asks for, for a model of `modality` (``"video"``, ``"pointcloud"``).

    `model_facts` are what that modality's targets need from the model (see each target's
    ``from_config``). Raises ConfigError for an unknown kind or loss.
    """
    kind = resolve_kind(modality, tcfg.kind)
    cls = TARGETS.get(f"{modality}.{kind}")
    target = cls.from_config(tcfg, **model_facts)
    if not isinstance(target, Target):
        raise TypeError(f"{cls.__name__}.from_config returned {type(target).__name__}, not a Target")
    return target
