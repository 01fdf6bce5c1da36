"""Prepared video shards: the ``video`` preparer of ``mm3d data prepare`` and clip datasets over shards.

Prepare (:class:`VideoPreparer`, registered as ``mm3d data prepare --kind video``)
    Every row of an annotation list (any format of :func:`mm3d.video.data.read_annotation_list`:
    ``path label``, ``path start total_frames``, ``dir total_frames label``) is transcoded with PyAV
    to an H.264 mp4 in memory:

    - short side ``short_side`` (default 320, as the VideoMAE authors resized Kinetics and SSv2),
      never upscaled, both sides even (yuv420p), bicubic scaling (FFmpeg's ``scale`` default);
    - a keyframe every ``gop`` frames exactly (``keyint=min-keyint=gop``, no scene-cut keyframes, no
      B-frames), so that a decoder seeking to any frame decodes at most ``gop - 1`` frames before it;
    - CRF 23 (x264's default quality: on the ``mm3d bench-data`` videos the prepared frames differ from a
      lossless bicubic resize of the source by 1.8 grey levels of 255 on average), preset ``veryfast``
      (prepare time, not decode time, is what the preset changes);
    - the source frame rate and every decoded frame (frames are renumbered 0, 1, ... at that rate, so
      the frame count of the mp4 header is exact); rawframe folders are encoded the same way at
      ``rawframe_fps`` (their lists carry no rate). Audio is dropped.

    A sample is ``key.mp4`` + ``key.json`` ``{"label", "fps", "frames", "width", "height", "source",
    "list", "line", "gop"}``; a key is the row number and the file stem (``000123_abseiling_xyz``).
    An input that cannot be decoded raises, and the driver (:mod:`mm3d.prepare`) lists it.

Datasets (:class:`VideoShardDataset`)
    The clips of :class:`~mm3d.video.data.VideoDataset` (same sampling, transforms, test views, repeated
    augmentation, failure budget and replacement, ``check_sample``), decoded from the ``key.mp4`` bytes
    of the shards in memory, with the label of ``key.json``. It exposes ``shard_set``, so the trainer
    draws its training order with :class:`mm3d.shards.ShardSampler` (shard locality, exact resume).
    :func:`shard_dataset_spec` maps the ``data.format / shards / val_shards / test_shards`` keys of a
    config to the shards of one split.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from mm3d.config import ConfigError
from mm3d.registry import PREPARERS, PrepareItem
from mm3d.shards import ShardSamples, ShardSet, has_split, safe_key
from mm3d.video.data import VideoDataset, VideoRecord, read_annotation_list, read_label_map
from mm3d.video.decode import FrameSource, RawFrameSource, VideoDecodeError, open_video

log = logging.getLogger(__name__)

__all__ = ["TranscodeSettings", "scaled_size", "transcode", "sample_key", "VideoPreparer", "VideoShardDataset",
           "shard_dataset_spec", "check_shard_keys", "check_shard_modality"]

DEFAULT_SHORT_SIDE = 320
DEFAULT_GOP = 16
DEFAULT_CRF = 23
DEFAULT_PRESET = "veryfast"
DEFAULT_RAWFRAME_FPS = 30.0


# --------------------------------------------------------------------------------------------
# Transcoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscodeSettings:
    """How a video is re-encoded (see the module docstring); ``as_dict()`` goes to the manifest."""

    short_side: int = DEFAULT_SHORT_SIDE
    gop: int = DEFAULT_GOP
    crf: int = DEFAULT_CRF
    preset: str = DEFAULT_PRESET
    rawframe_template: str = "img_{:05d}.jpg"
    rawframe_start: int = 1
    rawframe_fps: float = DEFAULT_RAWFRAME_FPS

    def __post_init__(self) -> None:
        if self.short_side < 2:
            raise ValueError(f"short_side must be >= 2, got {self.short_side}")
        if self.gop < 1:
            raise ValueError(f"gop must be >= 1, got {self.gop}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51] (x264), got {self.crf}")
        if self.rawframe_fps <= 0:
            raise ValueError(f"rawframe_fps must be positive, got {self.rawframe_fps}")

    def as_dict(self) -> dict[str, Any]:
        return {"short_side": self.short_side, "gop": self.gop, "crf": self.crf, "preset": self.preset,
                "codec": "libx264", "pix_fmt": "yuv420p", "rawframe_template": self.rawframe_template,
                "rawframe_start": self.rawframe_start, "rawframe_fps": self.rawframe_fps}


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side brought down to `short_side` (never up), aspect kept, both
    rounded to even numbers (yuv420p needs them): 1280x720 -> 568x320, 340x256 -> 340x256."""
    if width < 1 or height < 1:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    scale = min(1.0, short_side / min(width, height))
    even = lambda v: max(2, int(round(v * scale / 2)) * 2)  # noqa: E731
    return even(width), even(height)


