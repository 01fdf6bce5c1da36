"""Checkpoints: atomic writes, last/best retention, safe loading, weight matching with reports.

A checkpoint is a plain dict, loadable with ``torch.load(weights_only=True)``:
``model`` (state dict of the unwrapped model), ``optimizer``, ``scaler``, ``ema``, ``step``,
``epoch``, ``batch_in_epoch`` (sampler position), ``rng`` (all RNG states), ``config`` (plain
dict), ``metrics`` and ``mm3d_version``. Converted foreign weights use the same ``model`` /
``config`` keys plus ``meta``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from mm3d.errors import UserError

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
# Reading and writing
# --------------------------------------------------------------------------------------------


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write with torch.save to a temporary file beside `path`, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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

    `index.json` (rewritten atomically) lists every kept file with its step and metric;
    `last.pt` and `best.pt` are hard links (copies where links are unsupported) to the newest and
    the best file.
    """

    def __init__(self, directory: str | Path, keep_last: int = 2, keep_best: int = 1,
                 mode: str = "min") -> None:
        self.dir = Path(directory)
        self.keep_last, self.keep_best, self.mode = max(1, keep_last), max(0, keep_best), mode
        self.index_path = self.dir / "index.json"
        self.entries: list[dict[str, Any]] = []
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

    def _ranked(self) -> list[dict[str, Any]]:
        scored = [e for e in self.entries if e.get("metric") is not None]
        return sorted(scored, key=lambda e: e["metric"], reverse=self.mode == "max")

    def save(self, state: dict[str, Any], step: int, metric: float | None = None) -> Path:
        name = f"step_{step:08d}.pt"
        path = save_atomic(state, self.dir / name)
        self.entries = [e for e in self.entries if e["file"] != name]
        self.entries.append({"file": name, "step": step, "metric": metric})
        keep = {e["file"] for e in sorted(self.entries, key=lambda e: e["step"])[-self.keep_last:]}
        keep |= {e["file"] for e in self._ranked()[: self.keep_best]}
        for e in list(self.entries):
            if e["file"] not in keep:
                (self.dir / e["file"]).unlink(missing_ok=True)
                self.entries.remove(e)
        self._write_index()
        self._link("last.pt", self.latest())
        best = self.best()
        if best is not None:
            self._link("best.pt", best)
        return path

    def _write_index(self) -> None:
        tmp = self.index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        os.replace(tmp, self.index_path)

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
