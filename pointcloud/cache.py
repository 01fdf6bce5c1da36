"""The cache of preprocessed point-cloud arrays (ModelNet's FPS samples, ShapeNetPart's parsed files).

:func:`load_or_build_cache` keeps arrays in an ``.npz`` whose name holds a hash of every setting
they depend on (:func:`settings_digest`), so a changed setting or file never reads a stale cache;
it goes to ``<root>/.mm3d_cache`` and falls back to :func:`user_cache_dir` when the dataset
folder is read-only, and to memory when neither is writable (:func:`cache_dirs`). A cache also
remembers the files it found bad (:func:`store_bad`, :func:`restore_bad`), so that a dataset
loaded from it leaves out and names the same files as the one that built it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mm3d.datacheck import BadSample

log = logging.getLogger(__name__)


def user_cache_dir() -> Path:
    """``$MM3D_CACHE_DIR``, else ``$XDG_CACHE_HOME/mm3d``, else ``~/.cache/mm3d``."""
    env = os.environ.get("MM3D_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mm3d"


def settings_digest(key: dict) -> str:
    """A 16-hex-digit hash of a JSON-serialisable settings dict."""
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_or_build_cache(stem: str, key: dict, dirs: Sequence[Path],
                        build: Callable[[], dict[str, np.ndarray]]
                        ) -> tuple[dict[str, np.ndarray], Path | None, bool]:
    """Load arrays cached under `key`, or build and save them.

    The file ``<stem>_<digest>.npz`` (digest of `key`) is looked for in each of `dirs`; when it
    is absent everywhere, `build()` runs and its arrays are written to the first folder that
    accepts them (atomically), or kept in memory only when none does (or `dirs` is empty).
    Changing any setting in `key` changes the file name, so stale caches are never read.

    Returns:
        (arrays, path of the cache file or None when kept in memory, whether it was loaded).
    """
    digest = settings_digest(key)
    name = f"{stem}_{digest}.npz"
    for d in dirs:
        path = Path(d) / name
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:  # truncated or corrupt: rebuild
                log.warning("ignoring unreadable cache %s (%s)", path, e)
                continue
            if str(arrays.pop("_digest", "")) == digest:
                log.info("loaded cache %s", path)
                return arrays, path, True
    arrays = build()
    if not dirs:
        return arrays, None, False
    for d in dirs:
        path = Path(d) / name
        if _marked_read_only(Path(d)):
            log.info("not writing the cache in %s: its folder is marked read-only", d)
            continue
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, _digest=np.array(digest), **arrays)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write cache in %s (%s); trying the next location", d, e)
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            continue
        log.info("wrote cache %s", path)
        return arrays, path, False
    log.warning("no writable cache location among %s: keeping %s in memory only",
                [str(d) for d in dirs], stem)
    return arrays, None, False


def _marked_read_only(folder: Path) -> bool:
    """Whether the nearest existing folder at or above `folder` has no write permission bit at all
    (``r-xr-xr-x``): a dataset folder its owner made read-only is left untouched even by root, for
    whom the kernel would allow the write."""
    for p in (folder, *folder.parents):
        try:
            return not p.stat().st_mode & 0o222
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return False


def cache_dirs(root: Path, cache_dir: str | Path | None) -> list[Path]:
    """Where a dataset under `root` keeps its cache: `cache_dir` when given, else
    ``<root>/.mm3d_cache`` then :func:`user_cache_dir` (for a read-only root)."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    return [root / ".mm3d_cache", user_cache_dir()]


def store_bad(bad: dict[int, str]) -> dict[str, np.ndarray]:
    """The cache arrays of the bad files met while building it: ``{row: reason}`` -> ``bad_rows``,
    ``bad_reasons``."""
    return {"bad_rows": np.asarray(list(bad), dtype=np.int64),
            "bad_reasons": np.asarray(list(bad.values()) or [""], dtype=str)[:len(bad)]}


def restore_bad(arrays: dict[str, np.ndarray], files: Sequence[Path], where: Sequence[str]
                ) -> tuple[np.ndarray, list[BadSample]]:
    """(keep mask over `files`, the bad ones) from (and removed from) the `arrays` of a cache; a cache
    written before bad files were remembered has none."""
    rows = arrays.pop("bad_rows", np.zeros(0, np.int64)).tolist()
    reasons = arrays.pop("bad_reasons", np.zeros(0, str)).tolist()
    keep = np.ones(len(files), dtype=bool)
    keep[rows] = False
    return keep, [BadSample(str(files[r]), where[r], str(why)) for r, why in zip(rows, reasons)]
