"""Point-cloud masked-modeling targets (``model.target.kind``) and the Chamfer losses.

Each target says what the masked patches of a Point-MAE pretraining model
(:class:`~mm3d.pointcloud.models.PointMAEPretrain`) predict; the model sizes its head from the
target's ``out_dim`` and never branches on the kind.

* ``points`` (default, Pang et al., ECCV 2022): the K points of every masked patch, relative to
  its centre; Chamfer L2 (``model.loss=cdl2``) or L1. Exactly Point-MAE.
* ``center`` (PCP-MAE, Zhang et al., NeurIPS 2024): the points as above, plus each masked patch's
  centre, predicted from its shape by the encoder's second stream (see
  :meth:`~mm3d.pointcloud.models.PointMAEPretrain.forward`) and compared, as a code of the centre
  (:func:`center_code`), with the true one; the decoder places the mask tokens at the predicted
  centres with the gradient stopped.
* ``teacher`` (SIGMA / MVD style on patches): features of a frozen Point-MAE encoder loaded from
  ``model.target.checkpoint``, seeing every patch of the cloud.
* ``ema`` (data2vec): features of an exponential moving average of the student encoder, seeing
  every patch; updated after each optimizer step.

Teacher features are the average of the top ``model.target.layers`` block outputs ending at
``model.target.layer``, each instance-normalised over the patches (:func:`mm3d.teacher.layer_average`).

Axes: B batch, G patches, M masked patches, K points per patch, D width, F target width,
P centre-code width.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from torch import nn

from mm3d.config import ConfigError
from mm3d.losses import token_loss
from mm3d.pointcloud.ops import chamfer_distance
from mm3d.registry import register_loss, register_target
from mm3d.targets import Target, TargetConfig, build_target
from mm3d.teacher import FrozenModule, MomentumSchedule, ema_update_, frozen_copy, layer_average, teacher_layers

__all__ = ["CENTER_CODES", "center_code", "PointTarget", "PointsTarget", "CenterTarget", "TeacherTarget",
           "EMATarget", "target_for_model", "LossAndMetrics"]

CENTER_CODES = ("xyz", "sincos")


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _chamfer_per_patch(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """pred, target: (*tokens, K, 3) point patches -> (*tokens) per-patch Chamfer distances."""
    tokens = pred.shape[:-2]
    per = chamfer_distance(pred.reshape(-1, *pred.shape[-2:]), target.reshape(-1, *target.shape[-2:]),
                           kind=kind, reduction="none")
    return per.reshape(tokens)


@register_loss("chamfer_l2", token_dims=2,
               description="Chamfer distance of each point patch, squared distances (Point-MAE's cdl2)")
def chamfer_l2_per_patch(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """pred, target: (..., K, 3). Returns (...): mean_i d(p_i, T)^2 + mean_j d(t_j, P)^2 per patch."""
    return _chamfer_per_patch(pred, target, "l2")


@register_loss("chamfer_l1", token_dims=2,
               description="Chamfer distance of each point patch, plain distances halved (Point-MAE's cdl1)")
def chamfer_l1_per_patch(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """pred, target: (..., K, 3). Returns (...): (mean_i d(p_i, T) + mean_j d(t_j, P)) / 2 per patch."""
    return _chamfer_per_patch(pred, target, "l1")


# --------------------------------------------------------------------------------------------
# Centre codes
# --------------------------------------------------------------------------------------------


def center_code(center: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    """The fixed code of patch centres that Point-MAE's positional MLP reads.

    center: (B, L, 3). ``kind="xyz"``: the centres themselves (Point-MAE; `dim` must be 3).
    ``kind="sincos"``: PCP-MAE's code, `dim` wide (a multiple of 6): per axis, sines then cosines
    of the coordinate times ``1 / 10000 ** (f / (dim / 6))`` for f = 0 .. dim/6 - 1, the axes one
    after another (x sines, x cosines, y sines, ...). Returns (B, L, dim) in float32.
    """
    if center.shape[-1] != 3:
        raise ValueError(f"centres must be (..., 3), got shape {tuple(center.shape)}")
    if kind == "xyz":
        if dim != 3:
            raise ValueError(f"the xyz centre code is 3 wide, got dim={dim}")
        return center.float()
    if kind != "sincos":
        raise ValueError(f"centre code must be one of {CENTER_CODES}, got {kind!r}")
    if dim % 6:
        raise ValueError(f"the sincos centre code needs a width divisible by 6, got {dim}")
    freqs = dim // 6
    omega = 1.0 / 10000 ** (torch.arange(freqs, device=center.device, dtype=torch.float32) / freqs)
    angles = torch.einsum("...c,f->...cf", center.float(), omega)  # (..., 3, F)
    return rearrange(torch.stack([angles.sin(), angles.cos()], dim=-2), "... c s f -> ... (c s f)")


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


class LossAndMetrics(NamedTuple):
    """loss: () the training loss; metrics: name -> () batch means (filled in eval mode only)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, G, ...), idx: (B, M) patch indices -> (B, M, ...)."""
    index = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


class PointTarget(Target):
    """Base of the point-cloud targets.

    ``forward(neighborhood (B, G, K, 3), center (B, G, 3), mask_idx (B, M))`` returns the targets
    of the masked patches ``mask_idx`` (no gradient), shaped as :meth:`unflatten` shapes the
    head's (B, M, out_dim) output. :meth:`loss_and_metrics` turns both into the loss.
    """

    predicts_points: ClassVar[bool] = False  # the prediction is the masked patches' points
    predicts_centers: ClassVar[bool] = False  # the model runs PCP-MAE's centre stream
    metric_names: ClassVar[tuple[str, ...]] = ()

    def unflatten(self, out: torch.Tensor) -> torch.Tensor:
        """out: (B, M, out_dim) head output -> the prediction in the target's shape."""
        return out

    def loss_and_metrics(self, pred: torch.Tensor, target: torch.Tensor, center_pred: torch.Tensor | None = None,
                         center_target: torch.Tensor | None = None) -> LossAndMetrics:
        """pred, target: as :meth:`unflatten` and ``forward`` return; center_*: (B, M, P) or None."""
        return LossAndMetrics(self.loss(pred, target), {})

    def no_weight_decay(self) -> set[str]:
        """Names (relative to the target) of parameters that skip weight decay."""
        return set()


