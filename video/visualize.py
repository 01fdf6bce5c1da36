"""Pictures of VideoMAE reconstructions.

:func:`reconstruction_grid` renders one clip as a grid whose columns are frames and whose rows are
the original, the masked input (masked tubelets greyed), the reconstruction (predicted tubelets
only) and the reconstruction with the visible tubelets pasted back. With ``norm_pix_loss`` the
model predicts per-tubelet normalised pixels; they are un-normalised with each tubelet's own
mean and std so that the colours are right. :func:`write_visualization` writes that grid as a
PNG and the same four views side by side as an animated GIF.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from einops import rearrange, repeat
from PIL import Image, ImageDraw

from mm3d.video.data import uniform_clips
from mm3d.video.decode import open_video
from mm3d.video.models import VideoMAEPretrain
from mm3d.video.tokens import unpatchify
from mm3d.video.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, test_transform

log = logging.getLogger(__name__)

__all__ = ["ROW_NAMES", "reconstruction_views", "reconstruction_grid", "load_clip", "write_visualization"]

ROW_NAMES = ("original", "masked input", "reconstruction", "recon. + visible")
GREY = 0.5  # colour of hidden tubelets, in [0, 1]


def _to_unit(video: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(C, T, H, W) normalised -> (T, H, W, C) in [0, 1]."""
    x = video.float().cpu() * std.cpu()[:, None, None, None] + mean.cpu()[:, None, None, None]
    return rearrange(x.clamp(0, 1), "c t h w -> t h w c")


