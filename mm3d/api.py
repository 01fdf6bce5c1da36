"""The Python API: :func:`create_model` and :func:`list_models`, with timm's and Hugging Face's habits.

.. code-block:: python

    import mm3d
    mm3d.list_models("pointmae_*")                               # registered variants
    model = mm3d.create_model("videomae_small", drop_path=0.0)   # a preset, fresh weights
    model = mm3d.create_model(checkpoint="runs/k400/checkpoints/best.pt")  # name and classes from the file
    model = mm3d.create_model("pointmae_small", checkpoint="pretrain.pth", num_classes=15)

Which model is built, the same rule for every modality:

- a **classifier** (``VideoMAEClassifier``, ``PointMAEClassifier``) when `num_classes` is given
  (0: no head, the pooled feature comes out) or the checkpoint holds a fine-tuned classifier (its
  head's size is then the default);
- otherwise the **pretraining model** (``VideoMAEPretrain``, ``PointMAEPretrain``: encoder and
  decoder), whose ``forward_features`` runs the encoder over the whole input without masking.

Both kinds have timm's feature interface: ``forward_features(x)`` -> tokens (B, L, D);
``forward_head(tokens, pre_logits=False)`` -> logits (B, num_classes), or the pooled (B, F) feature
(``model.num_features`` wide) with `pre_logits` (the pretraining model has no head: always the
pooled feature); ``reset_classifier(num_classes)``. The model comes back in eval mode.

Checkpoints: ours (training runs, ``mm3d convert`` outputs), official ``.pth`` files and Hugging Face
folders, read by the modality that recognises them (each registers a :class:`ModelFamily`). Their
weights are loaded as ``init=`` loads them (position tables interpolated to the model's grid, the
decoder or a head that does not fit dropped, what stays initialised named); every note is logged
on the ``mm3d.api`` logger, as the trainer logs ``init=`` notes.

`name` and the checkpoint's config: without `name` the model is the one the checkpoint describes
(its stored config; a Hugging Face ``config.json``; the shapes of official weights, as
``mm3d convert`` infers them). With `name` the named preset is built and the weights must fit it;
what weights cannot show is still taken from the checkpoint's config (the family's
``source_fields``: e.g. a VideoMAE classifier's pooling, a pretraining encoder's final norm). `overrides` set fields of the model
config (``drop_path=0.0``, ``num_frames=8``) over either.

The core imports no modality: :func:`create_model` imports both through
:func:`mm3d.registry.load_modalities`, and they add their families here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from torch import nn

from mm3d.checkpoint import CheckpointError, load_checkpoint
from mm3d.config import config_from_dict, to_dict
from mm3d.errors import UserError
from mm3d.registry import MODELS, Registry, load_modalities, suggest

log = logging.getLogger("mm3d.api")

__all__ = ["create_model", "list_models", "ModelFamily", "SourceInfo", "register_family", "FAMILIES"]

SourceKind = Literal["pretrain", "classifier"]


@dataclass
class SourceInfo:
    """What a checkpoint describes, read by its modality's :attr:`ModelFamily.read`.

    config: the model section (the family's config dataclass) stored with the weights or inferred from
    them; None when neither (a name must then be given). kind: ``classifier`` for fine-tuned
    classifiers, ``pretrain`` for everything else (pretraining weights, bare encoders). num_classes:
    the head's size (classifiers). notes: what was assumed while reading, for the log.
    """

    config: Any | None
    kind: SourceKind
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelFamily:
    """How a modality builds its models and reads its checkpoints for :func:`create_model`.

    read(path, checkpoint, like, allow_pickle): a :class:`SourceInfo` when the file or folder is this
      family's, else None. `checkpoint` is the loaded dict (None for a folder); `like` is the config the
      caller will build (None without a name), for what official weights do not store (clip size).
    build(config, num_classes): the pretraining model (num_classes None) or a classifier.
    load(model, path, allow_pickle): load the checkpoint's weights into `model` as ``init=`` does;
      returns the notes.
    source_fields: per source kind, the model-config fields that a checkpoint's config decides even when a
      name is given (what its weights cannot show, e.g. a classifier's pooling).
    """

    modality: str
    config_class: type
    read: Callable[[Path, Mapping[str, Any] | None, Any | None, bool], SourceInfo | None]
    build: Callable[[Any, int | None], nn.Module]
    load: Callable[[nn.Module, Path, bool], list[str]]
    source_fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


FAMILIES: Registry[ModelFamily] = Registry("model family")


def register_family(family: ModelFamily) -> ModelFamily:
    """Register a modality's :class:`ModelFamily` (keyed by its modality name)."""
    return FAMILIES.add(family.modality, family)


def list_models(pattern: str = "*", *, modality: str | None = None) -> list[str]:
    """Names of the registered model variants matching the shell-style `pattern`, sorted.

    modality: ``video`` or ``pointcloud`` to list one modality's variants only.
    """
    load_modalities()
    if modality is not None and modality not in {v.modality for _, v in MODELS.items()}:
        known = sorted({v.modality for _, v in MODELS.items()})
        raise ValueError(f"unknown modality {modality!r}{suggest(modality, known)}; known: {', '.join(known)}")
    return [name for name, v in MODELS.items()
            if fnmatch.fnmatchcase(name, pattern) and (modality is None or v.modality == modality)]


def create_model(name: str | None = None, *, checkpoint: str | Path | None = None, num_classes: int | None = None,
                 allow_pickle: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered model variant, or the model a checkpoint describes, with its weights.

    name: a registered variant (:func:`list_models`), e.g. ``pointmae_small``, ``videomae_base``; may be
      left out when `checkpoint` describes its model.
    checkpoint: one of our checkpoints or ``mm3d convert`` outputs, an official VideoMAE / Point-MAE
      ``.pth``, or a Hugging Face VideoMAE folder.
    num_classes: build a classifier with this many outputs (0: no head). Default: a classifier when the
      checkpoint holds one (its head's size), else the pretraining model.
    allow_pickle: trust a checkpoint that needs full unpickling (some official files).
    overrides: model-config fields set over the preset or the checkpoint's config (``drop_path=0.0``);
      an unknown one raises TypeError naming the closest valid key.

    Returns the model in eval mode. See the module docstring for the rules.
    """
    load_modalities()
    if name is None and checkpoint is None:
        raise UserError("create_model needs a variant name (mm3d.list_models() lists them) or a checkpoint")
    if num_classes is not None and num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    variant = None
    if name is not None:
        if name not in MODELS:
            raise UserError(f"unknown model variant {name!r}{suggest(name, list(MODELS))}; "
                            f"mm3d.list_models() lists them")
        variant = MODELS.get(name)
    families = [FAMILIES.get(variant.modality)] if variant is not None else [f for _, f in FAMILIES.items()]
    if variant is not None:
        _check_overrides(families[0].config_class, overrides)
    like = _config(families[0].config_class, {"variant": name, **overrides}) if variant is not None else None

    family, source, path = families[0], None, None
    if checkpoint is not None:
        path = Path(checkpoint)
        family, source = _read(path, families, like, allow_pickle)
        for note in source.notes:
            log.info("%s: %s", path, note)

    if variant is not None:
        cfg = like
        if source is not None and source.config is not None:
            taken = {k: getattr(source.config, k) for k in family.source_fields.get(source.kind, ())
                     if k not in overrides and getattr(source.config, k) != getattr(cfg, k)}
            if taken:
                log.info("%s: from its config (not shown by the weights): %s", path,
                         ", ".join(f"{k}={v!r}" for k, v in taken.items()))
                cfg = dataclasses.replace(cfg, **taken)
    else:
        assert source is not None
        if source.config is None:
            raise CheckpointError(f"{path} does not say which model it holds: pass the variant name, "
                                  f"mm3d.create_model(NAME, checkpoint=...) (mm3d.list_models() lists them)")
        _check_overrides(family.config_class, overrides)
        cfg = _config(family.config_class, {**to_dict(source.config), **overrides})

    if num_classes is None and source is not None and source.kind == "classifier":
        num_classes = source.num_classes
    model = family.build(cfg, num_classes)
    if source is not None:
        for note in family.load(model, path, allow_pickle):
            if note not in source.notes and note.removeprefix(f"{path}: ") not in source.notes:  # said above
                log.info("init %s: %s", path, note)
    return model.eval()


def _check_overrides(config_class: type, overrides: Mapping[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(config_class) if f.init and f.name != "variant"]
    for key in overrides:
        if key not in names:
            hint = " (pass the variant as the name)" if key == "variant" else suggest(key, names)
            raise TypeError(f"create_model got an unknown {config_class.__name__} key {key!r}{hint}; "
                            f"valid keys: {', '.join(names)}")


def _config(config_class: type, data: dict[str, Any]) -> Any:
    """The model config of `data` (a ``variant`` key starts from that preset), validated."""
    if not data.get("variant"):
        data = {k: v for k, v in data.items() if k != "variant"}
    return config_from_dict(config_class, data, file="create_model arguments")


def _read(path: Path, families: list[ModelFamily], like: Any | None,
          allow_pickle: bool) -> tuple[ModelFamily, SourceInfo]:
    """The family that recognises `path` and what it read."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    ckpt = None if path.is_dir() else load_checkpoint(path, allow_pickle=allow_pickle, mmap=True)
    for family in families:
        source = family.read(path, ckpt, like, allow_pickle)
        if source is not None:
            return family, source
    for other in (f for _, f in FAMILIES.items() if f not in families):
        if other.read(path, ckpt, None, allow_pickle) is not None:
            raise CheckpointError(f"{path} holds a {other.modality} model, not a {families[0].modality} one: "
                                  f"give a {families[0].modality} variant name, or none")
    what = "a folder" if ckpt is None else "a checkpoint"
    of = f" of {families[0].modality} models" if len(families) == 1 else ""
    raise CheckpointError(f"{path} is {what} that no mm3d model family{of} recognises: expected one of our "
                          f"checkpoints, an `mm3d convert` output, an official .pth or a Hugging Face folder")

