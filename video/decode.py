"""Video decoding: decord first, PyAV per file as the fallback, and JPEG frame folders.

decord's ``VideoReader`` is the primary decoder; PyAV is the per-file fallback when decord is
absent, cannot open a file (e.g. GIFs) or fails on its codec. Frame folders are read as JPEG
files (PIL) with a configurable name template and start number. Only the requested frames
are decoded (PyAV decodes sequentially and stops at the last one needed), and a sample opens
its file once (a fallback reopens it with PyAV). decord 0.6 sometimes returns a stale frame
for the final frame of a file (dmlc/decord#195); such reads are detected and redone by PyAV.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from mm3d.video.data import VideoRecord

log = logging.getLogger(__name__)

Backend = Literal["auto", "decord", "pyav"]

try:  # decord has wheels for Linux x86_64 only; PyAV covers everything else
    import decord as _decord
except ImportError:  # pragma: no cover - depends on the platform
    _decord = None



class VideoDecodeError(RuntimeError):
    """A video or frame folder could not be read; the message names the path and the reasons."""


class FrameSource(Protocol):
    """An opened video: its frame count and random access to frames (opened once per sample)."""

    path: str
    backend: str  # "decord" | "pyav" | "rawframes"

    @property
    def num_frames(self) -> int: ...

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Frames at `indices` (any shape) -> (*indices.shape, H, W, 3) uint8."""
        ...

    def close(self) -> None: ...


class _DecordSource:
    backend = "decord"

    def __init__(self, path: str, num_threads: int) -> None:
        if _decord is None:
            raise ImportError("decord is not installed")
        self.path = path
        self._vr = _decord.VideoReader(path, num_threads=num_threads, ctx=_decord.cpu(0))
        self._len = len(self._vr)
        if self._len <= 0:
            raise VideoDecodeError(f"{path}: decord found no frames")

    @property
    def num_frames(self) -> int:
        return self._len

    def get(self, indices: np.ndarray) -> np.ndarray:
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(flat, return_inverse=True)
        last = self._len - 1
        wants_last = bool(unique[-1] == last and last >= 1)
        added = wants_last and (len(unique) < 2 or unique[-2] != last - 1)
        fetch = np.concatenate([unique[:-1], [last - 1, last]]) if added else unique
        frames = self._vr.get_batch(fetch.tolist()).asnumpy()
        if wants_last and np.array_equal(frames[-1], frames[-2]):
            # decord 0.6 sometimes returns a stale copy of the frame before the final frame of
            # a file (dmlc/decord#195; ~10% of reads of the real XviD avi sample). The final
            # frame then equals the one before it, so such a read is redone with PyAV (which
            # also handles the rare video whose last two frames really are identical).
            try:
                pyav = _PyAVSource(self.path, 1)
                try:
                    frames[-1] = pyav.get(np.array([min(last, pyav.num_frames - 1)]))[0]
                finally:
                    pyav.close()
            except Exception as e:  # noqa: BLE001 - keep decord's frame if PyAV cannot help
                log.debug("%s: PyAV re-read of the final frame failed: %s", self.path, e)
        if added:
            frames = np.concatenate([frames[:-2], frames[-1:]])
        return frames[inverse].reshape(*np.shape(indices), *frames.shape[1:])

    def close(self) -> None:
        self._vr = None


