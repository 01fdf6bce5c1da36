"""Typed run configuration: dataclass defaults <- YAML file <- command-line ``key.sub=value``.

Every run is described by one dataclass tree rooted at a task's config class (a subclass of
:class:`RunConfig`). Loading validates every key and type before any work starts; an unknown key
names the closest valid key, and a YAML error names the file and line.

A ``model.variant`` key (or any nested ``variant`` key whose dataclass has that field) starts
that section from the registered preset instead of the dataclass defaults, so the full merge
order for a model is: dataclass defaults <- variant preset <- YAML <- command line.

A YAML file may build on another with a top-level ``base: other.yaml`` key (a path relative to
the file that names it; bases may chain). The file's keys merge over its base's, mappings
key by key, so a benchmark config can state only what differs from a shared recipe. Errors
name the file and line where the offending key was written, base or not.

``protocol: paper`` sets, over the file, the keys the task config's ``paper_protocol()`` returns
(the official scripts' selection and statistics); the command line may repeat those keys but not
contradict them (see :func:`config_from_dict`).

A section dataclass that renamed a key lists it in a ``renamed_keys`` class attribute (old name ->
new name): the old name is read as the new one, so configs stored in earlier checkpoints still
load.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from mm3d.errors import UserError
from mm3d.registry import MODELS, TASKS, suggest


class ConfigError(UserError, ValueError):
    """A config key or value is invalid; the message names the key and where it came from."""


# --------------------------------------------------------------------------------------------
# Shared sections (modalities add `model` and `data` sections in their task config classes)
# --------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """Optimizer and LR schedule. Schedules are computed from the global optimizer step."""

    name: str = "adamw"  # any timm optimizer name (create_optimizer_v2)
    lr: float | None = None  # absolute peak LR; if None, blr * total_batch / 256
    blr: float = 1.5e-4  # base LR, scaled by the total batch (per-process batch x accum x world)
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine weight-decay schedule end value (None: constant)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # for SGD-like optimizers
    eps: float = 1e-8
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    schedule: Literal["cosine", "constant"] = "cosine"
    # "step": the warm-up + cosine is computed at every optimizer step (after warm-up the cosine runs
    # from the end of warm-up to the last step). "epoch": Point-MAE's schedule, timm's
    # CosineLRScheduler(t_in_epochs=True) stepped after each epoch: one rate per epoch, the cosine over
    # all train.epochs including the warm-up, and epoch e trains at the rate of e - 1 (the first two at
    # warmup_lr). Its warm-up must be given in epochs.
    schedule_unit: Literal["step", "epoch"] = "step"
    layer_decay: float | None = None  # layer-wise LR decay (models expose timm's group_matcher)
    clip_grad: float | None = None  # max global grad norm
    # Point-MAE's part-segmentation script steps the optimizer twice per batch: once with the raw
    # gradient, then (after clipping it) once more. Off except under that script's paper protocol.
    double_step: bool = False
    # torch's fused AdamW/Adam/SGD step (one vectorised kernel over all parameters): null = on for CPU
    # and CUDA parameters except under FSDP; true/false forces it
    fused: bool | None = None

    def validate(self) -> None:
        for name in ("lr", "blr", "min_lr", "warmup_lr"):
            _check_rate(name, getattr(self, name), zero_ok=name in ("min_lr", "warmup_lr"))
        for name in ("weight_decay", "weight_decay_end", "momentum", "warmup_epochs", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite number >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)} must both lie in [0, 1)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps={self.eps} must be a finite number > 0")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay={self.layer_decay} must lie in (0, 1] (or null for none)")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad) and self.clip_grad > 0):
            raise ValueError(f"clip_grad={self.clip_grad} must be a finite number > 0 (or null for no clipping)")
        if self.schedule_unit == "epoch" and self.warmup_steps is not None:
            raise ValueError("warmup_steps is set, but schedule_unit=epoch sets the rate once per epoch: give "
                             "warmup_epochs instead")


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
MAX_LEARNING_RATE = 100.0  # far above any rate that trains (peak rates are ~1e-5 to ~10 with LARS-size batches)


def _check_rate(name: str, value: float | None, *, zero_ok: bool) -> None:
    """A learning rate must be a number the optimizer can compute with, and a sensible one."""
    if value is None:
        return
    if math.isnan(value):
        raise ValueError(f"{name}={value} is not a number")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name}={value:g} does not fit in float32 (largest {FLOAT32_MAX:.3g}): the optimizer "
                         f"would compute with inf and every weight would become NaN")
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name}={value:g} must be " + ("> 0" if not zero_ok else ">= 0"))
    if value > MAX_LEARNING_RATE:
        raise ValueError(f"{name}={value:g} is too large to be meaningful: above {MAX_LEARNING_RATE:g} every "
                         f"update overshoots and the loss diverges (typical peak rates are 1e-5 to 1e-1)")


@dataclass
class TrainConfig:
    """How the trainer runs: lengths, batch, precision, logging, checkpoints."""

    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs for length)
    batch_size: int = 32  # per process
    accum_steps: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    num_workers: int = 0
    pin_memory: bool = True
    drop_last: bool = True
    log_every: int = 10  # optimizer steps between log lines / metric records
    eval_every: int = 1  # epochs between evaluations on the validation split (0: never)
    save_every: int = 1  # epochs between checkpoints (0: only at the end)
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0: off)
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str = "loss"  # key of the validation metrics used to rank checkpoints
    best_mode: Literal["min", "max"] = "min"
    # which split picks the reported checkpoint: "val" (honest default; falls back to "last" when
    # the task has no val split), "test" (labelled "custom" unless protocol=paper sets it), "last"
    select_on: Literal["val", "test", "last"] = "val"
    resume: str = ""  # "" (fresh) | "auto" (latest in the run dir, if any) | a checkpoint path
    resume_force: bool = False  # resume although the config changed what the run computes (logged)
    ema: bool = False
    ema_decay: float = 0.9999
    grad_checkpointing: bool = False
    compile: bool = False
    # torch.compile's mode: "default", "reduce-overhead" (CUDA graphs: for launch-bound steps such as
    # Point-MAE's on a GPU), "max-autotune", "max-autotune-no-cudagraphs"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    tensorboard: bool = True
    find_unused_parameters: bool = False
    # several processes: "ddp" replicates the model; "fsdp" shards parameters, gradients and optimizer
    # state over the processes (FSDP2, one unit per transformer block; see mm3d.fsdp). One process: unused
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fsdp: free each block's gathered parameters after its forward (least memory; false: keep them
    # to the backward, one all-gather less per block)
    fsdp_reshard_after_forward: bool = True

    # keys that do not change what a run computes: they may differ when it is resumed
    run_neutral_keys: ClassVar[tuple[str, ...]] = (
        "epochs", "max_steps", "device", "num_workers", "pin_memory", "log_every", "eval_every", "save_every",
        "save_every_steps", "keep_last", "keep_best", "resume", "resume_force", "grad_checkpointing", "compile",
        "compile_mode",
        "progress", "tensorboard", "find_unused_parameters", "strategy", "fsdp_reshard_after_forward")

    def validate(self) -> None:
        positive = ("batch_size", "accum_steps", "log_every", "keep_last")
        non_negative = ("epochs", "num_workers", "eval_every", "save_every", "save_every_steps", "keep_best")
        for name in positive + non_negative:
            value = getattr(self, name)
            if value < (1 if name in positive else 0):
                raise ValueError(f"{name}={value} must be {'>= 1' if name in positive else '>= 0'}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1 (or null: train.epochs sets the length)")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must lie in [0, 1]")
        if self.strategy == "fsdp" and self.ema:
            raise ValueError("strategy=fsdp with ema=true: the EMA copy would be a second, unsharded model on every "
                             "rank; use strategy=ddp for EMA runs")
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError("strategy=fsdp with precision=fp16: the loss scaler's skipped steps would have to "
                             "agree across shards; use precision=bf16 (or fp32)")


@dataclass
class BenchConfig:
    """`mm3d bench` settings."""

    warmup: int = 3
    steps: int = 10
    data_loader: bool = False  # also time the training data loader
    loader_batches: int = 10
    # time a peer implementation in the same run, alternating steps: true = the modality's default
    # (video: Hugging Face transformers; points: the official code at peer_root), "hf", "official"
    peer: bool | Literal["hf", "official"] = True
    # a checkout of the official code to time as the peer (Point-MAE: github.com/Pang-Yatian/Point-MAE;
    # VideoMAE: github.com/MCG-NJU/VideoMAE); nothing of it is stored here. "" : the default peer, if any
    peer_root: str = ""
    profile: int = 0  # > 0: profile this many steps (ours and the peer's): the operators with the most self time
    extra: bool = True  # the task's extra timings (video: decoding per worker; points: FPS, KNN, Chamfer)


@dataclass
class EvalConfig:
    """How evaluation treats what it could not score, and the statistics it reports."""

    # report a test metric although some test samples could not be read (they are counted and named
    # beside the metric); false refuses to report it
    allow_missing: bool = False
    # voting tasks: repeat the final voting test this many times with fresh draws and report the mean,
    # std and max of the vote metrics (ModelNet's published number is the max of 300 runs of 10 votes)
    vote_runs: int = 1
    # metrics of the selection split to also report as their maximum over the per-epoch evaluations
    # (`<metric>_epoch_max`), each maximised on its own, as Point-MAE's segmentation script does
    report_max: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.vote_runs < 1:
            raise ValueError(f"vote_runs={self.vote_runs} must be >= 1")


@dataclass
class PublishedConfig:
    """The number a benchmark config targets, as published (shown beside ours in every report).

    Facts only: ``value`` of ``metric`` (a ``split/metric`` key of results.json, e.g.
    ``test/top1``) under ``protocol=paper``, where it was published (``source``), and for a
    fine-tuning recipe the pretraining config it pairs with (``pretrain``: its path under
    ``configs/``, e.g. ``video/videomae_pretrain_k400_vitb.yaml``) and how many epochs that
    pretraining ran (``pretrain_epochs``).
    """

    value: float | None = None  # in percent, as published
    metric: str = ""
    source: str = ""
    pretrain: str = ""
    pretrain_epochs: int | None = None

    def validate(self) -> None:
        if self.value is not None and not self.metric:
            raise ValueError("metric is empty: say which split/metric the published value is (e.g. test/top1)")


@dataclass
class RunConfig:
    """Fields every task shares. Tasks subclass this and add `model` and `data` sections."""

    task: str = ""
    name: str = "run"
    output_dir: str = ""  # default: runs/<name>
    seed: int = 0
    seeds: list[int] = field(default_factory=list)  # run once per seed and report mean ± std
    deterministic: bool = False
    checkpoint: str = ""  # `mm3d evaluate`: the checkpoint to score
    init: str = ""  # weights to start from (a pretraining checkpoint, converted official weights)
    allow_pickle: bool = False  # load foreign checkpoints that need pickle (trusted files only)
    overwrite: bool = False  # clear a run folder that holds an earlier run (else that is an error)
    # "honest" (default: selection on a held-out split, the statistics we recommend) or "paper" (the
    # official scripts' procedure, applied by the task's `paper_protocol()`, labelled in every output)
    protocol: Literal["honest", "paper"] = "honest"
    published: PublishedConfig = field(default_factory=PublishedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # True for a task that runs no optimizer step (the SVM probe): only it may keep train.epochs at 0
    trains_nothing: ClassVar[bool] = False
    # keys (and whole sections) that do not change what a run computes: they may differ on resume
    run_neutral_keys: ClassVar[tuple[str, ...]] = ("name", "output_dir", "overwrite", "checkpoint", "allow_pickle",
                                                   "seeds", "bench", "eval", "published")
    # the official scripts `protocol=paper` follows (for the labels), set by each task config class
    paper_reference: ClassVar[str] = ""

    def paper_protocol(self) -> dict[str, Any]:
        """The keys ``protocol=paper`` sets, as a nested mapping (``{"train": {"select_on": "test"}}``),
        decided from this config (its dataset, its variant). The default: nothing differs."""
        return {}

    def validate(self) -> None:
        """Checks across sections; task configs that add their own call this first."""
        if self.train.epochs == 0 and not self.trains_nothing:
            raise ValueError(f"train.epochs=0 trains nothing: task {self.task!r} needs at least 1 epoch "
                             f"(train.max_steps=N stops earlier)")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _yaml_lines(text: str) -> dict[str, int]:
    """Map dotted key paths of a YAML mapping to their 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping; errors name the file (and line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data, _yaml_lines(text)


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a config YAML with its ``base:`` chain merged in.

    Returns the merged mapping (without ``base``) and, for every dotted key, where it was
    written (``file:line``) — the file that set it last wins, as in the merge.
    """
    chain: list[Path] = []
    path = Path(path)
    while True:
        if path.resolve() in [p.resolve() for p in chain]:
            cycle = " -> ".join(str(p) for p in [*chain, path])
            raise ConfigError(f"{chain[-1]}: 'base' chain loops: {cycle}")
        data, lines = read_yaml(path)
        chain.append(path)
        base = data.get("base")
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}:{lines.get('base', '?')}: 'base' must be a path to another YAML "
                              f"config (relative to this file), got {base!r}")
        nxt = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not nxt.is_file():
            raise ConfigError(f"{path}:{lines.get('base', '?')}: base config not found: {nxt}")
        path = nxt
    merged: dict[str, Any] = {}
    where: dict[str, str] = {}
    for p in reversed(chain):  # the furthest base first, the named file last
        data, lines = read_yaml(p)
        data.pop("base", None)
        merged = deep_merge(merged, data)
        where.update({k: f"{p}:{n}" for k, n in lines.items() if k != "base"})
    return merged, where


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[0,1]"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"command-line override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `top` over `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _lookup(tree: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of dotted `key` in a nested mapping."""
    node: Any = tree
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return False, None
        node = node[p]
    return True, node


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _Source:
    """Where a key came from, for error messages."""

    def __init__(self, file: str | None, lines: dict[str, int] | dict[str, str], cli: dict[str, Any],
                 preset: dict[str, Any] | None = None):
        self.file, self.lines, self.cli = file, lines, cli  # lines: key -> line, or "file:line"
        self.preset = preset or {}  # the keys protocol=paper set

    def where(self, key: str) -> str:
        if _lookup(self.cli, key)[0]:
            return "command line"
        if _lookup(self.preset, key)[0]:
            return "protocol=paper"
        if self.file:
            line = self.lines.get(key)
            if isinstance(line, str):
                return line
            return f"{self.file}:{line}" if line else self.file
        return "defaults"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, src: _Source) -> Any:
    """Check `value` against type hint `tp` and convert it (lists to tuples, ints to floats)."""

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{src.where(key)}: key '{key}' expects {expected}, got {value!r} "
                          f"({type(value).__name__})")

    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail(_type_name(tp))
        options = [a for a in args if a is not type(None)]
        reasons = []
        for a in options:
            try:
                return _coerce(value, a, key, src)
            except ConfigError as e:
                if len(options) == 1:  # `X | None`: X's own message says it best
                    raise
                reasons.append(str(e).split(": ", 1)[-1])
        raise ConfigError(f"{src.where(key)}: key '{key}' expects "
                          f"{' or '.join(_type_name(a) for a in options)}, got {value!r} "
                          f"({type(value).__name__}): " + "; ".join(reasons))
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            for word in (("off", "false", "no") if not value else ("on", "true", "yes")):
                if word in get_args(tp):
                    return word
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        fail("one of " + ", ".join(repr(a) for a in get_args(tp)))
    if is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"a mapping for section {tp.__name__}")
        return _build(tp, value, key + ".", src)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(f"a list ({_type_name(tp)})")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                fail(f"a list of {len(args)} items")
            return tuple(_coerce(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{key}[{i}]", src) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", src) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail("a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    fail(_type_name(tp))


def _renamed(cls: type, data: dict[str, Any], prefix: str, src: _Source) -> dict[str, Any]:
    """`data` with the old names of `cls`'s ``renamed_keys`` (old -> new) replaced by the new ones."""
    renamed: dict[str, str] = getattr(cls, "renamed_keys", None) or {}
    if not any(k in renamed for k in data):
        return data
    out = {}
    for k, v in data.items():
        new = renamed.get(k, k)
        if new != k and new in data:
            raise ConfigError(f"{src.where(prefix + k)}: '{prefix}{k}' is the old name of '{prefix}{new}', "
                              f"which is also given; keep only '{prefix}{new}'")
        out[new] = v
    return out


def _build(cls: type, data: dict[str, Any], prefix: str, src: _Source, base: Any = None) -> Any:
    """Build dataclass `cls` from `data` over `base` (default: the class defaults, or a variant)."""
    data = _renamed(cls, data, prefix, src)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    for k in data:
        if k not in names:
            raise ConfigError(f"{src.where(prefix + k)}: unknown key '{prefix}{k}'"
                              f"{suggest(k, names)}; valid keys of '{prefix.rstrip('.') or 'top level'}': "
                              f"{', '.join(names)}")
    base = base if base is not None else cls()
    if "variant" in names and data.get("variant"):
        vname = data["variant"]
        if vname not in MODELS:
            raise ConfigError(f"{src.where(prefix + 'variant')}: unknown model variant {vname!r}"
                              f"{suggest(str(vname), list(MODELS))}; `mm3d models` lists them")
        preset = MODELS.get(vname).config
        if not isinstance(preset, cls):
            raise ConfigError(f"{src.where(prefix + 'variant')}: variant {vname!r} is a "
                              f"{type(preset).__name__}, but '{prefix.rstrip('.')}' needs a {cls.__name__}")
        base = dataclasses.replace(preset)
    kwargs = {}
    for name in names:
        if name in data:
            current = getattr(base, name)
            if is_dataclass(current) and isinstance(data[name], dict) and "variant" not in data[name]:
                # merge over the parent's default for this section (a task may preset it with
                # field(default_factory=...)), not over the section class's bare defaults
                kwargs[name] = _build(type(current), data[name], f"{prefix}{name}.", src, current)
            else:
                kwargs[name] = _coerce(data[name], hints[name], prefix + name, src)
        else:
            kwargs[name] = getattr(base, name)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ConfigError(_validation_message(str(e), prefix, names, src)) from None
    return obj


def _validation_message(msg: str, prefix: str, names: list[str], src: _Source) -> str:
    """A ``validate()`` message that starts with a key of its section (``batch_size=0 must ...``,
    ``data.num_frames=8 differs ...``) gets the full key and where it was set; others name the section."""
    head = re.match(r"[A-Za-z_][\w.]*", msg)
    if head and head.group(0).split(".")[0] in names:
        where = src.where(prefix + head.group(0))
        return f"{where}: {prefix}{msg}" if where != "defaults" else f"{prefix}{msg}"
    return f"section '{prefix.rstrip('.') or 'top level'}': {msg}"


def config_from_dict(cls: type, data: dict[str, Any], file: str | None = None,
                     lines: dict[str, int] | None = None, cli: dict[str, Any] | None = None) -> Any:
    """Build and validate config class `cls` from a (merged) mapping.

    With ``protocol: paper`` the keys of the config's :meth:`RunConfig.paper_protocol` are set over
    the file's (the file holds the honest recipe). The command line may repeat them, but a
    command-line value that contradicts one is an error: a run is either the paper's procedure or
    labelled as ours, never a silent mix of both.
    """
    cli = cli or {}
    cfg = _build(cls, data, "", _Source(file, lines or {}, cli))
    if getattr(cfg, "protocol", None) != "paper":
        return cfg
    preset = cfg.paper_protocol()
    if not preset:
        return cfg
    conflicts = []
    for key, value in flatten_keys(preset).items():
        found, given = _lookup(cli, key)
        if found and given != value:
            conflicts.append(f"{key}={given!r} (the paper protocol sets {value!r})")
    if conflicts:
        raise ConfigError(f"command line: protocol=paper fixes keys the command line also sets: "
                          f"{'; '.join(conflicts)}. Drop those overrides to run the paper's procedure, or drop "
                          f"protocol=paper to run your own (labelled as such)")
    return _build(cls, deep_merge(data, preset), "", _Source(file, lines or {}, cli, preset))


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                task: str | None = None) -> RunConfig:
    """Load a run config: the task's dataclass defaults <- YAML `path` <- `overrides`.

    The task comes from `task`, else an override ``task=...``, else the YAML's ``task`` key.
    """
    data, lines = read_config_file(path) if path else ({}, {})
    cli = parse_overrides(list(overrides))
    merged = deep_merge(data, cli)
    name = task or merged.get("task")
    if not name:
        raise ConfigError(f"{path or 'command line'}: no 'task' key; known tasks: {', '.join(TASKS)}")
    if name not in TASKS:
        raise ConfigError(f"{_Source(str(path) if path else None, lines, cli).where('task')}: "
                          f"unknown task {name!r}{suggest(str(name), list(TASKS))}; known: {', '.join(TASKS)}")
    merged["task"] = name
    return config_from_dict(TASKS.get(name).config_class, merged, str(path) if path else None, lines, cli)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data copy of a config (tuples become lists), safe for YAML, JSON and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