@register_target("pointcloud", "points", default=True)
class PointsTarget(PointTarget):
    """Point-MAE: the K points of every masked patch, relative to its centre (out_dim 3K)."""

    default_loss = "chamfer_l2"
    allowed_losses = ("chamfer_l2", "chamfer_l1")
    predicts_points = True
    metric_names = ("cd_l2", "cd_l1")

    def __init__(self, group_size: int, *, loss: str = "", loss_beta: float = 1.0) -> None:
        super().__init__(3 * group_size, loss=loss, loss_beta=loss_beta)
        self.group_size = group_size

    @staticmethod
    def point_loss(tcfg: TargetConfig, point_loss: str) -> str:
        """``model.target.loss`` when given, else the loss ``model.loss`` (cdl2 / cdl1) names."""
        return tcfg.loss or {"cdl2": "chamfer_l2", "cdl1": "chamfer_l1"}[point_loss]

    @classmethod
    def from_config(cls, tcfg: TargetConfig, *, group_size: int, point_loss: str = "cdl2",
                    **_: Any) -> "PointsTarget":
        return cls(group_size, loss=cls.point_loss(tcfg, point_loss), loss_beta=tcfg.loss_beta)

    @torch.no_grad()
    def forward(self, neighborhood: torch.Tensor, center: torch.Tensor, mask_idx: torch.Tensor) -> torch.Tensor:
        """-> (B, M, K, 3) the masked patches (relative to their centres)."""
        return _take(neighborhood, mask_idx)

    def unflatten(self, out: torch.Tensor) -> torch.Tensor:
        """(B, M, 3K) -> (B, M, K, 3); the official ``increase_dim`` channels are (K, 3), xyz fastest."""
        return rearrange(out, "b m (k c) -> b m k c", c=3)

    def _point_metrics(self, pred: torch.Tensor, target: torch.Tensor, loss: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """Chamfer L2 and L1 of the patches (`loss`, already one of them, is reused); eval mode only."""
        if self.training:
            return {}
        with torch.no_grad():
            return {name: loss.detach() if self.loss_name == f"chamfer_{name[3:]}" else
                    _mean_loss(f"chamfer_{name[3:]}", pred, target) for name in ("cd_l2", "cd_l1")}

    def loss_and_metrics(self, pred: torch.Tensor, target: torch.Tensor, center_pred: torch.Tensor | None = None,
                         center_target: torch.Tensor | None = None) -> LossAndMetrics:
        loss = self.loss(pred, target)
        return LossAndMetrics(loss, self._point_metrics(pred, target, loss))


def _mean_loss(name: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return token_loss(pred, target, name)


@register_target("pointcloud", "center")
class CenterTarget(PointsTarget):
    """PCP-MAE: the masked patches' points (as ``points``) and their centres.

    The model's encoder runs the masked patches' shapes as a second stream placed by
    :attr:`mask_pos_token` (it attends to every patch; the visible patches never attend to it);
    :attr:`center_head` (PCP-MAE's ``pred_pos_proj``: Linear, LayerNorm, ReLU, Linear) maps its
    output to a centre code (:func:`center_code` of the encoder's ``model.pos_encoding``), compared
    with the true code by MSE (PCP-MAE's default ``pred_loss: l2``) and weighted by
    ``model.target.center_weight`` (PCP-MAE's ``ita``: 0.1).
    """

    predicts_centers = True
    metric_names = ("cd_l2", "cd_l1", "center_mse")

    def __init__(self, group_size: int, embed_dim: int, code_dim: int, *, center_weight: float = 0.1,
                 loss: str = "", loss_beta: float = 1.0) -> None:
        super().__init__(group_size, loss=loss, loss_beta=loss_beta)
        self.center_weight = float(center_weight)
        self.code_dim = code_dim
        self.mask_pos_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.center_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.LayerNorm(embed_dim), nn.ReLU(),
                                         nn.Linear(embed_dim, code_dim))
        trunc_normal_(self.mask_pos_token, std=0.02)

    @classmethod
    def from_config(cls, tcfg: TargetConfig, *, group_size: int, encoder: nn.Module, point_loss: str = "cdl2",
                    **_: Any) -> "CenterTarget":
        return cls(group_size, encoder.embed_dim, encoder.code.dim, center_weight=tcfg.center_weight,
                   loss=cls.point_loss(tcfg, point_loss), loss_beta=tcfg.loss_beta)

    @torch.no_grad()
    def center_codes(self, center: torch.Tensor, mask_idx: torch.Tensor, code: nn.Module) -> torch.Tensor:
        """center: (B, G, 3), mask_idx: (B, M), code: the encoder's centre code -> (B, M, P) the true
        codes of the masked patches' centres (the centre predictor's target)."""
        return code(_take(center, mask_idx))

    def loss_and_metrics(self, pred: torch.Tensor, target: torch.Tensor, center_pred: torch.Tensor | None = None,
                         center_target: torch.Tensor | None = None) -> LossAndMetrics:
        if center_pred is None or center_target is None:
            raise ValueError("the center target needs the predicted and true centre codes")
        points = self.loss(pred, target)
        centre = _mean_loss("mse", center_pred, center_target)
        metrics = self._point_metrics(pred, target, points)
        if not self.training:
            metrics["center_mse"] = centre.detach()
        return LossAndMetrics(points + self.center_weight * centre, metrics)

    def no_weight_decay(self) -> set[str]:
        return {"mask_pos_token"}  # the official rule: names with "token" skip decay


class _FeatureTarget(PointTarget):
    """Patch features of a teacher encoder that sees every patch of the cloud (out_dim: its width).

    teacher: a :class:`~mm3d.teacher.FrozenModule` around a Point-MAE encoder (eval mode, no
    gradient); blocks: the 0-based blocks averaged (:func:`~mm3d.teacher.teacher_layers`).
    """

    default_loss = "mse"
    uses_teacher = True

    def __init__(self, teacher: FrozenModule, tcfg: TargetConfig, *, loss: str = "", loss_beta: float = 1.0) -> None:
        encoder = teacher.module
        super().__init__(encoder.embed_dim, loss=loss, loss_beta=loss_beta)
        self.teacher = teacher
        self.blocks = teacher_layers(encoder.depth, tcfg)
        self.tcfg = tcfg

    @torch.no_grad()
    def forward(self, neighborhood: torch.Tensor, center: torch.Tensor, mask_idx: torch.Tensor) -> torch.Tensor:
        """-> (B, M, F) the teacher's features of the masked patches, computed on all G patches."""
        encoder = self.teacher.module
        hidden = encoder.hidden_states(neighborhood, center)  # depth x (B, G, F)
        features = layer_average([hidden[i] for i in self.blocks], self.tcfg, encoder.norm)  # (B, G, F)
        return _take(features, mask_idx)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.blocks}"