class _PyAVSource:
    """Sequential PyAV decoding that stops at the last needed frame."""

    backend = "pyav"

    def __init__(self, path: str, num_threads: int, strict: bool = False) -> None:
        import av

        self.path = path
        self._num_threads = num_threads
        self._strict = strict  # a stream that ends before a requested frame is an error (else: clamped)
        self._container = av.open(path)
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodeError(f"{path}: no video stream")
        stream = self._container.streams.video[0]
        count = int(stream.frames or 0)
        if count <= 0:  # unknown in the header: count the packets (no decoding)
            count = sum(1 for p in self._container.demux(stream) if p.size > 0)
            self._container.close()
            self._container = av.open(path)
        if count <= 0:  # still unknown (e.g. some GIFs): decode once to count
            count = sum(1 for _ in self._container.decode(video=0))
            self._container.close()
            self._container = av.open(path)
        if count <= 0:
            self._container.close()
            raise VideoDecodeError(f"{path}: PyAV found no frames")
        self._len = count
        self._used = False

    @property
    def num_frames(self) -> int:
        return self._len

    def get(self, indices: np.ndarray) -> np.ndarray:
        import av

        if self._used:  # decoding is sequential: start again from the beginning
            self._container.close()
            self._container = av.open(self.path)
        self._used = True
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        wanted = set(flat.tolist())
        last = int(flat.max())
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = max(0, int(self._num_threads))
        got: dict[int, np.ndarray] = {}
        final_i, final = -1, None
        for i, frame in enumerate(self._container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            final_i, final = i, frame
            if i >= last:  # stop at the last needed frame
                break
        if final is None:
            raise VideoDecodeError(f"{self.path}: PyAV decoded no frames")
        if final_i < last and self._strict:
            raise VideoDecodeError(f"{self.path}: the stream ends after frame {final_i} (0-based) of the "
                                   f"{self._len} its header promises (a truncated file?)")
        if final_i < last:  # the stream ended early: later indices take the last frame
            log.debug("%s: stream ended at frame %d before frame %d; clamping", self.path,
                      final_i, last)
            tail = got.get(final_i)
            if tail is None:
                tail = final.to_ndarray(format="rgb24")
            for i in wanted - got.keys():
                got[i] = tail
        frames = np.stack([got[i] for i in flat.tolist()])
        return frames.reshape(*np.shape(indices), *frames.shape[1:])

    def close(self) -> None:
        self._container.close()


class _FallbackSource:
    """decord first; PyAV when decord fails later, on the frames (e.g. an unsupported codec)."""

    def __init__(self, primary: _DecordSource, num_threads: int, strict: bool = False) -> None:
        self._src: FrameSource = primary
        self._num_threads = num_threads
        self._strict = strict
        self.path = primary.path

    @property
    def backend(self) -> str:
        return self._src.backend

    @property
    def num_frames(self) -> int:
        return self._src.num_frames

    def get(self, indices: np.ndarray) -> np.ndarray:
        try:
            return self._src.get(indices)
        except Exception as e:  # noqa: BLE001 - any decord failure falls back to PyAV
            if self._src.backend != "decord":
                raise
            log.info("decord failed on %s (%s); decoding with PyAV", self.path, e)
            self._src.close()
            self._src = _PyAVSource(self.path, self._num_threads, self._strict)
            return self._src.get(indices)

    def close(self) -> None:
        self._src.close()


class RawFrameSource:
    """A folder of frame images named ``template.format(start + i)`` for frame i."""

    backend = "rawframes"

    def __init__(self, path: str, total_frames: int | None, *, template: str = "img_{:05d}.jpg",
                 start: int = 1) -> None:
        self.path = path
        self.template = template
        self.start = start
        if not os.path.isdir(path):
            raise FileNotFoundError(f"frame folder {path} does not exist")
        if total_frames is None:
            total_frames = 0
            while os.path.exists(os.path.join(path, template.format(start + total_frames))):
                total_frames += 1
        if total_frames <= 0:
            raise VideoDecodeError(f"{path}: no frames named {template!r} from {start}")
        self._len = total_frames

    @property
    def num_frames(self) -> int:
        return self._len

    def get(self, indices: np.ndarray) -> np.ndarray:
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(flat, return_inverse=True)
        images = []
        for i in unique:  # each needed file is read once
            f = os.path.join(self.path, self.template.format(self.start + int(i)))
            if not os.path.isfile(f):
                raise FileNotFoundError(f"frame {f} does not exist")
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB")))
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise VideoDecodeError(f"{self.path}: frames differ in size: {sorted(shapes)}")
        stack = np.stack(images)  # (U, H, W, 3)
        return stack[inverse].reshape(*np.shape(indices), *stack.shape[1:])

    def close(self) -> None:
        pass


def open_video(path: str | os.PathLike, *, backend: Backend = "auto",
               num_threads: int = 1, strict: bool = False) -> FrameSource:
    """Open a video file for frame access.

    ``auto`` tries decord and falls back to PyAV when decord is missing, cannot open the file
    or fails while decoding it; ``decord`` / ``pyav`` use only that decoder. PyAV clamps a
    request past the end of a stream that is shorter than its header says to the last frame;
    ``strict=True`` makes that an error instead (``mm3d data check``).

    Raises:
        VideoDecodeError naming the path and every decoder's reason.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: file does not exist")
    reasons = []
    if backend in ("auto", "decord"):
        try:
            src = _DecordSource(path, num_threads)
            return _FallbackSource(src, num_threads, strict) if backend == "auto" else src
        except Exception as e:  # noqa: BLE001 - decord raises its own error types
            reasons.append(f"decord: {e}".strip().splitlines()[0])
            if backend == "decord":
                raise VideoDecodeError(f"{path}: {'; '.join(reasons)}") from e
    try:
        return _PyAVSource(path, num_threads, strict)
    except Exception as e:  # noqa: BLE001 - PyAV raises FFmpeg error subclasses
        reasons.append(f"pyav: {e}".strip().splitlines()[0])
        raise VideoDecodeError(f"{path}: {'; '.join(reasons)}") from e


def open_record(record: VideoRecord, *, backend: Backend = "auto", num_threads: int = 1,
                rawframe_template: str = "img_{:05d}.jpg", rawframe_start: int = 1,
                strict: bool = False) -> FrameSource:
    """Open a list row: a frame folder for rawframe rows, else a video file (`strict`: see
    :func:`open_video`)."""
    if record.is_rawframes:
        start = rawframe_start if record.start_index is None else record.start_index
        return RawFrameSource(record.path, record.total_frames, template=rawframe_template,
                              start=start)
    return open_video(record.path, backend=backend, num_threads=num_threads, strict=strict)


def decode_frames(path: str | os.PathLike, indices: np.ndarray, *, backend: Backend = "auto",
                  num_threads: int = 1) -> np.ndarray:
    """Decode the frames at `indices` (any shape) of a video -> (*indices.shape, H, W, 3) uint8."""
    src = open_video(path, backend=backend, num_threads=num_threads)
    try:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= src.num_frames):
            raise ValueError(f"{path}: frame indices must lie in [0, {src.num_frames}), got "
                             f"[{indices.min()}, {indices.max()}]")
        return src.get(indices)
    finally:
        src.close()


def video_num_frames(path: str | os.PathLike, backend: Backend = "auto") -> int:
    """The number of frames of a video file (decord's count, PyAV's when it falls back)."""
    src = open_video(path, backend=backend)
    try:
        return src.num_frames
    finally:
        src.close()


__all__ = ["Backend", "VideoDecodeError", "FrameSource", "RawFrameSource", "open_video", "open_record",
           "decode_frames", "video_num_frames"]
