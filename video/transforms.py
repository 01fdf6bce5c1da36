"""Clip transforms, batched over the frames and consistent across them.

A clip is a channels-last tensor ``video: (T, H, W, C)`` (uint8 pixels 0-255, or float on the
same 0-255 scale). Every random choice (crop box, flip, RandAugment ops, erased box) is drawn
once per clip from an explicit ``torch.Generator`` (``None``: torch's global generator) and
applied to all T frames in one tensor operation, as VideoMAE does with its per-clip PIL loops.
``normalize`` ends a pipeline with the model layout ``(C, T, H, W)`` float.

Pipelines (VideoMAE recipes; sizes and probabilities are arguments):

- :func:`pretrain_transform`: GroupMultiScaleCrop (scales 1, .875, .75, .66, max distortion 1,
  13 fixed crop positions) resized to `size`, then normalisation. VideoMAE's pretraining uses no
  flip; ``flip=True`` adds one.
- :func:`finetune_train_transform`: RandAugment ``rand-m7-n4-mstd0.5-inc1`` on the full frames,
  random resized crop (scale 0.08-1, aspect 3/4-4/3, log-uniform aspect, 10 tries then a centre
  crop), horizontal flip (off for SSv2-style data), normalisation, random erasing
  (p 0.25, per-pixel noise, one box shared by all frames).
- :func:`test_transform`: short side resized to `short_side` (bilinear, no antialias, as
  VideoMAE's cv2 resize), then `num_crops` crops spread along the long side (VideoMAE's
  left/centre/right or top/centre/bottom test crops; one crop is centred), normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torchvision.transforms.v2.functional as TF
from timm.data.auto_augment import rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode

Size = int | tuple[int, int]


def _hw(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _rand(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen))


def _uniform(gen: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * _rand(gen)


def _randint(gen: torch.Generator | None, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def _frames_first(video: torch.Tensor) -> torch.Tensor:
    """(..., T, H, W, C) -> (N, C, H, W) view with N = prod(...) * T."""
    if video.dim() < 4:
        raise ValueError(f"expected a clip (..., T, H, W, C), got shape {tuple(video.shape)}")
    return video.reshape(-1, *video.shape[-3:]).permute(0, 3, 1, 2)


def _channels_last(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (..., T, H, W, C) with the leading axes of `like`."""
    return x.permute(0, 2, 3, 1).reshape(*like.shape[:-3], *x.shape[-2:], x.shape[1])


