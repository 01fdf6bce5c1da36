"""Video data: annotation lists, temporal sampling and the clip dataset.

Lists
    ``read_annotation_list`` reads the three list formats used by VideoMAE / VideoMAEv2 /
    mmaction2 into :class:`VideoRecord` rows:

    - ``video``: ``path label`` (space or comma separated; a label may be a class name when a
      label map is given), as in VideoMAE's ``train.csv`` and mmaction2's video lists;
    - ``pretrain``: VideoMAEv2 pretraining lists ``path start_index total_frames``;
      ``total_frames < 0`` (``path 0 -1``) marks a video file, otherwise ``path`` is a folder of
      frames whose file numbers start at ``start_index``. These rows carry no label (``-1``);
    - ``rawframes``: mmaction2 frame-folder lists ``dir total_frames label``.

Decoding
    :mod:`mm3d.video.decode` (decord, PyAV fallback, frame folders).

Sampling (pure functions of the frame count and an explicit ``np.random.Generator``)
    ``dense_sample`` (Kinetics), ``segment_sample`` (TSN, SSv2), ``uniform_clips`` and
    ``segment_clips`` (multi-clip test views). A video shorter than the clip never fails: the
    indices are clamped (a frame repeats).

Dataset
    :class:`VideoDataset` returns ``{"video", "label", "index"}`` per sample, replaces unreadable
    videos by another sample (logged and counted) and fails once too many are unreadable
    (:class:`mm3d.datacheck.FailureBudget`). ``mm3d data check`` opens every row directly instead
    (:meth:`VideoDataset.check_sample`): no replacement, and a stream that ends before the frames
    its header promises is an error. :class:`mm3d.video.shards.VideoShardDataset` gives the same
    items from prepared shards (it overrides where a row is opened and its label read).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

from mm3d.datacheck import FailureBudget, read_or_replace
from mm3d.errors import UserError
from mm3d.video.decode import Backend, FrameSource, VideoDecodeError, open_record

log = logging.getLogger(__name__)

ListFormat = Literal["auto", "video", "pretrain", "rawframes"]


# --------------------------------------------------------------------------------------------
# Annotation lists
# --------------------------------------------------------------------------------------------


class AnnotationError(UserError, ValueError):
    """A malformed annotation list or label map; the message names the file and line."""


@dataclass(frozen=True)
class VideoRecord:
    """One row of an annotation list.

    path: the video file, or the frame folder for rawframe rows, with the data root applied.
    label: class index; -1 for unlabelled pretraining rows.
    total_frames: number of frames of a frame folder; None for a video file.
    line: ``"file:lineno"`` of the row, for messages.
    start_index: number of the first frame file of a folder, when the list gives it
        (VideoMAEv2 pretraining lists); None uses the dataset's ``rawframe_start``.
    """

    path: str
    label: int
    total_frames: int | None
    line: str
    start_index: int | None = None

    @property
    def is_rawframes(self) -> bool:
        return self.total_frames is not None


def read_label_map(path: str | os.PathLike) -> list[str]:
    """Class names, one per non-empty line; the label of a class is its 0-based position."""
    names = [ln.strip() for ln in Path(path).read_text().splitlines()]
    names = [n for n in names if n]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise AnnotationError(f"{path}: label map repeats class names {sorted(dup)}")
    return names


def _split_fields(text: str) -> list[str]:
    """Comma-separated when the line has a comma (paths may then hold spaces), else whitespace."""
    if "," in text:
        return [f.strip() for f in text.split(",")]
    return text.split()


def _parse_int(token: str, what: str, where: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise AnnotationError(f"{where}: {what} {token!r} is not an integer") from None


def _detect_format(fields: list[str], where: str) -> Literal["video", "pretrain", "rawframes"]:
    if len(fields) == 2:
        return "video"
    if len(fields) == 3:
        last = fields[2]
        if re.fullmatch(r"-\d+", last):
            return "pretrain"
        return "rawframes"
    raise AnnotationError(f"{where}: cannot tell the list format from {len(fields)} fields "
                          f"{fields!r}; expected 'path label', 'path start total_frames' or "
                          f"'dir total_frames label' (pass fmt= explicitly)")


def read_annotation_list(
    path: str | os.PathLike,
    *,
    fmt: ListFormat = "auto",
    data_root: str | os.PathLike = "",
    label_map: str | os.PathLike | Sequence[str] | None = None,
    num_classes: int | None = None,
    path_map: Mapping[str, str] | None = None,
) -> list[VideoRecord]:
    """Read a video annotation list.

    Args:
        path: the list file. Blank lines and lines starting with ``#`` are skipped.
        fmt: ``video`` (``path label``), ``pretrain`` (``path start_index total_frames``, with
            ``total_frames < 0`` for video files), ``rawframes`` (``dir total_frames label``) or
            ``auto``: decided from the first row (2 fields: video; 3 fields ending with a negative
            number: pretrain; other 3 fields: rawframes). Every row must then have that layout.
        data_root: prefix joined in front of every relative path (absolute paths are kept).
        label_map: a label-map file (one class name per line) or the list of names. Labels may
            then be class names as well as integers, and must be below the number of classes.
        num_classes: the number of classes labels must stay below (defaults to the label map's
            length); e.g. a model head's size, so that a bad label fails before training.
        path_map: replaces a listed path by another before the root is applied, e.g.
            ``{"imgs": "ApplyEyeMakeup_clip"}`` for a list that names a folder by another name.

    Returns:
        The rows in file order.

    Raises:
        AnnotationError (a ValueError) naming ``file:line`` for a malformed row or a label
        outside the classes.
    """
    path = Path(path)
    names: list[str] | None
    if label_map is None:
        names = None
    elif isinstance(label_map, (str, os.PathLike)):
        names = read_label_map(label_map)
    else:
        names = list(label_map)
    if num_classes is None and names is not None:
        num_classes = len(names)
    name_to_label = {n: i for i, n in enumerate(names or [])}
    root = str(data_root)
    records: list[VideoRecord] = []
    layout: str | None = None if fmt == "auto" else fmt
    expected = {"video": 2, "pretrain": 3, "rawframes": 3}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        fields = _split_fields(text)
        if layout is None:
            layout = _detect_format(fields, where)
        if len(fields) != expected[layout] or not all(fields):
            raise AnnotationError(f"{where}: expected {expected[layout]} fields for a {layout!r} list "
                                  f"({_FORMAT_HELP[layout]}), got {len(fields)}: {text!r}")
        entry = fields[0]
        if path_map is not None:
            entry = path_map.get(entry, entry)
        full = os.path.join(root, entry) if root else entry
        start_index: int | None = None
        if layout == "pretrain":
            start_index = _parse_int(fields[1], "start index", where)
            total = _parse_int(fields[2], "total frames", where)
            label = -1
            total_frames = total if total >= 0 else None
            if total_frames is None:
                start_index = None
        else:
            label_token = fields[1] if layout == "video" else fields[2]
            if label_token in name_to_label:
                label = name_to_label[label_token]
            elif re.fullmatch(r"[+-]?\d+", label_token):
                label = int(label_token)
            elif names is None:
                raise AnnotationError(f"{where}: label {label_token!r} is not an integer (give a "
                                      f"label map to use class names)")
            else:
                raise AnnotationError(f"{where}: label {label_token!r} is neither an integer nor a "
                                      f"class of the label map")
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                raise AnnotationError(f"{where}: label {label} is outside the classes {bound}")
            total_frames = None
            if layout == "rawframes":
                total_frames = _parse_int(fields[1], "total frames", where)
                if total_frames <= 0:
                    raise AnnotationError(f"{where}: total frames {total_frames} must be positive")
        records.append(VideoRecord(full, label, total_frames, where, start_index))
    if not records:
        raise AnnotationError(f"{path}: the list has no rows")
    return records


_FORMAT_HELP = {
    "video": "'path label'",
    "pretrain": "'path start_index total_frames'",
    "rawframes": "'dir total_frames label'",
}


# --------------------------------------------------------------------------------------------
# Temporal sampling
# --------------------------------------------------------------------------------------------


def _check_count(num_frames: int, **sizes: int) -> None:
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    for name, v in sizes.items():
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")


def dense_sample(num_frames: int, clip_len: int = 16, rate: int = 4, *,
                 rng: np.random.Generator,
                 spacing: Literal["stride", "spread"] = "stride") -> np.ndarray:
    """Indices of one clip of `clip_len` frames from a random start (Kinetics-style).

    spacing:
        ``stride``: frames exactly `rate` apart, from a uniformly random start (VideoMAE's
        pretraining loader). A video shorter than the span repeats its last frame on the grid.
        ``spread``: `clip_len` points spread by ``linspace`` over a random window of
        ``clip_len * rate`` frames (VideoMAE's fine-tuning loader: the step is
        ``rate * clip_len / (clip_len - 1)``); a shorter video is spread over its frames at
        `rate` and padded with its last frame.

    Returns:
        (clip_len,) int64 indices in [0, num_frames).
    """
    _check_count(num_frames, clip_len=clip_len, rate=rate)
    if spacing == "stride":
        span = (clip_len - 1) * rate + 1
        start = int(rng.integers(num_frames - span + 1)) if num_frames >= span else 0
        idx = start + np.arange(clip_len, dtype=np.int64) * rate
        last_on_grid = start + ((num_frames - 1 - start) // rate) * rate
        return np.minimum(idx, last_on_grid)
    if spacing == "spread":
        window = clip_len * rate
        if num_frames <= window:
            idx = np.linspace(0, num_frames, num=num_frames // rate)
            idx = np.concatenate([idx, np.full(clip_len - len(idx), float(num_frames))])
            return np.clip(idx, 0, num_frames - 1).astype(np.int64)
        end = int(rng.integers(window, num_frames))
        start = end - window
        idx = np.linspace(start, end, num=clip_len)
        return np.clip(idx, start, end - 1).astype(np.int64)
    raise ValueError(f"spacing must be 'stride' or 'spread', got {spacing!r}")


def segment_sample(num_frames: int, num_segments: int = 16, *,
                   rng: np.random.Generator | None = None, test: bool = False) -> np.ndarray:
    """TSN sampling: one frame per each of `num_segments` equal segments (SSv2-style).

    Training picks a random frame inside each segment (VideoMAE's SSv2 loader); ``test=True``
    picks each segment's centre. A video with fewer frames than segments repeats frames evenly.

    Returns:
        (num_segments,) int64 indices in [0, num_frames), non-decreasing.
    """
    _check_count(num_frames, num_segments=num_segments)
    seg = np.arange(num_segments)
    if test:
        tick = num_frames / num_segments
        return np.minimum((tick / 2 + tick * seg).astype(np.int64), num_frames - 1)
    if rng is None:
        raise ValueError("segment_sample needs rng= unless test=True")
    avg = num_frames // num_segments
    if avg > 0:
        return (seg * avg + rng.integers(avg, size=num_segments)).astype(np.int64)
    return np.floor(seg * num_frames / num_segments).astype(np.int64)


def segment_clips(num_frames: int, num_segments: int, num_clips: int) -> np.ndarray:
    """Multi-clip TSN test views: clip k takes the frame at ``k / num_clips`` of every segment.

    With 2 clips these are the segment starts and the segment centres, as in VideoMAE's SSv2
    test; a single clip takes the centres (``segment_sample(test=True)``).

    Returns:
        (num_clips, num_segments) int64 indices.
    """
    _check_count(num_frames, num_segments=num_segments, num_clips=num_clips)
    if num_clips == 1:
        return segment_sample(num_frames, num_segments, test=True)[None]
    tick = num_frames / num_segments
    frac = np.arange(num_clips)[:, None] / num_clips
    idx = (tick * (np.arange(num_segments)[None, :] + frac)).astype(np.int64)
    return np.minimum(idx, num_frames - 1)


def uniform_clips(num_frames: int, clip_len: int, rate: int, num_clips: int) -> np.ndarray:
    """Multi-clip test views of `clip_len` frames `rate` apart, evenly spread over the video.

    As VideoMAE's Kinetics test: take every `rate`-th frame (padded with the last one up to
    `clip_len`), then `num_clips` windows of `clip_len` of them starting at
    ``int(k * (L - clip_len) / (num_clips - 1))``; a single clip is centred.

    Returns:
        (num_clips, clip_len) int64 indices in [0, num_frames).
    """
    _check_count(num_frames, clip_len=clip_len, rate=rate, num_clips=num_clips)
    grid = np.arange(0, num_frames, rate, dtype=np.int64)
    if len(grid) < clip_len:
        grid = np.concatenate([grid, np.full(clip_len - len(grid), grid[-1])])
    extra = len(grid) - clip_len
    if num_clips == 1:
        starts = np.array([extra // 2])
    else:
        step = extra / (num_clips - 1)
        starts = (np.arange(num_clips) * step).astype(np.int64)
    return grid[starts[:, None] + np.arange(clip_len)[None, :]]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

#: A clip transform: ``fn(video, generator) -> tensor``; see :mod:`mm3d.video.transforms`.
ClipTransform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


class VideoDataset(torch.utils.data.Dataset):
    """Clips of the videos (or frame folders) of an annotation list.

    Each item is a dict:

    - ``"video"``: train mode: the transformed clip, e.g. (C, T, H, W) float, or the raw
      (T, H, W, 3) uint8 clip without a transform; with ``num_sample > 1`` (repeated
      augmentation) the views stacked to (S, ...). Test mode: ``num_clips`` temporal clips, each
      given to the transform, which returns ``num_crops`` spatial crops (N, C, T, H, W) (see
      ``transforms.test_transform``); the V = num_clips x num_crops views are stacked clip-major
      to (V, C, T, H, W), or (C, T, H, W) when V == 1. Without a transform, test mode returns
      (num_clips, T, H, W, 3) uint8 (num_crops must then be 1), squeezed when num_clips == 1.
    - ``"label"``: long scalar;
    - ``"index"``: long scalar, the row actually returned (after a replacement), so that
      multi-view predictions can be grouped per video.

    Args:
        records: rows from :func:`read_annotation_list`; None for a subclass that reads its rows elsewhere
            and overrides ``__len__``, ``sample_source``, ``_opened`` and ``label`` (shards).
        mode: ``train`` samples randomly; ``test`` samples fixed multi-clip views.
        num_frames: frames per clip (T).
        sampling_rate: frame step of dense sampling (4 Kinetics, 2 SSv2).
        sampling: ``dense`` (clip of `num_frames` at `sampling_rate`) or ``segment`` (TSN, one
            frame per segment; `sampling_rate` unused).
        dense_spacing: see :func:`dense_sample` (train mode only).
        num_clips, num_crops: test views (5 x 3 for Kinetics, 2 x 3 for SSv2).
        num_sample: repeated augmentation: views of one decoded clip per train item.
        transform: ``fn(video (T, H, W, 3) uint8, generator) -> tensor``.
        backend, num_threads, decode_device: video decoder (see :func:`mm3d.video.decode.open_video`);
            with ``decode_device="cuda"`` the clips are decoded and transformed on the GPU (the loader
            then needs ``num_workers=0``: CUDA does not work in forked workers).
        rawframe_template, rawframe_start: frame file names of rawframe rows.
        max_failure_ratio: unreadable rows are logged, replaced by the next readable row and
            counted (``failed``); once more than this fraction of the rows has failed, loading
            raises :class:`~mm3d.datacheck.BadDataError` naming them. 0 fails on the first
            unreadable row. The count is per process: with DataLoader workers each worker counts
            the rows it met. :meth:`check_sample` reads a row without replacement.
        seed: base seed of the training items' random streams: item `i` of epoch `e` draws its
            frames, crop and flip from (seed, e, i) alone (:meth:`set_epoch`), the same in any
            loader worker and after a resume.
    """

    def __init__(self, records: Sequence[VideoRecord] | None, *, mode: Literal["train", "test"],
                 num_frames: int = 16, sampling_rate: int = 4,
                 sampling: Literal["dense", "segment"] = "dense",
                 dense_spacing: Literal["stride", "spread"] = "stride", num_clips: int = 1,
                 num_crops: int = 1, num_sample: int = 1, transform: ClipTransform | None = None,
                 backend: Backend = "auto", num_threads: int = 1, decode_device: str = "cpu",
                 rawframe_template: str = "img_{:05d}.jpg", rawframe_start: int = 1,
                 max_failure_ratio: float = 0.01, seed: int = 0) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        if sampling not in ("dense", "segment"):
            raise ValueError(f"sampling must be 'dense' or 'segment', got {sampling!r}")
        if records is not None and not records:
            raise ValueError("VideoDataset needs at least one record")
        for name, v in dict(num_frames=num_frames, sampling_rate=sampling_rate,
                            num_clips=num_clips, num_crops=num_crops,
                            num_sample=num_sample).items():
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if mode == "test" and transform is None and num_crops > 1:
            raise ValueError("num_crops > 1 needs a test transform that makes the crops")
        if records is not None:
            self.records = list(records)
        self.mode = mode
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.sampling = sampling
        self.dense_spacing = dense_spacing
        self.num_clips = num_clips
        self.num_crops = num_crops
        self.num_sample = num_sample
        self.transform = transform
        self.backend: Backend = backend
        self.num_threads = num_threads
        self.decode_device = decode_device
        self.rawframe_template = rawframe_template
        self.rawframe_start = rawframe_start
        self.max_failure_ratio = max_failure_ratio
        self.seed = seed
        self._budget = FailureBudget(len(self), max_failure_ratio, noun="videos", logger=log)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def failed(self) -> dict[int, str]:
        """``{row: reason}`` of the rows that could not be read (and were replaced) in this process."""
        return self._budget.failed

    def sample_source(self, index: int) -> tuple[str, str]:
        """``(file or frame folder, "list:line")`` of row `index`."""
        record = self.records[index]
        return record.path, record.line

    def check_sample(self, index: int) -> None:
        """Open row `index` directly (no replacement) and decode the frames of its evaluation views and its
        first and final frames; raises :class:`VideoDecodeError` naming the file when it cannot.

        A stream that ends before the frames its header promises is an error here (the loaders
        repeat its last frame). Used by ``mm3d data check`` and to name the reason of a row an
        evaluation did not score.
        """
        with self._opened(index, strict=True) as src:
            n = src.num_frames
            if self.sampling == "dense":
                views = uniform_clips(n, self.num_frames, self.sampling_rate, self.num_clips)
            else:
                views = segment_clips(n, self.num_frames, self.num_clips)
            src.get(np.unique(np.concatenate([views.reshape(-1), [0, n - 1]])))

    @contextlib.contextmanager
    def _opened(self, index: int, *, strict: bool = False) -> Iterator[FrameSource]:
        """Row `index` opened with this dataset's decoder settings and closed after use; any reader
        failure, opening or reading, becomes a :class:`VideoDecodeError` naming the file.

        The hook of datasets that read their videos elsewhere (e.g. from the bytes of a shard,
        :class:`mm3d.video.shards.VideoShardDataset`), together with :meth:`label`."""
        record = self.records[index]
        try:
            src = open_record(record, backend=self.backend, num_threads=self.num_threads,
                              rawframe_template=self.rawframe_template,
                              rawframe_start=self.rawframe_start, strict=strict, device=self.decode_device)
            try:
                yield src
            finally:
                src.close()
        except VideoDecodeError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad sample
            raise VideoDecodeError(f"{record.path}: {type(e).__name__}: {e}") from e

    def set_epoch(self, epoch: int) -> None:
        """The training epoch (the trainer sets it before each epoch's loader): part of every item's
        random stream, so each epoch draws new clips and crops."""
        self.epoch = int(epoch)

    def _stream(self, index: int = 0) -> np.random.Generator:
        """Row `index`'s random stream this epoch: a function of (seed, epoch, index) only, so an
        item's frames and crop do not depend on the loader worker that reads it, on how many items
        that worker read before, or on where a resumed run restarted the epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def frame_indices(self, num_frames: int, rng: np.random.Generator | None) -> np.ndarray:
        """(T,) train indices or (num_clips, T) test indices for a video of `num_frames`."""
        if self.mode == "train":
            assert rng is not None
            if self.sampling == "dense":
                return dense_sample(num_frames, self.num_frames, self.sampling_rate, rng=rng,
                                    spacing=self.dense_spacing)
            return segment_sample(num_frames, self.num_frames, rng=rng)
        if self.sampling == "dense":
            return uniform_clips(num_frames, self.num_frames, self.sampling_rate, self.num_clips)
        return segment_clips(num_frames, self.num_frames, self.num_clips)

    def label(self, index: int, source: FrameSource) -> int:
        """The class of row `index` (-1: unlabelled), given its opened video."""
        return self.records[index].label

    def _read(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        with self._opened(index) as src:
            return src.get(self.frame_indices(src.num_frames, rng)), self.label(index, src)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._stream(index) if self.mode == "train" else None
        i, (frames, label) = read_or_replace(index, len(self), lambda j: self._read(j, rng), self._budget,
                                             self.sample_source, errors=(VideoDecodeError,))
        gen = torch.Generator()
        if rng is not None:
            gen.manual_seed(int(rng.integers(2**63)))
        video = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
        out = self._apply(video, gen)
        return {"video": out, "label": torch.tensor(label, dtype=torch.long),
                "index": torch.tensor(i, dtype=torch.long)}

    def _apply(self, video: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.mode == "train":
            if self.transform is None:
                views = [video] * self.num_sample
            else:
                views = [self.transform(video, gen) for _ in range(self.num_sample)]
            return views[0] if self.num_sample == 1 else torch.stack(views)
        # test: video is (num_clips, T, H, W, 3)
        if self.transform is None:
            return video[0] if self.num_clips == 1 else video
        views = []
        for clip in video:
            crops = self.transform(clip, gen)
            if crops.dim() == 4:  # a single-view transform
                crops = crops[None]
            if crops.shape[0] != self.num_crops:
                raise ValueError(f"the test transform made {crops.shape[0]} crops, the dataset "
                                 f"expects num_crops={self.num_crops}")
            views.append(crops)
        stacked = torch.cat(views)  # (num_clips * num_crops, C, T, H, W), clip-major
        return stacked[0] if stacked.shape[0] == 1 else stacked


__all__ = [
    "VideoRecord", "read_label_map", "read_annotation_list", "dense_sample", "segment_sample", "segment_clips",
    "uniform_clips", "VideoDataset",
]
