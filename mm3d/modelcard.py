"""Model cards: what a checkpoint or an exported model needs to be used right, carried inside it.

A card is plain data (JSON), built here from a run's task and config; it never imports a modality
(the task says how its inputs are prepared, :meth:`mm3d.task.Task.preprocessing`, and names its
classes, :meth:`mm3d.task.Task.class_names`). Keys:

``format``, ``mm3d_version``, ``task``, ``modality``
``model``: the model's class, ``variant``, ``parameters``, ``num_classes``.
``preprocessing``: the task's input recipe: the input tensor's name and per-sample ``shape`` (what
    ``mm3d export`` traces with) and, for people, sampling, sizes, normalisation.
``classes``: class names in label order, or None when unknown.
``training``: the run's config name, seed, ``protocol_name`` and ``protocol`` (the task's
    ``run_info``, as in ``results.json``); None for converted weights.
``source``: ``{"kind": "trained", "init": ...}`` (what the run started from: ``scratch``, or the
    init file with what its own card or conversion record says) or ``{"kind": "converted",
    "converter", "file", ...}``.
``checkpoint``: the step and epoch of the weights.
``metrics``: the evaluation of the selection split at the step the checkpoint was written, when
    there was one then (``{"split", "epoch", "values"}``); {} otherwise.
``results``: the run's final evaluation (see below), when known.
``export``: exported files only: format, outputs, batch, and the largest difference to eager
    measured when the file was written.

When the card is written. The trainer embeds the card in every checkpoint as it saves it, with the
metrics known then. The final evaluation comes after the last save, so the checkpoints are not
rewritten (they are hard-linked as ``last.pt``/``best.pt`` and written atomically); instead the run
folder gets ``model_card.json``: the evaluated checkpoint's card plus ``results`` (the final metrics
of every split, which checkpoint and step they belong to, the weights scored: ``model`` or ``ema``).
:func:`read_card` adds those ``results`` to the card of a checkpoint in that run folder whose step
they belong to, and ``mm3d export`` writes the combined card into the exported file.

``mm3d info FILE`` prints the card of one of our checkpoints, a ``mm3d convert`` output, or an
exported ``.onnx`` (``metadata_props``) or ``.pt2`` (an extra file of the archive).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from torch import nn

from mm3d.checkpoint import CheckpointError, load_checkpoint
from mm3d.config import config_from_dict
from mm3d.errors import UserError
from mm3d.registry import COMMANDS, TASKS, load_modalities
from mm3d.results import jsonable

log = logging.getLogger(__name__)

CARD_FORMAT = 1
CARD_KEY = "model_card"  # in a checkpoint dict
RUN_CARD_FILE = "model_card.json"  # in a run folder: the evaluated checkpoint's card with the final results
ONNX_KEY = "mm3d_model_card"  # metadata_props key of an exported .onnx
PT2_FILE = "mm3d_model_card.json"  # extra file of an exported .pt2 archive


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_card(task: Any, cfg: Any, *, model: nn.Module | None = None, protocol: Mapping[str, Any] | None = None,
               source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card of a model of `task` built from `cfg`.

    model: counted for ``model.parameters`` and named (None: left out).
    protocol: the task's ``run_info`` of a training run (None: not trained here).
    source: for converted weights (None: a trained model, its source is ``cfg.init``).
    """
    model_cfg = getattr(cfg, "model", None)
    facts: dict[str, Any] = {"class": type(model).__name__ if model is not None else None,
                             "variant": getattr(model_cfg, "variant", "") or None,
                             "parameters": sum(p.numel() for p in model.parameters()) if model is not None else None,
                             "num_classes": getattr(model, "num_classes", None)}
    training = None
    if source is None:
        source = {"kind": "trained", "init": describe_init(cfg.init, allow_pickle=cfg.allow_pickle)}
        training = {"config": cfg.name, "seed": cfg.seed, "protocol_name": cfg.protocol,
                    "protocol": dict(protocol or {})}
    card = {"format": CARD_FORMAT, "mm3d_version": __import__("mm3d").__version__, "task": task.name,
            "modality": task.modality, "model": facts, "preprocessing": task.preprocessing(cfg),
            "classes": card_classes(task, cfg), "training": training, "source": dict(source),
            "checkpoint": {}, "metrics": {}}
    return jsonable(card)


