"""``mm3d export``: one of our checkpoints as an ONNX model or a ``torch.export`` archive (``.pt2``),
carrying its model card (:mod:`mm3d.modelcard`).

The graph is the model's own ``forward_features`` then ``forward_head`` (the interface every
classifier and pretraining model has), traced once with :func:`torch.export.export`; the ONNX file
is translated from that program by the dynamo exporter (``torch.onnx.export(..., dynamo=True)``).
It takes one input, named and shaped as the task's preprocessing says
(:meth:`mm3d.task.Task.preprocessing`): ``video`` (B, C, T, H, W), a clip normalised as for
``mm3d predict``; ``points`` (B, N, 3), a normalised cloud. A Point-MAE graph holds its grouping
(farthest point sampling, unrolled over the G centres, and the KNN patches), so it takes the points
themselves. Outputs:

- ``logits`` (B, num_classes) with ``--logits`` (the default for a classifier);
- ``features`` (B, F), the pooled feature (``forward_head(..., pre_logits=True)``: a classifier's
  head input, a pretraining model's mean (video) or max+mean (points) of its tokens), and
  ``tokens`` (B, L, D), with ``--features`` (the default for a model without a head).

The batch is 1, or open with ``--dynamic-batch`` (the axis named ``batch``). Every file is
checked after it is written: it is run from disk (onnxruntime on the CPU; ``torch.export.load``)
on a random batch and compared with the eager model; the largest difference goes into the card
and the command fails when it exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mm3d.checkpoint import OutputError, describe_os_error, model_from_checkpoint
from mm3d.errors import UserError
from mm3d.modelcard import ONNX_KEY, PT2_FILE, card_classes, read_card
from mm3d.registry import COMMANDS
from mm3d.results import jsonable

log = logging.getLogger(__name__)

Format = Literal["onnx", "pt2"]
Output = Literal["logits", "features"]
FORMATS: tuple[str, ...] = ("onnx", "pt2")
# ONNX keeps the weights inside the file (protobuf's 2 GiB limit) up to this many bytes, beside it beyond
ONNX_INLINE_BYTES = 1_800_000_000


class ExportModule(nn.Module):
    """`model` as one tensor in, plain tensors out: ``forward_head(forward_features(x))`` (`output`
    ``logits``) or ``(forward_head(tokens, pre_logits=True), tokens)`` (``features``)."""

    def __init__(self, model: nn.Module, output: Output) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (B, ...) one batch of the model's input -> logits (B, C), or features (B, F) and tokens (B, L, D)."""
        tokens = self.model.forward_features(x)
        if self.output == "logits":
            return self.model.forward_head(tokens)
        return self.model.forward_head(tokens, pre_logits=True), tokens


@dataclass
class ExportResult:
    """path: the written file; outputs: output name -> shape (``"batch"`` for an open batch axis);
    max_abs_diff: the largest difference to eager over the checked batches (None: not checked);
    card: the card stored in the file."""

    path: Path
    format: str
    outputs: dict[str, list[int | str]]
    max_abs_diff: float | None
    card: dict[str, Any]


def output_names(output: Output) -> tuple[str, ...]:
    return ("logits",) if output == "logits" else ("features", "tokens")


def example_input(preprocessing: Mapping[str, Any], batch: int, *, seed: int = 0) -> torch.Tensor:
    """A random (batch, *shape) float32 input of the task's preprocessing (``shape``): normal values
    (like normalised pixels) for video; points inside the unit sphere for clouds."""
    shape = [batch, *preprocessing["shape"]]
    g = torch.Generator().manual_seed(seed)
    if preprocessing.get("input") == "points":
        x = torch.rand(shape, generator=g) * 2 - 1
        return x / x.norm(dim=-1, keepdim=True).amax(dim=1, keepdim=True)
    return torch.randn(shape, generator=g)


def _check_exportable(model: nn.Module, task_name: str, preprocessing: Mapping[str, Any], output: Output) -> None:
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise NotImplementedError(f"task {task_name!r}: its model ({type(model).__name__}) has no "
                                  f"forward_features/forward_head to export")
    if not preprocessing.get("input") or not preprocessing.get("shape"):
        raise NotImplementedError(f"task {task_name!r} does not state its input (Task.preprocessing)")
    if preprocessing.get("extra_inputs"):
        extra = ", ".join(preprocessing["extra_inputs"])
        raise NotImplementedError(f"task {task_name!r} takes further inputs ({extra}); mm3d export writes one-input models")
    if output == "logits" and not getattr(model, "num_classes", 0):
        raise UserError(f"this {type(model).__name__} has no classifier head: export --features")