def _frame_rate(stream: Any, where: str) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise VideoDecodeError(f"{where}: the video stream has no frame rate")
    return Fraction(rate).limit_denominator(1001 * 1000)


class _Encoder:
    """An H.264 mp4 written into memory, frame by frame (frames renumbered 0, 1, ... at `rate`)."""

    def __init__(self, width: int, height: int, rate: Fraction, s: TranscodeSettings) -> None:
        import av

        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.thread_count = 1  # one clip per worker process (threads=1 below: x264 sees this one only there)
        self.stream.options = {"crf": str(s.crf), "preset": s.preset,
                               "x264-params": f"keyint={s.gop}:min-keyint={s.gop}:scenecut=0:bframes=0:threads=1"}
        self.time_base = Fraction(1) / rate
        self.width, self.height = width, height
        self.count = 0

    def add(self, frame: Any) -> None:
        """`frame`: an ``av.VideoFrame`` of any size and format; scaled to the output size."""
        import av
        from av.video.frame import PictureType

        out = frame.reformat(width=self.width, height=self.height, format="yuv420p", interpolation="BICUBIC")
        # x264 gets a frame built from the scaled pixels alone: fed the scaler's frame directly, the same
        # source encoded to other bytes about once in 100 (2 of 300 in one process; never through this
        # copy, 0 of 900), which broke byte-identical shards for any --workers. The pixels were always
        # equal, so x264 read something else of that frame (its buffer beyond the picture, presumably).
        out = av.VideoFrame.from_ndarray(out.to_ndarray(), format="yuv420p")
        out.pts, out.time_base = self.count, self.time_base
        # a decoded frame keeps its picture type (I/P/B), and libx264 obeys it: a source keyframe would become
        # an extra keyframe here. The encoder alone decides (the fixed interval).
        out.pict_type = PictureType.NONE
        for packet in self.stream.encode(out):
            self.container.mux(packet)
        self.count += 1

    def finish(self) -> bytes:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        return self.buffer.getvalue()


def _transcode_file(path: str, s: TranscodeSettings) -> tuple[bytes, dict[str, Any]]:
    import av

    with av.open(path) as src:
        if not src.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        stream = src.streams.video[0]
        stream.thread_type = "AUTO"  # frame-threaded decoding of the source (the encoder stays single-threaded)
        rate = _frame_rate(stream, path)
        enc: _Encoder | None = None
        for frame in src.decode(stream):
            if enc is None:
                enc = _Encoder(*scaled_size(frame.width, frame.height, s.short_side), rate, s)
            enc.add(frame)
        if enc is None:
            raise VideoDecodeError(f"{path}: no frames could be decoded")
        data = enc.finish()
    return data, {"fps": float(rate), "frames": enc.count, "width": enc.width, "height": enc.height}


