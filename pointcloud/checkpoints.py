"""Initialising the point-cloud fine-tuning models from checkpoints (``init=``).

Our pretraining checkpoints, converted official checkpoints (``mm3d convert --from
pointmae-official``) and our fine-tuned ones all initialise the encoder of a classification,
SVM-probe or part-segmentation model through :func:`load_encoder_checkpoint`; ``init: ""``
trains from scratch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from mm3d.checkpoint import (CheckpointError, compare_state_dicts, extract_state_dict, load_checkpoint,
                             load_model_weights)


def _official_hint(keys: Iterable[str]) -> str:
    if any(k.startswith(("MAE_encoder.", "MAE_decoder.", "blocks.blocks.", "cls_head_finetune.")) for k in keys):
        return (" It looks like an official Point-MAE checkpoint: convert it first with "
                "`mm3d convert --from pointmae-official IN OUT` and pass OUT.")
    return ""


def load_encoder_checkpoint(model: nn.Module, src: str | Path | Mapping[str, Any], *,
                            allow_pickle: bool = False) -> list[str]:
    """Initialise a fine-tuning model from any Point-MAE checkpoint of ours; return log notes.

    * Every ``encoder.*`` weight of `model` must be in the checkpoint with the same shape, and the
      checkpoint may hold no ``encoder.*`` weight the model lacks: otherwise
      :class:`~mm3d.checkpoint.CheckpointError` names the mismatching keys and shapes (the
      config's architecture differs from the checkpoint's).
    * Weights the model does not have (the pretraining decoder, ``mask_token``, another task's
      head) are dropped and listed.
    * Other weights of the model that the checkpoint has with the same shape (a fine-tuned
      head) are loaded; a head of another shape (another class count) is left at its
      initialisation and listed.
    """
    ckpt = load_checkpoint(src, allow_pickle=allow_pickle) if isinstance(src, (str, Path)) else src
    sd = {k.removeprefix("module."): v for k, v in extract_state_dict(ckpt).items()}
    expected = model.state_dict()
    where = f" {src}" if isinstance(src, (str, Path)) else ""
    enc_expected = {k: v for k, v in expected.items() if k.startswith("encoder.")}
    enc_given = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    if not enc_given:
        raise CheckpointError(f"checkpoint{where} holds no Point-MAE encoder weights (encoder.*); its keys "
                              f"start with {sorted({k.split('.')[0] for k in sd})[:12]}.{_official_hint(sd)}")
    missing, unexpected, mismatched = compare_state_dicts(enc_expected, enc_given)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("mismatching shapes: " + "; ".join(mismatched))
        if missing:
            parts.append(f"encoder keys missing from the checkpoint: {_short(missing)}")
        if unexpected:
            parts.append(f"encoder keys the model lacks: {_short(unexpected)}")
        raise CheckpointError(f"checkpoint{where} does not match the model architecture of the config "
                              f"(check model.variant / embed_dim / depth / encoder_dims): " + " | ".join(parts))
    notes = []
    unused = sorted(k for k in sd if k not in expected)
    if unused:
        notes.append(f"dropped {len(unused)} checkpoint tensors this {type(model).__name__} does not use: "
                     f"{_by_module(unused)}")
    reinit = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and not k.startswith("encoder.") and sd[k].shape != v.shape]
    if reinit:
        notes.append("left at initialisation (shape differs, e.g. another class count): " + "; ".join(reinit))
    usable = {k: v for k, v in sd.items() if k in expected and v.shape == expected[k].shape}
    new = sorted(k for k in expected if k not in usable and not k.startswith("encoder."))
    if new:
        notes.append(f"newly initialised (not in the checkpoint): {_by_module(new)}")
    notes += load_model_weights(model, {"model": usable}, strict=False)[-1:]
    return notes


def _short(keys: Sequence[str], n: int = 10) -> str:
    keys = list(keys)
    return "[" + ", ".join(keys[:n]) + (f", … {len(keys) - n} more" if len(keys) > n else "") + "]"


def _by_module(keys: Sequence[str]) -> str:
    """Keys summarised by their first name component: ``decoder.* (16), mask_token``."""
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(".", 1)[0]
        groups[head + (".*" if "." in k else "")] = groups.get(head + (".*" if "." in k else ""), 0) + 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in sorted(groups.items()))
