"""Video decoding backends (mm3d.video.decode): decord and torchcodec against PyAV on real and
generated clips, in-memory input, and the errors for unknown backends and unusable devices.

Tolerance for "the same frames" on the CPU: max abs difference <= 3 and mean < 0.1 per uint8
value. All three backends use FFmpeg's decoders and its yuv420p -> RGB conversion; on this
machine they agree bit for bit (measured max 0 on every frame of both real clips), and 3 is the
slack torchcodec's own tests allow where FFmpeg builds may round differently. A frame off by
one index fails it: each test checks that its reference frames differ from their neighbours by
more than the tolerance (the real AVI's neighbours differ by a mean of only 0.03-0.4, which is
why the mean bound alone would not do).
"""

from __future__ import annotations

import io
import logging
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from mm3d.config import ConfigError, load_config
from mm3d.errors import UserError
from mm3d.testing import realdata_dir
from mm3d.video import decode as vdecode
from mm3d.video.decode import (BACKENDS, DecodeSettingsError, VideoDecodeError, check_decode_settings,
                               decode_frames, open_video, torchcodec_available, video_num_frames)

MAX_ABS = 3  # per-value bound on the CPU (see the module docstring)
MEAN_ABS = 0.1
REAL = {"mp4": ("kinetics400/arm_wrestling/demo.mp4", 280, (256, 340)),
        "avi": ("ucf101/ApplyEyeMakeup/test.avi", 164, (240, 320))}


def frame_diff(got: np.ndarray, ref: np.ndarray) -> tuple[int, float, tuple[int, ...]]:
    """(max abs difference, mean abs difference, index of the largest) of two uint8 frame stacks."""
    d = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    return int(d.max()), float(d.mean()), tuple(int(i) for i in np.unravel_index(d.argmax(), d.shape))