def _transcode_rawframes(record: VideoRecord, s: TranscodeSettings) -> tuple[bytes, dict[str, Any]]:
    import av

    start = s.rawframe_start if record.start_index is None else record.start_index
    src = RawFrameSource(record.path, record.total_frames, template=s.rawframe_template, start=start)
    rate = Fraction(s.rawframe_fps).limit_denominator(1001 * 1000)
    enc: _Encoder | None = None
    first: tuple[int, int] = (0, 0)
    for i in range(src.num_frames):
        image = src.get(np.array([i]))[0]  # (H, W, 3) uint8
        size = (image.shape[1], image.shape[0])
        if enc is None:
            first = size
            enc = _Encoder(*scaled_size(*size, s.short_side), rate, s)
        elif size != first:
            raise VideoDecodeError(f"{record.path}: frame {i} is {size[0]}x{size[1]}, the first is "
                                   f"{first[0]}x{first[1]}")
        enc.add(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
    assert enc is not None  # RawFrameSource refuses an empty folder
    return enc.finish(), {"fps": float(rate), "frames": enc.count, "width": enc.width, "height": enc.height}


def transcode(record: VideoRecord, settings: TranscodeSettings) -> tuple[bytes, dict[str, Any]]:
    """Re-encode one list row (a video file or a frame folder) -> (mp4 bytes, ``{"fps", "frames", "width",
    "height"}``). Raises (VideoDecodeError, FileNotFoundError, FFmpeg errors) when the input cannot be read."""
    if record.is_rawframes:
        return _transcode_rawframes(record, settings)
    if not os.path.isfile(record.path):
        raise FileNotFoundError(f"{record.path}: file does not exist")
    return _transcode_file(record.path, settings)


# --------------------------------------------------------------------------------------------
# The preparer
# --------------------------------------------------------------------------------------------


def sample_key(index: int, path: str) -> str:
    """The key of row `index`: ``000123_<file stem>`` (:func:`mm3d.shards.safe_key`; no dots)."""
    return safe_key(index, Path(path.rstrip("/")).name.split(".")[0])


def _settings_from(values: Mapping[str, Any]) -> TranscodeSettings:
    known = TranscodeSettings.__dataclass_fields__
    return TranscodeSettings(**{k: v for k, v in values.items() if k in known})


class VideoPreparer:
    """``mm3d data prepare --kind video``: transcode the rows of an annotation list (see the module docstring)."""

    modality = "video"
    tasks = ("videomae_pretrain", "videomae_finetune", "videomae_linprobe")

    def add_arguments(self, parser: Any) -> None:
        """The video options of ``mm3d data prepare`` (``--short-side`` belongs to the driver)."""
        g = parser.add_argument_group("video (--kind video)")
        g.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE, help=f"resize the short side to "
                       f"this (default {DEFAULT_SHORT_SIDE}, as VideoMAE for K400/SSv2; never upscaled)")
        g.add_argument("--label-map", default="", help="class names, one a line: lists may name classes; "
                       "the names go into the manifest")
        g.add_argument("--list-format", default="auto", choices=["auto", "video", "pretrain", "rawframes"])
        g.add_argument("--gop", type=int, default=DEFAULT_GOP, help=f"keyframe interval in frames "
                       f"(default {DEFAULT_GOP}: a 16x4 clip starts at most {DEFAULT_GOP - 1} frames after one)")
        g.add_argument("--crf", type=int, default=DEFAULT_CRF, help=f"x264 quality (default {DEFAULT_CRF})")
        g.add_argument("--preset", default=DEFAULT_PRESET, help=f"x264 preset (default {DEFAULT_PRESET})")
        g.add_argument("--rawframe-template", default="img_{:05d}.jpg")
        g.add_argument("--rawframe-start", type=int, default=1)
        g.add_argument("--rawframe-fps", type=float, default=DEFAULT_RAWFRAME_FPS,
                       help="frame rate given to frame folders (their lists have none)")

    # ---- the list form ----------------------------------------------------------------------

    def items(self, args: Any) -> list[PrepareItem]:
        lists = [p.strip() for p in str(args.list).split(",") if p.strip()]
        if not lists:
            raise ValueError("--list is empty: give an annotation list")
        label_map = getattr(args, "label_map", "") or None
        records: list[VideoRecord] = []
        for one in lists:
            records += read_annotation_list(one, fmt=getattr(args, "list_format", "auto"),
                                            data_root=getattr(args, "root", "") or "", label_map=label_map)
        return self._items(records)

    def settings(self, args: Any) -> dict[str, Any]:
        short = getattr(args, "short_side", None)
        s = TranscodeSettings(short_side=DEFAULT_SHORT_SIDE if short is None else int(short),
                              gop=getattr(args, "gop", DEFAULT_GOP), crf=getattr(args, "crf", DEFAULT_CRF),
                              preset=getattr(args, "preset", DEFAULT_PRESET),
                              rawframe_template=getattr(args, "rawframe_template", "img_{:05d}.jpg"),
                              rawframe_start=getattr(args, "rawframe_start", 1),
                              rawframe_fps=getattr(args, "rawframe_fps", DEFAULT_RAWFRAME_FPS))
        return s.as_dict()

    def classes(self, args_or_cfg: Any) -> list[str] | None:
        """Class names for the manifest: of ``--label-map``, or of a config's ``data.label_map``."""
        d = getattr(args_or_cfg, "data", None)
        if d is not None:
            return read_label_map(_config_file(d.label_map, d.root)) if d.label_map else None
        path = getattr(args_or_cfg, "label_map", "")
        return read_label_map(path) if path else None

    # ---- the config form --------------------------------------------------------------------

    def from_config(self, cfg: Any, split: str, args: Any = None) -> tuple[list[PrepareItem], dict[str, Any]] | None:
        """The rows of ``data.<split>_list`` of a VideoMAE pretraining or fine-tuning config (None when the
        config has no such list) and the settings of the command line `args` (defaults without it) with the
        config's frame-folder names."""
        d = cfg.data
        list_path = getattr(d, f"{split}_list", "") or ""
        if not list_path.strip():
            return None
        label_map = _config_file(d.label_map, d.root) if getattr(d, "label_map", "") else None
        # a fine-tuning head bounds the labels; a pretraining list only needs them to be valid
        num_classes = None if cfg.task == "videomae_pretrain" else cfg.model.num_classes
        records: list[VideoRecord] = []
        for one in (p.strip() for p in list_path.split(",") if p.strip()):
            records += read_annotation_list(_config_file(one, d.root), fmt=d.list_format, data_root=d.root,
                                            label_map=label_map, num_classes=num_classes)
        s = {**self.settings(args), "rawframe_template": d.rawframe_template, "rawframe_start": d.rawframe_start}
        return self._items(records), _settings_from(s).as_dict()

    @staticmethod
    def _items(records: Sequence[VideoRecord]) -> list[PrepareItem]:
        return [PrepareItem(key=sample_key(i, r.path), source=r.path, line=r.line,
                            info={"label": r.label, "total_frames": r.total_frames, "start_index": r.start_index})
                for i, r in enumerate(records)]

    # ---- one item (in a worker process) ---------------------------------------------------

    def convert(self, item: PrepareItem, settings: dict[str, Any]) -> dict[str, bytes]:
        info = item.info
        record = VideoRecord(item.source, int(info["label"]), info.get("total_frames"), item.line,
                             info.get("start_index"))
        data, meta = transcode(record, _settings_from(settings))
        list_file, _, lineno = item.line.rpartition(":")
        head = {"label": record.label, **meta, "source": item.source, "list": list_file,
                "line": int(lineno) if lineno.isdigit() else item.line, "gop": int(settings.get("gop", DEFAULT_GOP))}
        return {"mp4": data, "json": json.dumps(head).encode()}


