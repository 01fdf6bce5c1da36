"""Named registries: model variants, tasks, synthetic-data generators, targets and losses.

The core never imports a modality. `mm3d.video` and `mm3d.pointcloud` add their entries when
they are imported; :func:`load_modalities` (called by the CLI and the tests) imports both.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generic, Iterator, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")

MODALITIES = ("mm3d.pointcloud", "mm3d.video")


class Registry(Generic[T]):
    """A name -> entry mapping that refuses duplicates and suggests the closest name on a miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}{suggest(name, self._entries)}; "
                           f"known: {', '.join(sorted(self._entries)) or '(none)'}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())


def suggest(name: str, candidates) -> str:
    """Return `" (did you mean 'x'?)"` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class ModelVariant:
    """A named architecture preset.

    `config` is a dataclass instance of the modality's model-config class holding the preset's
    values; YAML and command-line keys are merged on top of it. `description` is shown by
    `mm3d models`.
    """

    name: str
    modality: str
    config: Any
    description: str = ""


MODELS: Registry[ModelVariant] = Registry("model variant")
TASKS: Registry[Any] = Registry("task")
SYNTH: Registry[Callable[..., Any]] = Registry("synthetic dataset kind")
CONVERTERS: Registry[Callable[..., Any]] = Registry("checkpoint converter")
# extra `mm3d data NAME` subcommands: name -> (help, add_arguments(parser), run(args) -> int)
DATA_COMMANDS: Registry[tuple[str, Callable[..., Any], Callable[..., Any]]] = Registry("data command")
# extra top-level `mm3d NAME` subcommands, same shape (registered by core modules that the CLI imports)
COMMANDS: Registry[tuple[str, Callable[..., Any], Callable[..., Any]]] = Registry("command")


@dataclass(frozen=True)
class PrepareItem:
    """One input of `mm3d data prepare`.

    key: the sample key in the shards (:func:`mm3d.shards.safe_key`: unique, no dots).
    source: the input file (or folder of frames), as the list names it.
    line: where it is listed (``"train.txt:4"``), for the report of failed items.
    info: what else the preparer needs in `convert` (label, class name, ...), plain JSON data.
    """

    key: str
    source: str
    line: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Preparer(Protocol):
    """A modality's converter of raw inputs into shard samples (``PREPARERS[kind]``).

    `mm3d data prepare --kind KIND` calls :meth:`items` and :meth:`settings` in the main process
    and :meth:`convert` on each item in worker processes (so the preparer must pickle);
    ``mm3d data prepare CONFIG`` calls :meth:`from_config` for each split.

    Optional members: ``add_arguments(parser)`` adds the preparer's own options (an option that
    another preparer already added is shared, so same names must mean the same), ``tasks``
    (task names whose configs :meth:`from_config` understands; picks the preparer for a config
    when a modality has several) and ``classes(args_or_cfg) -> list[str] | None``.
    """

    modality: str

    def items(self, args: Any) -> list[PrepareItem]:
        """The inputs named by the command-line options (``args.list``, ``args.root``, ...)."""
        ...

    def settings(self, args: Any) -> dict[str, Any]:
        """What the output depends on besides the inputs (``{"short_side": 320, "gop": 16}``)."""
        ...

    def convert(self, item: PrepareItem, settings: dict[str, Any]) -> dict[str, bytes]:
        """The sample's files, ``ext -> bytes`` (``{"mp4": ..., "json": ...}``); raise on bad input."""
        ...

    def from_config(self, cfg: Any, split: str) -> tuple[list[PrepareItem], dict[str, Any]] | None:
        """Items and settings of `split` of a run config; None when the config has no such split.

        A preparer whose settings also come from command-line options may take them as a third
        parameter, ``from_config(cfg, split, args)``; the driver passes them when it does."""
        ...


# `mm3d data prepare --kind NAME`: the modalities' preparers (see :class:`Preparer`)
PREPARERS: Registry[Preparer] = Registry("preparer")

# masked-modeling targets, "<modality>.<kind>" -> a :class:`mm3d.targets.Target` subclass
TARGETS: Registry[type] = Registry("target")
# the default kind of each modality (``model.target.kind=""``): modality -> kind
TARGET_DEFAULTS: dict[str, str] = {}


@dataclass(frozen=True)
class LossSpec:
    """A per-token loss (``LOSSES[name]``; see :func:`mm3d.losses.token_loss`).

    fn: ``fn(pred, target, *, beta) -> per_token``; `pred` and `target` are ``(*tokens, *content)``
    tensors and `per_token` has the ``tokens`` shape. `token_dims`: how many trailing axes form
    one token's content (1 for a feature vector ``(C,)``, 2 for a point patch ``(K, 3)``).
    `beta` is ``model.target.loss_beta`` (smooth L1's transition point); losses without such a
    parameter ignore it.
    """

    name: str
    fn: Callable[..., Any]
    token_dims: int = 1
    description: str = ""


LOSSES: Registry[LossSpec] = Registry("loss")


def register_variant(name: str, modality: str, config: Any, description: str = "") -> ModelVariant:
    """Register an architecture preset under `name` (e.g. ``pointmae_small``)."""
    return MODELS.add(name, ModelVariant(name, modality, config, description))


def variant_config(name: str) -> Any:
    """A fresh copy of the preset config registered as `name`."""
    return replace(MODELS.get(name).config)


def register_task(task: Any) -> Any:
    """Register a task object (see :class:`mm3d.task.Task`) under `task.name`."""
    TASKS.add(task.name, task)
    return task


def register_synth(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a synthetic-dataset writer `fn(out_dir, *, seed, size, **kw)`."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        SYNTH.add(kind, fn)
        return fn

    return deco


def register_converter(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a checkpoint converter `fn(src, dst, **kw)` for `mm3d convert --from`."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        CONVERTERS.add(name, fn)
        return fn

    return deco


def register_target(modality: str, kind: str, *, default: bool = False) -> Callable[[type], type]:
    """Class decorator: register a :class:`mm3d.targets.Target` subclass as ``"<modality>.<kind>"``.

    `default`: the kind ``model.target.kind=""`` means for this modality (one per modality).
    The class gets ``kind`` and ``modality`` set from the registration.
    """

    def deco(cls: type) -> type:
        if default and TARGET_DEFAULTS.get(modality, kind) != kind:
            raise KeyError(f"modality {modality!r} already has the default target {TARGET_DEFAULTS[modality]!r}")
        TARGETS.add(f"{modality}.{kind}", cls)
        cls.kind, cls.modality = kind, modality
        if default:
            TARGET_DEFAULTS[modality] = kind
        return cls

    return deco


def target_kinds(modality: str) -> list[str]:
    """The registered target kinds of `modality`, sorted (``["ema", "hog", "pixel", ...]``)."""
    return [name.split(".", 1)[1] for name in TARGETS if name.split(".", 1)[0] == modality]


def register_loss(name: str, *, token_dims: int = 1, description: str = ""
                  ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a per-token loss ``fn(pred, target, *, beta) -> per_token`` (see :class:`LossSpec`)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        LOSSES.add(name, LossSpec(name, fn, token_dims, description))
        return fn

    return deco


_loaded: list[str] = []


def load_modalities() -> list[str]:
    """Import every modality package so that its variants, tasks and generators are registered.

    Returns the names of the modalities that are present. A modality that fails to import for
    a reason other than being absent raises, so a broken install is never silently hidden.
    """
    if _loaded:
        return list(_loaded)
    for mod in MODALITIES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # the package itself is absent
            if e.name == mod:
                continue
            raise
        _loaded.append(mod)
    return list(_loaded)
