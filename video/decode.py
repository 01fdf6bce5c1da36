"""Video decoding: decord, PyAV and torchcodec over files or in-memory bytes, and JPEG frame folders.

Backends (``data.backend``):

==============  ===========================================================================
``auto``        decord, and PyAV per file when decord is absent, cannot open the file (e.g.
                a GIF) or fails on its frames (the default; frames on the CPU).
``decord``      decord's ``VideoReader`` only (random access through its frame index). It
                refuses AVI files with B-frames that are not DivX-packed, whose frames it
                returns out of order (UCF101's packed XviD clips decode right); ``auto``
                reads those with PyAV.
``pyav``        PyAV only: decodes sequentially and stops at the last frame a sample needs.
``torchcodec``  PyTorch's ``torchcodec.decoders.VideoDecoder`` only (exact seeking); the one
                backend that can also decode on a CUDA device (NVDEC). It refuses AVI files
                with B-frames (e.g. UCF101's XviD clips), whose frames it would mis-index.
==============  ===========================================================================

``auto`` does not try torchcodec: it is an optional dependency, cannot read those AVI files,
and on the CPU it was faster than decord only with one torch thread (a DataLoader worker),
2x slower in a process with several (measured in the README, "Training at scale").

An explicit backend uses only that decoder; when it fails, :class:`VideoDecodeError` names the
file and the reason. ``auto`` lists every decoder's reason when all of them fail. An unknown
backend name is a :class:`DecodeSettingsError` listing the known ones.

Devices (``data.decode_device``): ``cpu`` (every backend; frames come back as numpy arrays) or
``cuda`` (torchcodec only; frames come back as torch tensors on the current CUDA device, in the
same ``(..., H, W, 3)`` uint8 layout). Asking for ``cuda`` with another backend, or without a
usable GPU, is a :class:`DecodeSettingsError` (see :func:`check_decode_settings`).

Input: a path, or the encoded file itself as ``bytes`` / a binary file-like object (e.g. an
``mp4`` member of a WebDataset shard); ``name=`` then says what to call it in errors, e.g.
``"shard-000003.tar:000123_abseiling"``. Nothing is written to disk.

Only the requested frames are decoded, and a sample opens its file once (a fallback reopens it
with PyAV). decord 0.6 sometimes returns a stale frame for the final frame of a file
(dmlc/decord#195); such reads are detected and redone by PyAV. Frame folders are read as JPEG
files (PIL) with a configurable name template and start number.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Protocol, Union, get_args

import numpy as np
from PIL import Image

from mm3d.errors import UserError

if TYPE_CHECKING:
    import torch

    from mm3d.video.data import VideoRecord

log = logging.getLogger(__name__)

Backend = Literal["auto", "decord", "pyav", "torchcodec"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DecodeDevice = Literal["cpu", "cuda"]
VideoInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]
Frames = Union[np.ndarray, "torch.Tensor"]

try:  # decord has wheels for Linux x86_64 only; PyAV covers everything else
    import decord as _decord
except ImportError:  # pragma: no cover - depends on the platform
    _decord = None


class VideoDecodeError(RuntimeError):
    """A video or frame folder could not be read; the message names the file and the reasons."""


class DecodeSettingsError(UserError, ValueError):
    """A backend / decode device that does not exist or cannot work here (names the known ones)."""


def _torchcodec_decoder_class() -> Any:
    """torchcodec's ``VideoDecoder`` (imported on first use: it loads the FFmpeg libraries)."""
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as e:  # noqa: BLE001 - ImportError, or RuntimeError when FFmpeg is missing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImportError(f"torchcodec cannot be loaded ({reason}); install it with "
                          f"`pip install torchcodec` and FFmpeg 4-7 shared libraries") from e
    return VideoDecoder


def torchcodec_available() -> tuple[bool, str]:
    """(whether torchcodec can decode here, why not when it cannot)."""
    try:
        _torchcodec_decoder_class()
    except ImportError as e:
        return False, str(e)
    return True, ""


