"""Official Point-MAE checkpoints -> mm3d checkpoints (``mm3d convert --from pointmae-official``).

The official repository (Pang-Yatian/Point-MAE) saves ``{"base_model": state_dict, "optimizer",
"epoch", "metrics", "best_metrics"}``; the weights carry a ``module.`` prefix when the model was
wrapped in ``DataParallel``. Two model classes are released:

* ``Point_MAE`` (``pretrain.pth``): ``MAE_encoder.{encoder,pos_embed,blocks.blocks.N,norm}``,
  ``mask_token``, ``decoder_pos_embed``, ``MAE_decoder.{blocks.N,norm}``, ``increase_dim.0``;
* ``PointTransformer`` (fine-tuned classifiers): ``encoder``, ``pos_embed``, ``blocks.blocks.N``,
  ``norm``, ``cls_token``, ``cls_pos``, ``cls_head_finetune.{0,1,4,5,8}``.

Every tensor keeps its shape; only names change (see :data:`PRETRAIN_RULES` and
:data:`CLASSIFIER_RULES`). Keys that match no rule, and model keys that the file lacks, are
reported and stored in the output's ``meta``; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from mm3d.checkpoint import load_checkpoint
from mm3d.config import to_dict
from mm3d.modelcard import converted_card
from mm3d.registry import register_converter
from mm3d.pointcloud.models import PointMAEConfig, build_classifier, build_pretrain_model
from mm3d.pointcloud.tasks import PointPretrainConfig

log = logging.getLogger(__name__)

Kind = Literal["pretrain", "classifier"]

# (official prefix, our prefix): the first matching prefix wins; "" keys are exact names.
PRETRAIN_RULES: tuple[tuple[str, str], ...] = (
    ("MAE_encoder.encoder.", "encoder.patch_embed."),
    ("MAE_encoder.pos_embed.", "encoder.pos_embed."),
    ("MAE_encoder.blocks.blocks.", "encoder.blocks."),
    ("MAE_encoder.norm.", "encoder.norm."),
    ("MAE_decoder.blocks.", "decoder.blocks."),
    ("MAE_decoder.norm.", "decoder.norm."),
    ("decoder_pos_embed.", "decoder_pos_embed."),
    ("increase_dim.0.", "recon_head."),
    ("mask_token", "mask_token"),
)
CLASSIFIER_RULES: tuple[tuple[str, str], ...] = (
    ("encoder.", "encoder.patch_embed."),
    ("pos_embed.", "encoder.pos_embed."),
    ("blocks.blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
    ("cls_head_finetune.", "head."),
    ("cls_token", "cls_token"),
    ("cls_pos", "cls_pos"),
)


@dataclass
class ConversionReport:
    """What :func:`official_to_ours` did.

    kind: which official model the weights come from; model: the inferred ``model`` config
    section (plain dict of :class:`~mm3d.pointcloud.models.PointMAEConfig` fields) plus
    ``num_classes`` for classifiers; renamed: official -> our name; unknown: official keys that
    match no rule (not converted); missing: keys our model needs that the file lacks;
    mismatched: 'name: file shape vs model shape'; notes: assumptions made.
    """

    kind: Kind
    model: dict[str, Any]
    renamed: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"Point-MAE official {self.kind} checkpoint: {len(self.renamed)} tensors renamed"]
        out += [f"inferred model: {self.model}"]
        out += [f"note: {n}" for n in self.notes]
        if self.unknown:
            out.append(f"WARNING: {len(self.unknown)} keys match no rule and were not converted: "
                       f"{', '.join(self.unknown)}")
        if self.missing:
            out.append(f"WARNING: {len(self.missing)} model keys are absent from the file (they keep "
                       f"their initialisation): {', '.join(self.missing)}")
        if self.mismatched:
            out.append(f"WARNING: shape mismatches: {'; '.join(self.mismatched)}")
        return out


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the ``module.`` (DataParallel/DDP) and ``base_model.`` prefixes, as the official loader."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace("module.", "")
        k = k.removeprefix("base_model.")
        out[k] = v
    return out


def detect_kind(keys) -> Kind:
    """``pretrain`` for ``Point_MAE`` weights, ``classifier`` for ``PointTransformer`` weights."""
    keys = list(keys)
    if any(k.startswith(("MAE_encoder.", "MAE_decoder.", "increase_dim.")) or k == "mask_token" for k in keys):
        return "pretrain"
    if any(k.startswith(("blocks.blocks.", "cls_head_finetune.")) or k in ("cls_token", "cls_pos") for k in keys):
        return "classifier"
    raise ValueError(f"not a Point-MAE state dict: no MAE_encoder.*/blocks.blocks.* keys among "
                     f"{sorted(keys)[:10]}")


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in rules:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None


def _count_blocks(keys, prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_model_config(sd: Mapping[str, torch.Tensor], kind: Kind) -> tuple[dict[str, Any], list[str]]:
    """Architecture of renamed (our-name) weights: a dict of ``PointMAEConfig`` fields and notes.

    The head count and the number of groups are not stored in the weights: the official values
    (64-wide heads, 64 groups) are assumed and said so in the notes.
    """
    def shape(name: str) -> tuple[int, ...]:
        if name not in sd:
            raise ValueError(f"cannot infer the architecture: weight {name!r} is missing")
        return tuple(sd[name].shape)

    dim = shape("encoder.norm.weight")[0]
    keys = list(sd)
    cfg: dict[str, Any] = {
        "embed_dim": dim,  # the official trans_dim
        "depth": _count_blocks(keys, "encoder.blocks."),
        "encoder_dims": shape("encoder.patch_embed.second_conv.3.weight")[0],
        "pointnet_dims": [shape("encoder.patch_embed.first_conv.0.weight")[0],
                          shape("encoder.patch_embed.first_conv.3.weight")[0],
                          shape("encoder.patch_embed.second_conv.0.weight")[0]],
        "pos_hidden": shape("encoder.pos_embed.0.weight")[0],
        "mlp_ratio": shape("encoder.blocks.0.mlp.fc1.weight")[0] / dim,
        "qkv_bias": "encoder.blocks.0.attn.qkv.bias" in sd,
        "num_heads": max(dim // 64, 1),
    }
    cfg["decoder_num_heads"] = cfg["num_heads"]
    notes = [f"num_heads={cfg['num_heads']} assumed (64 channels per head, as the official models); "
             f"it is not stored in the weights"]
    if kind == "pretrain":
        cfg["decoder_depth"] = _count_blocks(keys, "decoder.blocks.")
        out_ch = shape("recon_head.weight")[0]
        if out_ch % 3:
            raise ValueError(f"increase_dim has {out_ch} output channels, not a multiple of 3")
        cfg["group_size"] = out_ch // 3
        notes.append("num_group=64 assumed (official pretraining: 64 groups of 1024 points)")
    else:
        linears = sorted((int(m.group(1)), k) for k in keys
                         if (m := re.match(r"head\.(\d+)\.weight$", k)) and sd[k].dim() == 2)
        if not linears:
            raise ValueError("classifier weights without a head (cls_head_finetune.*)")
        cfg["cls_head_dims"] = [sd[k].shape[0] for _, k in linears[:-1]]
        cfg["num_classes"] = sd[linears[-1][1]].shape[0]
        notes.append("num_group and group_size are not stored in a classifier's weights: set them "
                     "for the protocol (official: 64 x 32 for ModelNet40 1k, 128 x 32 for ScanObjectNN)")
    return cfg, notes


def official_to_ours(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename an official Point-MAE state dict (pretraining or classifier) to our names.

    Returns our state dict (same tensors, new names) and a :class:`ConversionReport` that lists
    every key that could not be placed, checked against a model built from the inferred config.
    """
    sd = strip_prefixes(state_dict)
    kind = detect_kind(sd)
    rules = PRETRAIN_RULES if kind == "pretrain" else CLASSIFIER_RULES
    ours: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        new = _rename(k, rules)
        if new is None:
            unknown.append(k)
            continue
        if new in ours:
            raise ValueError(f"two official keys map to {new!r} (second: {k!r})")
        ours[new] = v
        renamed[k] = new
    model_cfg, notes = infer_model_config(ours, kind)
    report = ConversionReport(kind=kind, model=model_cfg, renamed=renamed, unknown=unknown, notes=notes)

    known = {f.name for f in fields(PointMAEConfig)}
    cfg = PointMAEConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in model_cfg.items()
                            if k in known and k != "num_classes"}, drop_path=0.0)
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation cost
        model = build_pretrain_model(cfg) if kind == "pretrain" else build_classifier(cfg, model_cfg["num_classes"])
    expected = model.state_dict()
    report.missing = [k for k in expected if k not in ours]
    report.unknown += [k for k in ours if k not in expected and k not in report.unknown]
    report.mismatched = [f"{k}: file {tuple(ours[k].shape)} vs model {tuple(v.shape)}"
                         for k, v in expected.items() if k in ours and ours[k].shape != v.shape]
    return ours, report