def card_classes(task: Any, cfg: Any) -> list[str] | None:
    """The task's class names; None when they cannot be read now (a label map or dataset folder that
    is not on this machine: the card of a checkpoint written where they were has them)."""
    try:
        names = task.class_names(cfg)
    except (OSError, ValueError, UserError) as e:
        log.debug("model card: no class names (%s)", e)
        return None
    return list(names) if names is not None else None


def describe_init(path: str, *, allow_pickle: bool = False) -> str | dict[str, Any]:
    """What a run started from, for its card's ``source.init``: ``"scratch"``, or the file with what
    it says about itself (its card's task, step and source; a conversion record; a stored task)."""
    if not path:
        return "scratch"
    p = Path(path)
    if p.is_dir():
        return {"file": path, "format": "huggingface folder"}
    try:
        ck = load_checkpoint(p, mmap=True, allow_pickle=allow_pickle)
    except CheckpointError:
        return {"file": path}
    card = ck.get(CARD_KEY)
    if isinstance(card, dict):
        return {"file": path, "task": card.get("task"), "step": card.get("checkpoint", {}).get("step"),
                "source": card.get("source")}
    meta = ck.get("meta")
    if isinstance(meta, dict) and meta.get("converted_from"):
        return {"file": path, "converted_from": meta["converted_from"], "source": meta.get("source")}
    stored = ck.get("config")
    return {"file": path, "task": stored.get("task") if isinstance(stored, dict) else None, "step": ck.get("step")}


