"""Per-token losses of masked modeling, chosen by name (``model.target.loss``).

A loss maps a prediction and a target of the same shape ``(*tokens, *content)`` to one value per
token (the ``tokens`` shape); :func:`token_loss` then averages the tokens, optionally weighted.
The content of a token is a feature vector ``(C,)`` for every loss here; the point-cloud modality
registers ``chamfer_l2`` / ``chamfer_l1`` whose token is a point patch ``(K, 3)``.

=============  ================================================  =========================
name           per token                                          note
=============  ================================================  =========================
``mse``        ``mean_c (p_c - t_c)^2``                           MAE, VideoMAE, data2vec
``l1``         ``mean_c |p_c - t_c|``
``smooth_l1``  ``mean_c smooth_l1(p_c - t_c; beta)``              data2vec's ``loss_beta``
``cosine``     ``1 - <p, t> / (|p| |t|)``                         BYOL / MVD-style features
=============  ================================================  =========================

Every loss is computed in float32 (the inputs are upcast), so autocast precision does not change
the loss's own arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm3d.registry import LOSSES, register_loss

__all__ = ["token_loss", "per_token_loss", "loss_names"]


@register_loss("mse", description="mean squared error over the features")
def mse_per_token(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """pred, target: (..., C). Returns (...): the mean of the squared differences over C."""
    return F.mse_loss(pred, target, reduction="none").mean(dim=-1)  # one kernel each way, not three


@register_loss("l1", description="mean absolute error over the features")
def l1_per_token(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """pred, target: (..., C). Returns (...): the mean of the absolute differences over C."""
    return (pred - target).abs().mean(dim=-1)


@register_loss("smooth_l1", description="Huber-like smooth L1 with transition point model.target.loss_beta")
def smooth_l1_per_token(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """pred, target: (..., C). Returns (...): the mean over C of ``0.5 d^2 / beta`` where
    ``|d| < beta``, else ``|d| - 0.5 beta`` (``beta = 0``: plain L1)."""
    return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(dim=-1)


@register_loss("cosine", description="one minus the cosine similarity of the feature vectors")
def cosine_per_token(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """pred, target: (..., C). Returns (...): ``1 - cos(pred, target)`` over C (in [0, 2]; a zero
    vector counts as orthogonal to everything)."""
    return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)


def loss_names(token_dims: int | None = None) -> list[str]:
    """Registered loss names, sorted; only those whose token content has `token_dims` axes if given."""
    return [name for name, spec in LOSSES.items() if token_dims is None or spec.token_dims == token_dims]


def per_token_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, *, beta: float = 1.0) -> torch.Tensor:
    """The loss `kind` of every token, in float32.

    pred, target: (*tokens, *content) with equal shapes (content: the loss's ``token_dims`` trailing
    axes). Returns (*tokens).
    """
    spec = LOSSES.get(kind)
    if pred.shape != target.shape:
        raise ValueError(f"{kind} loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < spec.token_dims:
        raise ValueError(f"{kind} loss: a token's content has {spec.token_dims} axes, got a "
                         f"{pred.dim()}-d tensor of shape {tuple(pred.shape)}")
    return spec.fn(pred.float(), target.float(), beta=beta)


def token_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, weight: torch.Tensor | None = None,
               *, beta: float = 1.0) -> torch.Tensor:
    """The loss `kind` averaged over tokens: a () float32 tensor.

    pred, target: (*tokens, *content), e.g. (B, L, C) features or (B, M, K, 3) point patches.
    weight: optional (*tokens) non-negative weights (e.g. VideoMAE V2's "masked and decoded"
    0/1 weight); the result is then ``sum(w * loss) / sum(w)`` (0 when every weight is 0).
    beta: smooth L1's transition point (ignored by the other losses).
    """
    per_token = per_token_loss(pred, target, kind, beta=beta)
    if weight is None:
        return per_token.mean()
    if weight.shape != per_token.shape:
        raise ValueError(f"{kind} loss: weight must have the tokens' shape {tuple(per_token.shape)}, "
                         f"got {tuple(weight.shape)}")
    weight = weight.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=torch.finfo(per_token.dtype).tiny)
