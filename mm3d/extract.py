"""``mm3d extract``: features of every file of a dataset, from one of our checkpoints.

The driver here knows no modality. It rebuilds the task, config and model stored in the checkpoint,
turns the inputs (``FILES...`` or ``--list LIST [--root R]``) into :class:`ExtractInput` items with
an output name each, and asks the task for a :class:`FeatureExtractor`
(:meth:`mm3d.task.Task.feature_extractor`; by default the one its modality registered in
:data:`EXTRACTORS`: ``mm3d.video.extract`` and ``mm3d.pointcloud.extract``). What a large job needs
is done once, here:

- output names: the input's path under ``--root`` without its extension (``ucf/v_a.avi`` ->
  ``OUT/ucf/v_a.npy``), else its file (or frame-folder) name without the extension; two inputs of
  one name are refused before any work;
- ``torchrun`` shards the inputs over the ranks (input i goes to rank ``i % world_size``);
- an input whose outputs all exist is skipped, so a re-run resumes (``--overwrite`` redoes it);
  every file is written to a temporary name beside it and renamed (:func:`write_atomic`), so a
  killed run leaves no half file, and its temporary files are deleted by the next run. The
  settings that decide the features (checkpoint, ``--set``, window, stride, pool, per-point, fps)
  are kept in ``OUT/extract.json``; a re-run with other settings is refused unless ``--overwrite``;
- an input that cannot be read is logged, listed in ``OUT/failed.txt`` (``path<TAB>reason``) and
  the others go on; the exit status is then 1 (``failed.txt`` is removed by a run with no failure);
- a progress bar with the rate and ETA (tqdm, rank 0);
- ``OUT/index.csv``: the index rows of every input (each input's own ``<name>.csv``), in input order.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from tqdm.auto import tqdm

from mm3d.checkpoint import OutputError, describe_os_error, model_from_checkpoint
from mm3d.distributed import barrier, gather_objects, get_info, init_distributed
from mm3d.errors import UserError
from mm3d.registry import COMMANDS, Registry

log = logging.getLogger(__name__)

#: how tokens become one feature: ``mean`` of the tokens (through the model's own ``fc_norm`` when it
#: has one), ``max+mean`` (the element-wise max plus the mean: the published point-cloud SVM
#: feature), ``cls`` (the class token of a classifier) or ``none`` (the tokens themselves)
Pool = Literal["mean", "max+mean", "cls", "none"]
POOLS: tuple[str, ...] = ("mean", "max+mean", "cls", "none")

INDEX_FILE = "index.csv"
FAILED_FILE = "failed.txt"
SETTINGS_FILE = "extract.json"
ROW_SUFFIX = ".csv"  # each input's own index rows, written last: the input is done when it exists


@dataclass(frozen=True)
class ExtractOptions:
    """What ``mm3d extract`` was asked for, beyond the inputs.

    window, stride: video: frames one feature covers and frames between window starts (None: the
        checkpoint's clip span, ``model.num_frames x data.sampling_rate``, and the window itself).
    pool: see :data:`Pool` (None: the modality's default: ``mean`` for video, ``max+mean`` for points).
    per_point: point clouds: also a feature for every point of the file, a PCA-coloured ``.ply``
        and its picture.
    batch_size: windows (video) or files (point clouds) per forward pass.
    num_workers: processes that read and prepare inputs while the model runs (0: in this process).
    fps: frame rate of frame folders (and of videos whose container states none); their seconds are
        left empty without it.
    """

    window: int | None = None
    stride: int | None = None
    pool: Pool | None = None
    per_point: bool = False
    batch_size: int = 8
    num_workers: int = 0
    fps: float | None = None

    def validate(self) -> None:
        for name in ("window", "stride"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"--{name} must be >= 1 frame, got {v}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.fps is not None and not self.fps > 0:
            raise UserError(f"--fps must be positive, got {self.fps}")
        if self.pool is not None and self.pool not in POOLS:
            raise UserError(f"--pool must be one of {', '.join(POOLS)}, got {self.pool!r}")


@dataclass(frozen=True)
class ExtractInput:
    """One input: `path` (a file or a frame folder, as given or joined to ``--root``) and `name`, its
    output name relative to the output folder, without a suffix (``"ucf/v_a"``)."""

    path: str
    name: str


#: writes one output file at the path it is given (a temporary name that ends like the final one)
Writer = Callable[[Path], Any]


@dataclass
class ExtractResult:
    """What one input gave.

    files: output suffix (``".npy"``, ``"_points.npy"``, ...) -> the :data:`Writer` of that file;
        the keys are the extractor's :attr:`FeatureExtractor.suffixes`.
    rows: the input's rows of ``index.csv`` (column -> value; every row of a job has the same columns).
    error: why the input could not be read (then `files` and `rows` are empty).
    """

    input: ExtractInput
    files: dict[str, Writer] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class FeatureExtractor(abc.ABC):
    """A modality's side of ``mm3d extract``, built once per job by ``Task.feature_extractor`` from the
    model, its config, the :class:`ExtractOptions` and the device (bad options raise UserError there)."""

    #: the files written for each input besides its ``<name>.csv`` index rows, as name suffixes
    suffixes: tuple[str, ...] = (".npy",)

    @abc.abstractmethod
    def run(self, inputs: Sequence[ExtractInput]) -> Iterator[ExtractResult]:
        """One result per input, in any order; an input that cannot be read gives a result with
        `error` set (other exceptions are bugs and end the job)."""


#: modality -> ``fn(model, cfg, options, device) -> FeatureExtractor``, the default of its tasks
EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry("feature extractor")


def register_extractor(modality: str) -> Callable[[Callable[..., FeatureExtractor]], Callable[..., FeatureExtractor]]:
    """Decorator: the default :class:`FeatureExtractor` factory of `modality`'s tasks."""

    def deco(fn: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        EXTRACTORS.add(modality, fn)
        return fn

    return deco


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def temporary_path(path: Path) -> Path:
    """``.STEM.tmp-PID.SUFFIX`` beside `path` (ending like `path`, so writers that go by the
    extension, such as ``np.save`` or PIL, write the right format)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp-" in path.name


def write_atomic(path: Path, write: Writer) -> Path:
    """Run ``write(tmp)`` on a temporary name beside `path`, flush it to the disk and rename it over
    `path`: `path` is either absent (or the old file) or complete, never half written. The
    temporary file is removed when `write` fails; an OSError becomes :class:`OutputError` naming `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(describe_os_error(e, path)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def save_npy(array: np.ndarray) -> Writer:
    """A :data:`Writer` of `array` as ``.npy``."""
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, array)
    return write


def write_rows_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of one column set as CSV with a header (an empty file for no rows)."""
    with open(path, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _read_rows_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    return (lines[0], lines[1:]) if lines else ([], [])


def output_paths(out: Path, item: ExtractInput, suffixes: Sequence[str]) -> list[Path]:
    """Every file `item` gets: one per suffix, then its index rows (written last)."""
    return [out / f"{item.name}{s}" for s in (*suffixes, ROW_SUFFIX)]


def remove_temporary_files(out: Path) -> int:
    """Delete what killed runs left behind (:func:`temporary_path` names); returns how many."""
    count = 0
    for p in out.rglob(".*.tmp-*"):
        if p.is_file() and _is_temporary(p):
            with contextlib.suppress(OSError):
                p.unlink()
                count += 1
    return count


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def read_input_list(path: str | Path, root: str | None = None) -> list[str]:
    """The inputs of a list file: one a line; blank and ``#`` lines skipped. A line that names an
    existing path (under `root` when relative and `root` is given) is that path; otherwise its first
    field (space, tab or comma separated), so annotation lists (``path label``, ``dir frames label``)
    work as they are."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--list {path}: file does not exist")
    out = []
    for line in p.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not _resolve(text, root).exists():
            text = text.replace(",", " ").split()[0]
        out.append(text)
    return out


def _resolve(entry: str, root: str | None) -> Path:
    p = Path(entry)
    return p if p.is_absolute() or not root else Path(root) / p


def _output_name(path: Path, root: str | None) -> str:
    """`path` under `root` (when it lies there), else its name; a file loses its extension."""
    rel = Path(path.name)
    if root:
        with contextlib.suppress(ValueError):
            rel = path.resolve().relative_to(Path(root).resolve())
    if not path.is_dir() and rel.suffix:
        rel = rel.with_suffix("")
    return rel.as_posix()


def resolve_inputs(files: Sequence[str], list_file: str | None, root: str | None) -> list[ExtractInput]:
    """The inputs of ``FILES...`` and ``--list`` (relative paths joined to `root`), each with its
    output name; refuses none at all and two inputs of one name. A missing input is not refused
    here: it fails like an unreadable one and is listed in ``failed.txt``."""
    entries = list(files) + (read_input_list(list_file, root) if list_file else [])
    if not entries:
        raise UserError("no inputs: give files or --list LIST")
    if root and not Path(root).is_dir():
        raise UserError(f"--root {root}: folder does not exist")
    items, seen = [], {}
    for entry in entries:
        path = _resolve(entry, root)
        name = _output_name(path, root)
        if name in seen:
            if seen[name] == str(path):
                continue  # the same input twice
            raise UserError(f"{seen[name]} and {path} would both write {name}.*: give --root DIR so that "
                            f"outputs keep the folders under DIR, or extract them into separate --out folders")
        seen[name] = str(path)
        items.append(ExtractInput(str(path), name))
    return items


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


@dataclass
class ExtractSummary:
    """What a job did, over all ranks: inputs, done now, skipped (done before), failed (``(path, reason)``)."""

    inputs: int
    done: int
    skipped: int
    failed: list[tuple[str, str]]


def check_settings(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to add to `out` features made with other `settings` (those in ``extract.json``) unless
    `overwrite`; raises UserError naming each changed setting."""
    path = out / SETTINGS_FILE
    if overwrite or not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # unreadable: written again after the run starts
    changed = [f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(before) | set(settings))
               if before.get(k) != settings.get(k)]
    if changed:
        raise UserError(f"{out} holds features made with other settings ({'; '.join(changed)}): give another "
                        f"--out, or --overwrite to redo every input")


def extract(extractor: FeatureExtractor, inputs: Sequence[ExtractInput], out: Path, *,
            overwrite: bool = False, progress: bool = True, settings: dict[str, Any] | None = None) -> ExtractSummary:
    """Run `extractor` over this rank's share of `inputs` into `out` (see the module docstring);
    rank 0 then writes ``index.csv`` and ``failed.txt``. `settings`: what decides the features (JSON
    values), kept in ``extract.json`` and checked by :func:`check_settings`. Every rank must call it."""
    info = get_info()
    out.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        check_settings(out, settings, overwrite)
    barrier()
    if info.is_main:
        removed = remove_temporary_files(out)
        if removed:
            log.info("removed %d temporary files of an interrupted run from %s", removed, out)
        if settings is not None:
            write_atomic(out / SETTINGS_FILE, lambda tmp: tmp.write_text(json.dumps(settings, indent=1) + "\n"))
    barrier()
    mine = list(inputs[info.rank::info.world_size])
    todo = [it for it in mine if overwrite or not all(p.is_file() for p in output_paths(out, it, extractor.suffixes))]
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("%d of %d inputs are done already (--overwrite redoes them)", skipped, len(mine))
    failed: list[tuple[str, str]] = []
    done = 0
    bar = tqdm(total=len(mine), initial=skipped, unit="file", desc="extract", dynamic_ncols=True,
               disable=not (progress and info.is_main), mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        for result in extractor.run(todo):
            if result.error is not None:
                path, msg = result.input.path, result.error
                log.error("%s", msg if path in msg else f"{path}: {msg}")
                failed.append((result.input.path, result.error))
            else:
                paths = output_paths(out, result.input, extractor.suffixes)
                missing = set(extractor.suffixes) - set(result.files)
                if missing:
                    raise AssertionError(f"the extractor wrote no {sorted(missing)} for {result.input.path}")
                paths[-1].unlink(missing_ok=True)  # an input being redone is not done until its rows are written
                for suffix, p in zip(extractor.suffixes, paths):
                    write_atomic(p, result.files[suffix])
                write_atomic(paths[-1], lambda tmp, rows=result.rows: write_rows_csv(tmp, rows))
                done += 1
            bar.update(1)
    finally:
        bar.close()
    parts = gather_objects((done, skipped, failed))
    done, skipped = sum(p[0] for p in parts), sum(p[1] for p in parts)
    order = {item.path: i for i, item in enumerate(inputs)}
    failed = sorted((f for p in parts for f in p[2]), key=lambda f: order.get(f[0], -1))  # input order
    barrier()
    if info.is_main:
        _write_index(out, inputs, extractor.suffixes)
        failed_path = out / FAILED_FILE
        if failed:
            write_atomic(failed_path, lambda tmp: tmp.write_text("".join(
                f"{p}\t{' '.join(r.split())}\n" for p, r in failed)))
            log.error("%d of %d inputs failed; they are listed in %s", len(failed), len(inputs), failed_path)
        elif failed_path.exists():
            failed_path.unlink()
    return ExtractSummary(len(inputs), done, skipped, failed)


def _write_index(out: Path, inputs: Sequence[ExtractInput], suffixes: Sequence[str]) -> Path:
    """``index.csv``: the rows of every input that has all its files, in input order."""
    header: list[str] = []
    rows: list[list[str]] = []
    for item in inputs:
        paths = output_paths(out, item, suffixes)
        if not all(p.is_file() for p in paths):
            continue
        cols, body = _read_rows_csv(paths[-1])
        if body and not header:
            header = cols
        if body and cols != header:
            log.warning("%s has the columns %s, %s has %s: left out of %s (re-run with --overwrite)",
                        paths[-1], cols, INDEX_FILE, header, INDEX_FILE)
            continue
        rows += body

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            if header:
                w.writerow(header)
            w.writerows(rows)

    return write_atomic(out / INDEX_FILE, write)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="FILE", help="videos, frame folders or point-cloud files")
    p.add_argument("--checkpoint", required=True, help="one of our checkpoints (holds its config)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--list", dest="list_file", metavar="LIST",
                   help="inputs, one a line (extra columns of annotation lists are ignored)")
    p.add_argument("--root", help="folder of relative inputs; outputs keep the folders under it")
    p.add_argument("--window", type=int, help="video: frames per feature (default: the checkpoint's "
                   "model.num_frames x data.sampling_rate)")
    p.add_argument("--stride", type=int, help="video: frames between window starts (default: --window)")
    p.add_argument("--fps", type=float, help="video: frame rate of frame folders (videos use their own)")
    p.add_argument("--pool", choices=POOLS, help="mean (video default), max+mean (point-cloud default), "
                   "cls (class token of a classifier) or none (keep the tokens)")
    p.add_argument("--per-point", action="store_true",
                   help="point clouds: a feature for every point, a PCA-coloured .ply and its PNG render")
    p.add_argument("--batch-size", type=int, default=8, help="windows or files per forward pass")
    p.add_argument("--num-workers", type=int, default=0, help="processes reading inputs ahead of the model")
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs exist")
    p.add_argument("--device", default="auto")
    p.add_argument("--allow-pickle", action="store_true", help="trust a checkpoint that needs pickle")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="key=value",
                   help="override keys of the stored config (e.g. data.bin_columns=6)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``mm3d extract``; exit status 1 when an input failed."""
    options = ExtractOptions(window=args.window, stride=args.stride, pool=args.pool, per_point=args.per_point,
                             batch_size=args.batch_size, num_workers=args.num_workers, fps=args.fps)
    options.validate()
    inputs = resolve_inputs(args.inputs, args.list_file, args.root)
    info, device = init_distributed(args.device)
    task, cfg, model = model_from_checkpoint(args.checkpoint, args.allow_pickle, args.overrides)
    extractor = task.feature_extractor(model.to(device), cfg, options, device)
    settings = {"checkpoint": str(Path(args.checkpoint).resolve()), "set": list(args.overrides),
                "window": options.window, "stride": options.stride, "pool": options.pool,
                "per_point": options.per_point, "fps": options.fps}
    summary = extract(extractor, inputs, Path(args.out), overwrite=args.overwrite, progress=args.progress,
                      settings=settings)
    if info.is_main:
        print(json.dumps({"out": args.out, "inputs": summary.inputs, "done": summary.done,
                          "skipped": summary.skipped, "failed": len(summary.failed)}))
    return 1 if summary.failed else 0


COMMANDS.add("extract", ("Features of files (videos, frame folders, point clouds) from a checkpoint: one .npy "
                         "per input, an index.csv, failed.txt; resumable, sharded under torchrun.",
                         add_arguments, run))