def _config_file(path: str, root: str) -> str:
    """A list or label map of a config: as given, else under `root` (as the video tasks look them up)."""
    p = Path(path)
    if not p.is_file() and root and not p.is_absolute() and (Path(root) / p).is_file():
        return str(Path(root) / p)
    return str(p)


# --------------------------------------------------------------------------------------------
# Datasets over shards
# --------------------------------------------------------------------------------------------


def check_shard_modality(shard_set: ShardSet) -> None:
    """Refuse shards that a manifest says hold another modality (point clouds in a video run)."""
    modality = shard_set.meta.get("modality")
    if modality not in (None, "video"):
        raise ConfigError(f"{shard_set.spec}: these shards hold {modality} samples (manifest mm3d.modality), "
                          f"a video task needs shards prepared with `mm3d data prepare --kind video`")


def check_shard_keys(data: Any) -> None:
    """Validate the shard keys of a video data config (``format``, ``shards``, ``val_shards``,
    ``test_shards`` when it has one, ``shuffle_buffer``); ValueError naming the key."""
    if data.shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {data.shuffle_buffer}")
    if data.format == "shards" and not (data.shards or data.val_shards or getattr(data, "test_shards", "")):
        raise ValueError("format=shards needs data.shards: a folder of shards, a manifest.json, a brace pattern or "
                         "a prepared root (`mm3d data prepare ... --out DIR`)")
    if data.format == "files" and (data.shards or data.val_shards or getattr(data, "test_shards", "")):
        raise ValueError("data.shards / val_shards / test_shards are set but format=files reads the lists: set "
                         "data.format=shards to read the shards")


def shard_dataset_spec(shards: str, val_shards: str, test_shards: str, split: str) -> str | None:
    """The shards of `split` from the ``data.shards / val_shards / test_shards`` keys: the split's own key,
    else (val, test) the split of the prepared root ``data.shards`` when its ``dataset.json`` has it, else
    None. (:func:`mm3d.shards.resolve_shards` picks the split's folder of a prepared root.)"""
    own = {"train": shards, "val": val_shards, "test": test_shards}[split]
    if own:
        return own
    if split != "train" and shards and has_split(shards, split):
        return shards
    return None


class _ShardClip:
    """A decoded shard sample: the FrameSource of its ``key.mp4`` and the header of its ``key.json``."""

    def __init__(self, source: FrameSource, info: dict[str, Any]) -> None:
        self.source, self.info = source, info
        self.path, self.backend = source.path, source.backend

    @property
    def num_frames(self) -> int:
        return self.source.num_frames

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.source.get(indices)

    def close(self) -> None:
        self.source.close()