def _load_official(src: str | Path, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, other top-level entries) of an official checkpoint file."""
    ck = load_checkpoint(src, allow_pickle=allow_pickle)
    for key in ("base_model", "model", "state_dict"):
        if isinstance(ck.get(key), Mapping):
            return dict(ck[key]), {k: v for k, v in ck.items() if k != key}
    if ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
        return ck, {}
    raise ValueError(f"{src}: no weights under 'base_model', 'model' or 'state_dict'; "
                     f"top-level keys: {sorted(ck)[:20]}")


def _plain(v: Any) -> Any:
    """Checkpoint metadata as plain Python (tensors to numbers/lists) so weights_only loads it."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(v)


@register_converter("pointmae-official")
def convert_pointmae_official(src: str, dst: str, *, allow_pickle: bool = False) -> list[str]:
    """Convert an official Point-MAE ``.pth`` into our checkpoint format; return report lines.

    Pretraining weights get a full ``pointmae_pretrain`` config (so ``mm3d visualize`` can use
    them); classifier weights get ``config: None`` (pass a fine-tuning config with ``init=DST``).
    """
    weights, extra = _load_official(src, allow_pickle)
    ours, report = official_to_ours(weights)
    if report.mismatched:
        raise ValueError(f"{src}: converted weights do not fit the inferred architecture: "
                         + "; ".join(report.mismatched))
    config = None
    if report.kind == "pretrain":
        model_cfg = PointMAEConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                      for k, v in report.model.items()})
        small = PointMAEConfig()
        if all(getattr(small, k) == getattr(model_cfg, k) for k in report.model):
            model_cfg.variant = "pointmae_small"
        config = to_dict(PointPretrainConfig(task="pointmae_pretrain", name="pointmae_official",
                                             model=model_cfg))
    meta = {
        "converted_from": "pointmae-official",
        "source": str(src),
        "kind": report.kind,
        "model": report.model,
        "unmapped_keys": report.unknown,
        "missing_keys": report.missing,
        "notes": report.notes,
        "official": {k: _plain(v) for k, v in extra.items() if k in ("epoch", "metrics", "best_metrics")},
    }
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    card = converted_card(config, {"converter": "pointmae-official", "file": str(src), "weights": report.kind,
                                   "notes": list(report.notes)}, modality="pointcloud")
    torch.save({"model": ours, "config": config, "meta": meta, "model_card": card}, dst)
    ignored = sorted(k for k in extra if k not in ("epoch", "metrics", "best_metrics"))
    lines = report.lines()
    if ignored:
        lines.append(f"not converted (training state, not weights): {', '.join(ignored)}")
    lines.append(f"wrote {dst}")
    for line in lines:
        log.info("%s", line)
    return lines
