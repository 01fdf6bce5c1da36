"""Video data: lists, decoders, temporal sampling, clip transforms, dataset, synthetic clips."""

from __future__ import annotations

import itertools
import logging
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mm3d.testing import assert_close
from mm3d.video import data as vdata
from mm3d.video import decode as vdecode
from mm3d.video import transforms as vt
from mm3d.video.data import (VideoDataset, dense_sample, read_annotation_list, read_label_map, segment_clips,
                             segment_sample, uniform_clips)
from mm3d.video.decode import VideoDecodeError, decode_frames, open_video, video_num_frames
from mm3d.video.synth import CLASSES, SCALES, SynthVideoSpec, render_clip, write_mp4, write_video_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_video")
    summary = write_video_dataset(root, SCALES["tiny"], seed=0)
    return root, summary


def _write(path, text):
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Annotation lists
# --------------------------------------------------------------------------------------------


def test_video_list_space_and_comma_with_root_and_label_map(tmp_path):
    lm = _write(tmp_path / "labels.txt", "walk\nrun\njump\n")
    lst = _write(tmp_path / "a.txt", "# comment\na/x.mp4 2\n\nb/y.mp4,1\n/abs/z.mp4 run\n")
    recs = read_annotation_list(lst, data_root="/data", label_map=lm)
    assert [r.path for r in recs] == ["/data/a/x.mp4", "/data/b/y.mp4", "/abs/z.mp4"]
    assert [r.label for r in recs] == [2, 1, 1]
    assert all(r.total_frames is None and not r.is_rawframes for r in recs)
    assert recs[0].line == f"{lst}:2" and recs[1].line == f"{lst}:4"
    assert read_label_map(lm) == ["walk", "run", "jump"]


def test_pretrain_and_rawframe_lists(tmp_path):
    pre = read_annotation_list(_write(tmp_path / "p.txt", "v/a.mp4 0 -1\nv/b.mp4 0 -1\n"),
                               data_root="r")
    assert [(r.path, r.label, r.total_frames) for r in pre] == [("r/v/a.mp4", -1, None),
                                                               ("r/v/b.mp4", -1, None)]
    # a VideoMAEv2 frame-folder row 'dir start_index total_frames' needs fmt="pretrain"
    pre_raw = read_annotation_list(_write(tmp_path / "q.txt", "frames/c 0 120\n"), fmt="pretrain")
    assert pre_raw[0].total_frames == 120 and pre_raw[0].start_index == 0
    raw = read_annotation_list(_write(tmp_path / "r.txt", "clips/a 30 1\nclips/b 12 0\n"))
    assert [(r.path, r.total_frames, r.label, r.start_index) for r in raw] == [
        ("clips/a", 30, 1, None), ("clips/b", 12, 0, None)]


@pytest.mark.parametrize("text, fmt, line, words", [
    ("a.mp4 1\nb.mp4\n", "auto", 2, "expected 2 fields"),
    ("a.mp4 1\nb.mp4 1 2\n", "auto", 2, "expected 2 fields"),
    ("a.mp4 one\n", "auto", 1, "not an integer"),
    ("a 10 1\nb ten 1\n", "auto", 2, "total frames"),
    ("a.mp4 1 2 3\n", "auto", 1, "cannot tell"),
    ("a.mp4 1\n", "rawframes", 1, "expected 3 fields"),
])
def test_malformed_line_names_file_and_line(tmp_path, text, fmt, line, words):
    lst = _write(tmp_path / "bad.txt", text)
    with pytest.raises(ValueError, match=f"{lst}:{line}.*{words}"):
        read_annotation_list(lst, fmt=fmt)


def test_label_outside_classes_names_line(tmp_path):
    lm = _write(tmp_path / "labels.txt", "a\nb\n")
    lst = _write(tmp_path / "l.txt", "x.mp4 0\ny.mp4 2\n")
    with pytest.raises(ValueError, match=rf"{lst}:2: label 2 is outside the classes \[0, 2\)"):
        read_annotation_list(lst, label_map=lm)
    with pytest.raises(ValueError, match=f"{lst}:2"):
        read_annotation_list(lst, num_classes=2)
    assert len(read_annotation_list(lst, num_classes=3)) == 2
    named = _write(tmp_path / "m.txt", "x.mp4 c\n")
    with pytest.raises(ValueError, match=f"{named}:1.*neither"):
        read_annotation_list(named, label_map=lm)
    with pytest.raises(ValueError, match="no rows"):
        read_annotation_list(_write(tmp_path / "e.txt", "# nothing\n"))


