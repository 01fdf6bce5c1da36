"""The point-cloud side of the Python API: :func:`load_cloud` and the Point-MAE family of :func:`mm3d.create_model`.

.. code-block:: python

    import mm3d
    model = mm3d.create_model(checkpoint="modelnet40_finetuned.pt")
    cloud = mm3d.pointcloud.load_cloud("chair.ply", checkpoint="modelnet40_finetuned.pt")  # (N, 3)
    logits = model(cloud[None]).logits                                                     # (1, num_classes)

:func:`load_cloud` reads a file as the test protocol does (one implementation with
:meth:`~mm3d.pointcloud.classification.PointMAEClassifyTask.predict`:
:func:`~mm3d.pointcloud.classification.read_eval_cloud`); the checkpoint's config decides the
number of points and how raw ``.bin`` files are read.

The family (:class:`mm3d.api.ModelFamily`) reads our checkpoints (runs of every point-cloud task,
``mm3d convert --from pointmae-official`` outputs) and official Point-MAE ``.pth`` files (renamed in
memory as the converter does), and loads them as ``init=`` does
(:func:`~mm3d.pointcloud.checkpoints.load_encoder_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mm3d.api import ModelFamily, SourceInfo, register_family
from mm3d.checkpoint import CheckpointError, extract_state_dict, load_checkpoint
from mm3d.config import RunConfig, config_from_dict, load_config
from mm3d.errors import UserError
from mm3d.registry import TASKS
from mm3d.pointcloud.checkpoints import load_encoder_checkpoint
from mm3d.pointcloud.classification import PointClassifyConfig, read_eval_cloud
from mm3d.pointcloud.convert import detect_kind, official_to_ours, strip_prefixes
from mm3d.pointcloud.models import PointMAEConfig, build_classifier, build_pretrain_model

__all__ = ["load_cloud", "eval_config"]

# what weights cannot show and a preset cannot know: taken from a checkpoint's config even with a name
SOURCE_FIELDS = {"classifier": ("cls_head_dims",)}


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def load_cloud(path: str | Path, *, checkpoint: str | Path | None = None,
               config: RunConfig | Mapping[str, Any] | str | Path | None = None) -> torch.Tensor:
    """The evaluation sample of a point-cloud file (.txt/.xyz/.ply/.pcd/.npy/.bin): (N, 3) float.

    N = ``data.npoints`` points taken by farthest point sampling (a seeded random draw with repeats when
    the file has fewer), centred and scaled into the unit sphere: what ``mm3d predict`` and the test
    protocol feed the model. Raw ``.bin`` files are read with ``data.bin_columns`` values per point.

    checkpoint: its stored config decides (official ``.pth`` files store none: the defaults, 1024 points).
    config: a run config (object, mapping or YAML path) to use instead of the checkpoint's.
    Unreadable files raise OSError or ValueError naming the file.
    """
    run = eval_config(checkpoint=checkpoint, config=config)
    return read_eval_cloud(path, run.data, seed=run.seed)


def eval_config(*, checkpoint: str | Path | None = None,
                config: RunConfig | Mapping[str, Any] | str | Path | None = None) -> Any:
    """The run config whose ``data`` section :func:`load_cloud` follows: `config`, else the checkpoint's,
    else the classification defaults. Any point-cloud task's config will do (pretraining, classification,
    SVM probe, part segmentation): each has ``data.npoints``, ``bin_columns`` and ``drop_nonfinite``."""
    if config is not None:
        if isinstance(config, (str, Path)):
            run = load_config(config)
        elif isinstance(config, Mapping):
            task = config.get("task") or "pointmae_classify"
            if task not in TASKS:
                raise UserError(f"config: unknown task {task!r}; `mm3d tasks` lists them")
            run = config_from_dict(TASKS.get(task).config_class, {**config, "task": task, "seeds": []},
                                   file="config mapping")
        else:
            run = config
    elif checkpoint is not None:
        run = _checkpoint_run_config(Path(checkpoint))
    else:
        run = PointClassifyConfig()
    data = getattr(run, "data", None)
    if TASKS.get(run.task).modality != "pointcloud" or not all(
            hasattr(data, k) for k in ("npoints", "bin_columns", "drop_nonfinite")):
        raise UserError(f"config of task {run.task!r} is not a point-cloud config")
    return run


def _checkpoint_run_config(path: Path) -> Any:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: point-cloud checkpoints are files")
    stored = load_checkpoint(path, mmap=True).get("config")
    if not isinstance(stored, Mapping) or not stored.get("task"):
        return PointClassifyConfig()  # official weights and converted classifiers store no run config
    task = stored["task"]
    if task not in TASKS or TASKS.get(task).modality != "pointcloud":
        raise CheckpointError(f"{path} is a {task!r} checkpoint, not a point-cloud one")
    return config_from_dict(TASKS.get(task).config_class, {**stored, "seeds": []}, file=f"{path} (stored config)")


# --------------------------------------------------------------------------------------------
# The model family of mm3d.create_model
# --------------------------------------------------------------------------------------------


def _head_classes(sd: Mapping[str, torch.Tensor]) -> int | None:
    """Outputs of a classifier head (its last ``head.N.weight`` matrix), None without one."""
    linears = sorted((int(m.group(1)), k) for k in sd if (m := re.fullmatch(r"head\.(\d+)\.weight", k))
                     and sd[k].dim() == 2)
    return int(sd[linears[-1][1]].shape[0]) if linears else None


def _kind(sd: Mapping[str, torch.Tensor]) -> str:
    """``classifier`` for PointMAEClassifier weights (cls token and head), else ``pretrain`` (pretraining
    weights, the encoder of a part-segmentation or probe run)."""
    return "classifier" if "cls_token" in sd and _head_classes(sd) is not None else "pretrain"


def _model_config(data: Mapping[str, Any], where: str) -> PointMAEConfig:
    return config_from_dict(PointMAEConfig, dict(data), file=where)


def _read(path: Path, ckpt: Mapping[str, Any] | None, like: PointMAEConfig | None,
          allow_pickle: bool) -> SourceInfo | None:
    """What a Point-MAE checkpoint holds (see :class:`mm3d.api.ModelFamily`); None when it is none."""
    if ckpt is None:
        return None
    try:
        sd = {k.removeprefix("module."): v for k, v in extract_state_dict(ckpt).items()}
    except CheckpointError:
        return None
    stored, meta = ckpt.get("config"), ckpt.get("meta")
    if isinstance(stored, Mapping) and stored.get("task") in TASKS:
        if TASKS.get(stored["task"]).modality != "pointcloud":
            return None
        cfg = _model_config(stored.get("model") or {}, f"{path} (stored config)")
    elif isinstance(meta, Mapping) and meta.get("converted_from") == "pointmae-official":
        # a converted classifier: the architecture the converter inferred from the shapes
        cfg = _model_config(meta.get("model") or {}, f"{path} (meta.model)")
    elif "encoder.patch_embed.first_conv.0.weight" in sd:
        cfg = None  # our weights without a config: the name decides
    else:
        official = strip_prefixes(sd)
        try:
            detect_kind(official)
        except ValueError:
            return None
        ours, report = official_to_ours(official)
        if report.mismatched:
            raise CheckpointError(f"{path}: official Point-MAE weights that do not fit the inferred architecture: "
                                  + "; ".join(report.mismatched))
        cfg = _model_config({k: v for k, v in report.model.items()}, f"{path} (inferred from the weights)")
        kind = report.kind
        return SourceInfo(cfg, kind, report.model.get("num_classes") if kind == "classifier" else None,
                          ["official Point-MAE weights", *report.notes])
    kind = _kind(sd)
    return SourceInfo(cfg, kind, _head_classes(sd) if kind == "classifier" else None)


def _build(cfg: PointMAEConfig, num_classes: int | None) -> nn.Module:
    if num_classes is None:
        return build_pretrain_model(cfg)
    return build_classifier(dataclasses.replace(cfg, num_classes=num_classes), num_classes)


def _load(model: nn.Module, path: Path, allow_pickle: bool) -> list[str]:
    """Weights of any Point-MAE checkpoint into `model`, as ``init=`` loads them (official files renamed
    in memory as ``mm3d convert --from pointmae-official`` does)."""
    ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    sd = {k.removeprefix("module."): v for k, v in extract_state_dict(ckpt).items()}
    if not any(k.startswith("encoder.patch_embed.") for k in sd):  # official names
        sd, report = official_to_ours(strip_prefixes(sd))
        return [f"renamed {len(report.renamed)} official tensors"] + load_encoder_checkpoint(model, {"model": sd})
    return load_encoder_checkpoint(model, {"model": sd})


register_family(ModelFamily("pointcloud", PointMAEConfig, _read, _build, _load, SOURCE_FIELDS))
