"""Prepared shards: the WebDataset tar layout, written here and read map-style through wids.

A prepared split is a folder of tar files (``shard-000000.tar``, ``shard-000001.tar``, ...) in the
WebDataset layout — every sample is a group of members ``<key>.<ext>`` (``000123_abseiling.mp4`` +
``000123_abseiling.json``) — and a ``manifest.json`` in the wids format (``shardlist`` of
``{"url", "nsamples", "filesize", "sha256"}``) with our own description under ``"mm3d"``. Neither
reading path needs mm3d: ``wids.ShardListDataset("DIR/manifest.json")`` indexes the samples and
``webdataset.WebDataset(urls)`` streams them.

We read them map-style (:class:`ShardSamples`, wids underneath): sample ``i`` is a position, so
the trainer's resumable sampler keeps its exact mid-epoch resume; :class:`ShardSampler` adds shard
locality (a seeded order of shards, samples shuffled within a window, a contiguous run per rank),
so each rank reads few shards at a time, mostly sequentially.

=====================  ======================================================================
:class:`ShardWriter`   writes samples into size-capped shards (``.tmp`` name, renamed when done)
:func:`write_manifest` ``manifest.json`` beside the shards; :func:`read_manifest` reads one
:func:`resolve_shards` a folder, manifest or brace pattern -> :class:`ShardSet` (urls, counts)
:class:`ShardSamples`  map-style dataset: ``{"__key__", "__shard__", "<ext>": bytes}``
:class:`ShardSampler`  resumable per-rank sampler with shard locality
=====================  ======================================================================
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import braceexpand
import torch
from torch.utils.data import Dataset
from webdataset import TarWriter
from wids import ShardListDataset
from wids.wids import IndexedTarSamples, LRUShards, splitname

from mm3d.data import ResumableSampler
from mm3d.errors import MissingFileError, UserError

MANIFEST = "manifest.json"
DATASET_INDEX = "dataset.json"  # a prepared root: {"splits": {"train": "train", "val": "val", ...}}
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to whole records of 20 blocks
FIXED_MTIME = 0  # member mtime: shards are byte-identical however and whenever they are written
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_EXT_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


class ShardError(UserError, OSError):
    """A shard, manifest or shard spec that cannot be used; the message names the file."""


# what wids raises for a file that is not a (whole) tar: its asserts, struct/int parsing, I/O
_TAR_ERRORS = (AssertionError, OSError, ValueError, struct.error, UnicodeDecodeError, EOFError)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _member_bytes(size: int) -> int:
    """Bytes one tar member of `size` data bytes takes: a header block + data padded to blocks."""
    return TAR_BLOCK + math.ceil(size / TAR_BLOCK) * TAR_BLOCK


def _archive_bytes(members: int) -> int:
    """Bytes of a finished archive whose members take `members` bytes (end blocks, record pad)."""
    return math.ceil((members + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD


def check_key(key: str) -> None:
    """Refuse a sample key that webdataset/wids would split or mangle (dots, slashes, spaces)."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > 90:
        raise ValueError(f"sample key {key!r} must be 1-90 characters of letters, digits, '_' and '-' "
                         f"(webdataset splits keys at the first dot)")


def safe_key(index: int, stem: str) -> str:
    """A sample key from an item's position and its source's stem: ``000123_abseiling_xyz``.

    Characters other than letters, digits, ``_`` and ``-`` become ``_``; the stem is cut to keep
    the key short (the index keeps it unique)."""
    clean = re.sub(r"[^A-Za-z0-9_\-]+", "_", stem).strip("_")[:60]
    return f"{index:06d}_{clean}" if clean else f"{index:06d}"


