"""Checkpoint conversion between mm3d VideoMAE models and the official / Hugging Face layouts.

Pure functions map state dicts (:func:`official_to_ours`, :func:`hf_to_ours`,
:func:`ours_to_hf`); registered converters read and write files for ``mm3d convert --from NAME``:

- ``videomae-official``: an official VideoMAE / VideoMAEv2 ``.pth`` (pretraining keys ``encoder.*``,
  ``decoder.*``, ``encoder_to_decoder``, ``mask_token``; fine-tuned keys ``patch_embed``,
  ``blocks``, ``norm``/``fc_norm``, ``head``), weights under ``model`` or ``module``;
- ``videomae-hf``: a ``transformers`` VideoMAE directory (``config.json`` plus
  ``model.safetensors`` or ``pytorch_model.bin``) of ``VideoMAEForPreTraining``,
  ``VideoMAEForVideoClassification`` or ``VideoMAEModel``;
- ``to-hf``: one of our checkpoints written back as a ``transformers`` directory.

Every source key is either mapped or reported: unknown keys raise (``strict=True``) or are listed
in the notes; keys dropped on purpose (e.g. the decoder when initialising a classifier from a
pretraining checkpoint) are listed too. Foreign files load with ``torch.load(weights_only=True)``;
files that need pickle load only with ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from mm3d.checkpoint import extract_state_dict, load_checkpoint
from mm3d.config import config_from_dict, to_dict
from mm3d.modelcard import converted_card
from mm3d.registry import register_converter
from mm3d.video.models import VideoMAEClassifier, VideoMAEConfig
from mm3d.video.tokens import adapt_pos_embeds, build_pos_embed

log = logging.getLogger(__name__)

__all__ = [
    "ConvertedWeights",
    "official_to_ours",
    "hf_to_ours",
    "ours_to_hf",
    "hf_config_to_ours",
    "ours_config_to_hf",
    "load_hf_dir",
    "classifier_init_state",
    "TASK_OF_KIND",
]

Kind = Literal["pretrain", "classifier"]
TASK_OF_KIND = {"pretrain": "videomae_pretrain", "classifier": "videomae_finetune"}

# Heads are not stored in weights: the official widths -> heads (encoder incl. VideoMAEv2 giant).
OFFICIAL_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
OFFICIAL_DECODER_HEADS = {192: 3, 384: 6, 512: 8, 640: 8}

# Renames inside one transformer block (Hugging Face suffix -> ours), besides q/k/v.
_HF_BLOCK = {
    "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "intermediate.dense.weight": "mlp.fc1.weight", "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight", "output.dense.bias": "mlp.fc2.bias",
    # on disk (hub files, and what transformers writes) the q/v biases are ``q_bias``/``v_bias``;
    # transformers >= 5 renames them to ``query.bias``/``value.bias`` in memory
    "attention.attention.q_bias": "attn.q_bias", "attention.attention.v_bias": "attn.v_bias",
}
_HF_BLOCK_IN_MEMORY = {"attention.attention.query.bias": "attn.q_bias",
                       "attention.attention.value.bias": "attn.v_bias"}
_QKV = ("attention.attention.query.weight", "attention.attention.key.weight",
        "attention.attention.value.weight")
# Renames inside one block (official suffix -> ours): timm's layer scale.
_OFFICIAL_BLOCK = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}


class ConvertedWeights(NamedTuple):
    """state_dict: our names; config: the model section; kind: which model it fits; notes: report."""

    state_dict: dict[str, torch.Tensor]
    config: VideoMAEConfig
    kind: Kind
    notes: list[str]


def _short(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _finish(unknown: list[str], strict: bool, source: str, notes: list[str]) -> None:
    if unknown:
        msg = f"{len(unknown)} {source} keys have no counterpart in mm3d's VideoMAE: {_short(sorted(unknown))}"
        if strict:
            raise ValueError(msg + " (pass strict=False to convert the rest and list them)")
        notes.append("NOT converted: " + msg)


def _mlp_ratio(dim: int, hidden: int) -> float:
    """A ratio r with ``int(dim * r) == hidden`` (timm's Mlp width), exact where possible."""
    r = hidden / dim
    return r if int(dim * r) == hidden else (hidden + 0.5) / dim


def _num_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if ids and ids != set(range(len(ids))):
        raise ValueError(f"blocks under {prefix!r} are not numbered 0..{len(ids) - 1}: {sorted(ids)}")
    return len(ids)


def _heads(width: int, given: int | None, table: dict[int, int], name: str, notes: list[str]) -> int:
    """Head count: given, else the official one for this width, else width / 64 (ViT's head width)."""
    if given is not None:
        return given
    if width in table:
        return table[width]
    if width % 64 == 0:
        notes.append(f"{name} not stored in the weights and width {width} is not an official one: "
                     f"assumed {width // 64} heads of 64 channels")
        return width // 64
    raise ValueError(f"cannot tell {name} for width {width} from the weights (official widths: "
                     f"{sorted(table)}); pass {name}=...")


def _add_pos_tables(sd: dict[str, torch.Tensor], cfg: VideoMAEConfig, kind: Kind) -> None:
    sd["encoder.pos_embed"] = build_pos_embed(cfg.pos_embed, cfg.grid, cfg.embed_dim)
    if kind == "pretrain":
        sd["decoder_pos_embed"] = build_pos_embed(cfg.pos_embed, cfg.grid, cfg.decoder_embed_dim)


# --------------------------------------------------------------------------------------------
# Official VideoMAE
# --------------------------------------------------------------------------------------------


def official_to_ours(state_dict: Mapping[str, torch.Tensor], *, img_size: int = 224, num_frames: int = 16,
                     num_heads: int | None = None, decoder_num_heads: int | None = None,
                     strict: bool = True) -> ConvertedWeights:
    """Map an official VideoMAE (or VideoMAEv2) state dict to ours.

    Pretraining weights (``encoder.*``/``decoder.*``) give a pretraining model, fine-tuned ones
    (``patch_embed``/``blocks``/``head``) a classifier. The architecture is read from the tensor
    shapes; what weights cannot tell (clip size, frame count, head counts for non-official
    widths) comes from the arguments. The fixed position tables (not stored officially) are
    computed for the resulting grid.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    kind: Kind = "pretrain" if any(k.startswith("encoder.") for k in sd) else "classifier"
    enc = "encoder." if kind == "pretrain" else ""
    key = f"{enc}patch_embed.proj.weight"
    if key not in sd:
        raise ValueError(f"not an official VideoMAE state dict: no {key!r} (keys: {_short(sorted(sd))})")
    dim, chans, tubelet, patch, patch_w = sd[key].shape
    if patch != patch_w:
        raise ValueError(f"non-square patches {patch}x{patch_w} are not supported")
    depth = _num_blocks(sd, f"{enc}blocks.")
    hidden = sd[f"{enc}blocks.0.mlp.fc1.weight"].shape[0]
    notes: list[str] = []
    cfg = VideoMAEConfig(
        img_size=img_size, num_frames=num_frames, tubelet_size=tubelet, patch_size=patch, in_chans=chans,
        embed_dim=dim, depth=depth, num_heads=_heads(dim, num_heads, OFFICIAL_HEADS, "num_heads", notes),
        mlp_ratio=_mlp_ratio(dim, hidden), qkv_bias=f"{enc}blocks.0.attn.q_bias" in sd, norm_eps=1e-6,
        init_values=0.1 if f"{enc}blocks.0.gamma_1" in sd else None, pos_embed="sincos_1d")
    if kind == "pretrain":
        ddim = sd["mask_token"].shape[-1] if "mask_token" in sd else sd["decoder.head.weight"].shape[1]
        cfg = replace(cfg, decoder_embed_dim=ddim, decoder_depth=_num_blocks(sd, "decoder.blocks."),
                      decoder_num_heads=_heads(ddim, decoder_num_heads, OFFICIAL_DECODER_HEADS,
                                               "decoder_num_heads", notes))
        out = sd["decoder.head.weight"].shape[0]
        if out != chans * tubelet * patch * patch:
            raise ValueError(f"decoder.head predicts {out} values per token, expected "
                             f"{chans}*{tubelet}*{patch}^2={chans * tubelet * patch * patch}")
    else:
        cfg = replace(cfg, use_mean_pooling="fc_norm.weight" in sd,
                      num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0)
    if cfg.init_values:
        notes.append("layer scale (gamma_1/gamma_2) mapped to ls1.gamma/ls2.gamma")
    cfg.validate()

    out_sd: dict[str, torch.Tensor] = {}
    unknown = []
    block_pat = re.compile(r"^(encoder\.|decoder\.|)blocks\.(\d+)\.(.+)$")
    for k, v in sd.items():
        m = block_pat.match(k)
        if m:
            prefix = m.group(1) or "encoder."
            rest = _OFFICIAL_BLOCK.get(m.group(3), m.group(3))
            out_sd[f"{prefix}blocks.{m.group(2)}.{rest}"] = v
        elif kind == "pretrain" and (k.startswith(("encoder.patch_embed.", "encoder.norm.", "decoder.norm.",
                                                   "decoder.head."))
                                     or k in ("encoder_to_decoder.weight", "mask_token")):
            out_sd[k] = v
        elif kind == "classifier" and k.startswith(("patch_embed.", "norm.")):
            out_sd["encoder." + k] = v
        elif kind == "classifier" and k.startswith(("fc_norm.", "head.")):
            out_sd[k] = v
        else:
            unknown.append(k)
    _finish(unknown, strict, "official", notes)
    _add_pos_tables(out_sd, cfg, kind)
    notes.append(f"official VideoMAE {kind} weights: {len(sd) - len(unknown)} tensors mapped; "
                 f"clip {num_frames}x{img_size}^2 assumed (not stored in the weights)")
    return ConvertedWeights(out_sd, cfg, kind, notes)


# --------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"Hugging Face {name} {value} is not square; only square sizes are supported")
        value = value[0]
    return int(value)


def hf_config_to_ours(hf_config: Mapping[str, Any] | Any) -> VideoMAEConfig:
    """Our model section for a ``transformers`` VideoMAE config (a dict or a ``VideoMAEConfig``)."""
    c = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
    act = c.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"Hugging Face hidden_act {act!r} is not supported (VideoMAE uses exact 'gelu')")
    dim, hidden = int(c.get("hidden_size", 768)), int(c.get("intermediate_size", 3072))
    ratio = _mlp_ratio(dim, hidden)
    ddim, dhidden = int(c.get("decoder_hidden_size", 384)), int(c.get("decoder_intermediate_size", 1536))
    if int(ddim * ratio) != dhidden:
        raise ValueError(f"decoder_intermediate_size {dhidden} is not decoder_hidden_size {ddim} x the encoder's "
                         f"MLP ratio {hidden}/{dim}; mm3d uses one mlp_ratio for both")
    num_labels = c.get("num_labels") or len(c.get("id2label") or {}) or 0
    cfg = VideoMAEConfig(
        img_size=_square(c.get("image_size", 224), "image_size"),
        num_frames=int(c.get("num_frames", 16)), tubelet_size=int(c.get("tubelet_size", 2)),
        patch_size=_square(c.get("patch_size", 16), "patch_size"), in_chans=int(c.get("num_channels", 3)),
        embed_dim=dim, depth=int(c.get("num_hidden_layers", 12)), num_heads=int(c.get("num_attention_heads", 12)),
        mlp_ratio=ratio, qkv_bias=bool(c.get("qv_bias", c.get("qkv_bias", True))),
        norm_eps=float(c.get("layer_norm_eps", 1e-12)), head_norm_eps=1e-5,  # HF: nn.LayerNorm default there
        attn_drop=float(c.get("attention_probs_dropout_prob", 0.0)),
        proj_drop=float(c.get("hidden_dropout_prob", 0.0)), pos_embed="sincos_1d",
        decoder_embed_dim=ddim, decoder_depth=int(c.get("decoder_num_hidden_layers", 4)),
        decoder_num_heads=int(c.get("decoder_num_attention_heads", 6)),
        norm_pix_loss=bool(c.get("norm_pix_loss", True)), use_mean_pooling=bool(c.get("use_mean_pooling", True)),
        num_classes=int(num_labels))
    cfg.validate()
    return cfg


def hf_to_ours(state_dict: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any] | Any, *,
               strict: bool = True) -> ConvertedWeights:
    """Map a ``transformers`` VideoMAE state dict (pretraining, classification or bare encoder) to ours."""
    cfg = hf_config_to_ours(hf_config)
    sd = dict(state_dict)
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):  # a bare VideoMAEModel
        sd = {("videomae." + k if k.startswith(("embeddings.", "encoder.layer.", "layernorm.")) else k): v
              for k, v in sd.items()}
    kind: Kind = "pretrain" if any(k.startswith(("decoder.", "encoder_to_decoder.")) for k in sd) else "classifier"
    notes: list[str] = []
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str) -> None:
        out[dst] = sd[src]
        used.add(src)

    def blocks(src_prefix: str, dst_prefix: str, depth: int) -> None:
        for i in range(depth):
            s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            missing = [s + q for q in _QKV if s + q not in sd]
            if missing:
                raise ValueError(f"Hugging Face state dict lacks {_short(missing)}")
            out[d + "attn.qkv.weight"] = torch.cat([sd[s + q] for q in _QKV], dim=0)
            used.update(s + q for q in _QKV)
            kb = s + "attention.attention.key.bias"
            if kb in sd:
                if bool(sd[kb].any()):
                    raise ValueError(f"{kb} is non-zero; VideoMAE attention has no key bias")
                used.add(kb)
                notes.append(f"dropped all-zero {kb}")
            for hs, os_ in (*_HF_BLOCK.items(), *_HF_BLOCK_IN_MEMORY.items()):
                if s + hs in sd:
                    if d + os_ in out:
                        raise ValueError(f"{s + hs} duplicates another name of {d + os_}")
                    take(s + hs, d + os_)

    take("videomae.embeddings.patch_embeddings.projection.weight", "encoder.patch_embed.proj.weight")
    take("videomae.embeddings.patch_embeddings.projection.bias", "encoder.patch_embed.proj.bias")
    blocks("videomae.encoder.layer.", "encoder.blocks.", cfg.depth)
    has_layernorm = "videomae.layernorm.weight" in sd
    if has_layernorm:
        take("videomae.layernorm.weight", "encoder.norm.weight")
        take("videomae.layernorm.bias", "encoder.norm.bias")
    if kind == "pretrain":
        if not has_layernorm:  # transformers' default use_mean_pooling=True: no final encoder norm
            notes.append("no final encoder norm (Hugging Face use_mean_pooling=True): model.encoder_norm=false")
        take("encoder_to_decoder.weight", "encoder_to_decoder.weight")
        take("mask_token", "mask_token")
        blocks("decoder.decoder_layers.", "decoder.blocks.", cfg.decoder_depth)
        for p in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
            take("decoder." + p, "decoder." + p)
        cfg = replace(cfg, use_mean_pooling=False, encoder_norm=has_layernorm)
    else:
        if "fc_norm.weight" in sd:
            take("fc_norm.weight", "fc_norm.weight")
            take("fc_norm.bias", "fc_norm.bias")
        if "classifier.weight" in sd:
            take("classifier.weight", "head.weight")
            take("classifier.bias", "head.bias")
            cfg = replace(cfg, num_classes=sd["classifier.weight"].shape[0])
        else:
            notes.append("no classification head in the weights (a bare VideoMAEModel)")
        cfg = replace(cfg, use_mean_pooling="fc_norm.weight" in sd or not has_layernorm)
    _finish([k for k in sd if k not in used], strict, "Hugging Face", notes)
    _add_pos_tables(out, cfg, kind)
    notes.append(f"Hugging Face VideoMAE {kind} weights: {len(used)} tensors mapped")
    return ConvertedWeights(out, cfg, kind, notes)


def ours_config_to_hf(cfg: VideoMAEConfig, kind: Kind) -> dict[str, Any]:
    """A ``transformers`` ``config.json`` mapping for our model section."""
    if cfg.pos_embed != "sincos_1d":
        raise ValueError(f"Hugging Face VideoMAE uses the 1-D sin-cos table; pos_embed={cfg.pos_embed!r} "
                         f"cannot be written")
    if cfg.init_values:
        raise ValueError("Hugging Face VideoMAE has no layer scale; init_values must be None/0")
    if kind == "classifier" and cfg.cls_token:
        raise ValueError("Hugging Face VideoMAE has no class token; cls_token must be false")
    hf: dict[str, Any] = {
        "model_type": "videomae",
        "architectures": ["VideoMAEForPreTraining" if kind == "pretrain" else "VideoMAEForVideoClassification"],
        "image_size": cfg.img_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
        "num_frames": cfg.num_frames, "tubelet_size": cfg.tubelet_size, "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio), "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.proj_drop, "attention_probs_dropout_prob": cfg.attn_drop,
        "initializer_range": 0.02, "layer_norm_eps": cfg.norm_eps, "qkv_bias": cfg.qkv_bias,
        "use_mean_pooling": cfg.use_mean_pooling if kind == "classifier" else not cfg.encoder_norm,
        "decoder_num_attention_heads": cfg.decoder_num_heads, "decoder_hidden_size": cfg.decoder_embed_dim,
        "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_intermediate_size": int(cfg.decoder_embed_dim * cfg.mlp_ratio),
        "norm_pix_loss": cfg.norm_pix_loss,
    }
    if kind == "classifier":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    return hf


def ours_to_hf(state_dict: Mapping[str, torch.Tensor], cfg: VideoMAEConfig, kind: Kind
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Our weights in the ``transformers`` layout: (state dict, config.json mapping, notes)."""
    hf_cfg = ours_config_to_hf(cfg, kind)
    sd = dict(state_dict)
    notes: list[str] = []
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        out[dst] = sd[src].detach().clone().contiguous()
        used.add(src)

    for name, dim in (("encoder.pos_embed", cfg.embed_dim), ("decoder_pos_embed", cfg.decoder_embed_dim)):
        if name in sd:
            used.add(name)
            fresh = build_pos_embed("sincos_1d", cfg.grid, dim)
            if sd[name].shape != fresh.shape or not torch.allclose(sd[name].float(), fresh, atol=1e-6):
                notes.append(f"WARNING: {name} differs from the standard table (interpolated?); "
                             f"Hugging Face recomputes it, so outputs will differ")
    inv_block = {v: k for k, v in _HF_BLOCK.items()}

    def blocks(src_prefix: str, dst_prefix: str, depth: int, dim: int) -> None:
        for i in range(depth):
            s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            q, k, v = sd[s + "attn.qkv.weight"].detach().split(dim, dim=0)
            for name, w in zip(_QKV, (q, k, v)):
                out[d + name] = w.clone().contiguous()
            used.add(s + "attn.qkv.weight")
            for os_, hs in inv_block.items():
                if s + os_ in sd:
                    take(s + os_, d + hs)

    take("encoder.patch_embed.proj.weight", "videomae.embeddings.patch_embeddings.projection.weight")
    take("encoder.patch_embed.proj.bias", "videomae.embeddings.patch_embeddings.projection.bias")
    blocks("encoder.blocks.", "videomae.encoder.layer.", cfg.depth, cfg.embed_dim)
    if "encoder.norm.weight" in sd:
        take("encoder.norm.weight", "videomae.layernorm.weight")
        take("encoder.norm.bias", "videomae.layernorm.bias")
    if kind == "pretrain":
        take("encoder_to_decoder.weight", "encoder_to_decoder.weight")
        take("mask_token", "mask_token")
        blocks("decoder.blocks.", "decoder.decoder_layers.", cfg.decoder_depth, cfg.decoder_embed_dim)
        for p in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
            take("decoder." + p, "decoder." + p)
    else:
        for p in ("weight", "bias"):
            if f"fc_norm.{p}" in sd:
                take(f"fc_norm.{p}", f"fc_norm.{p}")
            take(f"head.{p}", f"classifier.{p}")
    head_eps = cfg.norm_eps if cfg.head_norm_eps is None else cfg.head_norm_eps
    if head_eps != 1e-5:
        notes.append(f"note: Hugging Face fixes the eps of the decoder's final norm and fc_norm at 1e-5 "
                     f"(ours: {head_eps:g}); outputs differ slightly")
    leftover = [k for k in sd if k not in used]
    if leftover:
        raise ValueError(f"{len(leftover)} keys cannot be written to the Hugging Face layout: {_short(leftover)}")
    return out, hf_cfg, notes


def _read_weights_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return extract_state_dict(load_checkpoint(path, allow_pickle=allow_pickle))


def load_hf_dir(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config.json mapping) of a ``transformers`` checkpoint directory.

    Reads ``model.safetensors`` (or its sharded index), else ``pytorch_model.bin``. A single
    weights file is accepted too when a ``config.json`` lies beside it.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: a Hugging Face VideoMAE directory needs one")
    hf_cfg = json.loads(cfg_path.read_text())
    if hf_cfg.get("model_type", "videomae") != "videomae":
        raise ValueError(f"{cfg_path}: model_type {hf_cfg.get('model_type')!r} is not 'videomae'")
    if path.is_file():
        return _read_weights_file(path, allow_pickle), hf_cfg
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(_read_weights_file(folder / shard, allow_pickle))
        return sd, hf_cfg
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _read_weights_file(folder / name, allow_pickle), hf_cfg
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


# --------------------------------------------------------------------------------------------
# Classifier initialisation from any VideoMAE weights
# --------------------------------------------------------------------------------------------


def classifier_init_state(state_dict: Mapping[str, torch.Tensor], model: VideoMAEClassifier, *,
                          old_grid: tuple[int, int, int] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit our pretraining or classifier weights to `model` for fine-tuning.

    Drops (and lists) the pretraining decoder, the encoder's final norm when `model` pools by
    mean (official fine-tuning does the same), and a head whose class count differs; resizes
    the position table from `old_grid` (default: the model's grid). Returns (state dict, notes);
    load it with ``load_model_weights(model, sd, strict=False)`` to list what stays initialised.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = model.state_dict()
    notes = []
    dropped = sorted(k for k in sd if k.startswith(("decoder.", "encoder_to_decoder.")) or k in
                     ("mask_token", "decoder_pos_embed"))
    if dropped:
        notes.append(f"pretraining decoder not used by the classifier, dropped: {_short(dropped, 6)}")
    for k in ("encoder.norm.weight", "encoder.norm.bias"):
        if k in sd and k not in own:
            dropped.append(k)
            notes.append(f"dropped {k} (the classifier pools by mean and uses fc_norm)")
    for k in ("head.weight", "head.bias"):
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            dropped.append(k)
            notes.append(f"head not loaded: {k} is {tuple(sd[k].shape)} in the checkpoint, "
                         f"{tuple(own[k].shape) if k in own else 'absent'} in the model")
    sd = {k: v for k, v in sd.items() if k not in dropped}
    notes += adapt_pos_embeds(sd, model, old_grid or model.grid)
    return sd, notes


# --------------------------------------------------------------------------------------------
# File converters (`mm3d convert --from NAME SRC DST`)
# --------------------------------------------------------------------------------------------


def _save_ours(conv: ConvertedWeights, dst: str, source: str, src: str) -> list[str]:
    config = {"task": TASK_OF_KIND[conv.kind], "model": to_dict(conv.config)}
    out = {"model": conv.state_dict, "config": config,
           "meta": {"converted_from": source, "source": str(src), "kind": conv.kind},
           "model_card": converted_card(config, {"converter": source, "file": str(src), "weights": conv.kind,
                                                 "notes": list(conv.notes)}, modality="video")}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, dst)
    cfg = conv.config
    return conv.notes + [f"wrote {dst}: {conv.kind} model, {cfg.embed_dim} wide, {cfg.depth} blocks, "
                         f"{cfg.num_frames}x{cfg.img_size}^2 clips, {len(conv.state_dict)} tensors"]


@register_converter("videomae-official")
def convert_official(src: str, dst: str, *, allow_pickle: bool = False) -> list[str]:
    """Official VideoMAE / VideoMAEv2 ``.pth`` (weights under ``model`` or ``module``) -> our checkpoint."""
    ckpt = load_checkpoint(src, allow_pickle=allow_pickle)
    conv = official_to_ours(extract_state_dict(ckpt, ("model", "module", "state_dict")))
    return _save_ours(conv, dst, "videomae-official", src)


@register_converter("videomae-hf")
def convert_hf(src: str, dst: str, *, allow_pickle: bool = False) -> list[str]:
    """``transformers`` VideoMAE directory (or weights file beside a config.json) -> our checkpoint."""
    sd, hf_cfg = load_hf_dir(src, allow_pickle=allow_pickle)
    return _save_ours(hf_to_ours(sd, hf_cfg), dst, "videomae-hf", src)


def _our_model_config(ckpt: Mapping[str, Any], src: str) -> VideoMAEConfig:
    cfg = ckpt.get("config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise ValueError(f"{src}: no model config in the checkpoint (expected ckpt['config']['model'])")
    return config_from_dict(VideoMAEConfig, dict(cfg["model"]), file=str(src))


@register_converter("to-hf")
def convert_to_hf(src: str, dst: str, *, allow_pickle: bool = False) -> list[str]:
    """Our VideoMAE checkpoint -> a ``transformers`` directory (config.json + model.safetensors)."""
    ckpt = load_checkpoint(src, allow_pickle=allow_pickle)
    sd = {k.removeprefix("module."): v for k, v in extract_state_dict(ckpt).items()}
    cfg = _our_model_config(ckpt, src)
    kind: Kind = "pretrain" if "encoder_to_decoder.weight" in sd else "classifier"
    hf_sd, hf_cfg, notes = ours_to_hf(sd, cfg, kind)
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return notes + [f"wrote {out}/config.json and model.safetensors ({hf_cfg['architectures'][0]}, "
                    f"{len(hf_sd)} tensors)"]