def check_decode_settings(backend: str, device: str = "cpu") -> None:
    """Fail early, in one line, on a backend / device pair that cannot decode here.

    `device` is ``cpu``, ``cuda`` or ``cuda:N``; only ``torchcodec`` decodes on CUDA.

    Raises:
        DecodeSettingsError naming the known backends, why torchcodec cannot be loaded, or why
        the device cannot be used.
    """
    if backend not in BACKENDS:
        raise DecodeSettingsError(f"unknown video backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "torchcodec":  # a missing library is a setting to change, not a bad video
        ok, why = torchcodec_available()
        if not ok:
            raise DecodeSettingsError(f"backend 'torchcodec': {why}")
    if device == "cpu":
        return
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise DecodeSettingsError(f"unknown decode device {device!r}; known: cpu, cuda (or cuda:N)")
    if backend != "torchcodec":
        raise DecodeSettingsError(f"decode device {device!r} needs backend 'torchcodec' (decord and PyAV "
                                  f"decode on the CPU only), got backend {backend!r}")
    import torch

    if not torch.cuda.is_available():
        raise DecodeSettingsError(f"decode device {device!r} asked for, but no CUDA device is available "
                                  f"here (torch.cuda.is_available() is False); use decode_device=cpu")


def _read_input(source: VideoInput, name: str | None) -> tuple[str | bytes, str]:
    """(a path or the encoded bytes, the name errors use) for any accepted `source`."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise VideoDecodeError(f"{name or path}: file does not exist")
        return path, name or path
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"{name or source!r}: a video file object must be opened in binary mode, "
                            f"its read() returned {type(data).__name__}")
        data = bytes(data)
    else:
        raise TypeError(f"open_video expects a path, bytes or a binary file object, got "
                        f"{type(source).__name__}")
    name = name or f"<in-memory video, {len(data)} bytes>"
    if not data:
        raise VideoDecodeError(f"{name}: no data (0 bytes)")
    return data, name


def _av_open(data: str | bytes) -> Any:
    import av

    return av.open(data if isinstance(data, str) else io.BytesIO(data))


class FrameSource(Protocol):
    """An opened video: its frame count and random access to frames (opened once per sample).

    ``get`` returns ``(*indices.shape, H, W, 3)`` uint8 RGB frames: a numpy array when decoding
    on the CPU (every backend), a torch tensor on the decode device for torchcodec on CUDA.
    """

    path: str  # the file path, or the `name` of in-memory input (used in messages)
    backend: str  # "decord" | "pyav" | "torchcodec" | "rawframes"

    @property
    def num_frames(self) -> int: ...

    def get(self, indices: np.ndarray) -> Frames:
        """Frames at `indices` (any shape) -> (*indices.shape, H, W, 3) uint8."""
        ...

    def close(self) -> None: ...


class _DecordSource:
    backend = "decord"

    def __init__(self, data: str | bytes, name: str, num_threads: int) -> None:
        if _decord is None:
            raise ImportError("decord is not installed")
        if _is_avi(data) and _avi_unpacked_b_frames(data):
            # (open_video prefixes "<name>: decord: ")
            raise VideoDecodeError(
                "an AVI file with B-frames that are not DivX-packed, whose frames decord 0.6 returns out of "
                "order (measured on MPEG-4 and H.264 AVI files: e.g. frame i-1 for i); decode it with backend "
                "auto (PyAV for such files) or pyav, or prepare shards with `mm3d data prepare`")
        self.path = name
        self._data = data
        uri = data if isinstance(data, str) else io.BytesIO(data)
        self._vr = _decord.VideoReader(uri, num_threads=num_threads, ctx=_decord.cpu(0))
        self._len = len(self._vr)
        if self._len <= 0:
            raise VideoDecodeError(f"{name}: decord found no frames")

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
                pyav = _PyAVSource(self._data, self.path, 1)
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

    def __init__(self, data: str | bytes, name: str, num_threads: int, strict: bool = False) -> None:
        self.path = name
        self._data = data
        self._num_threads = num_threads
        self._strict = strict  # a stream that ends before a requested frame is an error (else: clamped)
        self._container = _av_open(data)
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodeError(f"{name}: no video stream")
        stream = self._container.streams.video[0]
        count = int(stream.frames or 0)
        if count <= 0:  # unknown in the header: count the packets (no decoding)
            count = sum(1 for p in self._container.demux(stream) if p.size > 0)
            self._container.close()
            self._container = _av_open(data)
        if count <= 0:  # still unknown (e.g. some GIFs): decode once to count
            count = sum(1 for _ in self._container.decode(video=0))
            self._container.close()
            self._container = _av_open(data)
        if count <= 0:
            self._container.close()
            raise VideoDecodeError(f"{name}: PyAV found no frames")
        self._len = count
        self._used = False

    @property
    def num_frames(self) -> int:
        return self._len

    def get(self, indices: np.ndarray) -> np.ndarray:
        if self._used:  # decoding is sequential: start again from the beginning
            self._container.close()
            self._container = _av_open(self._data)
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


def _is_avi(data: str | bytes) -> bool:
    """Whether `data` (a path or the file's bytes) is a RIFF AVI file (its first 12 bytes)."""
    if isinstance(data, str):
        with open(data, "rb") as f:
            head = f.read(12)
    else:
        head = data[:12]
    return head[:4] == b"RIFF" and head[8:12] == b"AVI "


# MPEG-4 Part 2 user data that marks DivX "packed" B-frames (FFmpeg's mpeg4videodec reads it the same
# way: "DivX<version>b<build>p" or "DivX<version>Build<build>p")
_DIVX_PACKED = re.compile(rb"DivX\d+(?:Build|b)\d+p")


def _avi_unpacked_b_frames(data: str | bytes) -> bool:
    """Whether an AVI file's video stream has B-frames that are not DivX-packed (PyAV: the stream
    header and the first packet's user data). Such files are what decord 0.6 mis-indexes."""
    container = _av_open(data)
    try:
        streams = container.streams.video
        if not streams or not streams[0].codec_context.has_b_frames:
            return False
        first = next((bytes(p) for p in container.demux(streams[0]) if p.size > 0), b"")
        return _DIVX_PACKED.search(first) is None
    finally:
        container.close()


def _has_b_frames(data: str | bytes) -> bool:
    """Whether the first video stream reorders frames (B-frames), from the stream headers (PyAV)."""
    container = _av_open(data)
    try:
        streams = container.streams.video
        return bool(streams and streams[0].codec_context.has_b_frames)
    finally:
        container.close()


class _TorchCodecSource:
    """torchcodec's ``VideoDecoder`` in exact seek mode (the frame count comes from a scan of the
    file's packets, so every index below it decodes); frames stay on `device`.

    AVI files with B-frames (most UCF101 / HMDB51 XviD clips) are refused: AVI stores no
    presentation timestamps, torchcodec then indexes frames by decode timestamps and returns
    neighbouring frames (measured: the real UCF101 clip gives frame i-1 for i and fails on the
    final frame; meta-pytorch/torchcodec#1363). decord and PyAV decode them in the right order.
    """

    backend = "torchcodec"

    def __init__(self, data: str | bytes, name: str, num_threads: int, device: str = "cpu") -> None:
        decoder_class = _torchcodec_decoder_class()
        if _is_avi(data) and _has_b_frames(data):
            raise VideoDecodeError(
                f"{name}: torchcodec: an AVI file with B-frames, which torchcodec indexes by decode "
                f"timestamps and so returns the wrong frames (meta-pytorch/torchcodec#1363); decode it "
                f"with backend auto, decord or pyav, or prepare shards (H.264 mp4) with `mm3d data prepare`")
        self.path = name
        self.device = device
        self._dec = decoder_class(data, dimension_order="NHWC", num_ffmpeg_threads=max(0, int(num_threads)),
                                  device=device, seek_mode="exact")
        self._len = int(self._dec.metadata.num_frames or 0)
        if self._len <= 0:
            raise VideoDecodeError(f"{name}: torchcodec found no frames")

    @property
    def num_frames(self) -> int:
        return self._len

    def get(self, indices: np.ndarray) -> Frames:
        import torch

        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(flat, return_inverse=True)
        if unique[0] < 0 or unique[-1] >= self._len:
            raise VideoDecodeError(f"{self.path}: frame indices must lie in [0, {self._len}), got "
                                   f"[{unique[0]}, {unique[-1]}]")
        try:
            frames = self._dec.get_frames_at(unique.tolist()).data  # (U, H, W, 3) uint8 on the device
        except (RuntimeError, IndexError, ValueError) as e:
            raise VideoDecodeError(f"{self.path}: {_reason('torchcodec', e)}") from e
        shape = (*np.shape(indices), *frames.shape[1:])
        if frames.device.type == "cpu":
            return frames.numpy()[inverse].reshape(shape)
        return frames[torch.from_numpy(inverse).to(frames.device)].reshape(shape)

    def close(self) -> None:
        self._dec = None


class _FallbackSource:
    """decord first; PyAV when decord fails later, on the frames (e.g. an unsupported codec)."""

    def __init__(self, primary: _DecordSource, data: str | bytes, num_threads: int,
                 strict: bool = False) -> None:
        self._src: FrameSource = primary
        self._data = data
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
            self._src = _PyAVSource(self._data, self.path, self._num_threads, self._strict)
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


def _reason(backend: str, e: BaseException) -> str:
    text = str(e).strip()
    return f"{backend}: {text.splitlines()[0] if text else type(e).__name__}"


def open_video(source: VideoInput, *, backend: Backend = "auto", num_threads: int = 1,
               strict: bool = False, name: str | None = None, device: str = "cpu") -> FrameSource:
    """Open a video for frame access.

    Args:
        source: a file path, or the encoded file as bytes or a binary file-like object (read
            once, fully; nothing is written to disk).
        backend: ``auto`` tries decord and falls back to PyAV when decord is missing, cannot
            open the video or fails while decoding it; ``decord`` / ``pyav`` / ``torchcodec``
            use only that decoder.
        num_threads: decoder threads (0: the decoder's choice).
        strict: PyAV clamps a request past the end of a stream that is shorter than its header
            says to the last frame; ``strict=True`` makes that an error (``mm3d data check``).
        name: what errors call the video (default: the path, or "<in-memory video, N bytes>"),
            e.g. ``"shard-000003.tar:000123_abseiling"``.
        device: ``cpu``, or ``cuda`` / ``cuda:N`` with ``backend="torchcodec"`` (frames then
            come back as torch tensors on that device).

    Raises:
        DecodeSettingsError for an unknown backend or an unusable device; VideoDecodeError
        naming the video and every decoder's reason when it cannot be opened.
    """
    check_decode_settings(backend, device)
    data, name = _read_input(source, name)
    if backend == "torchcodec":
        if device == "cuda":
            import torch

            device = f"cuda:{torch.cuda.current_device()}"
        try:
            return _TorchCodecSource(data, name, num_threads, device)
        except VideoDecodeError:
            raise
        except Exception as e:  # noqa: BLE001 - torchcodec raises RuntimeError/ValueError/ImportError
            raise VideoDecodeError(f"{name}: {_reason('torchcodec', e)}") from e
    reasons = []
    if backend in ("auto", "decord"):
        try:
            src = _DecordSource(data, name, num_threads)
            return _FallbackSource(src, data, num_threads, strict) if backend == "auto" else src
        except Exception as e:  # noqa: BLE001 - decord raises its own error types
            reasons.append(_reason("decord", e))
            if backend == "decord":
                raise VideoDecodeError(f"{name}: {'; '.join(reasons)}") from e
    try:
        return _PyAVSource(data, name, num_threads, strict)
    except Exception as e:  # noqa: BLE001 - PyAV raises FFmpeg error subclasses
        reasons.append(_reason("pyav", e))
        raise VideoDecodeError(f"{name}: {'; '.join(reasons)}") from e


def open_record(record: VideoRecord, *, backend: Backend = "auto", num_threads: int = 1,
                rawframe_template: str = "img_{:05d}.jpg", rawframe_start: int = 1,
                strict: bool = False, device: str = "cpu") -> FrameSource:
    """Open a list row: a frame folder for rawframe rows, else a video file (`strict`, `device`:
    see :func:`open_video`; frame folders are always read on the CPU)."""
    if record.is_rawframes:
        start = rawframe_start if record.start_index is None else record.start_index
        return RawFrameSource(record.path, record.total_frames, template=rawframe_template,
                              start=start)
    return open_video(record.path, backend=backend, num_threads=num_threads, strict=strict,
                      device=device)


def decode_frames(source: VideoInput, indices: np.ndarray, *, backend: Backend = "auto",
                  num_threads: int = 1, name: str | None = None, device: str = "cpu") -> Frames:
    """Decode the frames at `indices` (any shape) of a video -> (*indices.shape, H, W, 3) uint8
    (numpy on the CPU; a torch tensor on `device` for torchcodec on CUDA)."""
    src = open_video(source, backend=backend, num_threads=num_threads, name=name, device=device)
    try:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= src.num_frames):
            raise ValueError(f"{src.path}: frame indices must lie in [0, {src.num_frames}), got "
                             f"[{indices.min()}, {indices.max()}]")
        return src.get(indices)
    finally:
        src.close()


def video_num_frames(source: VideoInput, backend: Backend = "auto", *, name: str | None = None) -> int:
    """The number of frames of a video (decord's count, PyAV's when it falls back)."""
    src = open_video(source, backend=backend, name=name)
    try:
        return src.num_frames
    finally:
        src.close()


__all__ = ["BACKENDS", "Backend", "DecodeDevice", "DecodeSettingsError", "FrameSource", "Frames",
           "RawFrameSource", "VideoDecodeError", "VideoInput", "check_decode_settings", "decode_frames",
           "open_record", "open_video", "torchcodec_available", "video_num_frames"]