def trace(model: nn.Module, example: torch.Tensor, input_name: str, *, dynamic_batch: bool,
          output: Output) -> torch.export.ExportedProgram:
    """`model` (eval mode) as an :class:`~torch.export.ExportedProgram` of :class:`ExportModule`."""
    shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    module = ExportModule(model, output).eval()
    try:
        return torch.export.export(module, (example,), dynamic_shapes=shapes)
    except Exception as e:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        raise RuntimeError(f"torch.export could not trace {type(model).__name__} with a {input_name} input of "
                           f"shape {tuple(example.shape)}: {e}") from e


@contextlib.contextmanager
def _quiet_onnx_logs() -> Iterator[None]:
    """The ONNX exporter's passes log every rewrite at INFO; keep them at WARNING while it runs."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _save_onnx(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path, input_name: str,
               names: Sequence[str], card: Mapping[str, Any], *, dynamic_batch: bool) -> None:
    for module in ("onnx", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--format onnx needs the {module} package: pip install 'mm3d[export]' "
                            f"(onnx, onnxscript, onnxruntime)")
    shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    with _quiet_onnx_logs():
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[input_name],
                                         output_names=list(names), dynamic_shapes=shapes, verbose=False)
    onnx_program.model.metadata_props[ONNX_KEY] = json.dumps(jsonable(card))
    size = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    onnx_program.save(str(path), external_data=size > ONNX_INLINE_BYTES)


def _set_onnx_card(path: Path, card: Mapping[str, Any]) -> None:
    """Replace the card in an ONNX file's metadata_props (weights stored beside it stay where they are)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == ONNX_KEY:
            prop.value = json.dumps(jsonable(card))
    onnx.save(proto, str(path))


