"""Action recognition with VideoMAE: fine-tuning, multi-view evaluation, linear probing, prediction.

Tasks (``task:`` key of a config):

- ``videomae_finetune``: the official VideoMAE fine-tuning recipe. The classifier (encoder over
  all tokens, mean pooling, ``fc_norm``, dropout, linear head) starts from our pretraining
  checkpoints, converted official / Hugging Face weights (``mm3d convert``), an official
  ``.pth`` or a Hugging Face directory; the position table is interpolated when the frame count
  or resolution differs, and a head of another class count is left out (both reported in the
  log). Training uses RandAugment, random resized crop, flip (off for SSv2), random erasing,
  repeated augmentation (``data.num_sample`` views of each decoded clip), timm's ``Mixup``
  (mixup 0.8 / cutmix 1.0 / label smoothing 0.1) and layer-wise LR decay through timm's
  optimizer factory (``optim.layer_decay``); EMA comes from the trainer (``train.ema``).
- ``videomae_linprobe``: the same data and evaluation with the encoder frozen; only a
  ``BatchNorm1d`` (no affine) + linear head on the pooled features is trained (MAE's probe).

Evaluation scores ``num_clips x num_crops`` views per video (5 x 3 Kinetics, 2 x 3 SSv2): the
softmax of every view is averaged per video by :class:`mm3d.metrics.ClassificationMeter`, which
gathers the scores of all DDP ranks (no per-rank files) and counts each video once. Metrics:
top-1, top-5, mean per-class accuracy and the NLL of the averaged probabilities (``loss``).
:meth:`VideoMAEFinetuneTask.write_report` writes the common layout of :mod:`mm3d.results`
(``results.md``, ``<split>/predictions.json``, ``<split>/per_class.csv``, ``<split>/confusion.png``);
:meth:`~VideoMAEFinetuneTask.predict` serves ``mm3d predict`` with the same views and decoders.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping

import torch
from einops import rearrange
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import nn
from torch.utils.data import Dataset

from mm3d.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_model_weights
from mm3d.config import ConfigError, RunConfig
from mm3d.datacheck import account_missing, missing_markdown, unscored_samples
from mm3d.errors import MissingFileError, UserError
from mm3d.metrics import ClassificationMeter, ClassificationResult
from mm3d.registry import register_task
from mm3d.results import (per_class_markdown, run_protocol_label, selection_split, write_classification_split,
                          write_results_md)
from mm3d.task import EvalResult, Task
from mm3d.video.convert import classifier_init_state, hf_to_ours, load_hf_dir, official_to_ours
from mm3d.video.data import VideoDataset, VideoRecord, read_annotation_list, read_label_map
from mm3d.video.decode import RawFrameSource, check_decode_settings, open_record
from mm3d.video.transforms import finetune_train_transform, test_transform
from mm3d.video.models import VideoMAEClassifier, VideoMAEConfig, build_classifier
from mm3d.video.shards import VideoShardDataset, check_shard_keys, shard_dataset_spec
from mm3d.video.tasks import clip_preprocessing
from mm3d.video.tokens import adapt_pos_embeds, token_grid

log = logging.getLogger(__name__)

REPORT_COLUMNS = ("top1", "top5", "mean_class_acc", "loss", "num_samples", "num_missing")  # of results.md

__all__ = [
    "FinetuneDataConfig",
    "MixupConfig",
    "VideoFinetuneConfig",
    "VideoMixup",
    "VideoMAEFinetuneTask",
    "VideoMAELinearProbeTask",
    "collate_views",
    "classifier_init_from",
    "read_views",
    "label_names",
]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneDataConfig:
    """The ``data`` section of a fine-tuning / evaluation run.

    Lists are VideoMAE / mmaction2 ``path label`` lists (or rawframe ``dir total_frames label``
    lists, see :func:`mm3d.video.data.read_annotation_list`); relative paths inside them are
    joined to `root`, and a relative list or label-map path is looked up in the working
    directory, then under `root`. Every label must lie below ``model.num_classes`` (the head's
    size); a label map (one class name a line) must have exactly that many names. Clip length
    and crop size come from the model section (``model.num_frames``, ``model.img_size``).

    ``format: shards`` reads prepared shards (``mm3d data prepare``) instead of the lists: ``shards``
    (training), ``val_shards``, ``test_shards`` name shard folders, manifests or brace patterns;
    ``shards`` may also be a prepared root whose ``dataset.json`` gives every split
    (:func:`mm3d.video.shards.shard_dataset_spec`). Labels come from each sample's ``key.json``.
    """

    format: Literal["files", "shards"] = "files"  # files: the lists below; shards: prepared shards
    shards: str = ""
    val_shards: str = ""
    test_shards: str = ""
    shuffle_buffer: int = 1000  # the training sampler's shuffle window (mm3d.shards.ShardSampler)
    root: str = ""
    train_list: str = ""
    val_list: str = ""  # scored with val_num_clips x val_num_crops views (checkpoint selection)
    test_list: str = ""  # scored with test_num_clips x test_num_crops views
    list_format: Literal["auto", "video", "rawframes"] = "auto"
    label_map: str = ""
    # temporal sampling
    sampling: Literal["dense", "segment"] = "dense"  # segment: TSN sampling (SSv2)
    sampling_rate: int = 4  # dense sampling frame step (4 Kinetics, 2 SSv2-like dense lists)
    dense_spacing: Literal["stride", "spread"] = "spread"  # "spread": VideoMAE's fine-tuning loader
    # training augmentation
    auto_augment: str = "rand-m7-n4-mstd0.5-inc1"  # timm RandAugment string ("" disables)
    flip: bool = True  # horizontal flip; false for SSv2-style (direction-sensitive) classes
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop area range
    rrc_ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # and aspect range
    reprob: float = 0.25  # random erasing probability
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = 1
    num_sample: int = 2  # repeated augmentation: augmented views of each decoded training clip
    # evaluation views
    short_side: int | None = None  # evaluation resize of the short side (None: model.img_size)
    val_num_clips: int = 1
    val_num_crops: int = 1
    test_num_clips: int = 5  # 5 x 3 Kinetics / UCF101 / HMDB51, 2 x 3 SSv2
    test_num_crops: int = 3
    # decoding
    backend: Literal["auto", "decord", "pyav", "torchcodec"] = "auto"  # see mm3d.video.decode
    decode_device: Literal["cpu", "cuda"] = "cpu"  # cuda: torchcodec only, training clips stay on the GPU
    num_threads: int = 1
    rawframe_template: str = "img_{:05d}.jpg"
    rawframe_start: int = 1
    max_failure_ratio: float = 0.01

    def validate(self) -> None:
        for name in ("sampling_rate", "recount", "num_sample", "val_num_clips", "val_num_crops",
                     "test_num_clips", "test_num_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.reprob <= 1.0:
            raise ValueError(f"reprob must be in [0, 1], got {self.reprob}")
        lo, hi = self.rrc_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"rrc_scale must satisfy 0 < min <= max <= 1, got {self.rrc_scale}")
        if not 0.0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ValueError(f"rrc_ratio must satisfy 0 < min <= max, got {self.rrc_ratio}")
        if self.auto_augment and not self.auto_augment.startswith("rand"):
            raise ValueError(f"auto_augment must be a timm RandAugment string 'rand-...' or empty, "
                             f"got {self.auto_augment!r}")
        if self.short_side is not None and self.short_side < 1:
            raise ValueError(f"short_side must be positive, got {self.short_side}")
        if not 0.0 <= self.max_failure_ratio <= 1.0:
            raise ValueError(f"max_failure_ratio must be in [0, 1], got {self.max_failure_ratio}")
        check_shard_keys(self)
        check_decode_settings(self.backend, self.decode_device)


@dataclass
class MixupConfig:
    """timm ``Mixup`` / CutMix and label smoothing (VideoMAE: 0.8 / 1.0 / 0.1).

    Mixing is active when ``mixup > 0`` or ``cutmix > 0`` (or ``cutmix_minmax`` is set); the
    targets then become soft and carry the smoothing. Without mixing, ``label_smoothing`` goes
    to the model's cross-entropy.
    """

    mixup: float = 0.8  # mixup alpha
    cutmix: float = 1.0  # cutmix alpha
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0  # probability of mixing a batch
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def validate(self) -> None:
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {self.mixup}, {self.cutmix}")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class VideoFinetuneConfig(RunConfig):
    """A VideoMAE fine-tuning, linear-probing or evaluation run.

    The optimiser and trainer sections keep the core defaults; the configs in ``configs/video/``
    spell out the official recipe (layer decay, warm-up, ``train.best_metric: top1``...).
    ``protocol=paper`` runs the official procedure around that recipe (:meth:`paper_protocol`).
    """

    task: str = "videomae_finetune"
    model: VideoMAEConfig = field(default_factory=VideoMAEConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)

    paper_reference: ClassVar[str] = "VideoMAE run_class_finetuning.py, MODEL_ZOO.md"

    def paper_protocol(self) -> dict[str, Any]:
        """What MCG-NJU/VideoMAE's fine-tuning does that our default does not:

        - ``train.select_on: last``: ``run_class_finetuning.py`` ends with ``final_test`` of the
          model of the last epoch (its per-epoch validation max only names ``checkpoint-best.pth``,
          which nothing reports), and MODEL_ZOO.md publishes that final multi-view test. For
          Kinetics-400 and SSv2 its ``test.csv`` is ``val.csv`` (DATASET.md), so a selection on
          val would be one on test; the official runs select nothing.
        - ``eval.allow_missing: true``: in test mode ``VideoClsDataset`` (``kinetics.py``) and
          ``SSVideoClsDataset`` (``ssv2.py``) replace an unreadable view with a random other one,
          and ``merge`` (``engine_for_finetuning.py``) counts each video once, so unreadable test
          videos drop out of the published number. Here the metric is reported over the videos
          scored, with the missing ones counted and named beside it (our default refuses it).

        The views (``data.test_num_clips x data.test_num_crops``), the training list and the
        recipe are the config's own (the benchmark files hold the official ones). The official
        scripts are fine-tuning scripts: a linear probe (``videomae_linprobe``) has none.
        """
        if self.task != "videomae_finetune":
            raise ConfigError(f"protocol=paper: MCG-NJU/VideoMAE released no procedure for task {self.task!r} (its "
                              f"scripts fine-tune; {self.paper_reference}); drop protocol=paper")
        return {"train": {"select_on": "last"}, "eval": {"allow_missing": True}}

    def validate(self) -> None:
        super().validate()
        if self.model.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1 for classification, got {self.model.num_classes}")
        if self.model.label_smoothing:
            raise ValueError("set label smoothing with mixup.label_smoothing (model.label_smoothing must stay 0 "
                             "for fine-tuning)")
        if self.data.decode_device != "cpu" and self.train.num_workers > 0:
            raise ValueError(f"data.decode_device={self.data.decode_device} decodes in the training process: set "
                             f"train.num_workers=0 (CUDA does not work in forked loader workers)")
        short = self.data.short_side or self.model.img_size
        if short < self.model.img_size:
            raise ValueError(f"data.short_side={short} is smaller than the crop size model.img_size="
                             f"{self.model.img_size}")


# --------------------------------------------------------------------------------------------
# Batches: views, mixup
# --------------------------------------------------------------------------------------------


def collate_views(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples, flattening the views of multi-view items into the batch.

    Each sample's ``"video"`` is (C, T, H, W), or (V, C, T, H, W) for V views of one video
    (repeated augmentation in training, clips x crops in evaluation). Returns ``"video"``
    (B * V, C, T, H, W) ordered video-major, and ``"label"`` / ``"index"`` (B * V,) repeated
    for every view, so that scores can be grouped per video by ``index``.
    """
    video = torch.stack([s["video"] for s in samples])
    views = 1
    if video.dim() == 6:  # (B, V, C, T, H, W)
        views = video.shape[1]
        video = rearrange(video, "b v c t h w -> (b v) c t h w")
    elif video.dim() != 5:
        raise ValueError(f"samples must hold (C, T, H, W) or (V, C, T, H, W) clips, got {tuple(video.shape[1:])}")
    out = {"video": video}
    for key in ("label", "index"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples]).repeat_interleave(views)
    return out