class _HashingFile:
    """A write-only file that hashes (sha256) and counts the bytes written through it."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.f.flush()


class ShardWriter:
    """Write samples into ``<prefix>-000000.tar``, ``-000001.tar``, ... of at most `max_bytes` each.

    Each shard is written to ``<name>.tmp`` and renamed when it is complete, so a folder never
    holds a half-written ``.tar``. A shard holds at least one sample, so one sample larger than
    `max_bytes` makes a shard of its own. Members get a fixed mtime and owner: the same samples
    give byte-identical shards.

    Args:
        out_dir: the folder (created).
        prefix: shard file names start with it.
        max_bytes: the largest shard file size (the tar's real size, padding included).
        start_index: the number of the first shard (a restarted prepare continues the numbering).
        on_shard: called with each finished shard's entry (see :meth:`close`) right after its rename.
    """

    def __init__(self, out_dir: str | Path, *, prefix: str = "shard", max_bytes: int = 1 << 30,
                 start_index: int = 0, on_shard: Any = None) -> None:
        if max_bytes < 3 * TAR_RECORD:
            raise ValueError(f"max_bytes={max_bytes} is too small for a tar shard (at least {3 * TAR_RECORD})")
        if not re.match(r"^[A-Za-z0-9_\-]+$", prefix):
            raise ValueError(f"shard prefix {prefix!r} must be letters, digits, '_' and '-'")
        self.out_dir, self.prefix, self.max_bytes = Path(out_dir), prefix, int(max_bytes)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index, self.on_shard = start_index, on_shard
        self.entries: list[dict[str, Any]] = []
        self._tar = self._file = self._raw = None
        self._members = self._count = 0
        self._keys: set[str] = set()

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        path = self.out_dir / (self.shard_name(self.index) + ".tmp")
        self._raw = open(path, "wb")
        self._file = _HashingFile(self._raw)
        self._tar = TarWriter(self._file, user="mm3d", group="mm3d", encoder=False, mtime=FIXED_MTIME)
        self._members = self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        self._raw.close()
        name = self.shard_name(self.index)
        tmp, final = self.out_dir / (name + ".tmp"), self.out_dir / name
        assert self._file.n == _archive_bytes(self._members), (self._file.n, self._members)
        os.replace(tmp, final)
        entry = {"url": name, "nsamples": self._count, "filesize": self._file.n,
                 "sha256": self._file.sha.hexdigest()}
        self.entries.append(entry)
        self._tar = self._file = self._raw = None
        self.index += 1
        if self.on_shard is not None:
            self.on_shard(entry)

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: tar members ``key.<ext>`` for each ``ext -> bytes`` of `files`."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} was already written")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        size = 0
        for ext, data in files.items():
            if not isinstance(ext, str) or not _EXT_RE.match(ext):
                raise ValueError(f"sample {key!r}: extension {ext!r} must be letters, digits, '_', '-', '.' "
                                 f"and must not start with a dot")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"sample {key!r}: {ext!r} is {type(data).__name__}, expected bytes")
            size += _member_bytes(len(data))
        if self._tar is not None and self._count and _archive_bytes(self._members + size) > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, **{ext: bytes(data) for ext, data in files.items()}})
        self._members += size
        self._count += 1
        self._keys.add(key)

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; the entries ``{"url", "nsamples", "filesize", "sha256"}`` of every
        shard this writer finished (urls relative to `out_dir`)."""
        if self._tar is not None:
            self._finish()
        return list(self.entries)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no .tmp behind a failure; finished shards stay
            self._raw.close()
            (self.out_dir / (self.shard_name(self.index) + ".tmp")).unlink(missing_ok=True)
            self._tar = None


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def write_manifest(out_dir: str | Path, shards: Sequence[dict[str, Any]], meta: dict[str, Any],
                   *, name: str | None = None) -> Path:
    """Write ``out_dir/manifest.json``: the wids descriptor of `shards` plus ``"mm3d": meta``.

    meta: our description — ``modality``, ``kind``, ``split``, ``source``, ``skipped``,
        ``settings``, ``classes`` (whatever is known); ``num_samples`` is filled in.
    """
    out_dir = Path(out_dir)
    shardlist = [{"url": s["url"], "nsamples": int(s["nsamples"]), "filesize": int(s["filesize"]),
                  "sha256": s["sha256"]} for s in shards]
    meta = {**meta, "num_samples": sum(s["nsamples"] for s in shardlist)}
    doc = {"wids_version": 1, "name": name or meta.get("split") or out_dir.name, "shardlist": shardlist,
           "mm3d": meta}
    path = out_dir / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a manifest (ours or any wids descriptor with a local ``shardlist``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such shard manifest")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not a JSON manifest ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("shardlist"), list):
        raise ShardError(f"{path}: a shard manifest needs a 'shardlist' list (wids format)")
    for i, s in enumerate(doc["shardlist"]):
        if not isinstance(s, dict) or not isinstance(s.get("url"), str) or not isinstance(s.get("nsamples"), int):
            raise ShardError(f"{path}: shardlist entry {i} needs 'url' (string) and 'nsamples' (integer), got {s!r}")
    return doc


# --------------------------------------------------------------------------------------------
# Resolving a spec
# --------------------------------------------------------------------------------------------


@dataclass
class ShardSet:
    """The shards of one split.

    urls: the shard files (absolute paths for local shards).
    counts: samples per shard (from the manifest, else counted from the tar index).
    meta: the manifest's ``"mm3d"`` section ({} without one).
    entries: the manifest's shardlist entries, one per url ({"url"} only without a manifest):
        ``filesize`` and ``sha256`` when known, for `mm3d data check`.
    spec: what was resolved (for messages).
    """

    urls: list[str]
    counts: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    spec: str = ""

    def __len__(self) -> int:
        return sum(self.counts)

    def manifest_entries(self) -> list[dict[str, Any]]:
        """wids shardlist entries with these urls (what :class:`wids.ShardListDataset` takes)."""
        return [{"url": u, "nsamples": n} for u, n in zip(self.urls, self.counts)]


def _is_remote(url: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.\-]*:", url)) and not url.startswith("file:")


def _join(base: Path, url: str) -> str:
    if _is_remote(url) or os.path.isabs(url):
        return url
    return str((base / url).resolve())


def count_samples(url: str) -> int:
    """The number of samples of a local tar shard (grouping members by key, as wids does)."""
    if not os.path.isfile(url):
        raise MissingFileError(f"{url}: no such shard")
    try:
        with open(url, "rb") as f:
            itf = IndexedTarSamples(path=url, stream=f)
            n = len(itf)
            itf.close()
    except _TAR_ERRORS as e:
        raise ShardError(f"{url}: cannot index the tar file ({type(e).__name__}: {e})") from e
    return n


def _from_manifest(path: Path, spec: str) -> ShardSet:
    doc = read_manifest(path)
    base = path.parent
    entries = [{**s, "url": _join(base, s["url"])} for s in doc["shardlist"]]
    if not entries:
        raise ShardError(f"{path}: the manifest lists no shards")
    return ShardSet([e["url"] for e in entries], [e["nsamples"] for e in entries],
                    dict(doc.get("mm3d") or {}), entries, spec)


def _from_urls(urls: list[str], spec: str) -> ShardSet:
    """Counts (and entries) for explicit urls: from a manifest beside them when it lists them all."""
    manifests: dict[Path, dict[str, dict[str, Any]]] = {}
    entries, meta = [], {}
    for u in urls:
        d = Path(u).parent
        if d not in manifests:
            m = d / MANIFEST
            doc = read_manifest(m) if m.is_file() else None
            manifests[d] = {_join(d, s["url"]): s for s in doc["shardlist"]} if doc else {}
            if doc and not meta:
                meta = dict(doc.get("mm3d") or {})
        known = manifests[d].get(u)
        entries.append({**known, "url": u} if known else {"url": u, "nsamples": count_samples(u)})
    return ShardSet(urls, [e["nsamples"] for e in entries], meta, entries, spec)


def resolve_shards(spec: str | Path, split: str = "train") -> ShardSet:
    """The shards that `spec` names.

    spec: a folder (its ``manifest.json``, else its ``*.tar`` sorted by name), a manifest path
        (``.json``), a brace pattern (``"dir/shard-{000000..000012}.tar"``) or one ``.tar``; or a
        prepared root whose ``dataset.json`` names a folder per split (then `split` picks one).
    split: the split to take from a prepared root.
    """
    text = str(spec)
    if not text:
        raise ShardError("no shards given (data.shards is empty)")
    if "{" in text:
        urls = [_join(Path("."), u) for u in braceexpand.braceexpand(text)]
        missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
        if missing:
            raise MissingFileError(f"{text}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
        return _from_urls(urls, text)
    path = Path(text)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return _from_manifest(path / MANIFEST, text)
        if (path / DATASET_INDEX).is_file():
            return resolve_shards(split_folder(path, split), split)
        tars = sorted(path.glob("*.tar"))
        if not tars:
            raise ShardError(f"{path}: a shard folder needs {MANIFEST} or *.tar files; it has neither")
        return _from_urls([str(t.resolve()) for t in tars], text)
    if not path.exists():
        raise MissingFileError(f"{path}: no such shard folder, manifest or tar file")
    if path.name == DATASET_INDEX:
        return resolve_shards(split_folder(path.parent, split), split)
    if path.suffix == ".json":
        return _from_manifest(path, text)
    if path.suffix == ".tar":
        return _from_urls([str(path.resolve())], text)
    raise ShardError(f"{path}: expected a shard folder, a manifest (.json), a .tar or a brace pattern")


def split_folder(root: str | Path, split: str) -> Path:
    """The folder of `split` in a prepared root (``dataset.json``: ``{"splits": {split: folder}}``)."""
    root = Path(root)
    index = root / DATASET_INDEX
    try:
        splits = json.loads(index.read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{index}: cannot read the 'splits' of a prepared dataset ({e})") from e
    if split not in splits:
        raise ShardError(f"{index}: no split {split!r}; it has {', '.join(sorted(splits)) or '(none)'}")
    return root / splits[split]


def has_split(root: str | Path, split: str) -> bool:
    """Whether a prepared root (a folder with ``dataset.json``) has `split`."""
    index = Path(root) / DATASET_INDEX
    if not index.is_file():
        return False
    try:
        return split in json.loads(index.read_text()).get("splits", {})
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _InPlaceShards(LRUShards):
    """wids' shard cache, reading local shards in place: no copy into a download cache and no lock
    file beside the shard (prepared data may sit on a read-only mount). Remote urls go through wids."""

    def get_shard(self, url: str) -> IndexedTarSamples:
        if _is_remote(url):
            return super().get_shard(url)
        self.accesses += 1
        if url not in self.lru:
            with open(url, "rb") as f:  # wids maps the file; the mapping outlives the handle
                self.lru[url] = IndexedTarSamples(path=url, stream=f)
            self.misses += 1
        return self.lru[url]


def _as_bytes(data: Any) -> bytes:
    """wids hands a member over as a stream over its mmap; a sample holds plain bytes."""
    if isinstance(data, io.BytesIO):
        return data.getvalue()
    if hasattr(data, "read"):
        return data.read()
    return bytes(data)


class ShardSamples(Dataset):
    """Map-style access to the samples of a :class:`ShardSet` (wids underneath, nothing decoded).

    ``self[i]`` is ``{"__key__": key, "__shard__": url, "<ext>": bytes, ...}`` for the i-th
    sample in shard order. Files are opened lazily in each process (a DataLoader worker opens its
    own), at most `lru_size` shards at a time.
    """

    def __init__(self, spec: "str | Path | ShardSet", *, split: str = "train", lru_size: int = 8) -> None:
        self.shard_set = spec if isinstance(spec, ShardSet) else resolve_shards(spec, split)
        self.lru_size = lru_size
        self._cum = [0]
        for n in self.shard_set.counts:
            self._cum.append(self._cum[-1] + n)
        self._wids = None

    def __len__(self) -> int:
        return self._cum[-1]

    def _dataset(self):
        if self._wids is None:
            with contextlib.redirect_stderr(io.StringIO()):  # wids prints a summary on every construction
                self._wids = ShardListDataset(self.shard_set.manifest_entries(), transformations=[],
                                              lru_size=self.lru_size)
            self._wids.cache = _InPlaceShards(self.lru_size, localname=self._wids.localname)
        return self._wids

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, position in that shard) of sample `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (0..{len(self) - 1}) of {self.shard_set.spec}")
        s = bisect.bisect_right(self._cum, i) - 1
        return s, i - self._cum[s]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, j = self.locate(int(i))
        url = self.shard_set.urls[s]
        try:
            shard = self._dataset().cache.get_shard(url)
            if j >= len(shard):
                raise ShardError(f"holds {len(shard)} samples, the manifest says {self.shard_set.counts[s]}")
            raw = shard[j]
        except FileNotFoundError as e:
            raise MissingFileError(f"{url}: no such shard (sample {i})") from e
        except _TAR_ERRORS as e:
            raise ShardError(f"{url}: cannot read sample {j} of the shard ({type(e).__name__}: {e})") from e
        # wids names a member's extension with its dot (".mp4"); ours go without
        out = {k[1:] if k.startswith(".") else k: _as_bytes(v) for k, v in raw.items() if not k.startswith("__")}
        out["__key__"], out["__shard__"] = raw["__key__"], url
        return out

    def source(self, i: int) -> tuple[str, str]:
        """(shard url, sample key) of sample `i`, for messages; the key is '' when unreadable."""
        s, j = self.locate(int(i))
        url = self.shard_set.urls[s]
        try:
            shard = self._dataset().cache.get_shard(url)
            return url, splitname(list(shard.reader.names())[shard.samples[j][0]])[0]
        except (*_TAR_ERRORS, IndexError):  # a missing or damaged shard: the key is unknown
            return url, ""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_wids"] = None  # open files and mmaps stay in the process that opened them
        return state

    def close(self) -> None:
        if self._wids is not None:
            self._wids.close()
            self._wids = None


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


class ShardSampler(ResumableSampler):
    """Resumable per-rank sample order with shard locality.

    Every epoch (seeded by ``seed + epoch``): the shards are permuted, their samples are laid out
    shard after shard, padded by wrapping around (``pad=True``, training) to split evenly, and rank
    `r` takes the r-th contiguous run of the stream — so each rank reads its own few shards,
    mostly sequentially. Within the rank's run, samples are shuffled inside consecutive windows
    of `shuffle_buffer` samples. :meth:`set_start` skips the first samples of the rank's run, so
    resuming mid-epoch is exact. ``shuffle=False`` keeps the shard order and the order inside.

    counts: samples per shard (:attr:`ShardSet.counts`).
    """

    def __init__(self, counts: Sequence[int], *, shuffle_buffer: int = 1000, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pad: bool = True) -> None:
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        if any(int(c) < 0 for c in counts):
            raise ValueError(f"negative shard sample count in {list(counts)}")
        super().__init__(int(sum(counts)), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, pad=pad)
        self.counts = torch.tensor([int(c) for c in counts], dtype=torch.long)
        self.shuffle_buffer = shuffle_buffer
        self._cache: tuple[int, torch.Tensor] | None = None

    def _span(self) -> tuple[int, int]:
        """[begin, end) of this rank's run in the (padded) epoch stream."""
        if self.pad:
            per = math.ceil(self.n / self.world)
            return self.rank * per, (self.rank + 1) * per
        return self.rank * self.n // self.world, (self.rank + 1) * self.n // self.world

    def _rank_indices(self) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        starts = torch.cumsum(self.counts, 0) - self.counts
        if self.shuffle:
            order = torch.randperm(len(self.counts), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(len(self.counts))
        counts, firsts = self.counts[order], starts[order]
        # the stream: shard order[0]'s samples, then order[1]'s, ... (vectorised ranges)
        shard_of = torch.repeat_interleave(torch.arange(len(order)), counts)
        offset = torch.arange(self.n) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        stream = firsts[shard_of] + offset
        begin, end = self._span()
        run = stream[torch.arange(begin, end) % self.n]  # wrap around: the training pad
        if self.shuffle and len(run):
            g = torch.Generator().manual_seed((self.seed + self.epoch) * 1_000_003 + 7919 * (self.rank + 1))
            window = torch.arange(len(run)) // self.shuffle_buffer
            run = run[torch.argsort(window.double() + torch.rand(len(run), generator=g, dtype=torch.float64))]
        self._cache = (self.epoch, run)
        return run

    def _indices(self) -> list[int]:
        return self._rank_indices().tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices()[self.start:].tolist())

    def __len__(self) -> int:
        begin, end = self._span()
        return max(0, end - begin - self.start)


def train_sampler(dataset: Any, *, seed: int, rank: int, world_size: int,
                  shuffle_buffer: int = 1000) -> ResumableSampler:
    """The training sampler of `dataset`: a :class:`ShardSampler` when it reads prepared shards
    (it has a ``shard_set``), else a shuffled :class:`ResumableSampler`."""
    shard_set = getattr(dataset, "shard_set", None)
    if shard_set is None:
        return ResumableSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    if len(shard_set) != len(dataset):
        raise ValueError(f"{type(dataset).__name__} has {len(dataset)} samples but its shard_set "
                         f"({shard_set.spec}) holds {len(shard_set)}: a dataset exposing shard_set must index "
                         f"the shards' samples in order, one to one")
    return ShardSampler(shard_set.counts, shuffle_buffer=shuffle_buffer, shuffle=True, seed=seed, rank=rank,
                        world_size=world_size)
