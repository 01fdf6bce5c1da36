"""Weight initialisers shared by the modalities' models (the MAE family's conventions)."""

from __future__ import annotations

from timm.layers import trunc_normal_
from torch import nn


def _unit_norm(m: nn.Module) -> None:
    if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_trunc_normal(m: nn.Module, std: float = 0.02) -> None:
    """For ``module.apply``: trunc-normal(std) Linear/Conv1d weights, zero biases, unit LayerNorm."""
    if isinstance(m, (nn.Linear, nn.Conv1d)):
        trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    _unit_norm(m)


def init_xavier(m: nn.Module) -> None:
    """For ``module.apply``: Xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    _unit_norm(m)