@register_target("pointcloud", "teacher")
class TeacherTarget(_FeatureTarget):
    """Features of a frozen encoder from ``model.target.checkpoint`` (an mm3d Point-MAE pretraining or
    classification checkpoint, or converted official weights); its weights are not in the
    student's state dict (reloaded from the file)."""

    @classmethod
    def from_config(cls, tcfg: TargetConfig, *, load_teacher: Callable[[str], tuple[FrozenModule, list[str]]],
                    **_: Any) -> "TeacherTarget":
        teacher, notes = load_teacher(tcfg.checkpoint)
        target = cls(teacher, tcfg, loss=tcfg.loss, loss_beta=tcfg.loss_beta)
        target.load_notes = notes
        return target


@register_target("pointcloud", "ema")
class EMATarget(_FeatureTarget):
    """Features of an EMA copy of the student encoder (data2vec), in the state dict
    (``target.teacher.*``) so a resumed run continues it exactly."""

    def __init__(self, teacher: FrozenModule, tcfg: TargetConfig, *, loss: str = "", loss_beta: float = 1.0) -> None:
        super().__init__(teacher, tcfg, loss=loss, loss_beta=loss_beta)
        self.schedule = MomentumSchedule.from_config(tcfg)

    @classmethod
    def from_config(cls, tcfg: TargetConfig, *, encoder: nn.Module, **_: Any) -> "EMATarget":
        return cls(frozen_copy(encoder), tcfg, loss=tcfg.loss, loss_beta=tcfg.loss_beta)

    def after_optimizer_step(self, step: int, total_steps: int, student: nn.Module) -> None:
        """teacher <- d * teacher + (1 - d) * student, d from the momentum schedule at `step`."""
        ema_update_(self.teacher.module, student, self.schedule(step, total_steps))


def target_for_model(tcfg: TargetConfig, **model_facts: Any) -> PointTarget:
    """The point-cloud target ``model.target`` names (see :func:`mm3d.targets.build_target`).

    model_facts: ``encoder`` (the student :class:`~mm3d.pointcloud.models.PointMAEEncoder`),
    ``group_size``, ``point_loss`` (``model.loss``), ``load_teacher`` (checkpoint -> frozen encoder).
    """
    tcfg.validate()
    target = build_target("pointcloud", tcfg, **model_facts)
    if not isinstance(target, PointTarget):
        raise ConfigError(f"model.target.kind={tcfg.kind!r} is not a point-cloud target")
    return target
