"""Checkpoints: atomic writes, last/best retention, safe loading, weight matching with reports.

A checkpoint is a plain dict, loadable with ``torch.load(weights_only=True)``:
``model`` (state dict of the unwrapped model), ``optimizer``, ``scaler``, ``ema``, ``step``,
``epoch``, ``batch_in_epoch`` (sampler position), ``rng`` (all RNG states), ``config`` (plain
dict), ``metric`` (the value that ranks it, if any), ``log_records`` (lines of ``metrics.jsonl``
written by then) and ``mm3d_version``. Converted foreign weights use the same ``model`` /
``config`` keys plus ``meta``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mm3d.config import config_from_dict, deep_merge, parse_overrides
from mm3d.errors import UserError
from mm3d.registry import TASKS

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model."""


# --------------------------------------------------------------------------------------------
# RNG state as plain data
# --------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(_tupleize(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tupleize(x: Any) -> Any:
    return tuple(_tupleize(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------
# Writing: errors that name the path
# --------------------------------------------------------------------------------------------


class OutputError(UserError):
    """A run's output cannot be written (full disk, read-only or forbidden folder); names the path."""


_OS_ERROR_WORDS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                   errno.EROFS: "read-only file system"}


def describe_os_error(e: OSError, path: str | Path | None = None) -> str:
    """``No space left on device: PATH``, ``permission denied: PATH``, …: what failed, and where.

    The path is the one the error names, else `path`."""
    where = e.filename if e.filename is not None else path
    what = _OS_ERROR_WORDS.get(e.errno) or e.strerror or str(e) or type(e).__name__
    return f"{what}: {where}" if where is not None else what


@contextlib.contextmanager
def output_errors(what: str, path: str | Path | None = None) -> Iterator[None]:
    """Turn an OSError raised while writing `what` into one :class:`OutputError` line."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {what}: {describe_os_error(e, path)}") from None


class _RecordedWrites:
    """A file wrapper that remembers the first OSError of a write: torch.save reports a failed
    write to a Python file as ``unexpected pos …``, which says nothing about the disk."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write with torch.save to ``.NAME.tmp-PID`` beside `path`, flush it to the disk, then rename
    it over `path`: `path` is either the old file or the complete new one, never half of one.

    A failed write (full disk, read-only or forbidden folder) removes the temporary file and raises
    :class:`OutputError` naming `path` (``No space left on device: PATH``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            out = _RecordedWrites(f)
            try:
                torch.save(obj, out)
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None or str(e.filename) == str(tmp):
            e.filename = str(path)
        raise OutputError(describe_os_error(e)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``.

    Files that need arbitrary unpickling (official research checkpoints that store an argparse
    Namespace, for instance) load only with `allow_pickle=True`. A file that is no torch
    checkpoint at all (neither the zip archive nor the legacy pickle that ``torch.save`` writes)
    fails before torch reads it. `mmap` maps the tensors of a zip checkpoint instead of reading
    them (to look at its config cheaply). Every failure raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    kind = _file_kind(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} cannot be loaded with weights_only=True: it stores Python objects that need "
                f"pickle ({_unpickler_reason(e)}). Only if you trust this file, load it with "
                f"allow_pickle=true (CLI: --allow-pickle)") from None
        log.warning("loading %s with full pickle (allow_pickle=true)", path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, AttributeError, ImportError, RuntimeError, EOFError, OSError) as e2:
            raise CheckpointError(f"{path} cannot be unpickled: {_torch_message(e2)}") from None
    except (RuntimeError, EOFError, OSError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({kind}): {_torch_message(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict")
    return obj


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _torch_message(e: BaseException) -> str:
    """The first line of a torch error message, without terminal escape sequences."""
    text = _ANSI_ESCAPE.sub("", str(e)).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def _unpickler_reason(e: pickle.UnpicklingError) -> str:
    """What ``weights_only=True`` refused (torch's 'WeightsUnpickler error:' line, first sentence)."""
    text = _ANSI_ESCAPE.sub("", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m is None:
        return _torch_message(e)
    return m.group(1).split(". ")[0].strip().rstrip(".")[:300]


def _file_kind(path: Path) -> str:
    """``zip`` (torch.save), ``pickle`` (legacy torch.save) or ``tar`` (torch < 0.4); anything else
    raises CheckpointError saying what the file looks like."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol >= 2: PROTO opcode
        return "pickle"
    if head[257:262] == b"ustar":
        return "tar"
    if not head:
        raise CheckpointError(f"{path} is empty: not a torch checkpoint")
    what = "a text file" if _looks_like_text(head) else "binary data of another kind"
    raise CheckpointError(f"{path} is not a torch checkpoint: it is {what} (starts with {head[:16]!r}), "
                          f"neither the zip archive nor the pickle that torch.save writes")


def _looks_like_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in data


def extract_state_dict(ckpt: Mapping[str, Any], keys: tuple[str, ...] = ("model", "module",
                       "state_dict", "base_model")) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict: under the first of `keys` present, else the dict itself."""
    for k in keys:
        if k in ckpt and isinstance(ckpt[k], Mapping):
            return dict(ckpt[k])
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise CheckpointError(f"no weights found under any of {keys}; top-level keys: {sorted(ckpt)[:20]}")


def compare_state_dicts(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
                        ) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: given shape vs expected shape' mismatches)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in given and tuple(given[k].shape) != tuple(v.shape)]
    return missing, unexpected, mismatched


def load_model_weights(model: nn.Module, src: str | Path | Mapping[str, Any], *,
                       allow_pickle: bool = False, strict: bool = True,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """Load weights into `model`, reporting every key that does not fit.

    `src` is a path, a checkpoint dict or a state dict. Shape mismatches always raise (naming
    every mismatching key with both shapes). With `strict`, missing or unexpected keys raise too;
    otherwise they are returned as notes. Keys starting with a prefix in `ignore` are dropped
    from the checkpoint first and reported as such.
    """
    ckpt = load_checkpoint(src, allow_pickle=allow_pickle) if isinstance(src, (str, Path)) else src
    sd = extract_state_dict(ckpt)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    notes = []
    dropped = sorted(k for k in sd if k.startswith(ignore)) if ignore else []
    if dropped:
        notes.append(f"dropped {len(dropped)} checkpoint keys by request: {_short(dropped)}")
        sd = {k: v for k, v in sd.items() if k not in dropped}
    missing, unexpected, mismatched = compare_state_dicts(model.state_dict(), sd)
    where = f" ({src})" if isinstance(src, (str, Path)) else ""
    if mismatched:
        raise CheckpointError(f"checkpoint{where} does not match the model architecture; "
                              f"mismatching shapes: " + "; ".join(mismatched))
    if strict and (missing or unexpected):
        raise CheckpointError(f"checkpoint{where} does not match the model: missing keys "
                              f"{_short(missing)}; unexpected keys {_short(unexpected)}")
    model.load_state_dict(sd, strict=False)
    if missing:
        notes.append(f"missing (left at initialisation): {_short(missing)}")
    if unexpected:
        notes.append(f"unexpected (ignored): {_short(unexpected)}")
    notes.append(f"loaded {len(sd) - len(unexpected)} tensors{where}")
    return notes


def _short(keys: list[str], n: int = 12) -> str:
    return "[" + ", ".join(keys[:n]) + (f", … {len(keys) - n} more" if len(keys) > n else "") + "]"


# --------------------------------------------------------------------------------------------
# Retention of the last and best checkpoints
# --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Keeps the newest `keep_last` and the best `keep_best` checkpoints in `directory`.

    `index.json` (rewritten atomically) lists every kept file with its step, metric and whether a
    later finite training loss showed that its weights compute one (``verified``); `last.pt` and
    `best.pt` are hard links (copies where links are unsupported) to the newest and the best file.
    Retention never deletes the newest verified checkpoint.

    :meth:`save` runs in stages, each leaving the folder readable: write ``.NAME.tmp-PID`` and
    rename it to ``step_XXXXXXXX.pt``, rewrite the index, link ``last.pt`` and ``best.pt``, then
    delete the files the index no longer lists. A process killed at any stage leaves at most a
    temporary file, a complete checkpoint the index does not list yet, stale links or files to
    delete; :meth:`recover` (run at the next start) puts the folder right.
    """

    def __init__(self, directory: str | Path, keep_last: int = 2, keep_best: int = 1,
                 mode: str = "min") -> None:
        self.dir = Path(directory)
        self.keep_last, self.keep_best, self.mode = max(1, keep_last), max(0, keep_best), mode
        self.index_path = self.dir / "index.json"
        self.entries: list[dict[str, Any]] = []
        self.reload()

    def reload(self) -> None:
        """Read the index again (another process, rank 0, writes it)."""
        self.entries = []
        if self.index_path.is_file():
            self.entries = json.loads(self.index_path.read_text())
            self.entries = [e for e in self.entries if (self.dir / e["file"]).is_file()]

    def latest(self) -> Path | None:
        if not self.entries:
            return None
        return self.dir / max(self.entries, key=lambda e: e["step"])["file"]

    def best(self) -> Path | None:
        ranked = self._ranked()
        return self.dir / ranked[0]["file"] if ranked else None

    def newest_first(self) -> list[dict[str, Any]]:
        """The index entries, newest first."""
        return sorted(self.entries, key=lambda e: e["step"], reverse=True)

    def _ranked(self) -> list[dict[str, Any]]:
        scored = [e for e in self.entries if e.get("metric") is not None]
        return sorted(scored, key=lambda e: e["metric"], reverse=self.mode == "max")

    def mark_verified(self, step: int) -> None:
        """Every checkpoint written before optimizer step `step` computed a finite training loss
        (the loss of the step after it), so it is a good one to go back to."""
        for e in self.entries:
            if e["step"] < step:
                e["verified"] = True

    def save(self, state: dict[str, Any], step: int, metric: float | None = None) -> Path:
        name = f"step_{step:08d}.pt"
        entry = {"file": name, "step": step, "metric": metric, "verified": False}
        path = self._write_file({**state, "metric": metric}, name)
        self.entries = [e for e in self.entries if e["file"] != name] + [entry]
        keep = {e["file"] for e in self.newest_first()[: self.keep_last]}
        keep |= {e["file"] for e in self._ranked()[: self.keep_best]}
        keep |= {e["file"] for e in [e for e in self.newest_first() if e.get("verified")][:1]}
        retired = [e["file"] for e in self.entries if e["file"] not in keep]
        self.entries = [e for e in self.entries if e["file"] in keep]
        with output_errors("the checkpoint index", self.index_path):
            self._write_index()
            self._link("last.pt", self.latest())
            self._link("best.pt", self.best())
            self._retire(retired)
        return path

    def _write_file(self, state: dict[str, Any], name: str) -> Path:
        return save_atomic(state, self.dir / name)

    def _write_index(self) -> None:
        tmp = self.index_path.with_name(f".{self.index_path.name}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        os.replace(tmp, self.index_path)

    def _retire(self, files: list[str]) -> None:
        for name in files:
            (self.dir / name).unlink(missing_ok=True)

    def _link(self, name: str, target: Path | None) -> None:
        if target is None:
            return
        dst = self.dir / name
        if dst.exists() and dst.samefile(target):  # rename() onto the same inode is a no-op
            return
        tmp = self.dir / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copy2(target, tmp)
        os.replace(tmp, dst)

    def recover(self) -> list[str]:
        """Put right what a process killed during :meth:`save` left (call once, on one process,
        before training); returns what was done, for the log.

        Temporary files are deleted; a complete ``step_*.pt`` newer than every indexed one (killed
        after its rename, before the index) joins the index; an older one the index does not list
        (killed before the deletions) is deleted; ``last.pt`` and ``best.pt`` are linked again.
        """
        if not self.dir.is_dir():
            return []
        notes = []
        for p in sorted(self.dir.iterdir()):
            if ((p.name.startswith(".") and ".tmp" in p.name) or p.name.endswith(".json.tmp")) and p.is_file():
                p.unlink()
                notes.append(f"removed the unfinished {p.name}")
        self.reload()
        listed = {e["file"] for e in self.entries}
        newest = max((e["step"] for e in self.entries), default=-1)
        changed = False
        for p in sorted(self.dir.glob("step_*.pt")):
            m = re.fullmatch(r"step_(\d+)\.pt", p.name)
            if m is None or p.name in listed:
                continue
            step = int(m.group(1))
            if step > newest:
                try:
                    metric = load_checkpoint(p, mmap=True).get("metric")
                except CheckpointError:
                    metric = None  # unreadable: adopted without a metric, resume will name it
                self.entries.append({"file": p.name, "step": step, "metric": metric, "verified": False})
                notes.append(f"added {p.name} to the index (written completely before a kill)")
            else:
                p.unlink()
                notes.append(f"deleted {p.name} (retired by a save that was killed)")
            changed = True
        if changed:
            self._write_index()
        for name, target in (("last.pt", self.latest()), ("best.pt", self.best())):
            dst = self.dir / name
            if target is None:
                if dst.exists():
                    dst.unlink()
                    changed = True
            elif not (dst.exists() and dst.samefile(target)):
                self._link(name, target)
                notes.append(f"linked {name} to {target.name}")
        return notes

    def set_aside_after(self, step: int) -> list[Path]:
        """Move the checkpoints newer than `step` to ``superseded/`` (resuming from an earlier
        checkpoint of this run: the steps after it are done again); returns their new paths."""
        newer = [e for e in self.entries if e["step"] > step]
        if not newer:
            return []
        moved = []
        with output_errors("the checkpoint folder", self.dir):
            (self.dir / "superseded").mkdir(exist_ok=True)
            for e in newer:
                dst = self.dir / "superseded" / e["file"]
                os.replace(self.dir / e["file"], dst)
                moved.append(dst)
            self.entries = [e for e in self.entries if e["step"] <= step]
            self._write_index()
            for name, target in (("last.pt", self.latest()), ("best.pt", self.best())):
                if target is None:
                    (self.dir / name).unlink(missing_ok=True)
                else:
                    self._link(name, target)
        return moved


def model_from_checkpoint(path: str, allow_pickle: bool = False, overrides: Sequence[str] = ()
                          ) -> tuple[Any, Any, nn.Module]:
    """The task, config and model (weights loaded, eval mode) stored in one of our checkpoints;
    `overrides` (``key=value``) change keys of its stored config (``mm3d predict``, ``visualize``,
    ``extract`` and ``export`` rebuild their model with it)."""
    ck = load_checkpoint(path, allow_pickle=allow_pickle)
    if not isinstance(ck.get("config"), dict) or not ck["config"]:
        raise CheckpointError(f"{path} holds no config (converted weights?): pass a config with "
                              f"init={path} to `mm3d finetune`/`mm3d evaluate` instead")
    data = deep_merge(ck["config"], parse_overrides(list(overrides)))
    data["seeds"] = []
    if data.get("task") not in TASKS:
        raise CheckpointError(f"{path}: its stored config names the task {data.get('task')!r}, which this mm3d "
                              f"does not know; `mm3d tasks` lists the known ones")
    task = TASKS.get(data["task"])
    cfg = config_from_dict(task.config_class, data, file=f"{path} (stored config)")
    model = task.build_model(cfg)
    load_model_weights(model, ck)
    return task, cfg, model.eval()