class VideoShardDataset(VideoDataset):
    """The clips of :class:`~mm3d.video.data.VideoDataset` from prepared shards (``key.mp4`` + ``key.json``).

    Items, sampling, transforms, views, repeated augmentation and the replacement of unreadable samples
    are those of :class:`VideoDataset` (all its keyword arguments are accepted; the frame-folder ones are
    unused): only where a row comes from differs. A row is a shard sample, decoded in memory by
    :func:`mm3d.video.decode.open_video`; its label is ``key.json``'s. ``sample_source(i)`` is
    ``(shard, key)``.

    Args:
        shards: a shard spec (folder, manifest, brace pattern, prepared root) or a resolved ShardSet.
        split: the split of a prepared root.
        num_classes: labels must lie below it (a fine-tuning head), else loading raises naming the sample.
        **kwargs: the keyword arguments of :class:`VideoDataset` (``mode``, ``num_frames``, ...).

    Attributes:
        shard_set: the resolved shards (the trainer then samples with :class:`mm3d.shards.ShardSampler`).
        classes: the class names of the manifest, or None.
    """

    def __init__(self, shards: str | ShardSet, *, split: str = "train", num_classes: int | None = None,
                 **kwargs: Any) -> None:
        self.samples = ShardSamples(shards, split=split)
        self.shard_set: ShardSet = self.samples.shard_set
        check_shard_modality(self.shard_set)
        if not len(self.samples):
            raise ValueError(f"{self.shard_set.spec}: the shards hold no samples")
        self.classes: list[str] | None = self.shard_set.meta.get("classes")
        if num_classes is not None and self.classes is not None and len(self.classes) != num_classes:
            raise ConfigError(f"{self.shard_set.spec}: the manifest names {len(self.classes)} classes, the "
                              f"model has num_classes={num_classes}")
        self.num_classes = num_classes
        super().__init__(None, **kwargs)

    def __len__(self) -> int:
        return len(self.samples)

    def sample_ids(self) -> list[str]:
        """``"<shard file name>:<key>"`` of every sample (the key holds the source's file stem), for reports."""
        return [f"{Path(url).name}:{key}" for url, key in map(self.samples.source, range(len(self)))]

    def sample_source(self, index: int) -> tuple[str, str]:
        """``(shard file, "key <sample key>")`` of sample `index`."""
        url, key = self.samples.source(index)
        return url, f"key {key}" if key else f"sample {index}"

    @contextlib.contextmanager
    def _opened(self, index: int, *, strict: bool = False) -> Iterator[_ShardClip]:
        name = f"{self.shard_set.urls[self.samples.locate(index)[0]]}:sample {index}"
        try:
            sample = self.samples[index]
            name = f"{sample['__shard__']}:{sample['__key__']}"
            if "mp4" not in sample or "json" not in sample:
                raise VideoDecodeError(f"{name}: the sample has no key.mp4 + key.json (members: "
                                       f"{sorted(k for k in sample if not k.startswith('__'))})")
            info = json.loads(sample["json"])
            src = open_video(sample["mp4"], name=name, backend=self.backend, num_threads=self.num_threads,
                             strict=strict, device=self.decode_device)
        except VideoDecodeError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable tar member or header is a bad sample
            raise VideoDecodeError(f"{name}: {type(e).__name__}: {e}") from e
        clip = _ShardClip(src, info)
        try:
            self._check_header(clip, name, strict)  # a label outside the classes is an error, not a bad sample
            try:
                yield clip
            except VideoDecodeError:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
                raise VideoDecodeError(f"{name}: {type(e).__name__}: {e}") from e
        finally:
            clip.close()

    def _check_header(self, clip: _ShardClip, name: str, strict: bool) -> None:
        label = clip.info.get("label", -1)
        if not isinstance(label, int) or label < -1 or (self.num_classes is not None
                                                         and not 0 <= label < self.num_classes):
            bound = f"[0, {self.num_classes})" if self.num_classes is not None else ">= -1"
            raise ValueError(f"{name}: key.json label {label!r} is outside the classes {bound}")
        frames = clip.info.get("frames")
        if strict and frames is not None and frames != clip.num_frames:
            raise VideoDecodeError(f"{name}: key.json says {frames} frames, the mp4 has {clip.num_frames}")

    def label(self, index: int, source: FrameSource) -> int:
        """The label of ``key.json`` (checked against the classes when the sample was opened)."""
        assert isinstance(source, _ShardClip)
        return int(source.info.get("label", -1))


PREPARERS.add("video", VideoPreparer())