def test_real_lists_and_label_maps(realdata):
    video = realdata / "video"
    k400 = read_label_map(video / "label_maps" / "label_map_k400.txt")
    ucf = read_label_map(video / "label_maps" / "label_map_ucf101.txt")
    assert len(k400) == 400 and len(ucf) == 101
    recs = read_annotation_list(video / "annotations" / "kinetics400_videos.txt",
                                data_root=video, label_map=k400)
    assert recs[0].label == 6 and k400[recs[0].label] == "arm wrestling"
    assert os.path.isfile(recs[0].path)
    recs = read_annotation_list(video / "annotations" / "ucf101_videos.txt", data_root=video,
                                label_map=ucf)
    assert ucf[recs[0].label] == "ApplyEyeMakeup" and os.path.isfile(recs[0].path)
    # the verbatim mmaction2 rawframe list 'imgs 5 127': label 127 is not a UCF101 class
    raw_list = video / "rawframes" / "rawframe_test_list.txt"
    with pytest.raises(ValueError, match=f"{raw_list}:1: label 127"):
        read_annotation_list(raw_list, label_map=ucf)


def test_real_rawframe_list_reads_frames(realdata, tmp_path):
    raw = realdata / "video" / "rawframes"
    # the list names its folder 'imgs'; point it at ApplyEyeMakeup_clip with path_map ...
    recs = read_annotation_list(raw / "rawframe_test_list.txt", data_root=raw,
                                path_map={"imgs": "ApplyEyeMakeup_clip"})
    assert len(recs) == 2 and recs[0].total_frames == 5 and recs[0].label == 127
    ds = VideoDataset(recs, mode="test", num_frames=4, sampling_rate=1, max_failure_ratio=0.0)
    item = ds[0]
    assert item["video"].shape == (4, 240, 320, 3) and item["video"].dtype == torch.uint8
    # ... or, as with mmaction2, by a data root holding an 'imgs' folder (here a symlink)
    (tmp_path / "imgs").symlink_to(raw / "ApplyEyeMakeup_clip")
    recs2 = read_annotation_list(raw / "rawframe_test_list.txt", data_root=tmp_path)
    src = vdecode.open_record(recs2[0])
    frames = src.get(np.array([0, 4, 4]))
    ref = np.asarray(Image.open(raw / "ApplyEyeMakeup_clip" / "img_00005.jpg").convert("RGB"))
    assert src.backend == "rawframes" and src.num_frames == 5
    assert frames.shape == (3, 240, 320, 3)
    assert np.array_equal(frames[1], ref)
    assert np.array_equal(frames[1], frames[2])
    # total_frames unknown (VideoMAEv2 'dir start -1' is a video; count the folder instead)
    counted = vdecode.RawFrameSource(str(raw / "ApplyEyeMakeup_clip"), None)
    assert counted.num_frames == 10


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def test_decord_and_pyav_agree_on_synthetic_mp4(synth):
    root, _ = synth
    recs = read_annotation_list(root / "train.txt", data_root=root)
    for rec in recs[::5]:
        n = video_num_frames(rec.path, "decord")
        assert video_num_frames(rec.path, "pyav") == n
        idx = np.array([n - 1, 0, 3, 3, n // 2])
        a = decode_frames(rec.path, idx, backend="decord")
        b = decode_frames(rec.path, idx, backend="pyav")
        assert a.shape == b.shape == (5, 32, 32, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)  # same FFmpeg decoder and RGB conversion
        assert np.array_equal(a[2], a[3])


@pytest.mark.parametrize("rel, n, hw", [
    ("kinetics400/arm_wrestling/demo.mp4", 280, (256, 340)),
    ("ucf101/ApplyEyeMakeup/test.avi", 164, (240, 320)),
])
def test_real_clips_decode_with_both_backends(realdata, rel, n, hw):
    path = realdata / "video" / rel
    assert video_num_frames(path, "decord") == n == video_num_frames(path, "pyav")
    idx = np.array([[0, 17, 100], [n - 2, n - 1, 50]])  # includes the final frame
    a = decode_frames(path, idx, backend="decord")
    b = decode_frames(path, idx, backend="pyav")
    assert a.shape == b.shape == (2, 3, *hw, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0, 0], a[0, 2])  # distinct frames really differ


def test_final_frame_of_avi_is_right_every_time(realdata):
    """decord 0.6 sometimes returns a stale frame for a file's final frame (dmlc/decord#195);
    the decord source detects it and re-reads that frame with PyAV."""
    path = realdata / "video" / "ucf101" / "ApplyEyeMakeup" / "test.avi"
    ref = decode_frames(path, np.array([100, 163]), backend="pyav")
    for _ in range(15):
        assert np.array_equal(decode_frames(path, np.array([100, 163]), backend="decord"), ref)


def test_gif_falls_back_to_pyav(tmp_path):
    frames = [Image.fromarray(np.full((24, 32, 3), 30 * i, np.uint8)) for i in range(6)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40, loop=0)
    with pytest.raises(VideoDecodeError, match="decord"):
        open_video(gif, backend="decord")
    src = open_video(gif)  # auto
    assert src.backend == "pyav" and src.num_frames == 6  # the GIF header has no frame count
    got = src.get(np.array([5, 0, 2]))
    assert got.shape == (3, 24, 32, 3)
    assert got[:, 0, 0, 0].tolist() == [150, 0, 60]


def test_fallback_when_decord_fails_or_is_missing(synth, monkeypatch, caplog):
    root, _ = synth
    path = str(read_annotation_list(root / "test.txt", data_root=root)[0].path)
    ref = decode_frames(path, np.array([1, 2]), backend="pyav")

    def broken(self, indices):
        raise RuntimeError("simulated codec failure")

    with monkeypatch.context() as m:
        m.setattr(vdecode._DecordSource, "get", broken)
        src = open_video(path)
        assert src.backend == "decord"
        with caplog.at_level(logging.INFO, logger="mm3d.video.decode"):
            got = src.get(np.array([1, 2]))
        assert src.backend == "pyav" and np.array_equal(got, ref)
        assert "simulated codec failure" in caplog.text
    with monkeypatch.context() as m:
        m.setattr(vdecode, "_decord", None)
        src = open_video(path)
        assert src.backend == "pyav" and np.array_equal(src.get(np.array([1, 2])), ref)


def test_unreadable_files_raise_decode_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(VideoDecodeError, match=r"bad\.mp4.*decord.*pyav"):
        open_video(bad)
    with pytest.raises(VideoDecodeError, match="does not exist"):
        open_video(tmp_path / "missing.mp4")


# --------------------------------------------------------------------------------------------
# Temporal sampling
# --------------------------------------------------------------------------------------------


def test_dense_stride_sampling():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(1000):
        idx = dense_sample(100, 16, 4, rng=rng)
        assert idx.shape == (16,) and idx.dtype == np.int64
        assert (np.diff(idx) == 4).all() and 0 <= idx[0] and idx[-1] <= 99
        starts.add(int(idx[0]))
    assert starts == set(range(0, 100 - 60))  # every feasible start is drawn
    for n in (1, 2, 10, 61):  # shorter than the 61-frame span: clamp on the stride grid
        idx = dense_sample(n, 16, 4, rng=rng)
        assert idx.shape == (16,) and idx.min() >= 0 and idx.max() <= n - 1
        assert (np.diff(idx) >= 0).all() and idx[0] == 0
    assert dense_sample(10, 16, 4, rng=rng).tolist() == [0, 4, 8] + [8] * 13


def test_dense_spread_sampling_matches_videomae_finetune_rule():
    for n, seed in itertools.product((70, 300), range(5)):
        idx = dense_sample(n, 16, 4, rng=np.random.default_rng(seed), spacing="spread")
        end = np.random.default_rng(seed).integers(64, n)  # the same draw, by hand
        ref = np.clip(np.linspace(end - 64, end, 16), end - 64, end - 1).astype(np.int64)
        assert idx.tolist() == ref.tolist()
    short = dense_sample(20, 16, 4, rng=np.random.default_rng(0), spacing="spread")
    assert short.tolist() == [0, 5, 10, 15, 19] + [19] * 11  # linspace(0, 20, 5) + padding


def test_segment_sampling():
    rng = np.random.default_rng(0)
    for n, s in itertools.product((16, 17, 50, 333), (4, 16)):
        idx = segment_sample(n, s, rng=rng)
        avg = n // s
        assert idx.shape == (s,) and ((idx // avg) == np.arange(s)).all()
        centre = segment_sample(n, s, test=True)
        assert centre.tolist() == [int(n / s / 2 + n / s * k) for k in range(s)]
    short = segment_sample(5, 16, rng=rng)
    assert short.min() == 0 and short.max() == 4 and (np.diff(short) >= 0).all()
    assert segment_sample(5, 16, test=True).max() <= 4
    with pytest.raises(ValueError, match="rng"):
        segment_sample(50, 8)


def _videomae_ssv2_test(n, s, num_clips):
    """VideoMAE ssv2.py test views: sorted segment centres + starts, clip k = [k::2]."""
    tick = n / s
    idx = sorted([int(tick / 2 + tick * x) for x in range(s)] + [int(tick * x) for x in range(s)])
    return np.array(idx)[np.arange(num_clips)[:, None] + 2 * np.arange(s)[None]]


def _videomae_k400_test(n, clip_len, rate, num_clips):
    """VideoMAE kinetics.py test views (the slow reference)."""
    all_index = list(range(0, n, rate))
    while len(all_index) < clip_len:
        all_index.append(all_index[-1])
    step = max((len(all_index) - clip_len) / (num_clips - 1), 0)
    return np.array([all_index[int(k * step):int(k * step) + clip_len] for k in range(num_clips)])


def test_multi_clip_test_views_match_videomae():
    for n, clip_len, rate, num_clips in itertools.product((5, 40, 64, 301), (4, 16), (1, 2, 4),
                                                          (2, 3, 5)):
        got = uniform_clips(n, clip_len, rate, num_clips)
        assert got.shape == (num_clips, clip_len)
        assert got.tolist() == _videomae_k400_test(n, clip_len, rate, num_clips).tolist()
    for n, s in itertools.product((16, 37, 120), (4, 16)):
        assert segment_clips(n, s, 2).tolist() == _videomae_ssv2_test(n, s, 2).tolist()
    one = uniform_clips(100, 16, 4, 1)
    assert one.tolist() == [list(range(16, 80, 4))]  # a single clip is centred
    assert segment_clips(50, 8, 1).tolist() == [segment_sample(50, 8, test=True).tolist()]


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _clip(t=4, h=48, w=64, seed=0):
    frames = render_clip("move_right", np.random.default_rng(seed), num_frames=t, size=max(h, w))
    return torch.from_numpy(frames[:, :h, :w].copy())


def test_normalize_values_and_layout():
    video = torch.zeros(2, 3, 4, 3, dtype=torch.uint8)
    video[1] = 255
    out = vt.normalize(video)
    assert out.shape == (3, 2, 3, 4) and out.dtype == torch.float32
    mean = torch.tensor(vt.IMAGENET_DEFAULT_MEAN)
    std = torch.tensor(vt.IMAGENET_DEFAULT_STD)
    assert_close(out[:, 0, 0, 0], -mean / std)
    assert_close(out[:, 1, 2, 3], (1 - mean) / std)
    assert vt.IMAGENET_DEFAULT_MEAN == (0.485, 0.456, 0.406)


def test_identical_frames_stay_identical():
    frame = _clip(1)
    video = frame.expand(6, -1, -1, -1).contiguous()
    pipes = [vt.pretrain_transform(32), vt.finetune_train_transform(32, reprob=0.0),
             vt.pretrain_transform(32, flip=True)]
    for pipe, seed in itertools.product(pipes, range(6)):
        out = pipe(video, torch.Generator().manual_seed(seed))
        assert out.shape == (3, 6, 32, 32)
        assert (out == out[:, :1]).all(), f"{pipe} changed frames differently (seed {seed})"
    outs = [pipes[1](video, torch.Generator().manual_seed(s)) for s in range(3)]
    assert not torch.equal(outs[0], outs[1])  # the augmentation does something


def test_batched_transforms_equal_per_frame_application():
    """Consistency: one draw per clip, the same as transforming each frame with that draw."""
    video = _clip(5)
    pipes = [vt.pretrain_transform(24), vt.finetune_train_transform(24, reprob=0.0),
             vt.test_transform(24, 32, 3)]
    for pipe, seed in itertools.product(pipes, range(4)):
        batched = pipe(video, torch.Generator().manual_seed(seed))
        per_frame = torch.cat([pipe(video[t:t + 1], torch.Generator().manual_seed(seed))
                               for t in range(video.shape[0])], dim=-3)
        assert_close(batched, per_frame, atol=1e-5, msg=f"{pipe}")


def test_multi_scale_crop_boxes():
    g = torch.Generator().manual_seed(0)
    sides, offsets = set(), set()
    for _ in range(400):
        top, left, h, w = vt.multi_scale_crop_params(256, 340, 224, generator=g)
        sides.add((h, w))
        offsets.add((top, left, h, w))
        assert 0 <= top <= 256 - h and 0 <= left <= 340 - w
    # base 256 -> sides int(256 * s) = 256, 224, 192, 168 (224 snaps to the output side);
    # pairs whose scale indices differ by at most 1:
    expected = {(256, 256), (256, 224), (224, 256), (224, 224), (224, 192), (192, 224),
                (192, 192), (192, 168), (168, 192), (168, 168)}
    assert sides == expected
    for h, w in expected:  # 13 fixed positions on a quarter grid
        boxes = {(t, le) for t, le, hh, ww in offsets if (hh, ww) == (h, w)}
        hs, ws = (256 - h) // 4, (340 - w) // 4
        allowed = {(a * hs, b * ws) for a, b in [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (2, 0),
                                                 (2, 4), (4, 2), (0, 2), (1, 1), (1, 3), (3, 1),
                                                 (3, 3)]}
        assert boxes <= allowed
    out = vt.multi_scale_crop(_clip(3), 32, generator=g)
    assert out.shape == (3, 32, 32, 3) and out.dtype == torch.uint8


def test_random_resized_crop_boxes():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = vt.random_resized_crop_params(240, 320, generator=g)
        assert 0 <= top <= 240 - h and 0 <= left <= 320 - w
        assert 0.08 * 0.9 <= h * w / (240 * 320) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or (h, w) == (240, 320)
    # an impossible aspect range falls back to the largest centred box of that aspect
    assert vt.random_resized_crop_params(100, 400, generator=g, scale=(0.9, 1.0),
                                         ratio=(1.0, 1.0)) == (0, 150, 100, 100)


def test_three_crop_and_short_side_resize():
    wide = torch.arange(2 * 4 * 10 * 3, dtype=torch.uint8).reshape(2, 4, 10, 3)
    crops = vt.three_crop(wide, 4)
    assert crops.shape == (3, 2, 4, 4, 3)
    for k, left in enumerate([0, 3, 6]):  # left, centre, right
        assert torch.equal(crops[k], wide[:, :, left:left + 4])
    tall = wide.transpose(1, 2)  # (2, 10, 4, 3)
    crops = vt.three_crop(tall, 4)
    for k, top in enumerate([0, 3, 6]):  # top, centre, bottom
        assert torch.equal(crops[k], tall[:, top:top + 4])
    assert vt.short_side_resize(torch.zeros(2, 240, 320, 3, dtype=torch.uint8), 224).shape == (
        2, 224, 298, 3)  # long side int(224 * 320 / 240)
    views = vt.test_transform(32, 32, 3)(_clip(2, 48, 64))
    assert views.shape == (3, 3, 2, 32, 32)


def test_random_erasing_shares_the_box_across_frames():
    x = torch.zeros(3, 5, 32, 32)
    out = vt.random_erasing(x, 1.0, mode="pixel", generator=torch.Generator().manual_seed(3))
    changed = out != 0
    assert changed.any()
    assert (changed == changed[:, :1]).all()  # the same box in every frame
    assert not torch.equal(out[:, 0], out[:, 1])  # per-frame pixel noise
    area = changed[0, 0].float().mean().item()
    assert 0.02 * 0.8 <= area <= 1 / 3 * 1.2
    assert torch.equal(vt.random_erasing(x, 0.0), x)


def _timm_policy_ops():
    return [op.name for op in vt.VideoRandAugment("rand-m7-n4-mstd0.5-inc1").ops]


def test_rand_augment_policy_and_levels_match_timm():
    from timm.data.auto_augment import LEVEL_TO_ARG

    ra = vt.VideoRandAugment("rand-m7-n4-mstd0.5-inc1")
    assert ra.num_layers == 4 and len(ra.ops) == 15 and ra.choice_weights is None
    assert all(op.magnitude == 7 and op.magnitude_std == 0.5 and op.prob == 0.5 for op in ra.ops)
    assert "PosterizeIncreasing" in _timm_policy_ops()
    state = random.getstate()
    try:
        names = _timm_policy_ops() + ["Posterize", "Solarize", "Color", "TranslateX"]
        for name, m in itertools.product(names, np.arange(0, 10.5, 0.5)):
            fn = LEVEL_TO_ARG[name]
            hp = {"translate_const": 100}
            mine = {vt.rand_augment_level(name, float(m), hp, neg) for neg in (False, True)}
            if fn is None:
                assert mine == {None}
                continue
            random.seed(int(m * 10))
            ref = {fn(float(m), hp)[0] for _ in range(20)}  # both signs of signed ops
            assert {round(float(v), 9) for v in ref} <= {round(float(v), 9) for v in mine}, name
    finally:
        random.setstate(state)


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert", "Rotate",
                                  "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                                  "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                                  "TranslateYRel"])
def test_rand_augment_ops_match_timm_pil_ops(name):
    from timm.data.auto_augment import NAME_TO_OP

    frames = render_clip("static", np.random.default_rng(1), num_frames=2, size=64)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    hp = {"translate_const": 28}
    for negate in (False, True):
        arg = vt.rand_augment_level(name, 7.0, hp, negate)
        mine = vt.apply_rand_augment_op(x, name, arg).permute(0, 2, 3, 1).int()
        for t in range(2):
            args = () if arg is None else (int(arg) if "Posterize" in name or "Solarize" in name
                                           else arg,)
            ref = np.asarray(NAME_TO_OP[name](Image.fromarray(frames[t]), *args,
                                              fillcolor=(128, 128, 128),
                                              resample=Image.BILINEAR)).astype(int)
            diff = (mine[t] - torch.from_numpy(ref)).abs().float()
            # colour ops agree to rounding; resampling ops differ at a few edge pixels
            geometric = name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
            assert diff.mean() <= (2.0 if geometric else 0.6), (name, arg, diff.mean().item())
            assert (diff <= 1).float().mean() >= (0.9 if geometric else 0.99), (name, arg)


def test_rand_augment_is_seeded_and_varied():
    ra = vt.VideoRandAugment()
    draws = [ra.sample(torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws[3] == ra.sample(torch.Generator().manual_seed(3))
    names = {n for d in draws for n, _ in d}
    assert len(names) >= 10  # many ops get drawn
    assert min(len(d) for d in draws) < 4 <= max(len(d) for d in draws)  # the 0.5 coin
    with pytest.raises(TypeError):
        ra(torch.zeros(2, 8, 8, 3))


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def test_dataset_train_and_test_views(synth):
    root, summary = synth
    recs = read_annotation_list(root / "train.txt", data_root=root,
                                label_map=root / "label_map.txt")
    assert len(recs) == summary["train"] == 2 * len(CLASSES)
    ds = VideoDataset(recs, mode="train", num_frames=8, sampling_rate=2,
                      transform=vt.finetune_train_transform(32), seed=1)
    item = ds[3]
    assert item["video"].shape == (3, 8, 32, 32) and item["video"].dtype == torch.float32
    assert item["label"].item() == recs[3].label and item["index"].item() == 3
    raw = VideoDataset(recs, mode="train", num_frames=8, sampling_rate=2)[0]["video"]
    assert raw.shape == (8, 32, 32, 3) and raw.dtype == torch.uint8
    rep = VideoDataset(recs, mode="train", num_frames=8, num_sample=2,
                       transform=vt.finetune_train_transform(16))
    views = [rep[i]["video"] for i in range(3)]
    assert views[0].shape == (2, 3, 8, 16, 16)
    assert not all(torch.equal(v[0], v[1]) for v in views)  # independent augmentations

    test = VideoDataset(recs, mode="test", num_frames=8, sampling_rate=2, num_clips=2,
                        num_crops=3, transform=vt.test_transform(24, 24, 3))
    views = test[5]["video"]
    assert views.shape == (6, 3, 8, 24, 24)
    again = test[5]["video"]
    assert torch.equal(views, again)  # test views are deterministic
    one = VideoDataset(recs, mode="test", num_frames=8, transform=vt.test_transform(24, 24, 1))
    assert one[0]["video"].shape == (3, 8, 24, 24)
    seg = VideoDataset(recs, mode="test", num_frames=8, sampling="segment", num_clips=2)
    assert seg[0]["video"].shape == (2, 8, 32, 32, 3)


def test_dataset_train_sampling_is_seeded():
    # rows are not read: frame_indices is a pure function of the frame count and the stream
    ds = [VideoDataset([vdata.VideoRecord("x.mp4", 0, None, "l:1")], mode="train", seed=s)
          for s in (0, 0, 1)]
    torch.manual_seed(0)
    a, b, c = (d.frame_indices(300, d._stream()) for d in ds)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_rawframes_and_videos_give_the_same_clip(synth):
    root, _ = synth
    vids = read_annotation_list(root / "val.txt", data_root=root)
    raws = read_annotation_list(root / "rawframes_val.txt", data_root=root)
    assert len(vids) == len(raws) and all(r.is_rawframes for r in raws)
    for v, r in zip(vids[:3], raws[:3]):
        assert video_num_frames(v.path) == r.total_frames and v.label == r.label
    dv = VideoDataset(vids, mode="test", num_frames=8, sampling_rate=2)
    dr = VideoDataset(raws, mode="test", num_frames=8, sampling_rate=2)
    a, b = dv[1]["video"].float(), dr[1]["video"].float()
    assert a.shape == b.shape == (8, 32, 32, 3)
    assert (a - b).abs().mean() < 8  # H.264 vs JPEG of the same rendered frames


def test_bad_videos_are_replaced_counted_and_bounded(synth, tmp_path, caplog):
    root, _ = synth
    good = read_annotation_list(root / "test.txt", data_root=root)[:3]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(3000))
    rows = [good[0], vdata.VideoRecord(str(corrupt), 4, None, "list.txt:2"), good[1],
            vdata.VideoRecord(str(tmp_path / "missing.mp4"), 5, None, "list.txt:4"), good[2]]
    ds = VideoDataset(rows, mode="test", num_frames=4, max_failure_ratio=0.4)  # allows 2 of 5
    with caplog.at_level(logging.WARNING, logger="mm3d.video.decode"):
        item = ds[1]
    assert item["index"].item() == 2 and item["label"].item() == good[1].label
    assert str(corrupt) in caplog.text and "list.txt:2" in caplog.text
    item = ds[3]
    assert item["index"].item() == 4 and sorted(ds.failed) == [1, 3]
    assert "does not exist" in ds.failed[3]
    assert ds[1]["index"].item() == 2 and len(ds.failed) == 2  # known-bad rows are skipped
    strict = VideoDataset(rows, mode="train", num_frames=4, max_failure_ratio=0.3)
    strict[1]
    with pytest.raises(RuntimeError, match=r"2 of 5 videos could not be read.*list\.txt:4"):
        strict[3]
    with pytest.raises(RuntimeError, match="1 of 5"):
        VideoDataset(rows, mode="train", num_frames=4, max_failure_ratio=0.0)[1]


def test_check_sample_reads_directly_and_catches_a_stream_shorter_than_its_header(realdata, tmp_path):
    """A truncated avi opens and PyAV's header still promises 164 frames: the loader repeats the last
    decoded frame, the check (no replacement) reports the short stream."""
    data = (realdata / "video" / "ucf101" / "ApplyEyeMakeup" / "test.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    rows = [vdata.VideoRecord(str(tmp_path / "cut.avi"), 0, None, "list.txt:1"),
            vdata.VideoRecord(str(tmp_path / "missing.avi"), 0, None, "list.txt:2")]
    ds = VideoDataset(rows, mode="test", num_frames=4, sampling_rate=8, backend="pyav", max_failure_ratio=0.5)
    assert ds[0]["video"].shape == (4, 240, 320, 3) and not ds.failed
    assert ds.sample_source(1) == (str(tmp_path / "missing.avi"), "list.txt:2")
    with pytest.raises(VideoDecodeError, match=r"cut.avi: the stream ends after frame \d+ \(0-based\) of the 164"):
        ds.check_sample(0)
    with pytest.raises(VideoDecodeError, match="does not exist"):
        ds.check_sample(1)
    assert ds[1]["index"].item() == 0 and list(ds.failed) == [1]  # the loader replaces; the check does not


def test_real_clips_through_the_dataset(realdata):
    video = realdata / "video"
    recs = (read_annotation_list(video / "annotations" / "kinetics400_videos.txt",
                                 data_root=video)
            + read_annotation_list(video / "annotations" / "ucf101_videos.txt", data_root=video))
    ds = VideoDataset(recs, mode="test", num_frames=8, sampling_rate=4, num_clips=2,
                      num_crops=3, transform=vt.test_transform(64, 64, 3), max_failure_ratio=0.0)
    for i in range(2):
        item = ds[i]
        assert item["video"].shape == (6, 3, 8, 64, 64)
        assert torch.isfinite(item["video"]).all() and item["video"].std() > 0.1
    train = VideoDataset(recs, mode="train", num_frames=8, sampling_rate=4,
                         transform=vt.finetune_train_transform(64), max_failure_ratio=0.0)
    assert train[1]["video"].shape == (3, 8, 64, 64)


# --------------------------------------------------------------------------------------------
# Synthetic clips
# --------------------------------------------------------------------------------------------


def test_synth_layout_and_determinism(synth, tmp_path):
    root, summary = synth
    assert summary["classes"] == len(CLASSES) == 9
    assert (summary["train"], summary["val"], summary["test"]) == (18, 9, 9)
    assert read_label_map(root / "label_map.txt") == list(CLASSES)
    pre = read_annotation_list(root / "pretrain.txt", data_root=root)
    assert len(pre) == 18 and all(r.label == -1 and os.path.isfile(r.path) for r in pre)
    raws = read_annotation_list(root / "rawframes_train.txt", data_root=root)
    assert all(16 <= r.total_frames <= 24 for r in raws)
    a = render_clip("rotate_cw", np.random.default_rng(7), num_frames=6, size=32)
    b = render_clip("rotate_cw", np.random.default_rng(7), num_frames=6, size=32)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    path = tmp_path / "c.mp4"
    assert write_mp4(path, a) in ("libx264", "mpeg4")
    assert decode_frames(path, np.arange(6)).shape == (6, 32, 32, 3)


def test_synth_motion_classes_move_as_named():
    """The object's centre of change moves the named way (left/right/up/down)."""
    for motion, axis, sign in [("move_left", 1, -1), ("move_right", 1, 1), ("move_up", 0, -1),
                               ("move_down", 0, 1)]:
        for seed in range(3):
            v = render_clip(motion, np.random.default_rng(seed), num_frames=12, size=64)
            v = v.astype(float)
            bg = np.median(v, axis=0)  # the moving object rarely covers a pixel for long
            w = np.abs(v - bg).sum(-1)  # (T, H, W) where the object is
            coords = np.arange(64)
            pos = [(w[t].sum(axis=1 - axis) * coords).sum() / w[t].sum() for t in (0, 11)]
            assert sign * (pos[1] - pos[0]) > 5, (motion, seed, pos)


def test_synth_actors_pair_opposite_motions_and_carry_their_colour():
    """Opposite motions share an actor; every clip shows its actor's colour family over a
    background far from it, so appearance narrows a clip to a pair and motion decides."""
    from mm3d.video.synth import ACTOR_COLOURS, ACTORS, COLOUR_JITTER

    pairs = [("move_left", "move_right"), ("move_up", "move_down"), ("rotate_cw", "rotate_ccw"),
             ("grow", "shrink")]
    assert all(ACTORS[a] == ACTORS[b] for a, b in pairs)
    assert len({ACTORS[a] for a, _ in pairs} | {ACTORS["static"]}) == 5 and set(ACTORS) == set(CLASSES)
    for motion in CLASSES:
        for seed in range(3):
            v = render_clip(motion, np.random.default_rng(seed), num_frames=4, size=64).astype(float)
            ref = np.asarray(ACTOR_COLOURS[ACTORS[motion]], dtype=float)
            near = np.linalg.norm(v - ref, axis=-1) <= COLOUR_JITTER * np.sqrt(3) + 30  # jitter, stripes, noise
            assert near.mean() > 0.05, (motion, seed, near.mean())
            assert near.mean() < 0.7, (motion, seed, near.mean())  # the background is not the actor


def test_synth_small_scale_writes_frame_folders_for_eval_splits_only(tmp_path):
    spec = SCALES["small"]
    assert spec.rawframe_splits == ("val", "test") and SCALES["tiny"].rawframe_splits == ("train", "val", "test")
    small = SynthVideoSpec(size=32, min_frames=8, max_frames=8, per_class=(1, 1, 0), rawframe_splits=("val",))
    summary = write_video_dataset(tmp_path, small, seed=0)
    assert summary["rawframes"] == ["val"]
    assert (tmp_path / "rawframes_val.txt").is_file() and not (tmp_path / "rawframes_train.txt").exists()
    assert len(list((tmp_path / "rawframes").iterdir())) == len(CLASSES)
