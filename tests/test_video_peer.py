"""The official VideoMAE as ``mm3d bench``'s in-process peer (mm3d.video.peer).

The official engine's target formula is checked against ours always; the official model only when
``MM3D_VIDEOMAE_ROOT`` names a checkout of github.com/MCG-NJU/VideoMAE (nothing of it is stored here).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import timm
import torch

from mm3d.masking import video_mask
from mm3d.registry import load_modalities

load_modalities()

from mm3d.video.models import VideoMAEConfig, build_pretrain_model  # noqa: E402
from mm3d.video.peer import PeerUnavailable, build_official_pretrain, import_official, official_targets  # noqa: E402

ROOT = os.environ.get("MM3D_VIDEOMAE_ROOT", "")
needs_checkout = pytest.mark.skipif(not ROOT, reason="set MM3D_VIDEOMAE_ROOT to a checkout of the official "
                                                     "VideoMAE (github.com/MCG-NJU/VideoMAE) to test the peer")
# the official PatchEmbed is built for 16 frames
TINY = VideoMAEConfig(img_size=32, num_frames=16, patch_size=16, tubelet_size=2, embed_dim=64, depth=2, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, qkv_bias=True, mask_ratio=0.75)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_the_official_engines_targets_are_our_targets(norm_pix):
    cfg = replace(TINY, norm_pix_loss=norm_pix)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg).eval()
    video = torch.randn(2, 3, 16, 32, 32)
    mask = video_mask(cfg.mask_type, 2, cfg.grid, cfg.mask_ratio, generator=torch.Generator().manual_seed(0))
    out = model({"video": video, "mask": mask})
    theirs = official_targets(video, mask, cfg, model.pixel_mean.flatten(), model.pixel_std.flatten())
    assert torch.allclose(out.target, theirs, atol=1e-5)


def test_a_folder_that_is_no_checkout_is_refused(tmp_path):
    with pytest.raises(PeerUnavailable, match="not a VideoMAE checkout"):
        import_official(tmp_path)


@needs_checkout
def test_official_model_with_our_weights_gives_our_loss_and_leaves_timm_alone():
    before = timm.models._registry._model_entrypoints["vit_base_patch16_224"]
    torch.manual_seed(0)
    ours = build_pretrain_model(TINY).eval()
    peer = build_official_pretrain(ROOT, ours, TINY).eval()
    video = torch.randn(2, 3, 16, 32, 32)
    mask = video_mask(TINY.mask_type, 2, TINY.grid, TINY.mask_ratio, generator=torch.Generator().manual_seed(1))
    lo = ours({"video": video, "mask": mask}).loss
    labels = official_targets(video, mask, TINY, ours.pixel_mean.flatten(), ours.pixel_std.flatten())
    lp = torch.nn.functional.mse_loss(peer(video, mask), labels)
    assert torch.allclose(lo, lp, rtol=1e-5), (lo.item(), lp.item())
    # the official file registers timm names (vit_base_patch16_224, ...): timm's own entries stay
    assert timm.models._registry._model_entrypoints["vit_base_patch16_224"] is before


@needs_checkout
def test_a_16_frame_model_is_required(tmp_path):
    cfg = replace(TINY, num_frames=8)
    with pytest.raises(PeerUnavailable, match="16 frames"):
        build_official_pretrain(ROOT, build_pretrain_model(cfg), cfg)