def checkpoint_card(base: Mapping[str, Any], *, step: int, epoch: int,
                    evaluation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`base` (from :func:`build_card`) for the weights of `step`; `evaluation`: a ``metrics.jsonl``
    record of the selection split (``step``, ``epoch``, ``split`` and the metrics) made at that step."""
    card = copy.deepcopy(dict(base))
    card["checkpoint"] = {"step": int(step), "epoch": int(epoch)}
    if evaluation is not None:
        values = {k: v for k, v in evaluation.items() if k not in ("step", "epoch", "split", "final")}
        card["metrics"] = jsonable({"split": evaluation.get("split"), "epoch": evaluation.get("epoch"),
                                    "values": values})
    return card


def converted_card(config: Mapping[str, Any] | None, source: Mapping[str, Any], *,
                   modality: str) -> dict[str, Any]:
    """The card of ``mm3d convert`` output: `config` the stored run config (with ``task`` and
    ``model``; None when the weights do not tell the task: then only `modality` and `source`)."""
    load_modalities()
    source = {"kind": "converted", **source}
    task_name = (config or {}).get("task")
    if task_name not in TASKS:
        return jsonable({"format": CARD_FORMAT, "mm3d_version": __import__("mm3d").__version__, "task": None,
                         "modality": modality, "model": {}, "preprocessing": {}, "classes": None,
                         "training": None, "source": source, "checkpoint": {}, "metrics": {}})
    task = TASKS.get(task_name)
    cfg = config_from_dict(task.config_class, {**dict(config), "seeds": []}, file="converted config")
    with torch.device("meta"):  # counted, never initialised
        model = task.build_model(cfg)
    return build_card(task, cfg, model=model, source=source)


def write_run_card(run_dir: Path, checkpoint: Path | None, results: Mapping[str, Any], *, weights: str = "model"
                   ) -> Path | None:
    """``run_dir/model_card.json``: the card of `checkpoint` (the one the final evaluation scored) with
    ``results``: its metrics per split from `results` (the trainer's results), the file, its step and
    which of its weights were scored (`weights`: ``model`` or ``ema``). None when there is no
    checkpoint (a run that saves none) or it holds no card."""
    if checkpoint is None:
        return None
    card = load_checkpoint(checkpoint, mmap=True).get(CARD_KEY)
    if not isinstance(card, dict):
        return None
    card = dict(card)
    card["results"] = jsonable({
        "checkpoint": checkpoint.name, "step": card.get("checkpoint", {}).get("step"), "weights": weights,
        "selected_on": results.get("selected_on"),
        "splits": {s: results[s] for s in ("val", "test") if isinstance(results.get(s), dict)}})
    path = run_dir / RUN_CARD_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(card, indent=1))
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class CardInfo:
    """What ``mm3d info`` shows. card: the model card (None: the file carries none and has no config
    to build one from); kind: ``checkpoint``, ``onnx`` or ``pt2``; basics: file, task, variant, step,
    parameters (or, without a card, the weights' size); notes: how the card was found."""

    card: dict[str, Any] | None
    kind: str
    basics: dict[str, Any]
    notes: list[str]


def read_card(path: str | Path, *, allow_pickle: bool = False) -> CardInfo:
    """The card and basic facts of one of our checkpoints, a converted checkpoint, or an exported
    ``.onnx`` / ``.pt2``. A checkpoint in a run folder whose ``model_card.json`` belongs to its step
    gets that file's final ``results``; a checkpoint written before cards existed gets a card built
    from its stored config (said in `notes`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".onnx":
        return _onnx_card(path)
    if path.suffix == ".pt2":
        return _pt2_card(path)
    ck = load_checkpoint(path, mmap=True, allow_pickle=allow_pickle)
    notes: list[str] = []
    card = ck.get(CARD_KEY)
    card = dict(card) if isinstance(card, dict) else _card_from_stored(ck, notes)
    if card is not None:
        run_card = path.resolve().parent.parent / RUN_CARD_FILE
        if path.resolve().parent.name == "checkpoints" and run_card.is_file():
            final = json.loads(run_card.read_text()).get("results")
            if isinstance(final, dict) and final.get("step") == card.get("checkpoint", {}).get("step"):
                card["results"] = final
                notes.append(f"final results from {run_card}")
    sd = ck.get("model") if isinstance(ck.get("model"), Mapping) else {}
    basics = {"file": str(path), "format": "mm3d checkpoint",
              "task": (card or {}).get("task") or (ck.get("config") or {}).get("task"),
              "variant": ((card or {}).get("model") or {}).get("variant"),
              "step": ck.get("step", ((card or {}).get("checkpoint") or {}).get("step")),
              "parameters": ((card or {}).get("model") or {}).get("parameters"),
              "tensors": len(sd), "values": sum(v.numel() for v in sd.values() if isinstance(v, torch.Tensor))}
    return CardInfo(card, "checkpoint", basics, notes)


def _card_from_stored(ck: Mapping[str, Any], notes: list[str]) -> dict[str, Any] | None:
    """A card for a checkpoint that carries none, from its stored config and conversion record."""
    stored, meta = ck.get("config"), ck.get("meta")
    load_modalities()
    if not isinstance(stored, dict) or stored.get("task") not in TASKS:
        if isinstance(meta, dict) and meta.get("converted_from"):
            notes.append("no model card in the file: built from its conversion record")
            return converted_card(None, {"converter": meta["converted_from"], "file": meta.get("source"),
                                         "weights": meta.get("kind")}, modality="")
        return None
    task = TASKS.get(stored["task"])
    cfg = config_from_dict(task.config_class, {**stored, "seeds": []}, file="stored config")
    notes.append("no model card in the file (written before mm3d stored one): built from its stored config")
    try:
        with torch.device("meta"):  # counted, never initialised
            model = task.build_model(cfg)
    except (OSError, ValueError) as e:  # e.g. a class count read from a dataset that is not here
        notes.append(f"parameters not counted: the model cannot be built here ({e})")
        model = None
    source = None
    if isinstance(meta, dict) and meta.get("converted_from"):
        source = {"kind": "converted", "converter": meta["converted_from"], "file": meta.get("source"),
                  "weights": meta.get("kind")}
    card = build_card(task, cfg, model=model, source=source)
    return checkpoint_card(card, step=ck.get("step", 0), epoch=ck.get("epoch", 0)) if source is None else card


def _export_basics(path: Path, card: Mapping[str, Any] | None, fmt: str) -> dict[str, Any]:
    card = card or {}
    return {"file": str(path), "format": fmt, "task": card.get("task"),
            "variant": (card.get("model") or {}).get("variant"),
            "step": (card.get("checkpoint") or {}).get("step"),
            "parameters": (card.get("model") or {}).get("parameters")}


def _onnx_card(path: Path) -> CardInfo:
    try:
        import onnx
    except ImportError:
        raise UserError("reading .onnx files needs the onnx package: pip install onnx") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others, with no common base
        raise UserError(f"{path} is not a readable ONNX model: {e}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    card = json.loads(meta[ONNX_KEY]) if ONNX_KEY in meta else None
    notes = [] if card is not None else [f"no {ONNX_KEY} in the file's metadata_props (not written by mm3d export)"]
    basics = _export_basics(path, card, "onnx")
    basics["inputs"] = {i.name: _onnx_shape(i) for i in proto.graph.input}
    basics["outputs"] = {o.name: _onnx_shape(o) for o in proto.graph.output}
    basics["opset"] = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return CardInfo(card, "onnx", basics, notes)


def _onnx_shape(value: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _pt2_card(path: Path) -> CardInfo:
    extra = {PT2_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # torch raises RuntimeError, KeyError, zipfile errors ... for a bad archive
        raise UserError(f"{path} is not a readable torch.export archive: {e}") from None
    card = json.loads(extra[PT2_FILE]) if extra[PT2_FILE] else None
    notes = [] if card is not None else [f"no {PT2_FILE} in the archive (not written by mm3d export)"]
    basics = _export_basics(path, card, "pt2")
    sig = program.graph_signature
    basics["inputs"] = list(sig.user_inputs)
    basics["outputs"] = list(sig.user_outputs)
    return CardInfo(card, "pt2", basics, notes)


# --------------------------------------------------------------------------------------------
# `mm3d info`
# --------------------------------------------------------------------------------------------


def format_info(info: CardInfo) -> str:
    """The text ``mm3d info`` prints: the basics, then the card as YAML."""
    b = info.basics
    lines = [f"file        {b['file']} ({b['format']})"]
    if b.get("task"):
        lines.append(f"task        {b['task']}" + (f" ({info.card.get('modality')})" if info.card else ""))
    if b.get("variant"):
        lines.append(f"variant     {b['variant']}")
    if b.get("step") is not None:
        lines.append(f"step        {b['step']}")
    if b.get("parameters") is not None:
        lines.append(f"parameters  {b['parameters']:,} ({_millions(b['parameters'])})")
    elif b.get("values") is not None:
        lines.append(f"weights     {b['values']:,} values in {b['tensors']} tensors")
    for key in ("inputs", "outputs", "opset"):
        if b.get(key) is not None:
            lines.append(f"{key:11s} {b[key]}")
    for note in info.notes:
        lines.append(f"note        {note}")
    if info.card is None:
        lines.append("model card  none")
    else:
        lines.append("model card:")
        text = yaml.safe_dump(info.card, sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)
        lines += ["  " + line for line in text.rstrip().splitlines()]
    return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 100 else str(n)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="one of our checkpoints, a `mm3d convert` output, or an exported .onnx / .pt2")
    p.add_argument("--json", action="store_true", help="print {basics, card, notes} as JSON")
    p.add_argument("--allow-pickle", action="store_true", help="trust a checkpoint that needs pickle")


def run(args: argparse.Namespace) -> int:
    info = read_card(args.file, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(jsonable({"kind": info.kind, "basics": info.basics, "card": info.card,
                                   "notes": info.notes}), indent=1, default=str))
    else:
        print(format_info(info))
    return 0


COMMANDS.add("info", ("Show the model card of a checkpoint, a converted checkpoint or an exported .onnx/.pt2: "
                      "task, variant, step, parameters, preprocessing, classes, protocol, metrics, source.",
                      add_arguments, run))
