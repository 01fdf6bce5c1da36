"""The video side of the Python API: :func:`load_clip` and the VideoMAE family of :func:`mm3d.create_model`.

.. code-block:: python

    import mm3d
    model = mm3d.create_model(checkpoint="k400_finetuned.pt")
    clip = mm3d.video.load_clip("demo.mp4", checkpoint="k400_finetuned.pt")  # (C, T, H, W)
    logits = model(clip[None]).logits                                        # (1, num_classes)

:func:`load_clip` reads a video file or a rawframe folder as the evaluation does (the decoders,
sampling and normalisation of :meth:`~mm3d.video.finetune.VideoMAEFinetuneTask.predict`, one
implementation: :func:`~mm3d.video.finetune.read_views`); the checkpoint's config decides the clip
length, sampling rate and size.

The family (:class:`mm3d.api.ModelFamily`) reads our checkpoints (runs and ``mm3d convert``
outputs), official VideoMAE / VideoMAEv2 ``.pth`` files and Hugging Face VideoMAE folders, and
loads them as ``init=`` does (:func:`~mm3d.video.finetune.classifier_init_from` for classifiers).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mm3d.api import ModelFamily, SourceInfo, register_family
from mm3d.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_model_weights
from mm3d.config import RunConfig, config_from_dict, load_config
from mm3d.errors import UserError
from mm3d.registry import TASKS
from mm3d.video.convert import hf_config_to_ours, hf_to_ours, load_hf_dir, official_to_ours
from mm3d.video.finetune import (FinetuneDataConfig, VideoFinetuneConfig, _source_state, classifier_init_from,
                                 read_views)
from mm3d.video.models import VideoMAEClassifier, VideoMAEConfig, build_classifier, build_pretrain_model
from mm3d.video.tokens import adapt_pos_embeds

__all__ = ["load_clip", "eval_config"]

# what weights cannot show and a preset cannot know: taken from a checkpoint's config even with a name
SOURCE_FIELDS = {"pretrain": ("encoder_norm", "norm_eps", "head_norm_eps"),
                 "classifier": ("use_mean_pooling", "cls_token", "norm_eps", "head_norm_eps")}


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def load_clip(path: str | Path, *, checkpoint: str | Path | None = None,
              config: RunConfig | Mapping[str, Any] | str | Path | None = None) -> torch.Tensor:
    """The evaluation view of a video file (or rawframe folder): (C, T, H, W) float.

    The centre clip of ``model.num_frames`` frames (``data.sampling_rate`` apart, or one per TSN
    segment with ``data.sampling: segment``), its short side resized to ``data.short_side`` (default
    ``model.img_size``), the centre ``img_size`` square, scaled to [0, 1] and normalised with the
    ImageNet mean and std: the validation view of the evaluation (one clip, one crop).

    checkpoint: its stored config decides (ours, ``mm3d convert`` outputs, a Hugging Face folder's
      config.json; official ``.pth`` files store none: the defaults, 16 frames of 224^2 at rate 4).
    config: a run config (object, mapping or YAML path) to use instead of the checkpoint's.
    Unreadable files raise :class:`~mm3d.video.decode.VideoDecodeError` naming the file.
    """
    return read_views(str(path), eval_config(checkpoint=checkpoint, config=config), num_clips=1, num_crops=1)[0]


def eval_config(*, checkpoint: str | Path | None = None,
                config: RunConfig | Mapping[str, Any] | str | Path | None = None) -> VideoFinetuneConfig:
    """The fine-tuning config whose evaluation views :func:`load_clip` takes: `config`, else the
    checkpoint's, else the defaults. A pretraining config gives its model and its sampling."""
    if config is not None:
        run = _run_config(config)
    elif checkpoint is not None:
        run = _checkpoint_run_config(Path(checkpoint))
    else:
        run = VideoFinetuneConfig()
    return _as_finetune_config(run)


def _run_config(config: RunConfig | Mapping[str, Any] | str | Path) -> Any:
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, Mapping):
        task = config.get("task") or "videomae_finetune"
        if task not in TASKS:
            raise UserError(f"config: unknown task {task!r}; `mm3d tasks` lists them")
        return config_from_dict(TASKS.get(task).config_class, {**config, "task": task, "seeds": []},
                                file="config mapping")
    return config


def _checkpoint_run_config(path: Path) -> Any:
    if path.is_dir():  # a Hugging Face folder: the model from its config.json
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is a folder without config.json (not a Hugging Face VideoMAE folder)")
        model = hf_config_to_ours(json.loads((path / "config.json").read_text()))
        return VideoFinetuneConfig(model=dataclasses.replace(model, num_classes=max(1, model.num_classes)))
    stored = load_checkpoint(path, mmap=True).get("config")
    if not isinstance(stored, Mapping) or not stored.get("task"):
        return VideoFinetuneConfig()  # official weights store no config
    task = stored["task"]
    if task not in TASKS or TASKS.get(task).modality != "video":
        raise CheckpointError(f"{path} is a {task!r} checkpoint, not a video one")
    return config_from_dict(TASKS.get(task).config_class, {**stored, "seeds": []}, file=f"{path} (stored config)")