@torch.no_grad()
def reconstruction_views(model: VideoMAEPretrain, video: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The four views of one clip.

    video: (1, C, T, H, W) normalised clip; mask: (1, L) bool, True = masked.
    Returns (4, T, H, W, 3) float32 in [0, 1]: original, masked input, reconstruction,
    reconstruction with the visible tubelets pasted back (rows of :data:`ROW_NAMES`).
    """
    if video.dim() != 5 or video.shape[0] != 1:
        raise ValueError(f"video must be (1, C, T, H, W), got shape {tuple(video.shape)}")
    was_training = model.training
    model.eval()
    try:
        recon = model.reconstruct(video, mask)  # (1, C, T, H, W): prediction where masked
    finally:
        model.train(was_training)
    k = model.in_chans * model.tubelet_size * model.patch_size ** 2
    pix_mask = unpatchify(repeat(mask.float(), "b l -> b l k", k=k), model.grid, model.tubelet_size,
                          model.patch_size)[0, 0].cpu().bool()  # (T, H, W)
    mean, std = model.pixel_mean, model.pixel_std
    orig, rec = _to_unit(video[0], mean, std), _to_unit(recon[0], mean, std)
    if orig.shape[-1] == 1:
        orig, rec = orig.expand(-1, -1, -1, 3), rec.expand(-1, -1, -1, 3)
    orig, rec = orig[..., :3], rec[..., :3]
    grey = torch.full_like(orig, GREY)
    hidden = pix_mask[..., None]
    views = torch.stack([orig, torch.where(hidden, grey, orig), torch.where(hidden, rec, grey), rec])
    return views.numpy().astype(np.float32)


def _tile(views: np.ndarray, scale: int, pad: int, label_width: int) -> np.ndarray:
    """(R, T, H, W, 3) in [0, 1] -> uint8 grid image with row labels on the left."""
    r, t, h, w, _ = views.shape
    hs, ws = h * scale, w * scale
    canvas = np.full((pad + r * (hs + pad), label_width + pad + t * (ws + pad), 3), 255, np.uint8)
    img = (views * 255).round().astype(np.uint8)
    if scale > 1:
        img = img.repeat(scale, axis=2).repeat(scale, axis=3)
    for i in range(r):
        for j in range(t):
            y, x = pad + i * (hs + pad), label_width + pad + j * (ws + pad)
            canvas[y:y + hs, x:x + ws] = img[i, j]
    if label_width:
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        for i, name in enumerate(ROW_NAMES[:r]):
            draw.text((4, pad + i * (hs + pad) + hs // 2 - 5), name, fill=(0, 0, 0))
        canvas = np.asarray(pil)
    return canvas


def _scale_for(height: int, min_height: int = 96) -> int:
    return max(1, -(-min_height // height))


def reconstruction_grid(model: VideoMAEPretrain, video: torch.Tensor, mask: torch.Tensor, *,
                        pad: int = 2, labels: bool = True) -> np.ndarray:
    """A grid picture: columns are frames, rows are :data:`ROW_NAMES`.

    video: (1, C, T, H, W) normalised clip; mask: (1, L) bool, True = masked. Small clips are
    enlarged (nearest neighbour) to at least 96 pixels high. Returns (H_img, W_img, 3) uint8.
    """
    views = reconstruction_views(model, video, mask)
    return _tile(views, _scale_for(views.shape[2]), pad, 110 if labels else 0)


def load_clip(path: str | Path, *, num_frames: int, img_size: int, sampling_rate: int = 4,
              backend: Literal["auto", "decord", "pyav"] = "auto", mean: torch.Tensor | None = None,
              std: torch.Tensor | None = None) -> torch.Tensor:
    """The centre clip of a video file, ready for the model.

    `num_frames` frames every `sampling_rate` frames around the middle (clamped for short
    videos), shorter side resized to `img_size` and centre-cropped (the evaluation transform),
    normalised with `mean`/`std` (ImageNet by default). Returns (1, C, T, img_size, img_size).
    """
    src = open_video(path, backend=backend)
    try:
        idx = uniform_clips(src.num_frames, num_frames, sampling_rate, 1)[0]
        frames = torch.from_numpy(np.ascontiguousarray(src.get(idx)))  # (T, H, W, 3) uint8
    finally:
        src.close()
    mean_t = tuple(IMAGENET_DEFAULT_MEAN) if mean is None else tuple(mean.tolist())
    std_t = tuple(IMAGENET_DEFAULT_STD) if std is None else tuple(std.tolist())
    return test_transform(img_size, img_size, 1, mean=mean_t, std=std_t)(frames)  # (1, C, T, H, W)


def write_visualization(model: VideoMAEPretrain, video: str | Path | torch.Tensor, out_dir: str | Path, *,
                        seed: int = 0, fps: float = 4.0, name: str | None = None,
                        sampling_rate: int = 4) -> list[Path]:
    """Write ``<name>_grid.png`` (the grid) and ``<name>.gif`` (the four views side by side).

    video: a video file (its centre clip is taken, see :func:`load_clip`) or a (1, C, T, H, W)
    normalised clip. The mask is drawn from the model's mask settings with a generator seeded by
    `seed`. Returns the files written.
    """
    if not isinstance(video, torch.Tensor):
        name = name or Path(video).stem
        t, h, _ = model.grid
        video = load_clip(video, num_frames=t * model.tubelet_size, img_size=h * model.patch_size,
                          sampling_rate=sampling_rate, mean=model.pixel_mean, std=model.pixel_std)
    name = name or "clip"
    if video.dim() == 4:
        video = video[None]
    device = next(model.parameters()).device
    video = video.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    mask, _ = model.sample_masks(1, device, generator=gen, video=video)  # (motion masks read the clip)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    views = reconstruction_views(model, video, mask)
    scale = _scale_for(views.shape[2])
    png = out / f"{name}_grid.png"
    Image.fromarray(_tile(views, scale, 2, 110)).save(png)
    # animation: one frame per time step, the four views in a row
    strips = [_tile(rearrange(views[:, j:j + 1], "r 1 h w c -> 1 r h w c"), scale, 2, 0)
              for j in range(views.shape[1])]
    gif = out / f"{name}.gif"
    frames = [Image.fromarray(s) for s in strips]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    log.info("wrote %s and %s", png, gif)
    return [png, gif]
