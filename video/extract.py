"""Video features for ``mm3d extract``: windows slid over whole videos (snippet features).

Each video (a file any of our decoders reads, GIFs included, or a frame folder) is covered by
windows of ``window`` frames whose starts are ``stride`` frames apart, from frame 0 while a whole
window fits (a video shorter than one window gets one window, its last frame repeated). A window
gives the model ``model.num_frames`` frames spread evenly over it (frame ``start + k * window //
num_frames``), prepared as the checkpoint's evaluation view (short side resized, centre crop,
ImageNet normalisation; :func:`mm3d.video.transforms.test_transform`). The defaults are the
checkpoint's clip: ``window = num_frames x data.sampling_rate`` frames, ``stride = window``.

Outputs per video: ``NAME.npy``, (num_windows, D) pooled features (``--pool none``: (num_windows,
L, D) tokens), and ``NAME.csv``, one row per window: ``video`` (NAME), ``path``, ``window``,
``start_frame``, ``end_frame`` (one past the last frame the window covers), ``start_sec`` and
``end_sec`` (frame / fps) and ``fps`` (the container's frame rate; ``--fps`` for frame folders and
videos that state none, whose seconds are otherwise left empty).

This is the layout of VideoMAEv2's temporal-action-detection features (``extract_tad_feature.py``:
one ``<video>.npy`` of (num_windows, D) per video, 16-frame windows every 4 frames for THUMOS14,
the classifier's mean-pooled ``fc_norm`` feature), which ActionFormer reads with ``feat_stride``
= stride and ``num_frames`` = window.

Frames are decoded once each, in order (PyAV streams sequentially; decord and frame folders read
blocks), and prepared once each; each block of ``--batch-size`` windows is one forward pass.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from mm3d.errors import UserError
from mm3d.extract import ExtractInput, ExtractOptions, ExtractResult, FeatureExtractor, register_extractor, save_npy
from mm3d.video.decode import FrameSource, RawFrameSource, VideoDecodeError, open_video
from mm3d.video.transforms import test_transform

log = logging.getLogger(__name__)

FRAME_BLOCK = 32  # frames decoded and prepared together


class Windows(NamedTuple):
    """Sliding windows over a video. start, end: (W,) first frame and one past the last frame each
    window covers; indices: (W, T) the frames given to the model."""

    start: np.ndarray
    end: np.ndarray
    indices: np.ndarray


def sliding_windows(num_frames: int, window: int, stride: int, clip_len: int) -> Windows:
    """Windows of `window` frames, starts `stride` apart from frame 0 while a whole window fits
    (``1 + (num_frames - window) // stride`` of them; one window when the video is shorter), each
    sampled at `clip_len` frames ``start + k * window // clip_len`` (k < clip_len), clamped to the
    last frame."""
    for name, v in dict(num_frames=num_frames, window=window, stride=stride, clip_len=clip_len).items():
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    start = np.arange(0, max(num_frames - window, 0) + 1, stride, dtype=np.int64)
    offsets = np.arange(clip_len, dtype=np.int64) * window // clip_len
    indices = np.minimum(start[:, None] + offsets[None, :], num_frames - 1)
    return Windows(start, np.minimum(start + window, num_frames), indices)


def video_fps(path: str | os.PathLike) -> float | None:
    """The frame rate a video's container states (PyAV: average, else guessed rate), None when
    it states none or cannot be opened by PyAV."""
    import av

    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    except Exception as e:  # noqa: BLE001 - FFmpeg errors of every kind: the rate is then unknown
        log.debug("%s: no frame rate from PyAV: %s", path, e)
        return None
    return float(rate) if rate else None


def _pyav_blocks(path: str, wanted: np.ndarray, block: int, num_threads: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One sequential PyAV pass: (indices (n,), frames (n, H, W, 3) uint8) blocks of the sorted,
    unique `wanted` frames. Frames past the end of a stream shorter than its header take the last
    decoded frame (as the loaders do)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = max(0, int(num_threads))
        pos, ids, frames, last = 0, [], [], None
        for i, frame in enumerate(container.decode(stream)):
            last = frame
            if i == wanted[pos]:
                ids.append(i)
                frames.append(frame.to_ndarray(format="rgb24"))
                pos += 1
                if len(ids) == block:
                    yield np.asarray(ids), np.stack(frames)
                    ids, frames = [], []
                if pos == len(wanted):
                    break
        if pos < len(wanted):
            if last is None:
                raise VideoDecodeError(f"{path}: PyAV decoded no frames")
            log.debug("%s: the stream ends before frame %d; repeating its last frame", path, wanted[pos])
            tail = last.to_ndarray(format="rgb24")
            for i in wanted[pos:]:
                ids.append(int(i))
                frames.append(tail)
        if ids:
            yield np.asarray(ids), np.stack(frames)


def _blocks(src: FrameSource, wanted: np.ndarray, block: int, num_threads: int
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices (n,), frames (n, H, W, 3) uint8) blocks of the sorted, unique `wanted` frames."""
    if src.backend == "pyav":  # sequential decoding: one pass, not one per block
        yield from _pyav_blocks(src.path, wanted, block, num_threads)
        return
    for lo in range(0, len(wanted), block):
        ids = wanted[lo:lo + block]
        yield ids, src.get(ids)


class _Chunk(NamedTuple):
    """A block of one video's windows, prepared (or why the video failed).

    position: the video's place in the job's inputs; first: index of the first window here;
    clips: (n, C, T, S, S) evaluation views; windows, fps: the video's windows and frame rate
    (every chunk carries them); error: set when the video failed (then nothing else is)."""

    position: int
    first: int = 0
    clips: torch.Tensor | None = None
    windows: Windows | None = None
    fps: float | None = None
    error: str | None = None


class _ChunkStream(torch.utils.data.IterableDataset):
    """The chunks of every input video, in order; DataLoader workers take every n-th video."""

    def __init__(self, inputs: Sequence[ExtractInput], *, window: int, stride: int, clip_len: int, transform: Any,
                 chunk: int, fps: float | None, data: Any) -> None:
        self.inputs = list(inputs)
        self.window, self.stride, self.clip_len = window, stride, clip_len
        self.transform, self.chunk, self.fps, self.data = transform, chunk, fps, data

    def __iter__(self) -> Iterator[_Chunk]:
        worker = torch.utils.data.get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for position in range(first, len(self.inputs), step):
            yield from self._video(position)

    def _open(self, path: str) -> FrameSource:
        d = self.data
        if os.path.isdir(path):
            return RawFrameSource(path, None, template=d.rawframe_template, start=d.rawframe_start)
        return open_video(path, backend=d.backend, num_threads=d.num_threads)

    def _video(self, position: int) -> Iterator[_Chunk]:
        path = self.inputs[position].path
        try:
            src = self._open(path)
        except (VideoDecodeError, OSError, ValueError) as e:
            yield _Chunk(position, error=str(e) if path in str(e) else f"{path}: {e}")
            return
        try:
            win = sliding_windows(src.num_frames, self.window, self.stride, self.clip_len)
            fps = (None if os.path.isdir(path) else video_fps(path)) or self.fps
            blocks = _blocks(src, np.unique(win.indices), FRAME_BLOCK, self.data.num_threads)
            views: dict[int, torch.Tensor] = {}  # prepared frames (C, S, S) still needed
            loaded = -1
            for lo in range(0, len(win.start), self.chunk):
                idx = win.indices[lo:lo + self.chunk]  # (n, T)
                while loaded < idx.max():
                    ids, frames = next(blocks)
                    prepared = self.transform(torch.from_numpy(frames))[0]  # (C, n, S, S): every frame alike
                    views.update({int(i): prepared[:, j] for j, i in enumerate(ids)})
                    loaded = int(ids[-1])
                clips = torch.stack([torch.stack([views[int(i)] for i in row], dim=1) for row in idx])
                if lo + self.chunk < len(win.start):
                    keep_from = int(win.indices[lo + self.chunk:].min())
                    for i in [i for i in views if i < keep_from]:
                        del views[i]
                yield _Chunk(position, lo, clips, win, fps)
        except (VideoDecodeError, OSError, ValueError, RuntimeError, StopIteration) as e:
            msg = str(e) or type(e).__name__
            yield _Chunk(position, error=msg if path in msg else f"{path}: {type(e).__name__}: {msg}")
        finally:
            src.close()


class VideoFeatureExtractor(FeatureExtractor):
    """Window features of VideoMAE pretraining and classification checkpoints (see the module docstring).

    Pools (``--pool``): ``mean`` (default): the model's own mean-pooled feature: the mean of the
    tokens, through ``fc_norm`` for a classifier that has it (its head's input; VideoMAEv2's TAD
    feature); ``max+mean``: max plus mean of the patch tokens; ``cls``: the first token, for a
    classifier with a class token or one pooled by its first token; ``none``: the tokens
    (``forward_features``).
    """

    suffixes = (".npy",)

    def __init__(self, model: nn.Module, cfg: Any, options: ExtractOptions, device: torch.device) -> None:
        if options.per_point:
            raise UserError("--per-point is for point clouds; this is a video checkpoint")
        m, d = cfg.model, cfg.data
        self.model, self.device, self.options = model.eval(), device, options
        self.clip_len = m.num_frames
        self.window = options.window or m.num_frames * d.sampling_rate
        self.stride = options.stride or self.window
        self.pool = options.pool or "mean"
        self.has_cls = model.encoder.cls_token is not None
        if self.pool == "cls" and not (self.has_cls or getattr(model, "use_mean_pooling", True) is False):
            raise UserError("--pool cls: this model has no class token (nor pools its first token); use mean, "
                            "max+mean or none")
        self.stream = dict(window=self.window, stride=self.stride, clip_len=self.clip_len, chunk=options.batch_size,
                           transform=test_transform(m.img_size, getattr(d, "short_side", None) or m.img_size, 1),
                           fps=options.fps, data=d)
        log.info("windows of %d frames every %d frames, %d frames each, %dx%d crops; pool %s", self.window,
                 self.stride, self.clip_len, m.img_size, m.img_size, self.pool)

    @torch.no_grad()
    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """clips: (B, C, T, S, S) evaluation views -> (B, D) pooled features, or (B, L, D) tokens for ``none``."""
        tokens = self.model.forward_features(clips)  # (B, L (+1), D)
        if self.pool == "none":
            return tokens
        if self.pool == "cls":
            return tokens[:, 0]
        if self.pool == "mean" and getattr(self.model, "fc_norm", None) is not None:
            return self.model.forward_head(tokens, pre_logits=True)
        patches = tokens[:, 1:] if self.has_cls else tokens
        if self.pool == "mean":
            return patches.mean(dim=1)
        return patches.amax(dim=1) + patches.mean(dim=1)

    def run(self, inputs: Sequence[ExtractInput]) -> Iterator[ExtractResult]:
        stream = _ChunkStream(inputs, **self.stream)
        chunks = stream if self.options.num_workers == 0 else torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.options.num_workers)
        partial: dict[int, list[np.ndarray]] = {}
        for c in chunks:
            item = inputs[c.position]
            if c.error is not None:
                partial.pop(c.position, None)
                yield ExtractResult(item, error=c.error)
                continue
            feats = self.features(c.clips.to(self.device, non_blocking=True))
            partial.setdefault(c.position, []).append(feats.float().cpu().numpy())
            if c.first + len(c.clips) == len(c.windows.start):
                yield ExtractResult(item, files={".npy": save_npy(np.concatenate(partial.pop(c.position)))},
                                    rows=window_rows(item, c.windows, c.fps))


def window_rows(item: ExtractInput, windows: Windows, fps: float | None) -> list[dict[str, Any]]:
    """The index rows of one video's windows (see the module docstring)."""
    rows = []
    for k, (s, e) in enumerate(zip(windows.start.tolist(), windows.end.tolist())):
        rows.append({"video": item.name, "path": item.path, "window": k, "start_frame": s, "end_frame": e,
                     "start_sec": s / fps if fps else "", "end_sec": e / fps if fps else "", "fps": fps or ""})
    return rows


@register_extractor("video")
def video_extractor(model: nn.Module, cfg: Any, options: ExtractOptions, device: torch.device) -> FeatureExtractor:
    """The default ``mm3d extract`` of video tasks."""
    return VideoFeatureExtractor(model, cfg, options, device)


__all__ = ["Windows", "sliding_windows", "video_fps", "VideoFeatureExtractor", "window_rows"]