def _as_finetune_config(run: Any) -> VideoFinetuneConfig:
    if isinstance(run, VideoFinetuneConfig):
        return run
    model, data = getattr(run, "model", None), getattr(run, "data", None)
    if not isinstance(model, VideoMAEConfig) or not hasattr(data, "sampling_rate"):
        raise UserError(f"config of task {getattr(run, 'task', '?')!r} is not a video config")
    # a pretraining config: its model and its clip sampling, the evaluation's single centre view
    return VideoFinetuneConfig(
        task="videomae_finetune",
        model=dataclasses.replace(model, num_classes=max(1, model.num_classes), label_smoothing=0.0),
        data=FinetuneDataConfig(root=data.root, sampling=data.sampling, sampling_rate=data.sampling_rate,
                                backend=data.backend, num_threads=data.num_threads,
                                rawframe_template=data.rawframe_template, rawframe_start=data.rawframe_start))


# --------------------------------------------------------------------------------------------
# The model family of mm3d.create_model
# --------------------------------------------------------------------------------------------


def _kind(sd: Mapping[str, Any]) -> str:
    """``pretrain`` for weights with the pretraining decoder or none of a head (bare encoders)."""
    if "encoder_to_decoder.weight" in sd or not any(k.startswith("head.") for k in sd):
        return "pretrain"
    return "classifier"


def _read(path: Path, ckpt: Mapping[str, Any] | None, like: VideoMAEConfig | None,
          allow_pickle: bool) -> SourceInfo | None:
    """What a VideoMAE checkpoint holds (see :class:`mm3d.api.ModelFamily`); None when it is none."""
    if ckpt is None:  # a folder: Hugging Face transformers
        if not (path / "config.json").is_file():
            return None
        if json.loads((path / "config.json").read_text()).get("model_type", "videomae") != "videomae":
            return None
        sd, hf_cfg = load_hf_dir(path, allow_pickle=allow_pickle)
        conv = hf_to_ours(sd, hf_cfg, strict=False)
        cfg, kind = conv.config, _kind(conv.state_dict)
        if kind == "pretrain" and conv.kind == "classifier":  # a bare VideoMAEModel: the encoder of a pretraining model
            cfg = dataclasses.replace(cfg, encoder_norm="encoder.norm.weight" in conv.state_dict, use_mean_pooling=False)
        return SourceInfo(cfg, kind, cfg.num_classes if kind == "classifier" else None,
                          ["Hugging Face VideoMAE folder", *conv.notes])
    try:
        sd = {k.removeprefix("module."): v for k, v in extract_state_dict(ckpt).items()}
    except CheckpointError:
        return None
    stored = ckpt.get("config")
    if isinstance(stored, Mapping) and stored.get("task") in TASKS:
        if TASKS.get(stored["task"]).modality != "video":
            return None
        cfg = config_from_dict(VideoMAEConfig, dict(stored.get("model") or {}), file=f"{path} (stored config)")
        kind = _kind(sd)
        classes = sd["head.weight"].shape[0] if "head.weight" in sd else cfg.num_classes
        return SourceInfo(cfg, kind, classes if kind == "classifier" else None)
    if any(k.startswith("videomae.") for k in sd):
        raise CheckpointError(f"{path} holds Hugging Face VideoMAE weights without their config.json: pass the "
                              f"model folder, or convert it first with `mm3d convert --from videomae-hf`")
    if "encoder.pos_embed" in sd and "encoder.patch_embed.proj.weight" in sd:  # ours, without a config
        kind = _kind(sd)
        return SourceInfo(None, kind, sd["head.weight"].shape[0] if "head.weight" in sd else None)
    embed = sd.get("encoder.patch_embed.proj.weight", sd.get("patch_embed.proj.weight"))
    if embed is None or embed.dim() != 5:
        return None
    # official VideoMAE / VideoMAEv2: the architecture from the shapes, the clip from the preset (or the defaults)
    conv = official_to_ours(sd, img_size=like.img_size if like else 224, num_frames=like.num_frames if like else 16,
                            num_heads=like.num_heads if like else None,
                            decoder_num_heads=like.decoder_num_heads if like else None, strict=False)
    return SourceInfo(conv.config, conv.kind, conv.config.num_classes if conv.kind == "classifier" else None,
                      ["official VideoMAE weights", *conv.notes])


def _build(cfg: VideoMAEConfig, num_classes: int | None) -> nn.Module:
    return build_pretrain_model(cfg) if num_classes is None else build_classifier(cfg, num_classes)


def _load(model: nn.Module, path: Path, allow_pickle: bool) -> list[str]:
    """Weights of any VideoMAE checkpoint into `model`, as ``init=`` loads them."""
    if isinstance(model, VideoMAEClassifier):
        return classifier_init_from(model, str(path), allow_pickle=allow_pickle)
    sd, grid, notes = _source_state(str(path), model, allow_pickle)
    notes += adapt_pos_embeds(sd, model, grid or model.grid)
    return notes + load_model_weights(model, {"model": sd}, strict=False)


register_family(ModelFamily("video", VideoMAEConfig, _read, _build, _load, SOURCE_FIELDS))