class VideoMixup:
    """timm's :class:`~timm.data.Mixup` for clip batches (B, C, T, H, W).

    timm cuts its CutMix box from the last two axes of a (B, C, H, W) batch; on a 5-D clip
    batch its ``x[:, :, y0:y1, x0:x1]`` would cut time and height instead. The clips are
    therefore viewed as (B, C * T, H, W): the same box is cut from every frame and channel, as
    VideoMAE's own copy of the Mixup code does. Mixup is elementwise and unaffected.

    Call: ``batch`` with ``"video"`` (B, C, T, H, W) and ``"label"`` (B,) -> the same dict with
    mixed clips and ``"label"`` (B, num_classes) soft targets (smoothing included). timm mixes
    pairs (i, B - 1 - i) and needs an even B: of an odd batch the last clip stays unmixed (its
    target smoothed only).
    """

    def __init__(self, *, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 cutmix_minmax: tuple[float, float] | None = None, prob: float = 1.0, switch_prob: float = 0.5,
                 mode: Literal["batch", "pair", "elem"] = "batch", label_smoothing: float = 0.1) -> None:
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                           cutmix_minmax=list(cutmix_minmax) if cutmix_minmax else None, prob=prob,
                           switch_prob=switch_prob, mode=mode, label_smoothing=label_smoothing,
                           num_classes=num_classes)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        video, label = batch["video"], batch["label"]
        if video.dim() != 5:
            raise ValueError(f"expected clips (B, C, T, H, W), got shape {tuple(video.shape)}")
        b, c = video.shape[:2]
        even = b - b % 2
        x = rearrange(video, "b c t h w -> b (c t) h w").clone()
        target = mixup_target(label, self.num_classes, smoothing=self.label_smoothing)  # (B, num_classes)
        if even:
            x[:even], target[:even] = self.mixup(x[:even], label[:even])
        return {**batch, "video": rearrange(x, "b (c t) h w -> b c t h w", c=c), "label": target}


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _infer_grid(num_tokens: int, like: tuple[int, int, int]) -> tuple[int, int, int]:
    """A (T', H', W') grid of `num_tokens` square frames: with `like`'s T', else its H' x W'."""
    t, h, w = like
    if num_tokens % t == 0 and math.isqrt(num_tokens // t) ** 2 == num_tokens // t:
        s = math.isqrt(num_tokens // t)
        return t, s, s
    if num_tokens % (h * w) == 0:
        return num_tokens // (h * w), h, w
    raise ValueError(f"cannot tell the token grid of a position table with {num_tokens} tokens (the model's "
                     f"grid is {like}); use a checkpoint that stores its config (mm3d convert)")


def _source_state(path: str, model: VideoMAEClassifier, allow_pickle: bool
                  ) -> tuple[dict[str, torch.Tensor], tuple[int, int, int] | None, list[str]]:
    """(our-layout state dict, its token grid or None when unknown, notes) of any VideoMAE weights."""
    t, h, _ = model.grid
    size, frames = h * model.encoder.patch_size, t * model.encoder.tubelet_size
    if Path(path).is_dir():  # a Hugging Face transformers directory
        sd, hf_cfg = load_hf_dir(path, allow_pickle=allow_pickle)
        conv = hf_to_ours(sd, hf_cfg, strict=False)
        return conv.state_dict, conv.config.grid, [f"{path}: Hugging Face VideoMAE weights"] + conv.notes
    ck = load_checkpoint(path, allow_pickle=allow_pickle)
    sd = {k.removeprefix("module."): v for k, v in extract_state_dict(ck).items()}
    cfg = ck.get("config")
    m = cfg.get("model") if isinstance(cfg, Mapping) else None
    if isinstance(m, Mapping) and all(k in m for k in ("num_frames", "img_size", "tubelet_size", "patch_size")):
        return sd, token_grid(m["num_frames"], m["img_size"], m["tubelet_size"], m["patch_size"]), []
    if any(k.startswith("videomae.") for k in sd):
        raise ValueError(f"{path} holds Hugging Face VideoMAE weights without their config.json: pass the model "
                         f"directory, or convert it first with `mm3d convert --from videomae-hf`")
    if "encoder.pos_embed" not in sd:  # official VideoMAE: fixed tables are not stored, rebuilt for this model
        # head counts are not stored: the model's own; the decoder is dropped, any valid count will do
        conv = official_to_ours(sd, img_size=size, num_frames=frames, num_heads=model.encoder.blocks[0].attn.num_heads,
                                decoder_num_heads=1, strict=False)
        return conv.state_dict, conv.config.grid, [f"{path}: official VideoMAE weights"] + conv.notes
    return sd, _infer_grid(sd["encoder.pos_embed"].shape[1], model.grid), []


def classifier_init_from(model: VideoMAEClassifier, path: str, *, allow_pickle: bool = False) -> list[str]:
    """Initialise `model` from any VideoMAE weights; returns the notes for the log.

    `path`: one of our checkpoints (pretraining or classification, or converted by
    ``mm3d convert``), an official VideoMAE ``.pth`` (pretrained or fine-tuned) or a Hugging Face
    directory. The pretraining decoder is dropped, a head of another class count is left out
    (and said so), the position table is interpolated to the model's grid (and the keys named).
    Raises CheckpointError when encoder weights are missing or do not fit.
    """
    sd, grid, notes = _source_state(path, model, allow_pickle)
    target = sorted(k for k in sd if k.startswith("target."))  # a pretraining target's teacher (ema)
    if target:
        sd = {k: v for k, v in sd.items() if not k.startswith("target.")}
        notes.append(f"dropped the pretraining target's {len(target)} tensors (target.*: its EMA teacher)")
    sd, more = classifier_init_state(sd, model, old_grid=grid)
    notes += more
    own = model.state_dict()
    # a fresh class token, final norm or (fixed) position table is expected; any other encoder
    # weight missing means the checkpoint is another architecture
    fresh_ok = ("encoder.cls_token", "encoder.norm.", "encoder.pos_embed")
    missing_encoder = sorted(k for k in own if k.startswith("encoder.") and k not in sd and not k.startswith(fresh_ok))
    if missing_encoder:
        raise CheckpointError(f"{path} does not fit the encoder (another depth or width?): missing "
                              f"{', '.join(missing_encoder[:8])}{' ...' if len(missing_encoder) > 8 else ''}")
    notes += load_model_weights(model, {"model": sd}, strict=False)
    return notes


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _resolve_file(path: str, root: str, what: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if root and not p.is_absolute() and (Path(root) / p).is_file():
        return Path(root) / p
    raise MissingFileError(f"{what} {path!r} not found" + (f" (nor under data.root={root!r})" if root else ""))


def label_names(cfg: VideoFinetuneConfig, label_map: str | None = None, *, required: bool = False) -> list[str]:
    """Class names: from `label_map`, else ``data.label_map`` (when it exists), else ``"0"``, ``"1"``, ...

    Raises ConfigError (a ValueError) when the map's length differs from ``model.num_classes``.
    """
    n = cfg.model.num_classes
    path = label_map or cfg.data.label_map
    if not path:
        return [str(i) for i in range(n)]
    try:
        file = _resolve_file(path, cfg.data.root, "label map")
    except FileNotFoundError:
        if required or label_map:
            raise
        log.warning("label map %s not found; classes are shown by number", path)
        return [str(i) for i in range(n)]
    names = read_label_map(file)
    if len(names) != n:
        raise ConfigError(f"label map {file} has {len(names)} classes but the model's head has "
                         f"model.num_classes={n}")
    return names


def _test_transform(cfg: VideoFinetuneConfig, num_crops: int):
    return test_transform(cfg.model.img_size, cfg.data.short_side or cfg.model.img_size, num_crops)


def _dataset(cfg: VideoFinetuneConfig, records: list | str, mode: Literal["train", "test"], *, num_clips: int = 1,
             num_crops: int = 1, max_failure_ratio: float | None = None, split: str = "train") -> Dataset:
    """The clips of `records` (list rows), or of the shards `records` names (a shard spec; `split` picks
    the split of a prepared root)."""
    d = cfg.data
    if mode == "train":
        transform = finetune_train_transform(cfg.model.img_size, auto_augment=d.auto_augment or None, flip=d.flip,
                                             reprob=d.reprob, remode=d.remode, recount=d.recount,
                                             scale=tuple(d.rrc_scale), ratio=tuple(d.rrc_ratio))
    else:
        transform = _test_transform(cfg, num_crops)
    options = dict(mode=mode, num_frames=cfg.model.num_frames, sampling_rate=d.sampling_rate,
                   sampling=d.sampling, dense_spacing=d.dense_spacing, num_clips=num_clips,
                   num_crops=num_crops, num_sample=d.num_sample if mode == "train" else 1,
                   transform=transform, backend=d.backend, num_threads=d.num_threads, decode_device=d.decode_device,
                   max_failure_ratio=d.max_failure_ratio if max_failure_ratio is None else max_failure_ratio,
                   seed=cfg.seed)
    if isinstance(records, str):
        return VideoShardDataset(records, split=split, num_classes=cfg.model.num_classes, **options)
    return VideoDataset(records, rawframe_template=d.rawframe_template, rawframe_start=d.rawframe_start, **options)


def _records(cfg: VideoFinetuneConfig, list_path: str) -> list:
    d = cfg.data
    label_map = str(_resolve_file(d.label_map, d.root, "label map")) if d.label_map else None
    if label_map:
        label_names(cfg, label_map)  # fail early on a map of the wrong length
    return read_annotation_list(_resolve_file(list_path, d.root, "annotation list"), fmt=d.list_format,
                                data_root=d.root, label_map=label_map, num_classes=cfg.model.num_classes)


def _input_record(path: str, cfg: VideoFinetuneConfig, position: int):
    """A list row for a file given on the command line (a folder is read as rawframes)."""
    if os.path.isdir(path):
        frames = RawFrameSource(path, None, template=cfg.data.rawframe_template,
                                start=cfg.data.rawframe_start).num_frames
        return VideoRecord(path, 0, frames, f"input {position}")
    return VideoRecord(path, 0, None, f"input {position}")


def read_views(path: str, cfg: VideoFinetuneConfig, *, num_clips: int, num_crops: int,
               position: int = 0) -> torch.Tensor:
    """The evaluation views of one video file (or rawframe folder): (V, C, T, H, W) float, V = num_clips x
    num_crops clip-major, sampled, cropped and normalised as the evaluation dataset does (without its
    replacement of unreadable files: they raise, naming the file). `position` names the input in messages.
    Used by :meth:`VideoMAEFinetuneTask.predict` and :func:`mm3d.video.load_clip`."""
    d = cfg.data
    record = _input_record(path, cfg, position)
    ds = _dataset(cfg, [record], "test", num_clips=num_clips, num_crops=num_crops)
    src = open_record(record, backend=d.backend, num_threads=d.num_threads, rawframe_template=d.rawframe_template,
                      rawframe_start=d.rawframe_start)
    try:
        clips = torch.from_numpy(src.get(ds.frame_indices(src.num_frames, None)))  # (num_clips, T, H, W, 3)
    finally:
        src.close()
    return torch.cat([ds.transform(c, None) for c in clips])


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _view_logits(model: nn.Module, video: torch.Tensor, chunk: int) -> torch.Tensor:
    """video: (N, C, T, H, W) views. Returns (N, num_classes) logits, at most `chunk` views per forward."""
    return torch.cat([model({"video": v}).logits for v in video.split(max(1, chunk))])


class VideoMAEFinetuneTask(Task):
    """VideoMAE action-recognition fine-tuning with multi-view evaluation (see the module docstring)."""

    name = "videomae_finetune"
    modality = "video"
    stage = "finetune"
    config_class = VideoFinetuneConfig
    description = "VideoMAE action-recognition fine-tuning, multi-view evaluation and prediction"

    # ---- model and weights -----------------------------------------------------------------

    def build_model(self, cfg: VideoFinetuneConfig) -> nn.Module:
        return build_classifier(replace(cfg.model, label_smoothing=0.0 if cfg.mixup.active
                                        else cfg.mixup.label_smoothing))

    def preprocessing(self, cfg: VideoFinetuneConfig) -> dict[str, Any]:
        """The test views: ``data.test_num_clips x data.test_num_crops``, short side ``data.short_side``."""
        d = cfg.data
        return clip_preprocessing(cfg.model, sampling=d.sampling, sampling_rate=d.sampling_rate,
                                  short_side=d.short_side or cfg.model.img_size, clips=d.test_num_clips,
                                  crops=d.test_num_crops)

    def class_names(self, cfg: VideoFinetuneConfig) -> list[str] | None:
        """The names of ``data.label_map`` (None without one)."""
        return label_names(cfg, required=True) if cfg.data.label_map else None

    def init_weights(self, model: nn.Module, path: str, cfg: VideoFinetuneConfig) -> list[str]:
        return classifier_init_from(model, path, allow_pickle=cfg.allow_pickle)

    def load_trained(self, model: nn.Module, path: str, cfg: VideoFinetuneConfig) -> list[str]:
        """Fine-tuned weights (ours, official or Hugging Face) to score at the configured frame count
        and size: the position table is interpolated (and the key named); everything else must fit,
        the head included."""
        sd, grid, notes = _source_state(path, model, cfg.allow_pickle)
        notes += adapt_pos_embeds(sd, model, grid or model.grid)
        return notes + load_model_weights(model, {"model": sd})

    # ---- data ------------------------------------------------------------------------------

    def build_datasets(self, cfg: VideoFinetuneConfig, splits: Iterable[str]) -> dict[str, Dataset]:
        d = cfg.data
        splits = list(splits)
        if d.format == "shards":  # a shard spec per split (None: the split has none)
            rows: dict[str, Any] = {s: shard_dataset_spec(d.shards, d.val_shards, d.test_shards, s)
                                    for s in ("train", "val", "test")}
            if "train" in splits and rows["train"] is None:
                raise ConfigError("data.format=shards: data.shards is empty: give the training shards (a folder, "
                                  "manifest, brace pattern or prepared root)")
        else:
            if "train" in splits and not d.train_list:
                raise ConfigError("data.train_list is empty: give an annotation list 'path label' (data.train_list=FILE, "
                                 "with data.root=DIR for relative paths)")
            lists = {"train": d.train_list, "val": d.val_list, "test": d.test_list}
            rows = {s: _records(cfg, lists[s]) if lists[s] and s in splits else None for s in lists}
        out: dict[str, Dataset] = {}
        if "train" in splits:
            out["train"] = _dataset(cfg, rows["train"], "train", split="train")
        if "val" in splits and rows["val"] is not None:
            out["val"] = _dataset(cfg, rows["val"], "test", num_clips=d.val_num_clips,
                                  num_crops=d.val_num_crops, split="val")
        if "test" in splits and rows["test"] is not None:
            out["test"] = _dataset(cfg, rows["test"], "test", num_clips=d.test_num_clips,
                                   num_crops=d.test_num_crops, split="test")
        return out

    def collate_fn(self, cfg: VideoFinetuneConfig) -> Callable[[list[Any]], Any] | None:
        return collate_views

    def batch_transform(self, cfg: VideoFinetuneConfig, device: torch.device) -> Callable[[Any], Any] | None:
        m = cfg.mixup
        if not m.active:
            return None
        return VideoMixup(num_classes=cfg.model.num_classes, mixup_alpha=m.mixup, cutmix_alpha=m.cutmix,
                          cutmix_minmax=m.cutmix_minmax, prob=m.prob, switch_prob=m.switch_prob, mode=m.mode,
                          label_smoothing=m.label_smoothing)

    # ---- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: VideoFinetuneConfig, device: torch.device,
                 split: str) -> EvalResult:
        """Multi-view scores: softmax averaged over the views of each video, gathered over ranks.

        Metrics: ``top1``, ``top5``, ``mean_class_acc``, ``num_samples`` (videos scored), ``loss``
        (mean negative log-likelihood of the true class under the averaged probabilities) and
        ``num_missing``: the videos that were not scored (the loader replaced them as unreadable),
        each named in ``missing``; a test split with missing videos is refused unless
        ``eval.allow_missing=true`` (:func:`mm3d.datacheck.account_missing`).
        Artefacts: ``{"classification": ClassificationResult}``.
        """
        model.eval()
        meter = ClassificationMeter(cfg.model.num_classes, ks=(1, 5))
        chunk = cfg.train.batch_size * cfg.data.num_sample
        for batch in loader:
            video = batch["video"].to(device, non_blocking=True)
            meter.update(_view_logits(model, video, chunk), batch["label"].to(device), batch["index"].to(device))
        res = meter.compute()
        metrics = dict(res.metrics)
        if len(res.labels):
            p_true = res.probs.gather(1, res.labels[:, None]).squeeze(1)
            metrics["loss"] = float(-p_true.clamp(min=1e-12).log().mean())
        else:
            metrics["loss"] = float("nan")
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            account_missing(metrics, unscored_samples(dataset, res.index.tolist()), split,
                            allow_missing=cfg.eval.allow_missing)
        return EvalResult(metrics, {"classification": res})

    def run_info(self, cfg: VideoFinetuneConfig, datasets: Mapping[str, Any]) -> dict[str, Any]:
        """How the run was done, for every results file: selection, initialisation, test views."""
        selected = selection_split(cfg.train.select_on, list(datasets))
        d = cfg.data
        return {"config": cfg.name, "task": cfg.task, "seed": cfg.seed, "selected_on": selected,
                "protocol": run_protocol_label(cfg, selected), "init": cfg.init or "scratch",
                "frames": f"{cfg.model.num_frames} x rate {d.sampling_rate}",
                "test_views": f"{d.test_num_clips} clips x {d.test_num_crops} crops = "
                              f"{d.test_num_clips * d.test_num_crops} views per video"}

    def write_report(self, run_dir: Path, model: nn.Module, cfg: VideoFinetuneConfig,
                     results: dict[str, EvalResult], datasets: dict[str, Dataset],
                     device: torch.device) -> list[Path]:
        """The common results layout (:mod:`mm3d.results`): ``results.md`` and, per split,
        ``predictions.json`` (video, label, top-5 with scores), ``per_class.csv`` and
        ``confusion.png`` in ``run_dir/<split>/``."""
        names = label_names(cfg)
        manifest_classes = next((d.classes for d in datasets.values() if getattr(d, "classes", None)), None)
        if not cfg.data.label_map and manifest_classes and len(manifest_classes) == cfg.model.num_classes:
            names = list(manifest_classes)  # prepared shards name their classes
        files: list[Path] = []
        per_class = []
        for split, res in results.items():
            art = (res.artifacts or {}).get("classification")
            if not isinstance(art, ClassificationResult):
                continue
            ds = datasets.get(split)
            records = getattr(ds, "records", None)
            ids = [r.path for r in records] if records else (ds.sample_ids() if hasattr(ds, "sample_ids") else None)
            files += write_classification_split(run_dir, split, art, names, sample_ids=ids)
            if split == "test":
                per_class.append(per_class_markdown(art.confusion, names, split))
        files.append(write_results_md(run_dir, f"{cfg.name} ({cfg.task})", self.run_info(cfg, datasets),
                                      {s: r.metrics for s, r in results.items()}, REPORT_COLUMNS,
                                      extra_info=("init", "frames", "test_views"),
                                      sections=[*per_class, *missing_markdown({s: r.metrics for s, r in
                                                                               results.items()})]))
        return files

    # ---- prediction ------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, model: nn.Module, cfg: VideoFinetuneConfig, inputs: list[str], *, topk: int,
                label_map: str | None, device: torch.device) -> list[dict[str, Any]]:
        """Top-k classes of each video file (or rawframe folder) with the test views of the config
        (``data.test_num_clips x data.test_num_crops``, softmax averaged) and the loaders' decoder
        fallbacks. A file that cannot be read gives ``{"input", "error", "topk": []}`` (the caller
        reports it); a label map that is missing or of the wrong length raises a UserError."""
        try:
            names = label_names(cfg, label_map)
        except FileNotFoundError as e:
            raise UserError(f"--label-map: {e}" if label_map else str(e)) from None
        model.eval()
        d = cfg.data
        k = max(1, min(topk, cfg.model.num_classes))
        rows: list[dict[str, Any]] = []
        for i, path in enumerate(inputs):
            try:  # the evaluation dataset's sampling and views, without its replacement of bad files
                views = read_views(path, cfg, num_clips=d.test_num_clips, num_crops=d.test_num_crops,
                                   position=i)  # (clips * crops, C, T, H, W)
            except (RuntimeError, OSError, ValueError) as e:
                rows.append({"input": path, "error": str(e), "topk": []})
                continue
            logits = _view_logits(model, views.to(device), cfg.train.batch_size * d.num_sample)
            probs = logits.float().softmax(dim=1).mean(dim=0)
            top = probs.topk(k)
            rows.append({"input": path, "views": int(views.shape[0]),
                         "topk": [(names[c], float(p)) for c, p in zip(top.indices.tolist(), top.values.tolist())]})
        return rows


class VideoMAELinearProbeTask(VideoMAEFinetuneTask):
    """Linear probe: the encoder (and ``fc_norm``) frozen; ``BatchNorm1d(affine=False)`` + linear head
    trained on the pooled features, with the fine-tuning data pipeline and evaluation."""

    name = "videomae_linprobe"
    stage = "finetune"
    description = "VideoMAE linear probe on frozen pooled features (BatchNorm + linear head)"

    def build_model(self, cfg: VideoFinetuneConfig) -> nn.Module:
        m = cfg.model
        if m.drop_path or m.attn_drop or m.proj_drop:
            raise ValueError(f"a linear probe freezes the encoder: set model.drop_path, model.attn_drop and "
                             f"model.proj_drop to 0 (got {m.drop_path}, {m.attn_drop}, {m.proj_drop})")
        model = super().build_model(cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        head = model.head
        model.head = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6), head)
        for p in model.head.parameters():
            p.requires_grad_(True)
        return model


register_task(VideoMAEFinetuneTask())
register_task(VideoMAELinearProbeTask())