def assert_same_frames(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == np.uint8, f"{what}: {got.shape} {got.dtype} vs {ref.shape}"
    mx, mean, where = frame_diff(got, ref)
    assert mx <= MAX_ABS and mean < MEAN_ABS, f"{what}: max abs diff {mx} at {where}, mean {mean:.3f}"


def assert_tolerance_catches_a_shift(ref_all: np.ndarray, idx: np.ndarray, what: str) -> None:
    """The frames one index away from `idx` fail the tolerance (so an off-by-one decoder would)."""
    n = len(ref_all)
    shifted = np.where(idx + 1 < n, idx + 1, idx - 1)
    mx, mean, _ = frame_diff(ref_all[shifted], ref_all[idx])
    assert mx > MAX_ABS or mean >= MEAN_ABS, f"{what}: neighbouring frames are within the tolerance"


def index_sets(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random (unsorted, with a repeat), dense 16 frames at rate 4, and the first + last frame."""
    rng = np.random.default_rng(seed)
    random = rng.choice(n, size=12, replace=False)
    start = int(rng.integers(0, n - 15 * 4))
    return {"random": np.concatenate([random, random[:1]]),
            "dense16x4": start + 4 * np.arange(16),
            "ends": np.array([0, n - 1])}


@pytest.fixture(scope="module")
def torchcodec_ok() -> None:
    ok, why = torchcodec_available()
    if not ok:
        pytest.skip(why)


def _write_clip(path: Path, codec: str, n: int = 24, b_frames: int = 0, size: tuple[int, int] = (48, 64)) -> None:
    """A clip whose frame i has a white column at x = 2i and a colour ramp (frames all differ)."""
    import av

    h, w = size
    out = av.open(str(path), "w")
    stream = out.add_stream(codec, rate=25)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.codec_context.gop_size = 12
    if codec == "libx264":
        stream.options = {"bframes": str(b_frames), "crf": "18"}
    elif b_frames:
        stream.codec_context.max_b_frames = b_frames
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0], a[..., 1] = 8 * i, 255 - 8 * i
        a[:, 2 * i] = 255
        frame = av.VideoFrame.from_ndarray(a, format="rgb24").reformat(format="yuv420p")
        frame.pts, frame.time_base = i, Fraction(1, 25)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Generated clips: H.264 mp4 with B-frames, MPEG-4 AVI with and without B-frames, H.264 AVI with
    B-frames (the AVI B-frames unpacked, as FFmpeg writes them)."""
    d = tmp_path_factory.mktemp("backends")
    spec = {"h264.mp4": ("libx264", 2), "mpeg4_b.avi": ("mpeg4", 2), "mpeg4.avi": ("mpeg4", 0),
            "h264_b.avi": ("libx264", 2)}
    for name, (codec, b) in spec.items():
        _write_clip(d / name, codec, b_frames=b)
    return {name: d / name for name in spec}


@pytest.fixture(scope="module")
def real_ref() -> dict[str, tuple[Path, np.ndarray]]:
    """Every frame of each real clip, decoded sequentially by PyAV (the reference)."""
    root = realdata_dir()
    if root is None:
        pytest.skip("real-data samples not found (set MM3D_REALDATA or place ../shared/realdata)")
    out = {}
    for kind, (rel, n, _) in REAL.items():
        path = root / "video" / rel
        if not path.is_file():
            pytest.skip(f"real clip {path} not found")
        out[kind] = path, decode_frames(path, np.arange(n), backend="pyav")
    return out


# --------------------------------------------------------------------------------------------
# Same frames as PyAV
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mp4", "avi"])
@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_backends_return_pyavs_frames_on_real_clips(backend, kind, real_ref, request):
    if backend == "torchcodec":
        request.getfixturevalue("torchcodec_ok")
    path, ref = real_ref[kind]
    _, n, hw = REAL[kind]
    assert ref.shape == (n, *hw, 3)
    if backend == "torchcodec" and kind == "avi":
        # XviD with B-frames: torchcodec would return frame i-1 for i (meta-pytorch/torchcodec#1363)
        with pytest.raises(VideoDecodeError, match=r"test\.avi: torchcodec: an AVI file with B-frames"):
            open_video(path, backend="torchcodec")
        return
    assert video_num_frames(path, backend) == n
    for name, idx in index_sets(n).items():
        assert_tolerance_catches_a_shift(ref, idx, f"{kind} {name}")
        assert_same_frames(decode_frames(path, idx, backend=backend), ref[idx], f"{backend} {kind} {name}")
    src = open_video(path, backend=backend)  # one opened source, read twice in any order
    try:
        for idx in (np.array([[n - 1, 3], [3, 40]]), np.array([7, 1])):
            assert_same_frames(src.get(idx), ref[idx], f"{backend} {kind} reread {idx.tolist()}")
    finally:
        src.close()


def test_torchcodec_agrees_on_generated_clips(clips, torchcodec_ok):
    """H.264 with B-frames in mp4 and MPEG-4 AVI without B-frames decode right; an AVI with
    B-frames is refused, naming the file, instead of returning neighbouring frames."""
    for name in ("h264.mp4", "mpeg4.avi"):
        path = clips[name]
        ref = decode_frames(path, np.arange(24), backend="pyav")
        idx = np.array([23, 0, 5, 5, 12, 22, 1])
        assert_tolerance_catches_a_shift(ref, idx, name)
        assert video_num_frames(path, "torchcodec") == 24
        assert_same_frames(decode_frames(path, idx, backend="torchcodec"), ref[idx], f"torchcodec {name}")
        for i in (1, 13, 23):  # single frames from a fresh decoder: the seek path
            assert_same_frames(decode_frames(path, [i], backend="torchcodec"), ref[[i]], f"{name} frame {i}")
    with pytest.raises(VideoDecodeError, match=r"mpeg4_b\.avi: torchcodec: an AVI file with B-frames.*#1363"):
        open_video(clips["mpeg4_b.avi"], backend="torchcodec")
    with pytest.raises(ValueError, match=r"frame indices must lie in \[0, 24\)"):
        decode_frames(clips["h264.mp4"], [24], backend="torchcodec")


@pytest.mark.parametrize("name", ["mpeg4_b.avi", "h264_b.avi"])
def test_decord_refuses_avi_files_with_unpacked_b_frames_and_auto_reads_them_with_pyav(name, clips):
    """decord 0.6 returns such files' frames out of order (measured: frame 2 for 3, 9 for 10; on the H.264
    one frame 1 for 23); the explicit backend says so, naming the file, and auto gives PyAV's frames."""
    pytest.importorskip("decord")
    path = clips[name]
    with pytest.raises(VideoDecodeError, match=rf"{re.escape(name)}: decord: an AVI file with B-frames that are not "
                                               rf"DivX-packed"):
        open_video(path, backend="decord")
    ref = decode_frames(path, np.arange(24), backend="pyav")
    idx = np.array([23, 0, 3, 10, 12, 22, 1])
    assert_tolerance_catches_a_shift(ref, idx, name)
    assert_same_frames(decode_frames(path, idx, backend="auto"), ref[idx], f"auto {name}")
    assert_same_frames(decode_frames(path.read_bytes(), idx, backend="auto", name=name), ref[idx], f"auto bytes {name}")
    # no B-frames, or not AVI: decord reads them (the real packed XviD clip: test_backends_return_pyavs_frames_...)
    for other in ("mpeg4.avi", "h264.mp4"):
        assert open_video(clips[other], backend="decord").backend == "decord"


def test_divx_packed_user_data_is_recognised_as_ffmpeg_reads_it():
    from mm3d.video.decode import _DIVX_PACKED

    assert _DIVX_PACKED.search(b"\x00\x00\x01\xb2DivX503b1393p\x00\x00\x01\xb2XviD0055")  # the real UCF101 clip
    assert _DIVX_PACKED.search(b"DivX999Build1234p")
    assert not _DIVX_PACKED.search(b"DivX503b1393\x00") and not _DIVX_PACKED.search(b"XviD0055 Lavc62.28.102")


# --------------------------------------------------------------------------------------------
# In-memory input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_memory_bytes_decode_like_the_path(backend, clips, request):
    if backend == "torchcodec":
        request.getfixturevalue("torchcodec_ok")
    path = clips["h264.mp4"]
    data = path.read_bytes()
    idx = np.array([[20, 0, 7], [7, 23, 2]])
    ref = decode_frames(path, idx, backend=backend)
    assert ref.shape == (2, 3, 48, 64, 3)
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
        src = open_video(source, backend=backend, name="shard-000003.tar:000123_abseiling")
        try:
            assert src.path == "shard-000003.tar:000123_abseiling" and src.num_frames == 24
            assert np.array_equal(src.get(idx), ref), type(source).__name__
            assert np.array_equal(src.get(idx[:, :1]), ref[:, :1])  # a second read of the same source
        finally:
            src.close()
    assert video_num_frames(data, backend) == 24


def test_in_memory_real_clips_decode_like_the_path(real_ref):
    for kind, (path, ref) in real_ref.items():
        data = path.read_bytes()
        idx = index_sets(len(ref), seed=1)["dense16x4"]
        for backend in ("auto", "decord", "pyav"):
            got = decode_frames(io.BytesIO(data), idx, backend=backend, name=f"x.tar:{kind}")
            assert np.array_equal(got, decode_frames(path, idx, backend=backend)), (backend, kind)
            assert_same_frames(got, ref[idx], f"{backend} {kind} bytes")
        if kind == "avi":  # the final frame: decord's stale-frame re-read (dmlc/decord#195) works from bytes
            for _ in range(5):
                assert np.array_equal(decode_frames(data, [100, len(ref) - 1], backend="decord"),
                                      ref[[100, len(ref) - 1]])


def test_in_memory_errors_name_the_sample(clips):
    name = "shard-000003.tar:000123_abseiling"
    garbage = bytes(range(256)) * 8
    with pytest.raises(VideoDecodeError, match=rf"^{name}: decord: .+; pyav: "):
        open_video(garbage, name=name)
    with pytest.raises(VideoDecodeError, match=rf"^{name}: pyav: "):
        open_video(io.BytesIO(garbage), backend="pyav", name=name)
    with pytest.raises(VideoDecodeError, match=r"^<in-memory video, 2048 bytes>: decord: "):
        open_video(garbage, backend="decord")
    with pytest.raises(VideoDecodeError, match=rf"^{name}: no data \(0 bytes\)"):
        open_video(b"", name=name)
    with pytest.raises(ValueError, match=rf"^{name}: frame indices must lie in \[0, 24\), got \[0, 30\]"):
        decode_frames(clips["h264.mp4"].read_bytes(), [0, 30], name=name)
    with pytest.raises(TypeError, match="binary mode"):
        open_video(io.StringIO("text"), name=name)
    with pytest.raises(TypeError, match="path, bytes or a binary file object, got int"):
        open_video(123)
    with pytest.raises(VideoDecodeError, match=r"missing\.mp4: file does not exist"):
        open_video(clips["h264.mp4"].parent / "missing.mp4")


def test_in_memory_fallback_to_pyav(clips, tmp_path, monkeypatch, caplog):
    """auto: decord cannot open a GIF from bytes -> PyAV; decord failing later -> PyAV re-reads the bytes."""
    from PIL import Image

    frames = [Image.fromarray(np.full((24, 32, 3), 30 * i, np.uint8)) for i in range(6)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    src = open_video(gif.getvalue(), name="clips.tar:anim")
    assert src.backend == "pyav" and src.num_frames == 6 and src.path == "clips.tar:anim"
    assert src.get(np.array([5, 0, 2]))[:, 0, 0, 0].tolist() == [150, 0, 60]

    data = clips["h264.mp4"].read_bytes()
    ref = decode_frames(data, [3, 9], backend="pyav")

    def broken(self, indices):
        raise RuntimeError("simulated codec failure")

    monkeypatch.setattr(vdecode._DecordSource, "get", broken)
    src = open_video(data, name="clips.tar:h264")
    assert src.backend == "decord"
    with caplog.at_level(logging.INFO, logger="mm3d.video.decode"):
        got = src.get(np.array([3, 9]))
    assert src.backend == "pyav" and np.array_equal(got, ref)
    assert "decord failed on clips.tar:h264 (simulated codec failure)" in caplog.text


# --------------------------------------------------------------------------------------------
# Backend and device errors
# --------------------------------------------------------------------------------------------


def test_unknown_backend_is_an_error(clips):
    """Every name but the four known ones used to decode silently with PyAV."""
    path = clips["h264.mp4"]
    known = "auto, decord, pyav, torchcodec"
    for call in (lambda: open_video(path, backend="torchcodecs"),
                 lambda: decode_frames(path, [0], backend="PyAV"),
                 lambda: video_num_frames(path, "nope"),
                 lambda: open_video(path.read_bytes(), backend="ffmpeg")):
        with pytest.raises(DecodeSettingsError, match=rf"unknown video backend '\w+'; known: {known}") as e:
            call()
        assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_config_validates_backend_and_decode_device():
    base = ["task=videomae_pretrain"]
    with pytest.raises(ConfigError, match=r"key 'data\.backend' expects one of 'auto', 'decord', 'pyav', "
                                          r"'torchcodec', got 'nope'"):
        load_config(None, [*base, "data.backend=nope"])
    with pytest.raises(ConfigError, match=r"key 'data\.decode_device' expects one of 'cpu', 'cuda', got 'tpu'"):
        load_config(None, [*base, "data.decode_device=tpu"])
    cfg = load_config(None, [*base, "data.backend=torchcodec"])
    assert (cfg.data.backend, cfg.data.decode_device) == ("torchcodec", "cpu")


def test_cuda_decode_errors_name_the_problem(clips, monkeypatch):
    path = clips["h264.mp4"]
    for backend in ("auto", "decord", "pyav"):
        with pytest.raises(DecodeSettingsError, match=rf"decode device 'cuda' needs backend 'torchcodec'.*"
                                                      rf"got backend '{backend}'"):
            open_video(path, backend=backend, device="cuda")
    with pytest.raises(DecodeSettingsError, match=r"unknown decode device 'tpu'; known: cpu, cuda"):
        open_video(path, backend="torchcodec", device="tpu")
    with pytest.raises(DecodeSettingsError, match=r"unknown decode device 'cuda:x'"):
        check_decode_settings("torchcodec", "cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DecodeSettingsError, match=r"decode device 'cuda:1' asked for, but no CUDA device is "
                                                  r"available here.*use decode_device=cpu"):
        decode_frames(path, [0], backend="torchcodec", device="cuda:1")
    for backend in ("auto", "decord", "pyav"):
        check_decode_settings(backend, "cpu")  # these decode on the CPU without torchcodec


def test_missing_torchcodec_is_a_settings_error(clips, monkeypatch):
    """Not a VideoDecodeError: a loader would count every video as unreadable and go on."""
    def missing():
        raise ImportError("torchcodec cannot be loaded (libavutil.so.59: cannot open shared object file)")

    monkeypatch.setattr(vdecode, "_torchcodec_decoder_class", missing)
    with pytest.raises(DecodeSettingsError, match=r"backend 'torchcodec': torchcodec cannot be loaded \(libavutil"):
        open_video(clips["h264.mp4"], backend="torchcodec")
    assert open_video(clips["h264.mp4"]).num_frames == 24  # auto never needs it


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torchcodec_cuda_decode_matches_cpu(clips, torchcodec_ok):
    """NVDEC + GPU colour conversion: torch uint8 (..., H, W, 3) on the GPU, close to PyAV's frames
    (torchcodec's own CUDA criterion: mean < 1, at least 95% of values within 3)."""
    path = clips["h264.mp4"]
    idx = np.array([[0, 5, 23], [12, 12, 1]])
    ref = torch.from_numpy(decode_frames(path, idx, backend="pyav")).int()
    for source in (path, path.read_bytes()):
        got = decode_frames(source, idx, backend="torchcodec", device="cuda")
        assert isinstance(got, torch.Tensor) and got.is_cuda and got.dtype == torch.uint8
        assert tuple(got.shape) == (2, 3, 48, 64, 3)
        d = (got.cpu().int() - ref).abs()
        assert d.float().mean() < 1.0 and (d <= 3).float().mean() >= 0.95, (d.max(), d.float().mean())
        assert torch.equal(got[1, 0], got[1, 1])  # repeated index -> the same frame
