"""``mm3d data prepare``: convert raw inputs into prepared shards, in parallel, restartable.

Two forms::

    mm3d data prepare --kind KIND --list LIST [--root ROOT] --out DIR [--shard-size 1GiB] [--workers N]
    mm3d data prepare CONFIG [key=value ...] --out DIR        # every split the config names

The first writes one split into DIR; the second writes ``DIR/<split>/`` for every split the
config's preparer knows, plus ``DIR/dataset.json`` (``{"splits": {"train": "train", ...}}``),
so ``data.shards=DIR`` names them all.

A split folder holds the shards (:mod:`mm3d.shards`), ``manifest.json`` (wids format, our
description under ``"mm3d"``), ``prepare_report.json`` (every input that failed: file, line,
reason) and ``prepare_state.json`` (what a restart needs). The preparer's ``convert`` runs over a
process pool in item order (``imap``), so the shards are byte-identical for any ``--workers``.
A restart verifies the finished shards (size and sha256), skips the items they cover, discards
an unfinished ``.tmp`` shard and continues; a changed item list or settings is an error that
says what changed (``--overwrite`` starts over).
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import hashlib
import inspect
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mm3d.config import load_config
from mm3d.errors import UserError
from mm3d.registry import DATA_COMMANDS, PREPARERS, TASKS, PrepareItem, Preparer
from mm3d.shards import DATASET_INDEX, MANIFEST, ShardWriter, file_sha256, write_manifest

log = logging.getLogger(__name__)

STATE = "prepare_state.json"
REPORT = "prepare_report.json"
STATE_VERSION = 1
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class PrepareError(UserError):
    """A prepare run that cannot go on (bad options, a changed item list on restart, nothing written)."""


def parse_size(text: str | int) -> int:
    """Bytes from ``"1GiB"``, ``"512MiB"``, ``"200MB"``, ``"1.5G"`` or a plain number of bytes.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB (and bare K/M/G/T) powers of 1024."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PrepareError(f"--shard-size {text!r}: expected a size such as 1GiB, 512MiB, 200MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _item_digest(items: Sequence[PrepareItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(asdict(it), sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class SplitJob:
    """One split to prepare into `out`."""

    kind: str
    preparer: Preparer
    items: list[PrepareItem]
    settings: dict[str, Any]
    out: Path
    split: str = "train"
    source: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None


def _convert(preparer: Preparer, settings: dict[str, Any], item: PrepareItem) -> tuple[bool, Any]:
    """Worker: ``(True, files)`` or ``(False, reason)``; a failure is the item's, never the run's."""
    try:
        files = preparer.convert(item, settings)
        if not isinstance(files, dict) or not files:
            return False, f"the preparer returned {type(files).__name__}, not a dict of files"
        return True, files
    except Exception as e:  # noqa: BLE001 - every failed item is listed in the report
        text = str(e).strip() or type(e).__name__
        if not isinstance(e, (ValueError, OSError, UserError, RuntimeError)):
            text = f"{type(e).__name__}: {text}"
        for prefix in (f"{item.source}: ", f"{item.source}, "):
            text = text[len(prefix):] if text.startswith(prefix) else text
        return False, text


def _ordered_map(executor: ProcessPoolExecutor, fn: Any, items: Sequence[PrepareItem], window: int):
    """`fn` over `items` in the executor, results in item order, at most `window` items in flight.

    A worker process that dies (a decoder crashing in native code) raises ``BrokenProcessPool`` here,
    where ``multiprocessing.Pool`` would wait for the lost item forever."""
    it = iter(items)
    pending = collections.deque(executor.submit(fn, x) for x in itertools.islice(it, window))
    while pending:
        result = pending.popleft().result()
        pending.extend(executor.submit(fn, x) for x in itertools.islice(it, 1))
        yield result


def _shard_files(out: Path, prefix: str) -> list[Path]:
    return sorted(p for p in out.glob(f"{prefix}-*.tar*") if re.fullmatch(rf"{prefix}-\d+\.tar(\.tmp)?", p.name))


class _State:
    """``prepare_state.json``: the run's identity and its finished shards (with the items each covers)."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path, self.identity = path, identity
        self.shards: list[dict[str, Any]] = []
        self.complete = False

    def save(self) -> None:
        doc = {"version": STATE_VERSION, **self.identity, "shards": self.shards, "complete": self.complete}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, self.path)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for k in ("kind", "split", "prefix", "max_bytes"):
        if old.get(k) != new.get(k):
            out.append(f"{k} {old.get(k)!r} -> {new.get(k)!r}")
    os_, ns = old.get("settings") or {}, new.get("settings") or {}
    for k in sorted(set(os_) | set(ns)):
        if os_.get(k) != ns.get(k):
            out.append(f"setting {k} {os_.get(k, '(unset)')!r} -> {ns.get(k, '(unset)')!r}")
    oi, ni = old.get("items") or {}, new.get("items") or {}
    if oi.get("count") != ni.get("count"):
        out.append(f"the item list has {ni.get('count')} items, the stopped run had {oi.get('count')}")
    elif oi.get("sha256") != ni.get("sha256"):
        out.append("the item list differs (same length, other files, keys or labels)")
    return out


def _verify(path: Path, entry: dict[str, Any]) -> str:
    """Why the finished shard at `path` does not match its record (size, sha256); '' when it does."""
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size != entry["filesize"]:
        return f"{path.name} has {path.stat().st_size} bytes, the record says {entry['filesize']}"
    if file_sha256(path) != entry["sha256"]:
        return f"{path.name} fails its sha256 check"
    return ""


def _resume(job: SplitJob, state: _State, prefix: str, overwrite: bool) -> int:
    """Load `state` from disk and keep the finished shards that verify; the first item still to do."""
    out = job.out
    if overwrite:
        for p in _shard_files(out, prefix) + [out / STATE, out / MANIFEST, out / REPORT]:
            p.unlink(missing_ok=True)
        return 0
    if not (out / STATE).is_file():
        stray = _shard_files(out, prefix)
        if stray or (out / MANIFEST).is_file():
            raise PrepareError(f"{out} already holds shards ({stray[0].name if stray else MANIFEST}) that no prepare "
                               f"run of ours is writing (no {STATE}): choose another --out, or --overwrite")
        return 0
    try:
        old = json.loads((out / STATE).read_text())
    except (OSError, ValueError) as e:
        raise PrepareError(f"{out / STATE}: unreadable ({e}); --overwrite starts over") from e
    diff = _differences(old, state.identity)
    if diff:
        raise PrepareError(f"{out} was prepared (or started) with other inputs: {'; '.join(diff)}. "
                           f"Use another --out, or --overwrite to start over")
    for entry in old.get("shards", []):
        problem = _verify(out / entry["url"], entry)
        if problem:
            log.warning("%s: rewriting from there", problem)
            break
        state.shards.append(entry)
    keep = {e["url"] for e in state.shards}
    for p in _shard_files(out, prefix):  # an unfinished .tmp, or shards after the first bad one
        if p.name not in keep:
            p.unlink()
    return state.shards[-1]["items"][1] if state.shards else 0


def prepare_split(job: SplitJob, *, max_bytes: int, workers: int, prefix: str = "shard", overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Convert `job.items` into shards in `job.out`; returns the report (also in ``prepare_report.json``).

    Restarts where a stopped run left off (see the module doc). Raises :class:`PrepareError` when
    no item could be converted.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    identity = {"kind": job.kind, "split": job.split, "prefix": prefix, "max_bytes": max_bytes,
                "settings": job.settings, "items": {"count": len(job.items), "sha256": _item_digest(job.items)}}
    state = _State(out / STATE, identity)
    start = _resume(job, state, prefix, overwrite)
    skipped = [s for e in state.shards for s in e.get("skipped", [])]
    done_before = start
    pending: list[dict[str, Any]] = []  # failed items not yet covered by a finished shard
    shard_begin = [start]
    current = [start]
    consumed = [start]  # items whose result has been written or listed

    def on_shard(entry: dict[str, Any]) -> None:
        state.shards.append({**entry, "items": [shard_begin[0], current[0]], "skipped": list(pending)})
        state.save()
        pending.clear()
        shard_begin[0] = current[0]

    todo = job.items[start:]
    if start:
        log.info("%s: %d shards (%d items) already done and verified; continuing at item %d of %d", out,
                 len(state.shards), start, start + 1, len(job.items))
    state.save()
    convert = functools.partial(_convert, job.preparer, job.settings)
    workers = max(1, int(workers))
    # worker processes start from a fresh interpreter (forkserver): forking a parent that already runs
    # torch's and the decoders' threads is what native libraries crash on
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) \
        if workers > 1 and len(todo) > 1 else None
    bar = tqdm(total=len(job.items), initial=start, desc=f"prepare {job.split}", unit="item", disable=not progress,
               dynamic_ncols=True)
    try:
        results = _ordered_map(pool, convert, todo, 4 * workers) if pool else map(convert, todo)
        with logging_redirect_tqdm(), ShardWriter(out, prefix=prefix, max_bytes=max_bytes,  # warnings above the bar
                                                  start_index=len(state.shards), on_shard=on_shard) as writer:
            for n, (item, (ok, value)) in enumerate(zip(todo, results)):
                current[0] = start + n
                if ok:
                    writer.write(item.key, value)
                else:
                    bad = {"file": item.source, "line": item.line, "reason": value, "key": item.key}
                    log.warning("skipped %s%s: %s", item.source, f" ({item.line})" if item.line else "", value)
                    pending.append(bad)
                    skipped.append(bad)
                consumed[0] = start + n + 1
                bar.update(1)
                bar.set_postfix(shards=len(state.shards), skipped=len(skipped), refresh=False)
            current[0] = len(job.items)
    except BrokenProcessPool as e:
        first = job.items[min(consumed[0], len(job.items) - 1)]
        raise PrepareError(f"{out}: a worker process died converting the items from {consumed[0] + 1} of "
                           f"{len(job.items)} on (the first: {first.source}); the finished shards are kept: run "
                           f"the same command again to continue, with --workers 1 to see the failure") from e
    finally:
        bar.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    written = sum(e["nsamples"] for e in state.shards)
    report = {"kind": job.kind, "split": job.split, "out": str(out),
              "counts": {"items": len(job.items), "written": written, "skipped": len(skipped),
                         "shards": len(state.shards), "resumed_at_item": done_before},
              "skipped": skipped}
    (out / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    if not state.shards:
        raise PrepareError(f"{out}: none of the {len(job.items)} items could be converted; every failure is in "
                           f"{out / REPORT}, e.g. {skipped[0]['file']}: {skipped[0]['reason']}" if skipped else
                           f"{out}: no items to prepare")
    meta = {"modality": job.preparer.modality, "kind": job.kind, "split": job.split, "source": job.source,
            "skipped": [{k: s[k] for k in ("file", "line", "reason")} for s in skipped], "settings": job.settings}
    if job.classes is not None:
        meta["classes"] = list(job.classes)
    write_manifest(out, [{k: e[k] for k in ("url", "nsamples", "filesize", "sha256")} for e in state.shards], meta)
    state.complete = True
    state.save()
    log.info("prepared %s: %d of %d items in %d shards (%.1f MiB)%s -> %s", job.split, written, len(job.items),
             len(state.shards), sum(e["filesize"] for e in state.shards) / 2**20,
             f", {len(skipped)} skipped (listed in {REPORT})" if skipped else "", out / MANIFEST)
    return report


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _classes(preparer: Preparer, source: Any) -> list[str] | None:
    fn = getattr(preparer, "classes", None)
    names = fn(source) if callable(fn) else None
    return list(names) if names is not None else None


def _config_preparer(cfg: Any, modality: str, kind: str | None) -> tuple[str, Preparer]:
    """The preparer of a config: `kind` when given; else the one registered for the config's task
    (``tasks``), or of its modality, narrowed by an optional ``handles(cfg)`` (e.g. by data.dataset)."""
    if kind:
        return kind, PREPARERS.get(kind)
    named = [(k, p) for k, p in PREPARERS.items() if cfg.task in getattr(p, "tasks", ())]
    same = [(k, p) for k, p in PREPARERS.items() if getattr(p, "modality", None) == modality]
    found = named or same
    if len(found) > 1:
        found = [(k, p) for k, p in found if getattr(p, "handles", lambda c: True)(cfg)]
    task_name = cfg.task
    if len(found) != 1:
        names = ", ".join(k for k, _ in found) or "(none)"
        raise PrepareError(f"task {task_name!r} ({modality}): {'no preparer' if not found else 'several preparers'} "
                           f"({names}); name one with --kind")
    return found[0]


def _takes_args(fn: Any) -> bool:
    """Whether a preparer's ``from_config`` takes the command line too (``(cfg, split, args)``)."""
    try:
        return len(inspect.signature(fn).parameters) >= 3
    except (TypeError, ValueError):
        return False


def _list_path(lst: str, root: str | None) -> str:
    """The list file as recorded in the manifest: absolute, found as given or under `root`."""
    path = Path(lst)
    if not path.is_file() and root and (Path(root) / path).is_file():
        path = Path(root) / path
    return str(path.resolve())


def jobs_from_args(args: argparse.Namespace) -> tuple[list[SplitJob], Path | None]:
    """The split jobs of a command line (and the prepared root to index, for the CONFIG form)."""
    out = Path(args.out)
    if args.config:
        if args.list:
            raise PrepareError("give either CONFIG or --list, not both")
        cfg = load_config(args.config, args.overrides)
        task = TASKS.get(cfg.task)
        kind, preparer = _config_preparer(cfg, task.modality, args.kind)
        jobs = []
        for split in ("train", "val", "test"):
            got = preparer.from_config(cfg, split, args) if _takes_args(preparer.from_config) else \
                preparer.from_config(cfg, split)
            if got is None:
                continue
            items, settings = got
            source = {"config": str(Path(args.config).resolve()), "overrides": list(args.overrides),
                      "task": cfg.task}
            jobs.append(SplitJob(kind, preparer, list(items), dict(settings), out / split, split, source,
                                 _classes(preparer, cfg)))
        if not jobs:
            raise PrepareError(f"{args.config}: the {kind} preparer finds no split (train/val/test) in this config")
        return jobs, out
    if args.overrides:
        raise PrepareError(f"key=value overrides ({args.overrides[0]}) need a CONFIG")
    if not args.kind or not args.list:
        raise PrepareError("give a CONFIG, or --kind KIND and --list LIST (with --root ROOT when the list's paths "
                           f"are relative); preparers: {', '.join(PREPARERS) or '(none)'}")
    preparer = PREPARERS.get(args.kind)
    items = preparer.items(args)
    source = {"list": _list_path(args.list, args.root), "root": str(Path(args.root).resolve()) if args.root else ""}
    return [SplitJob(args.kind, preparer, list(items), dict(preparer.settings(args)), out, args.split, source,
                     _classes(preparer, args))], None


def write_dataset_index(root: Path, splits: Sequence[str]) -> Path:
    path = root / DATASET_INDEX
    path.write_text(json.dumps({"splits": {s: s for s in splits}}, indent=1) + "\n")
    return path


def cmd_prepare(args: argparse.Namespace) -> int:
    jobs, root = jobs_from_args(args)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)
    max_bytes = parse_size(args.shard_size)
    if root is not None and args.overwrite and (root / DATASET_INDEX).is_file():
        (root / DATASET_INDEX).unlink()
    reports = [prepare_split(j, max_bytes=max_bytes, workers=args.workers, prefix=args.prefix,
                             overwrite=args.overwrite, progress=not args.no_progress) for j in jobs]
    if root is not None:
        write_dataset_index(root, [j.split for j in jobs])
    summary = {"out": args.out, "splits": {r["split"]: r["counts"] for r in reports}}
    print(json.dumps(summary))
    skipped = sum(r["counts"]["skipped"] for r in reports)
    if skipped:
        log.warning("%d input(s) could not be converted and were left out; each is listed in %s", skipped,
                    ", ".join(str(Path(r["out"]) / REPORT) for r in reports if r["counts"]["skipped"]))
    return 0


class _SharedOptions:
    """What a preparer's ``add_arguments`` sees (a parser, or one of its groups): an option that
    another preparer already added is shared, not added twice."""

    def __init__(self, parser: argparse.ArgumentParser, target: Any = None) -> None:
        self.parser, self.target = parser, target if target is not None else parser

    def add_argument(self, *names: str, **kw: Any) -> Any:
        if any(n in self.parser._option_string_actions for n in names):
            return None
        return self.target.add_argument(*names, **kw)

    def add_argument_group(self, *a: Any, **kw: Any) -> "_SharedOptions":
        return _SharedOptions(self.parser, self.parser.add_argument_group(*a, **kw))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a run config: prepare every split it names into OUT/<split>/")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--kind", help=f"preparer ({', '.join(PREPARERS) or 'none registered'}); with CONFIG: "
                   "default, the one for the config's task")
    p.add_argument("--list", help="the list of inputs (any list format the preparer reads)")
    p.add_argument("--root", help="folder that relative paths of the list are under")
    p.add_argument("--split", default="train", help="split name recorded in the manifest (--list form)")
    p.add_argument("--shard-size", default="1GiB", help="largest shard: 1GiB (default), 512MiB, 200MB, bytes")
    p.add_argument("--workers", type=int, help="converting processes (default: min(8, CPUs))")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ...")
    p.add_argument("--overwrite", action="store_true", help="start over instead of continuing a stopped run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    shared = _SharedOptions(p)
    for _, preparer in PREPARERS.items():
        extra = getattr(preparer, "add_arguments", None)
        if callable(extra):
            extra(shared)


if "prepare" not in DATA_COMMANDS:
    DATA_COMMANDS.add("prepare", ("Convert a list (or a config's splits) into WebDataset shards + manifest, "
                                  "in parallel; restarts where it stopped.", add_arguments, cmd_prepare))