def load_exported(path: str | Path) -> Callable[[torch.Tensor], list[np.ndarray]]:
    """An exported file, loaded once from disk, as a function of one input batch: an ``.onnx`` runs in
    onnxruntime (CPU), a ``.pt2`` through :func:`torch.export.load`. It returns the outputs in order,
    as float arrays."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: list(session.run(None, {name: x.numpy()}))
    module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(x)
        return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]

    return run


def run_exported(path: str | Path, x: torch.Tensor) -> list[np.ndarray]:
    """Run an exported file on `x` (:func:`load_exported`)."""
    return load_exported(path)(x)


def _verify(path: Path, module: ExportModule, preprocessing: Mapping[str, Any], batches: Sequence[int]) -> float:
    """The largest difference between the file and `module` over random inputs of `batches`."""
    worst = 0.0
    exported = load_exported(path)
    for b in batches:
        x = example_input(preprocessing, b, seed=b)
        with torch.no_grad():
            ref = module(x)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = exported(x)
        if len(got) != len(ref):
            raise RuntimeError(f"{path} gave {len(got)} outputs, the model {len(ref)}")
        for g, r in zip(got, ref):
            if tuple(g.shape) != tuple(r.shape):
                raise RuntimeError(f"{path}: an output of shape {tuple(g.shape)} for batch {b}, eager {tuple(r.shape)}")
            worst = max(worst, float(np.abs(g.astype(np.float64) - r.numpy().astype(np.float64)).max()))
    return worst


def export_model(model: nn.Module, task_name: str, card: Mapping[str, Any], out: str | Path, *, fmt: Format,
                 output: Output, dynamic_batch: bool = False, tolerance: float = 1e-4,
                 checkpoint: str = "") -> ExportResult:
    """Write `model` (of task `task_name`, whose card is `card`) to `out` as `fmt`, check the file
    against eager and store the card with an ``export`` section. Raises UserError when the file
    differs from eager by more than `tolerance`."""
    out = Path(out)
    preprocessing = card.get("preprocessing") or {}
    _check_exportable(model, task_name, preprocessing, output)
    model = model.eval().cpu()
    input_name = preprocessing["input"]
    names = output_names(output)
    example = example_input(preprocessing, 2 if dynamic_batch else 1)
    log.info("tracing %s (%s input %s, %s)", type(model).__name__, input_name, tuple(example.shape), output)
    program = trace(model, example, input_name, dynamic_batch=dynamic_batch, output=output)
    module = ExportModule(model, output).eval()
    with torch.no_grad():
        ref = module(example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    batch: int | str = "batch" if dynamic_batch else 1
    card = dict(card)
    card["export"] = {"format": fmt, "file": out.name, "checkpoint": checkpoint, "output": output,
                      "inputs": {input_name: [batch, *preprocessing["shape"]]},
                      "outputs": {n: [batch, *r.shape[1:]] for n, r in zip(names, ref)},
                      "dynamic_batch": dynamic_batch, "torch": torch.__version__, "max_abs_diff": None,
                      "checked_with": None}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "onnx":
            _save_onnx(program, example, out, input_name, names, card, dynamic_batch=dynamic_batch)
        else:
            torch.export.save(program, str(out), extra_files={PT2_FILE: json.dumps(jsonable(card))})
    except OSError as e:
        raise OutputError(describe_os_error(e, out)) from None
    diff: float | None = None
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        log.warning("onnxruntime is not installed: %s was not checked against the model (pip install onnxruntime)", out)
    else:
        diff = _verify(out, module, preprocessing, (1, 3) if dynamic_batch else (1,))
        card["export"].update(max_abs_diff=diff,
                              checked_with="torch.export.load" if fmt == "pt2" else "onnxruntime (CPU)")
    if fmt == "onnx":
        _set_onnx_card(out, card)
    else:
        torch.export.save(program, str(out), extra_files={PT2_FILE: json.dumps(jsonable(card))})
    if diff is not None and diff > tolerance:
        raise UserError(f"{out} differs from the model by up to {diff:.3g} (more than --tolerance {tolerance:g}); "
                        f"the file is written, but do not deploy it without checking why")
    return ExportResult(out, fmt, card["export"]["outputs"], diff, jsonable(card))


def export_checkpoint(checkpoint: str, out: str | Path, *, fmt: Format | None = None, output: Output | None = None,
                      dynamic_batch: bool = False, tolerance: float = 1e-4, allow_pickle: bool = False,
                      overrides: Sequence[str] = ()) -> ExportResult:
    """``mm3d export``: rebuild the model of one of our checkpoints (its stored config, `overrides`
    over it) and export it (:func:`export_model`). `fmt` None: from the suffix of `out`; `output`
    None: ``logits`` for a classifier, else ``features``."""
    out = Path(out)
    if fmt is None:
        fmt = out.suffix.lstrip(".")  # type: ignore[assignment]
        if fmt not in FORMATS:
            raise UserError(f"--out {out}: give --format onnx|pt2, or a file ending in .onnx or .pt2")
    elif fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out.suffix != f".{fmt}":
        raise UserError(f"--out {out} does not end in .{fmt} (--format {fmt})")
    task, cfg, model = model_from_checkpoint(checkpoint, allow_pickle, overrides)
    card = dict(read_card(checkpoint, allow_pickle=allow_pickle).card or {})
    card["preprocessing"] = task.preprocessing(cfg)  # as overridden (e.g. data.npoints)
    if card.get("classes") is None:  # a card written where the label map or dataset was not
        card["classes"] = card_classes(task, cfg)
    if output is None:
        output = "logits" if getattr(model, "num_classes", 0) else "features"
    return export_model(model, task.name, card, out, fmt=fmt, output=output, dynamic_batch=dynamic_batch,
                        tolerance=tolerance, checkpoint=str(checkpoint))


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="one of our checkpoints (holds its config)")
    p.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    p.add_argument("--format", choices=FORMATS, help="onnx or pt2 (default: from the --out suffix)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--logits", dest="output", action="store_const", const="logits",
                       help="one output: logits (the default for a classifier)")
    which.add_argument("--features", dest="output", action="store_const", const="features",
                       help="two outputs: the pooled features and the tokens (the default without a head)")
    p.add_argument("--dynamic-batch", action="store_true", help="leave the batch size open (else 1)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest difference to the eager model allowed when the file is checked (default 1e-4)")
    p.add_argument("--allow-pickle", action="store_true", help="trust a checkpoint that needs pickle")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="key=value",
                   help="override keys of the stored config (e.g. data.npoints=2048)")


def run(args: argparse.Namespace) -> int:
    """``mm3d export``: prints one JSON line (file, format, outputs, largest difference to eager)."""
    result = export_checkpoint(args.checkpoint, args.out, fmt=args.format, output=args.output,
                               dynamic_batch=args.dynamic_batch, tolerance=args.tolerance,
                               allow_pickle=args.allow_pickle, overrides=args.overrides)
    print(json.dumps({"out": str(result.path), "format": result.format, "outputs": result.outputs,
                      "max_abs_diff": result.max_abs_diff,
                      "checked_with": result.card["export"]["checked_with"]}))
    return 0


COMMANDS.add("export", ("Export a checkpoint to ONNX or torch.export (.pt2) with its model card; the file is "
                        "checked against the eager model.", add_arguments, run))
