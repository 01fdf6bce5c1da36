"""The official VideoMAE model as an in-process peer for ``mm3d bench`` (``bench.peer=official
bench.peer_root=CHECKOUT``), beside the Hugging Face one.

The user points at a checkout of https://github.com/MCG-NJU/VideoMAE; its ``modeling_pretrain.py``
(and the ``modeling_finetune.py`` it imports) is imported unmodified and built with our model's
sizes and our weights. The timed step is the official ``engine_for_pretraining.train_one_epoch``
step: targets from the un-normalised clip (per-tubelet normalised when ``norm_pix_loss``), the
model's forward on (clip, mask), MSE on the masked tokens, the host read of the loss that engine
does every step, backward and the optimizer step. Nothing of the official project is stored here.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Callable

import torch
from einops import rearrange
from torch import nn

from mm3d.bench import PeerUnavailable, import_from_checkout
from mm3d.engine import OptimizerStep, autocast, unwrap
from mm3d.masking import video_mask

_OFFICIAL_MODULES = ("modeling_pretrain", "modeling_finetune")
_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)$")
_LAYER_SCALE = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}


def import_official(root: str | Path) -> types.ModuleType:
    """``modeling_pretrain`` of the VideoMAE checkout at `root` (removed from sys.modules again).

    timm's ``register_model`` is a no-op meanwhile: the official ``modeling_finetune`` registers
    names such as ``vit_base_patch16_224`` that would replace timm's own models in this process.
    """
    import timm.models.registry as timm_registry

    register = timm_registry.register_model
    timm_registry.register_model = lambda fn: fn
    try:
        return import_from_checkout(root, "modeling_pretrain", marker="modeling_pretrain.py", what="VideoMAE",
                                    packages=_OFFICIAL_MODULES,
                                    hint="give bench.peer_root=<a clone of github.com/MCG-NJU/VideoMAE>")
    finally:
        timm_registry.register_model = register


def official_key_to_ours(key: str) -> str:
    """An official pretraining state-dict key -> ours (the converter's mapping: layer scale renamed)."""
    m = _BLOCK.match(key)
    if m:
        return f"{m.group(1)}.blocks.{m.group(2)}.{_LAYER_SCALE.get(m.group(3), m.group(3))}"
    return key


def build_official_pretrain(root: str | Path, model: nn.Module, cfg: Any) -> nn.Module:
    """The official ``PretrainVisionTransformer`` sized as our `cfg` (a VideoMAEConfig) with the
    weights of our pretraining model `model`."""
    module = import_official(root)
    if cfg.pos_embed != "sincos_1d" or cfg.decoder_mask_type is not None:
        raise PeerUnavailable("the official VideoMAE has the fixed 1-D sine position table and no decoder "
                              f"masking; this model has pos_embed={cfg.pos_embed!r}, "
                              f"decoder_mask_type={cfg.decoder_mask_type!r}")
    peer = module.PretrainVisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, encoder_in_chans=cfg.in_chans,
        encoder_embed_dim=cfg.embed_dim, encoder_depth=cfg.depth, encoder_num_heads=cfg.num_heads,
        decoder_num_classes=cfg.in_chans * cfg.tubelet_size * cfg.patch_size ** 2,
        decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        drop_path_rate=cfg.drop_path, norm_layer=lambda d: nn.LayerNorm(d, eps=cfg.norm_eps),
        init_values=cfg.init_values or 0.0, tubelet_size=cfg.tubelet_size,
        use_checkpoint=False)
    tokens = cfg.grid[0] * cfg.grid[1] * cfg.grid[2]
    if peer.encoder.patch_embed.num_patches != tokens:  # its PatchEmbed is built for 16 frames
        raise PeerUnavailable(f"the official model has {peer.encoder.patch_embed.num_patches} tokens per clip "
                              f"(16 frames); this model has {tokens} ({cfg.num_frames} frames)")
    ours = unwrap(model).state_dict()
    sd, missing = {}, []
    for k, like in peer.state_dict().items():
        name = official_key_to_ours(k)
        if name in ours and ours[name].shape == like.shape:
            sd[k] = ours[name].detach().clone()
        else:
            missing.append(k)
    if missing:
        raise PeerUnavailable(f"our weights have nothing (of that shape) for official keys {missing[:5]}")
    peer.load_state_dict(sd, strict=True)
    return peer


def official_targets(video: torch.Tensor, mask: torch.Tensor, cfg: Any, mean: torch.Tensor,
                     std: torch.Tensor) -> torch.Tensor:
    """The official engine's targets. video: (B, C, T, H, W) normalised clip; mask: (B, N) bool ->
    (B, M, tubelet*patch^2*C) targets of the masked tokens, per token normalised when
    ``norm_pix_loss`` (unbiased variance, +1e-6 on the std, as ``engine_for_pretraining``)."""
    t, p = cfg.tubelet_size, cfg.patch_size
    with torch.no_grad():
        unnorm = video * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
        if cfg.norm_pix_loss:
            sq = rearrange(unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=t, p1=p, p2=p)
            sq = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
            patches = rearrange(sq, "b n p c -> b n (p c)")
        else:
            patches = rearrange(unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=t, p1=p, p2=p)
        b, _, d = patches.shape
        return patches[mask].reshape(b, -1, d)


def pretrain_peer_step(root: str | Path, cfg: Any, model: nn.Module, batch: dict[str, Any],
                       device: torch.device) -> tuple[str, Callable[[], None]]:
    """``mm3d bench``'s official peer: one step of the official pretraining engine on `batch`'s clips
    with `model`'s weights, a fresh tube mask per step as ours, the trainer's optimizer and precision."""
    from mm3d.trainer import build_optimizer, peak_lr

    m = cfg.model
    peer = build_official_pretrain(root, model, m).to(device).train()
    opt_step = OptimizerStep(build_optimizer(peer, cfg, peak_lr(cfg, 1), fused=False), device=device,
                             precision=cfg.train.precision, clip_grad=cfg.optim.clip_grad)
    raw = unwrap(model)
    mean, std = raw.pixel_mean.to(device).flatten(), raw.pixel_std.to(device).flatten()
    video = batch["video"]
    b = video.shape[0]
    loss_fn = nn.MSELoss()

    def step() -> None:
        mask = video_mask(m.mask_type, b, m.grid, m.mask_ratio, device=device)
        labels = official_targets(video, mask, m, mean, std)
        with autocast(device, cfg.train.precision):
            out = peer(video, mask)
            loss = loss_fn(input=out, target=labels)
        loss.item()  # the official engine reads the loss every step (its isfinite check)
        opt_step.backward(loss)
        opt_step.step()

    return f"official VideoMAE ({Path(root).name}: modeling_pretrain.py)", step


__all__ = ["PeerUnavailable", "import_official", "official_key_to_ours", "build_official_pretrain",
           "official_targets", "pretrain_peer_step"]
