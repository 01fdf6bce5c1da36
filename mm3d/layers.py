"""Layers shared by the modalities' models (timm's ``layers/`` vs ``models/`` habit).

- :func:`vit_blocks` / :func:`run_blocks`: the transformer block stack and its runner
  (positional embedding added before every block, activation checkpointing, tapped outputs);
- :func:`sdpa` / :class:`SDPAAttention`: torch's scaled-dot-product attention, in fp32 where the
  CPU's bf16 kernel is slower than its fp32 one;
- :func:`token_mask_count` / :func:`gather_tokens`: the visible-token bookkeeping of masked
  encoders, without a host read on the training path;
- the MAE family's weight initialisers.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint

# Sequences up to this length run a CPU bf16 attention that needs gradients in fp32: torch's CPU
# flash-attention backward in bf16 is 1.1-5x slower than in fp32 for L = 26 .. 256 at head width
# 64; from L = 512 bf16 forward + backward is the faster (1.3x). `python tools/bench_attention.py`
# measures it (BENCHMARKS.md).
CPU_BF16_SDPA_FP32_MAX_LEN = 256

# MM3D_CHECK_MASKS=1 validates even the masks our own generators made (a host read per forward)
CHECK_ALL_MASKS = os.environ.get("MM3D_CHECK_MASKS", "") not in ("", "0")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of q (B, H, Lq, d), k, v (B, H, Lk, d) -> (B, H, Lq, d).

    One exception, measured: on the CPU, bf16 inputs that need gradients with sequences of at most
    :data:`CPU_BF16_SDPA_FP32_MAX_LEN` run in fp32 (autocast off) and the output is cast back, since
    torch's bf16 backward kernel is the slower one there. Elsewhere (any GPU, inference, long
    sequences) this is exactly torch's call.
    """
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
            and max(q.shape[-2], k.shape[-2]) <= CPU_BF16_SDPA_FP32_MAX_LEN
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                 dropout_p=dropout_p, is_causal=is_causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


class SDPAAttention(Attention):
    """timm's ``Attention`` (same parameters and state dict) with its attention through :func:`sdpa`.

    x: (B, L, D) -> (B, L, D); plugs into timm's ``Block(attn_layer=...)``.
    """

    def qkv_proj(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, 3 * H * d), ordered q, k, v."""
        return self.qkv(x)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        q, k, v = rearrange(self.qkv_proj(x), "b l (n h d) -> n b h l d", n=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        x = sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                 dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(rearrange(x, "b h l d -> b l (h d)"))
        return self.proj_drop(self.proj(x))


def vit_blocks(*, dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
               norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, attn_layer: type[nn.Module] | None = None,
               init_values: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> nn.ModuleList:
    """`depth` timm pre-norm ViT blocks (SDPA attention); drop-path rises linearly from 0 to
    `drop_path` over the depth, as in timm's ViT and the MAE family. `attn_layer` replaces
    :class:`SDPAAttention` (timm's ``Attention`` through :func:`sdpa`), e.g. VideoMAE's q/v-bias one."""
    rates = torch.linspace(0, drop_path, depth, device="cpu").tolist() if depth > 0 else []
    return nn.ModuleList([
        Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
              attn_drop=attn_drop, init_values=init_values or None, drop_path=r, norm_layer=norm_layer,
              attn_layer=attn_layer or SDPAAttention)
        for r in rates])


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *, pos: torch.Tensor | None = None,
               grad_checkpointing: bool = False, taps: Sequence[int] = ()
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x: (B, L, D) through every block; with `pos` (B, L, D) each block sees ``x + pos``
    (Point-MAE adds its centre embedding before every block). Activation checkpointing when
    `grad_checkpointing` and gradients are on. Returns (output (B, L, D), the outputs of the
    blocks whose indices are in `taps`, in block order)."""
    tapped = []
    for i, blk in enumerate(blocks):
        inp = x if pos is None else x + pos
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, inp, use_reentrant=False)
        else:
            x = blk(inp)
        if i in taps:
            tapped.append(x)
    return x, tapped


def token_mask_count(mask: torch.Tensor, batch: int, num_tokens: int, name: str, *,
                     expected: int | None = None, allow_all: bool = True) -> int:
    """Validate a (B, L) bool token mask whose rows all hold the same number of True; return it.

    `expected`: the count a mask generator of ours guarantees (exact by construction). Such a
    mask is trusted without reading it back to the host — the check costs a device sync per
    forward — unless it lives on the CPU (where the check is free) or ``MM3D_CHECK_MASKS=1``.
    A mask from outside (``expected=None``) is always checked. ``allow_all=False`` also refuses
    rows that are all True or all False.
    """
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, num_tokens):
        raise ValueError(f"{name} must be a ({batch}, {num_tokens}) bool tensor, got "
                         f"{mask.dtype} of shape {tuple(mask.shape)}")
    if expected is not None and (mask.device.type != "cpu" or is_fake(mask)) and not CHECK_ALL_MASKS:
        return expected  # (a fake tensor, as `mm3d plan` traces a step with, has no values to read)
    counts = mask.sum(dim=1)
    first = int(counts[0])
    if bool((counts != first).any()) or (expected is not None and first != expected) or \
            (not allow_all and first in (0, num_tokens)):
        need = "the same number of tokens" + ("" if allow_all else ", at least one masked and one visible")
        raise ValueError(f"every sample of {name} must mask {need}; got per-sample counts {counts.tolist()}"
                         + (f" (expected {expected})" if expected is not None else ""))
    return first


def gather_tokens(x: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
    """The tokens where `keep` is True, in token order, without a host read.

    x: (B, L, D) (or (1, L, D), broadcast over the batch); keep: (B, L) bool with `count` True
    in every row (see :func:`token_mask_count`). Returns (B, count, D).
    """
    b = keep.shape[0]
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :count]  # kept first, in order
    return torch.gather(x.expand(b, -1, -1), 1, order[..., None].expand(-1, -1, x.shape[-1]))


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