def resize(video: torch.Tensor, size: Size, *, antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of every frame: (..., T, H, W, C) -> (..., T, h, w, C), same dtype."""
    h, w = _hw(size)
    if video.shape[-3:-1] == (h, w):
        return video
    x = _frames_first(video)
    out = TF.resize(x, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=antialias)
    return _channels_last(out, video)


def short_side_resize(video: torch.Tensor, size: int, *, antialias: bool = False) -> torch.Tensor:
    """Resize so that the short side is `size`; the long side becomes ``int(size * long / short)``.

    video: (..., T, H, W, C). Bilinear without antialiasing matches VideoMAE's cv2 test resize.
    """
    h, w = video.shape[-3:-1]
    if min(h, w) == size:
        return video
    if w < h:
        new = (int(size * h / w), size)
    else:
        new = (size, int(size * w / h))
    return resize(video, new, antialias=antialias)


def crop(video: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """(..., T, H, W, C) -> (..., T, height, width, C), the same box in every frame."""
    H, W = video.shape[-3:-1]
    if top < 0 or left < 0 or top + height > H or left + width > W:
        raise ValueError(f"crop box (top={top}, left={left}, {height}x{width}) leaves the "
                         f"{H}x{W} frame")
    return video[..., top:top + height, left:left + width, :]


def center_crop(video: torch.Tensor, size: Size) -> torch.Tensor:
    """Central (h, w) crop: (..., T, H, W, C) -> (..., T, h, w, C)."""
    h, w = _hw(size)
    H, W = video.shape[-3:-1]
    return crop(video, int(round((H - h) / 2.0)), int(round((W - w) / 2.0)), h, w)


def three_crop(video: torch.Tensor, size: int, num_crops: int = 3) -> torch.Tensor:
    """Square test crops spread along the long side.

    video: (..., T, H, W, C) -> (num_crops, ..., T, size, size, C).

    Crop k starts at ``int(k * (long - size) / (num_crops - 1))`` along the long side (left,
    centre, right for 3 crops of a wide frame; top, centre, bottom of a tall one), centred along
    the short side, as VideoMAE's test views; a single crop is the centre crop.
    """
    if num_crops == 1:
        return center_crop(video, size)[None]
    H, W = video.shape[-3:-1]
    if min(H, W) < size:
        raise ValueError(f"frames {H}x{W} are smaller than the crop size {size}")
    tall = H > W
    long_side = H if tall else W
    step = (long_side - size) / (num_crops - 1)
    across = int(round(((W if tall else H) - size) / 2.0))
    views = []
    for k in range(num_crops):
        along = int(k * step)
        top, left = (along, across) if tall else (across, along)
        views.append(crop(video, top, left, size, size))
    return torch.stack(views)


def horizontal_flip(video: torch.Tensor, p: float = 0.5, *,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip all frames left-right with probability p: (..., T, H, W, C) -> same."""
    if p > 0 and _rand(generator) < p:
        return video.flip(-2)
    return video


def normalize(video: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Normalise and move channels first.

    video: (..., T, H, W, C) pixels on the 0-255 scale (uint8 or float);
    returns (..., C, T, H, W) float32 ``(video / 255 - mean) / std``.
    """
    c = video.shape[-1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {c} channels")
    m = torch.tensor(mean, dtype=torch.float32, device=video.device)
    s = torch.tensor(std, dtype=torch.float32, device=video.device)
    x = (video.float() / 255.0 - m) / s
    return x.movedim(-1, -4)


# --------------------------------------------------------------------------------------------
# Random crops
# --------------------------------------------------------------------------------------------


def multi_scale_crop_params(height: int, width: int, size: Size, *,
                            generator: torch.Generator | None = None,
                            scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66),
                            max_distort: int = 1, fix_crop: bool = True,
                            more_fix_crop: bool = True) -> tuple[int, int, int, int]:
    """VideoMAE's GroupMultiScaleCrop box ``(top, left, crop_h, crop_w)`` for a frame.

    Crop sides are ``int(min(H, W) * s)`` for each scale (snapped to the output side when within
    3 pixels); a (w, h) pair is drawn among those whose scale indices differ by at most
    `max_distort`; the offset is drawn among 5 fixed positions (corners and centre), or 13 with
    `more_fix_crop`, on a grid of quarter steps ``(H - crop_h) // 4`` (``fix_crop``), or
    uniformly otherwise.
    """
    out_h, out_w = _hw(size)
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    crop_hs = [out_h if abs(x - out_h) < 3 else x for x in sides]
    crop_ws = [out_w if abs(x - out_w) < 3 else x for x in sides]
    pairs = [(w, h) for i, h in enumerate(crop_hs) for j, w in enumerate(crop_ws)
             if abs(i - j) <= max_distort]
    crop_w, crop_h = pairs[_randint(generator, 0, len(pairs) - 1)]
    crop_w, crop_h = min(crop_w, width), min(crop_h, height)
    if not fix_crop:
        return (_randint(generator, 0, height - crop_h), _randint(generator, 0, width - crop_w),
                crop_h, crop_w)
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2)]  # (w steps, h steps)
    if more_fix_crop:
        grid += [(0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    gw, gh = grid[_randint(generator, 0, len(grid) - 1)]
    return gh * hs, gw * ws, crop_h, crop_w


def multi_scale_crop(video: torch.Tensor, size: Size = 224, *,
                     generator: torch.Generator | None = None,
                     scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66), max_distort: int = 1,
                     fix_crop: bool = True, more_fix_crop: bool = True) -> torch.Tensor:
    """VideoMAE's multi-scale crop, resized to `size`: (T, H, W, C) -> (T, h, w, C), same dtype.

    The resize is bilinear with antialiasing, like PIL's ``resize(BILINEAR)`` VideoMAE uses.
    """
    H, W = video.shape[-3:-1]
    top, left, ch, cw = multi_scale_crop_params(H, W, size, generator=generator, scales=scales,
                                                max_distort=max_distort, fix_crop=fix_crop,
                                                more_fix_crop=more_fix_crop)
    return resize(crop(video, top, left, ch, cw), size, antialias=True)


def random_resized_crop_params(height: int, width: int, *,
                               generator: torch.Generator | None = None,
                               scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3),
                               attempts: int = 10) -> tuple[int, int, int, int]:
    """Inception-style box ``(top, left, h, w)``: area fraction uniform in `scale`, aspect
    (w/h) log-uniform in `ratio`; after `attempts` misses, the largest centred box whose aspect
    lies in `ratio` (VideoMAE's ``_get_param_spatial_crop``)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = _uniform(generator, *scale) * area
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(video: torch.Tensor, size: Size = 224, *,
                        generator: torch.Generator | None = None,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        antialias: bool = False) -> torch.Tensor:
    """One random resized crop shared by all frames: (T, H, W, C) -> (T, h, w, C), same dtype.

    Bilinear without antialiasing by default, as VideoMAE's ``F.interpolate`` call.
    """
    H, W = video.shape[-3:-1]
    top, left, h, w = random_resized_crop_params(H, W, generator=generator, scale=scale,
                                                 ratio=ratio)
    return resize(crop(video, top, left, h, w), size, antialias=antialias)


# --------------------------------------------------------------------------------------------
# Random erasing
# --------------------------------------------------------------------------------------------


def random_erasing(x: torch.Tensor, p: float = 0.25, *, mode: Literal["pixel", "rand", "const"]
                   = "pixel", min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, max_aspect: float | None = None, max_count: int = 1,
                   attempts: int = 100, generator: torch.Generator | None = None) -> torch.Tensor:
    """Erase boxes shared by all frames of a normalised clip (VideoMAE's "cube" erasing).

    x: (C, T, H, W) normalised float clip; returns a new tensor. With probability `p`, 1 to
    `max_count` boxes (area fraction uniform in [min_area, max_area] / count, aspect
    log-uniform in [min_aspect, 1/min_aspect]) are filled in every frame with per-pixel normal
    noise (``pixel``, drawn per frame), a per-channel normal colour (``rand``) or zeros
    (``const``).
    """
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}")
    if p <= 0 or _rand(generator) > p:
        return x
    C, T, H, W = x.shape
    out = x.clone()
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    count = max_count if max_count <= 1 else _randint(generator, 1, max_count)
    for _ in range(count):
        for _ in range(attempts):
            target = _uniform(generator, min_area, max_area) * H * W / count
            aspect = math.exp(_uniform(generator, *log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < W and h < H:
                top, left = _randint(generator, 0, H - h), _randint(generator, 0, W - w)
                if mode == "pixel":
                    fill = torch.randn((C, T, h, w), generator=generator, dtype=x.dtype)
                elif mode == "rand":
                    fill = torch.randn((C, T, 1, 1), generator=generator, dtype=x.dtype)
                else:
                    fill = torch.zeros((C, T, 1, 1), dtype=x.dtype)
                out[:, :, top:top + h, left:left + w] = fill.to(x.device)
                break
    return out


# --------------------------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------------------------

_LEVEL_DENOM = 10.0  # timm's magnitude scale: M10 is the strongest level
_SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel",
           "TranslateYRel", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
           "SharpnessIncreasing"}


def rand_augment_level(name: str, magnitude: float, hparams: dict,
                       negate: bool = False) -> float | None:
    """The argument timm's RandAugment op `name` takes at `magnitude` (its ``LEVEL_TO_ARG``).

    `negate` stands for timm's random sign of the signed ops; None for ops without argument.
    """
    lv = magnitude / _LEVEL_DENOM
    sign = -1.0 if negate and name in _SIGNED else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return sign * lv * 30.0
    if name == "Posterize":
        return float(int(lv * 4))
    if name == "PosterizeIncreasing":
        return float(4 - int(lv * 4))
    if name == "PosterizeOriginal":
        return float(int(lv * 4) + 4)
    if name == "Solarize":
        return float(min(256, int(lv * 256)))
    if name == "SolarizeIncreasing":
        return float(256 - min(256, int(lv * 256)))
    if name == "SolarizeAdd":
        return float(min(128, int(lv * 110)))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return lv * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing"):
        return max(0.1, 1.0 + sign * lv * 0.9)
    if name in ("ShearX", "ShearY"):
        return sign * lv * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * lv * hparams.get("translate_pct", 0.45)
    if name in ("TranslateX", "TranslateY"):
        return sign * lv * float(hparams["translate_const"])
    if name == "Desaturate":
        return min(1.0, max(0.5, 0.5 + 0.5 * lv))
    raise ValueError(f"RandAugment op {name!r} is not supported for clips")


def apply_rand_augment_op(x: torch.Tensor, name: str, arg: float | None, *,
                          fill: Sequence[int] = (128, 128, 128)) -> torch.Tensor:
    """Apply one RandAugment op with argument `arg` to every frame.

    x: (N, C, H, W) uint8 frames. Matches timm's PIL op of the same name (colour ops exactly or
    within 1 level; geometric ops up to edge pixels: bilinear, since torchvision's tensor affine
    has no bicubic).
    """
    fill_l = [float(f) for f in fill]
    bil = InterpolationMode.BILINEAR
    H, W = x.shape[-2:]
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    if name == "Invert":
        return TF.invert(x)
    assert arg is not None
    if name == "Rotate":
        return TF.rotate(x, arg, interpolation=bil, fill=fill_l)
    if name.startswith("Posterize"):
        return x if arg >= 8 else TF.posterize(x, int(arg))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return x if arg >= 256 else TF.solarize(x, float(arg))
    if name == "SolarizeAdd":
        added = (x.to(torch.int16) + int(arg)).clamp_(max=255).to(torch.uint8)
        return torch.where(x < 128, added, x)
    if name.startswith("Color") or name == "Desaturate":
        factor = arg if name != "Desaturate" else min(1.0, max(0.0, 1.0 - arg))
        return TF.adjust_saturation(x, factor)
    if name.startswith("Contrast"):
        return TF.adjust_contrast(x, arg)
    if name.startswith("Brightness"):
        return TF.adjust_brightness(x, arg)
    if name.startswith("Sharpness"):
        return TF.adjust_sharpness(x, arg)
    if name in ("ShearX", "ShearY"):
        # PIL's (1, f, 0, 0, 1, 0) affine shears about the image corner
        deg = math.degrees(math.atan(arg))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return TF.affine(x, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear,
                         center=[0.0, 0.0], interpolation=bil, fill=fill_l)
    if name.startswith("Translate"):
        rel = name.endswith("Rel")
        if name.startswith("TranslateX"):
            shift = [-(arg * W if rel else arg), 0.0]
        else:
            shift = [0.0, -(arg * H if rel else arg)]
        return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                         interpolation=bil, fill=fill_l)
    raise ValueError(f"RandAugment op {name!r} is not supported for clips")


@dataclass(frozen=True)
class _OpSpec:
    name: str
    prob: float
    magnitude: float
    magnitude_std: float
    magnitude_max: float | None


class VideoRandAugment:
    """timm's RandAugment policy, drawn once per clip and applied to all frames at once.

    The policy (op list, ``n`` layers, magnitude ``m``, ``mstd``, ``inc``, weights) is parsed by
    ``timm.data.auto_augment.rand_augment_transform`` from `config` (e.g. VideoMAE's
    ``rand-m7-n4-mstd0.5-inc1``); per clip we draw, like timm's ``RandAugment`` /
    ``AugmentOp``: `n` ops (with replacement unless weighted), then for each op its 0.5
    application coin, its magnitude ``N(m, mstd)`` clipped to [0, 10] and the sign of signed
    ops, and apply it with torchvision's tensor ops to the (T, C, H, W) batch. That is VideoMAE's
    video RandAugment (one op draw per clip, applied to each frame) without the PIL loop.
    Geometric ops use bilinear interpolation (VideoMAE: bicubic) and fill grey (128).

    Call: ``video (T, H, W, C) uint8 -> (T, H, W, C) uint8``.
    """

    def __init__(self, config: str = "rand-m7-n4-mstd0.5-inc1", *, hparams: dict | None = None,
                 fill: Sequence[int] = (128, 128, 128)) -> None:
        if not config.startswith("rand"):
            raise ValueError(f"expected a RandAugment config 'rand-...', got {config!r}")
        hp = {"translate_const": 100, **(hparams or {})}
        policy = rand_augment_transform(config, hp)
        self.config = config
        self.hparams = hp
        self.num_layers = int(policy.num_layers)
        weights = policy.choice_weights
        self.choice_weights = (None if weights is None
                               else torch.as_tensor(weights, dtype=torch.float64))
        self.ops = [_OpSpec(op.name, float(op.prob), float(op.magnitude),
                            float(op.magnitude_std), op.magnitude_max) for op in policy.ops]
        for op in self.ops:  # fail on an unsupported op now, not in a worker
            rand_augment_level(op.name, op.magnitude, hp)
        self.fill = tuple(int(f) for f in hp.get("img_mean", fill))

    def sample(self, generator: torch.Generator | None = None) -> list[tuple[str, float | None]]:
        """Draw one clip's ops: a list of (name, argument) to apply in order."""
        if self.choice_weights is None:
            picks = torch.randint(len(self.ops), (self.num_layers,), generator=generator)
        else:
            picks = torch.multinomial(self.choice_weights, self.num_layers, replacement=False,
                                      generator=generator)
        chosen = []
        for k in picks.tolist():
            op = self.ops[k]
            if op.prob < 1.0 and _rand(generator) > op.prob:
                continue
            m = op.magnitude
            if op.magnitude_std == float("inf"):
                m = _uniform(generator, 0.0, m)
            elif op.magnitude_std > 0:
                m = m + op.magnitude_std * float(torch.randn((), generator=generator))
            m = max(0.0, min(m, op.magnitude_max or _LEVEL_DENOM))
            negate = _rand(generator) > 0.5
            chosen.append((op.name, rand_augment_level(op.name, m, self.hparams, negate)))
        return chosen

    def __call__(self, video: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if video.dtype != torch.uint8:
            raise TypeError(f"RandAugment expects uint8 frames, got {video.dtype}")
        x = _frames_first(video)
        for name, arg in self.sample(generator):
            x = apply_rand_augment_op(x, name, arg, fill=self.fill)
        return _channels_last(x, video)

    def __repr__(self) -> str:
        return f"VideoRandAugment({self.config!r})"


# --------------------------------------------------------------------------------------------
# Pipelines: call(video (T, H, W, C) uint8, generator=None)
# --------------------------------------------------------------------------------------------


@dataclass
class PretrainTransform:
    """Multi-scale crop (+ flip), normalisation: (T, H, W, C) uint8 -> (C, T, h, w) float."""

    size: Size = 224
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    flip: bool = False
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    def __call__(self, video: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x = multi_scale_crop(video, self.size, generator=generator, scales=self.scales)
        if self.flip:
            x = horizontal_flip(x, 0.5, generator=generator)
        return normalize(x, self.mean, self.std)


@dataclass
class FinetuneTrainTransform:
    """VideoMAE fine-tuning augmentation: (T, H, W, C) uint8 -> (C, T, h, w) float.

    RandAugment (on the uint8 frames) -> random resized crop -> flip -> normalise -> random
    erasing. VideoMAE normalises before cropping; bilinear resizing commutes with the affine
    normalisation, so cropping first (in float) gives the same values for less work.
    """

    size: Size = 224
    auto_augment: str | None = "rand-m7-n4-mstd0.5-inc1"
    flip: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    reprob: float = 0.25
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = 1
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    rand_augment: VideoRandAugment | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.auto_augment:
            h, w = _hw(self.size)
            # as VideoMAE's create_random_augment: translate_const = 45% of the crop side
            self.rand_augment = VideoRandAugment(
                self.auto_augment, hparams={"translate_const": int(min(h, w) * 0.45)})

    def __call__(self, video: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if self.rand_augment is not None:
            video = self.rand_augment(video, generator)
        H, W = video.shape[-3:-1]
        box = random_resized_crop_params(H, W, generator=generator, scale=self.scale,
                                         ratio=self.ratio)
        x = resize(crop(video, *box).float(), self.size, antialias=False)
        if self.flip:
            x = horizontal_flip(x, 0.5, generator=generator)
        x = normalize(x, self.mean, self.std)
        if self.reprob > 0:
            x = random_erasing(x, self.reprob, mode=self.remode, max_count=self.recount,
                               generator=generator)
        return x


@dataclass
class TestTransform:
    """Short-side resize + `num_crops` crops + normalisation.

    Call: (T, H, W, C) uint8 -> (num_crops, C, T, size, size) float (a leading crop axis even
    for one crop). With ``size == short_side`` (VideoMAE: 224 and 224) the crops span the whole
    short side, as VideoMAE's test views.
    """

    size: int = 224
    short_side: int = 224
    num_crops: int = 1
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    def __call__(self, video: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x = short_side_resize(video, self.short_side)
        crops = three_crop(x, self.size, self.num_crops)  # (N, T, s, s, C)
        return normalize(crops, self.mean, self.std)


def pretrain_transform(size: Size = 224, scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66), *,
                       flip: bool = False, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                       std: Sequence[float] = IMAGENET_DEFAULT_STD) -> PretrainTransform:
    """VideoMAE pretraining augmentation (multi-scale crop, no flip by default)."""
    return PretrainTransform(size, tuple(scales), flip, tuple(mean), tuple(std))


def finetune_train_transform(size: Size = 224, *, auto_augment: str | None =
                             "rand-m7-n4-mstd0.5-inc1", flip: bool = True,
                             reprob: float = 0.25, remode: Literal["pixel", "rand", "const"] =
                             "pixel", recount: int = 1, scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                             std: Sequence[float] = IMAGENET_DEFAULT_STD) -> FinetuneTrainTransform:
    """VideoMAE fine-tuning augmentation; ``flip=False`` for SSv2-style data."""
    return FinetuneTrainTransform(size, auto_augment, flip, tuple(scale), tuple(ratio), reprob,
                                  remode, recount, tuple(mean), tuple(std))


def test_transform(size: int = 224, short_side: int = 224, num_crops: int = 1, *,
                   mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD) -> TestTransform:
    """Evaluation views: short side to `short_side`, `num_crops` crops of `size` (3: VideoMAE)."""
    if size > short_side:
        raise ValueError(f"crop size {size} exceeds the resized short side {short_side}")
    return TestTransform(size, short_side, num_crops, tuple(mean), tuple(std))


test_transform.__test__ = False  # type: ignore[attr-defined]  (not a pytest test)
TestTransform.__test__ = False  # type: ignore[attr-defined]

__all__ = [
    "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "resize", "short_side_resize", "crop",
    "center_crop", "three_crop", "horizontal_flip", "normalize", "multi_scale_crop_params",
    "multi_scale_crop", "random_resized_crop_params", "random_resized_crop", "random_erasing",
    "rand_augment_level", "apply_rand_augment_op", "VideoRandAugment", "PretrainTransform",
    "FinetuneTrainTransform", "TestTransform", "pretrain_transform", "finetune_train_transform",
    "test_transform",
]
