"""`mm3d extract`: features of whole datasets (tiny variants, checkpoints written into tmp_path).

Video: window counts and timestamps of the real clips (mp4, avi, a frame folder) and of a GIF
written here, counted by hand; features equal ``mm3d.create_model(...).forward_features`` on
``mm3d.video.load_clip``'s view. Point clouds: the global feature equals the model's own on
``mm3d.pointcloud.load_cloud``'s sample; per-point features, the PCA-coloured .ply and its picture.
Large jobs: a bad input goes to failed.txt (exit 1) and the rest go on; a run killed half-way
resumes to the same outputs, skipping finished inputs; torchrun shards the inputs.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mm3d
import mm3d.extract as extract_core
from mm3d.cli import main
from mm3d.config import load_config, to_dict
from mm3d.pointcloud.extract import pca_colors, picture_point_size, read_cloud
from mm3d.pointcloud.io import read_points
from mm3d.pointcloud.probe import pool_patch_tokens
from mm3d.registry import TASKS
from mm3d.testing import PROJECT_ROOT, assert_close
from mm3d.video.decode import decode_frames
from mm3d.video.extract import sliding_windows
from mm3d.video.transforms import test_transform

D = 48  # width of videomae_tiny_test
DP = 32  # width of pointmae_tiny_test


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the tiny variants (random weights, each with its config)."""
    d = tmp_path_factory.mktemp("ckpts")

    def save(name: str, task: str, *overrides: str) -> Path:
        torch.manual_seed(0)
        cfg = load_config(None, list(overrides), task=task)
        torch.save({"model": TASKS.get(task).build_model(cfg).state_dict(), "config": to_dict(cfg)}, d / name)
        return d / name

    return {
        "video_cls": save("video_cls.pt", "videomae_finetune", "model.variant=videomae_tiny_test",
                          "model.num_classes=3"),
        "video_pre": save("video_pre.pt", "videomae_pretrain", "model.variant=videomae_tiny_test"),
        "pc_pre": save("pc_pre.pt", "pointmae_pretrain", "model.variant=pointmae_tiny_test", "data.npoints=64",
                       "data.dataset=folder"),
        "pc_cls": save("pc_cls.pt", "pointmae_classify", "model.variant=pointmae_tiny_test", "model.num_classes=3",
                       "data.npoints=64", "data.fps_points=64", "data.cache_points=64"),
    }


def run_extract(capsys, *args) -> tuple[int, dict | None, str]:
    """`mm3d extract ARGS` in this process: (exit status, the summary line, stderr)."""
    rc = main(["extract", "--device", "cpu", "--no-progress", *map(str, args)])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, json.loads(lines[-1]) if lines else None, err


def read_index(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_gif(path: Path, frames: int = 40, ms: int = 100) -> Path:
    """A GIF of `frames` 48x64 frames shown `ms` milliseconds each (1000 / ms frames a second)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms, loop=0)
    return path


# ----------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------


def test_sliding_windows_by_hand():
    w = sliding_windows(10, window=4, stride=3, clip_len=2)  # starts 0, 3, 6 (a window from 9 would not fit)
    assert w.start.tolist() == [0, 3, 6] and w.end.tolist() == [4, 7, 10]
    assert w.indices.tolist() == [[0, 2], [3, 5], [6, 8]]
    w = sliding_windows(16, window=16, stride=4, clip_len=16)  # VideoMAEv2 TAD: 16 consecutive frames
    assert w.start.tolist() == [0] and w.indices.tolist() == [list(range(16))]
    w = sliding_windows(3, window=4, stride=2, clip_len=4)  # shorter than a window: one, last frame repeated
    assert w.start.tolist() == [0] and w.end.tolist() == [3] and w.indices.tolist() == [[0, 1, 2, 2]]
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, window=4, stride=0, clip_len=2)


def test_video_windows_and_timestamps_of_real_clips(realdata, ckpts, tmp_path, capsys):
    """16-frame windows every 4 frames: counts, frames and seconds worked out by hand for the real mp4
    (280 frames at 28 fps), avi (164 at 25), the 10-frame folder and a GIF (40 frames at 10 fps)."""
    video = realdata / "video"
    mp4, avi = video / "kinetics400/arm_wrestling/demo.mp4", video / "ucf101/ApplyEyeMakeup/test.avi"
    folder, gif = video / "rawframes/ApplyEyeMakeup_clip", write_gif(tmp_path / "anim.gif")
    out = tmp_path / "out"
    rc, summary, _ = run_extract(capsys, mp4, avi, folder, gif, "--checkpoint", ckpts["video_cls"], "--out", out,
                                 "--window", 16, "--stride", 4, "--batch-size", 16)
    assert rc == 0 and summary == {"out": str(out), "inputs": 4, "done": 4, "skipped": 0, "failed": 0}
    expected = {"demo": (280, 28.0), "test": (164, 25.0), "ApplyEyeMakeup_clip": (10, None), "anim": (40, 10.0)}
    windows = {"demo": 1 + (280 - 16) // 4, "test": 1 + (164 - 16) // 4, "ApplyEyeMakeup_clip": 1,
               "anim": 1 + (40 - 16) // 4}
    assert windows == {"demo": 67, "test": 38, "ApplyEyeMakeup_clip": 1, "anim": 7}
    rows = read_index(out / "index.csv")
    assert [r["video"] for r in rows] == [n for n in expected for _ in range(windows[n])]  # input order
    assert list(rows[0]) == ["video", "path", "window", "start_frame", "end_frame", "start_sec", "end_sec", "fps"]
    for name, (frames, fps) in expected.items():
        feats = np.load(out / f"{name}.npy")
        assert feats.shape == (windows[name], D) and np.isfinite(feats).all()
        mine = [r for r in rows if r["video"] == name]
        assert mine == read_index(out / f"{name}.csv")
        for k, r in enumerate(mine):
            start, end = 4 * k, min(4 * k + 16, frames)
            assert (int(r["window"]), int(r["start_frame"]), int(r["end_frame"])) == (k, start, end)
            if fps is None:
                assert r["start_sec"] == r["end_sec"] == r["fps"] == ""
            else:
                assert float(r["fps"]) == fps
                assert float(r["start_sec"]) == pytest.approx(start / fps)
                assert float(r["end_sec"]) == pytest.approx(end / fps)
    assert float(rows[66]["start_sec"]) == pytest.approx(264 / 28)  # the mp4's last window starts at 9.43 s
    # distinct windows see distinct frames
    assert not np.allclose(np.load(out / "demo.npy")[0], np.load(out / "demo.npy")[-1])

    # a frame folder has no frame rate of its own: --fps gives one (videos keep theirs)
    rc, summary, _ = run_extract(capsys, folder, avi, "--checkpoint", ckpts["video_cls"], "--out", out, "--window", 16,
                                 "--stride", 4, "--fps", 30, "--overwrite")
    row = read_index(out / "ApplyEyeMakeup_clip.csv")[0]
    assert (float(row["fps"]), float(row["end_sec"])) == (30.0, pytest.approx(10 / 30))
    assert float(read_index(out / "test.csv")[1]["start_sec"]) == pytest.approx(4 / 25)

    # the checkpoint's own clip by default: 4 frames x sampling rate 4 = 16-frame windows, every 16 frames
    rc, summary, _ = run_extract(capsys, mp4, "--checkpoint", ckpts["video_cls"], "--out", tmp_path / "default")
    rows = read_index(tmp_path / "default" / "index.csv")
    assert rc == 0 and len(rows) == 1 + (280 - 16) // 16 == 17
    assert [int(r["start_frame"]) for r in rows[:3]] == [0, 16, 32] and rows[-1]["end_frame"] == "272"


def test_video_features_equal_the_models_own(realdata, ckpts, tmp_path, capsys):
    """The window that is load_clip's centre clip gives create_model(...).forward_features pooled by the
    model's own head (mean + fc_norm); other windows equal the same on their own frames; tokens with
    --pool none; windows batched or not alike."""
    avi, ckpt = realdata / "video/ucf101/ApplyEyeMakeup/test.avi", ckpts["video_cls"]
    out = tmp_path / "mean"
    rc, _, _ = run_extract(capsys, avi, "--checkpoint", ckpt, "--out", out, "--stride", 4, "--batch-size", 5)
    feats, rows = np.load(out / "test.npy"), read_index(out / "test.csv")
    assert rc == 0 and feats.shape == (38, D)

    model = mm3d.create_model(checkpoint=ckpt)
    with torch.no_grad():
        # load_clip: 4 frames 4 apart, centred: the grid 0, 4, ..., 160 has 41 frames, the clip starts at
        # grid frame (41 - 4) // 2 = 18, i.e. frame 72: the window 72..88 with stride 4 is window 18
        clip = mm3d.video.load_clip(avi, checkpoint=ckpt)
        assert rows[18]["start_frame"] == "72"
        assert_close(feats[18], model.forward_head(model.forward_features(clip[None]), pre_logits=True)[0],
                     atol=1e-5, msg="load_clip window")
        view = test_transform(32, 32, 1)
        for k in (0, 37):
            frames = decode_frames(avi, sliding_windows(164, 16, 4, 4).indices[k])
            tokens = model.forward_features(view(torch.from_numpy(frames)))
            assert_close(feats[k], model.forward_head(tokens, pre_logits=True)[0], atol=1e-5, msg=f"window {k}")

    rc, _, _ = run_extract(capsys, avi, "--checkpoint", ckpt, "--out", tmp_path / "tokens", "--stride", 4,
                           "--pool", "none")
    tokens = np.load(tmp_path / "tokens" / "test.npy")
    assert tokens.shape == (38, 2 * 4 * 4, D)  # (W, L, D): 2 x 4 x 4 tubelets of a 4x32x32 clip
    with torch.no_grad():
        assert_close(tokens[18], model.forward_features(clip[None])[0], atol=1e-5)

    # a pretraining checkpoint: the mean of its (final-normed) tokens; it has no class token
    pre = mm3d.create_model(checkpoint=ckpts["video_pre"])
    rc, _, _ = run_extract(capsys, avi, "--checkpoint", ckpts["video_pre"], "--out", tmp_path / "pre", "--stride", 4)
    with torch.no_grad():
        assert_close(np.load(tmp_path / "pre" / "test.npy")[18], pre.forward_features(clip[None])[0].mean(0), atol=1e-5)
    rc, _, err = run_extract(capsys, avi, "--checkpoint", ckpts["video_pre"], "--out", tmp_path / "cls",
                             "--pool", "cls")
    assert rc == 2 and "mm3d extract: error: --pool cls: this model has no class token" in err


def test_bad_inputs_go_to_failed_txt_and_the_rest_go_on(ckpts, tmp_path, capsys, caplog):
    gif = write_gif(tmp_path / "good.gif", frames=20)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty_frames"
    empty.mkdir()
    missing = tmp_path / "missing.avi"
    out = tmp_path / "out"
    args = ["--checkpoint", ckpts["video_cls"], "--out", out]
    rc, summary, _ = run_extract(capsys, corrupt, gif, missing, empty, *args)
    assert rc == 1 and summary["done"] == 1 and summary["failed"] == 3
    failed = (out / "failed.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in failed] == [str(corrupt), str(missing), str(empty)]
    for line in failed:
        path, reason = line.split("\t")
        assert path in reason and "Traceback" not in reason  # the reason names the file
        assert reason in caplog.messages  # logged as met
    assert "does not exist" in failed[1] and "no frames" in failed[2]
    assert np.load(out / "good.npy").shape == (1, D) and {r["video"] for r in read_index(out / "index.csv")} == {"good"}
    assert sorted(p.name for p in out.iterdir()) == ["extract.json", "failed.txt", "good.csv", "good.npy", "index.csv"]
    # read by two worker processes: the same files
    good = (out / "good.npy").read_bytes()
    rc, summary, _ = run_extract(capsys, corrupt, gif, missing, empty, *args, "--num-workers", 2, "--overwrite")
    assert rc == 1 and (out / "good.npy").read_bytes() == good
    assert (out / "failed.txt").read_text().splitlines() == failed
    # again: the good one is skipped, the bad ones fail again; without them, failed.txt goes
    rc, summary, _ = run_extract(capsys, corrupt, gif, missing, empty, *args)
    assert rc == 1 and (summary["skipped"], summary["failed"]) == (1, 3)
    rc, summary, _ = run_extract(capsys, gif, *args)
    assert rc == 0 and summary["skipped"] == 1 and not (out / "failed.txt").exists()


# ----------------------------------------------------------------------------------------------
# Point clouds
# ----------------------------------------------------------------------------------------------


def test_pca_colors_follow_the_principal_components():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(2, 500))
    u, v = np.linalg.qr(rng.normal(size=(8, 2)))[0].T  # orthonormal directions in 8-D
    feats = torch.tensor(3 * t[:, None] * u + 1 * s[:, None] * v + 0.01 * rng.normal(size=(500, 8)),
                         dtype=torch.float32)
    rgb = pca_colors(feats).numpy()
    assert rgb.shape == (500, 3) and rgb.min() >= 0 and rgb.max() <= 1
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    corr = lambda a, b: abs(np.corrcoef(rank(a), rank(b))[0, 1])  # noqa: E731
    assert corr(rgb[:, 0], t) > 0.99 and corr(rgb[:, 1], s) > 0.99  # largest variance first
    assert corr(rgb[:, 0], s) < 0.2
    assert np.isclose(np.quantile(rgb[:, 0], 0.5), 0.5, atol=0.1) and (rgb[:, 0] == 1).sum() >= 4  # 1 % clipped
    flat = pca_colors(torch.ones(10, 8)).numpy()  # no variance: mid grey
    assert np.allclose(flat, 0.5)
    two = pca_colors(torch.tensor(rng.normal(size=(50, 2)), dtype=torch.float32)).numpy()  # only 2 components
    assert np.allclose(two[:, 2], 0.5) and two[:, :2].std() > 0.1


@pytest.fixture
def clouds(realdata, tmp_path) -> list[Path]:
    """The bunny (397 points), a ModelNet chair (10,000) and a 20-point cloud (fewer than the 64 sampled)."""
    small = tmp_path / "small.npy"
    np.save(small, np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32) * 5 + 2)
    pc = realdata / "pointcloud"
    return [pc / "scans/bunny.pcd", pc / "modelnet40_sample/chair/chair_0391.txt", small]


def test_point_features_equal_the_models_own_and_per_point_files(clouds, ckpts, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n4 5\n")
    ckpt, out = ckpts["pc_pre"], tmp_path / "out"
    rc, summary, _ = run_extract(capsys, *clouds, bad, "--checkpoint", ckpt, "--out", out, "--per-point",
                                 "--batch-size", 2)
    assert rc == 1 and summary["done"] == 3 and (out / "failed.txt").read_text().startswith(f"{bad}\t{bad}")
    model = mm3d.create_model(checkpoint=ckpt)
    rows = read_index(out / "index.csv")
    for path, row in zip(clouds, rows):
        name, raw = path.stem, read_points(path)[:, :3]
        cloud = read_cloud(str(path), load_config(None, ["model.variant=pointmae_tiny_test", "data.npoints=64"],
                                                  task="pointmae_pretrain").data)
        sample = mm3d.pointcloud.load_cloud(path, checkpoint=ckpt)
        assert torch.equal(cloud.sample, sample)  # the test protocol's sample
        with torch.no_grad():
            tokens = model.forward_features(sample[None])  # (1, G, D)
            centers = model.group(sample[None]).center[0]
        assert_close(np.load(out / f"{name}.npy"), pool_patch_tokens(tokens, "max_plus_mean")[0], atol=1e-5, msg=name)
        assert row == {"input": str(path), "name": name, "points": str(len(raw)), "sampled": "64", "dim": str(DP),
                       "pool": "max+mean"}

        per_point = np.load(out / f"{name}_points.npy")
        assert per_point.shape == (len(raw), DP) and np.isfinite(per_point).all()
        # a patch centre is a point of the file: its feature is its patch's token
        frame = (torch.from_numpy(raw) - cloud.center) / cloud.scale
        at = torch.cdist(centers, frame).argmin(dim=1)
        assert_close(per_point[at.numpy()], tokens[0], atol=1e-4, msg=f"{name} at the centres")
        # elsewhere a blend of the three nearest patches' tokens: inside their range
        near3 = torch.cdist(frame, centers).topk(3, largest=False).indices  # (N, 3)
        blend = torch.from_numpy(per_point)
        assert (blend >= tokens[0][near3].amin(1) - 1e-5).all() and (blend <= tokens[0][near3].amax(1) + 1e-5).all()

        ply = read_points(out / f"{name}_pca.ply")
        assert ply.shape == (len(raw), 6) and np.array_equal(ply[:, :3], raw)
        rgb = ply[:, 3:]
        assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.std(axis=0).min() > 0.05
        assert np.abs(rgb - pca_colors(torch.from_numpy(per_point)).numpy()).max() <= 0.5 / 255 + 1e-6
        png = np.asarray(Image.open(out / f"{name}_pca.png").convert("RGB"))
        drawn, size = (png != 255).any(-1).mean(), picture_point_size(len(raw))
        assert png.shape == (640, 640, 3) and 0.5 * min(len(raw) * size ** 2 / 640 ** 2, 0.05) < drawn < 0.9, drawn

    # a classifier: its class token, and its tokens (class token first) with the patch centres
    cls_model = mm3d.create_model(checkpoint=ckpts["pc_cls"])
    rc, _, _ = run_extract(capsys, clouds[0], "--checkpoint", ckpts["pc_cls"], "--out", tmp_path / "cls",
                           "--pool", "cls")
    rc2, _, _ = run_extract(capsys, clouds[0], "--checkpoint", ckpts["pc_cls"], "--out", tmp_path / "none",
                            "--pool", "none")
    sample = mm3d.pointcloud.load_cloud(clouds[0], checkpoint=ckpts["pc_cls"])
    with torch.no_grad():
        tokens = cls_model.forward_features(sample[None])[0]  # (1 + G, D)
        centers = cls_model.group(sample[None]).center[0]
    assert rc == rc2 == 0
    assert_close(np.load(tmp_path / "cls" / "bunny.npy"), tokens[0], atol=1e-5)
    assert_close(np.load(tmp_path / "none" / "bunny.npy"), tokens, atol=1e-5)
    assert_close(np.load(tmp_path / "none" / "bunny_centers.npy"), centers, atol=1e-6)


def test_a_half_finished_extraction_resumes_to_the_same_outputs(clouds, ckpts, tmp_path, capsys, caplog, monkeypatch):
    """A run stopped in the middle of writing (the 6th rename never happens) leaves only whole files; the
    next run deletes the temporary files a killed run leaves, skips the finished inputs and ends with the
    outputs of an uninterrupted run."""
    args = ["--checkpoint", ckpts["pc_pre"], "--pool", "none", "--batch-size", 2]
    rc, _, _ = run_extract(capsys, *clouds, "--out", tmp_path / "ref", *args)
    assert rc == 0
    out = tmp_path / "out"
    renames, real_replace = [], os.replace

    def stop_at_sixth(src, dst):
        renames.append(dst)
        if len(renames) == 6:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(extract_core.os, "replace", stop_at_sixth)
    with pytest.raises(KeyboardInterrupt):
        main(["extract", *map(str, clouds), "--out", str(out), "--device", "cpu", "--no-progress", *map(str, args)])
    monkeypatch.undo()
    capsys.readouterr()
    # the settings, then 3 files per input (tokens, centres, index rows): the first input is complete, the
    # second has its tokens only; no temporary file is left, no file is half written
    assert sorted(p.name for p in out.iterdir()) == ["bunny.csv", "bunny.npy", "bunny_centers.npy", "chair_0391.npy",
                                                     "extract.json"]
    (out / ".chair_0391_centers.tmp-99999.npy").write_bytes(b"\x93NUMPY half")  # as a kill -9 would leave it
    done_before = (out / "bunny.npy").stat().st_mtime_ns
    # other settings would mix two kinds of features in one folder: refused, nothing written
    rc, _, err = run_extract(capsys, *clouds, "--out", out, "--checkpoint", ckpts["pc_pre"], "--pool", "mean")
    assert rc == 2 and f"mm3d extract: error: {out} holds features made with other settings (pool: 'none' -> " \
        "'mean'): give another --out, or --overwrite to redo every input" in err
    assert not (out / "chair_0391.csv").exists()

    rc, summary, _ = run_extract(capsys, *clouds, "--out", out, *args)
    assert rc == 0 and (summary["done"], summary["skipped"]) == (2, 1)
    assert f"removed 1 temporary files of an interrupted run from {out}" in caplog.messages
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref
    for name in ref:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert (out / "bunny.npy").stat().st_mtime_ns == done_before  # skipped, not rewritten

    rc, summary, _ = run_extract(capsys, *clouds, "--out", out, *args, "--overwrite")
    assert (summary["done"], summary["skipped"]) == (3, 0) and (out / "bunny.npy").stat().st_mtime_ns != done_before


# ----------------------------------------------------------------------------------------------
# Inputs and options
# ----------------------------------------------------------------------------------------------


def test_list_root_and_output_names(ckpts, tmp_path, capsys):
    root = tmp_path / "data"
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        np.save(root / sub / "x.npy", np.random.default_rng(len(sub)).normal(size=(80, 3)).astype(np.float32))
    listing = tmp_path / "list.txt"
    listing.write_text("# an annotation list: path label\na/x.npy 3\n\nb/x.npy,4\n")
    out = tmp_path / "out"
    rc, summary, _ = run_extract(capsys, "--list", listing, "--root", root, "--checkpoint", ckpts["pc_pre"],
                                 "--out", out)
    assert rc == 0 and summary["inputs"] == 2
    assert (out / "a" / "x.npy").is_file() and (out / "b" / "x.npy").is_file()
    assert [r["name"] for r in read_index(out / "index.csv")] == ["a/x", "b/x"]
    # without --root two inputs would write the same files
    rc, _, err = run_extract(capsys, root / "a/x.npy", root / "b/x.npy", "--checkpoint", ckpts["pc_pre"], "--out", out)
    assert rc == 2 and "would both write x.*: give --root DIR" in err


@pytest.mark.parametrize("ckpt, args, message", [
    ("pc_pre", [], "no inputs: give files or --list LIST"),
    ("pc_pre", ["x.npy", "--window", "16"], "--window: for videos only; this is a point-cloud checkpoint"),
    ("video_cls", ["x.mp4", "--per-point"], "--per-point is for point clouds; this is a video checkpoint"),
    ("video_cls", ["x.mp4", "--stride", "0"], "--stride must be >= 1 frame, got 0"),
    ("pc_pre", ["x.npy", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("pc_pre", ["--list", "nothere.txt"], "--list nothere.txt: file does not exist"),
])
def test_bad_options_are_one_error_line(ckpts, tmp_path, capsys, ckpt, args, message):
    rc, _, err = run_extract(capsys, *args, "--checkpoint", ckpts[ckpt], "--out", tmp_path / "out")
    assert rc == 2 and err.strip().splitlines()[-1] == f"mm3d extract: error: {message}" and "Traceback" not in err


@pytest.mark.slow
def test_torchrun_shards_the_inputs(clouds, ckpts, tmp_path):
    """Two processes share the inputs (rank r takes inputs r, r + 2, ...); together they write what one
    process writes, and rank 0 the index and the summary of all."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mm3d.cli",
           "extract", *map(str, clouds), "--checkpoint", str(ckpts["pc_pre"]), "--out", str(out), "--device", "cpu",
           "--no-progress"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["done"] == 3  # one summary of all ranks, from rank 0
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "mm3d.cli", "extract", *map(str, clouds), "--checkpoint",
                    str(ckpts["pc_pre"]), "--out", str(single), "--device", "cpu", "--no-progress"],
                   check=True, capture_output=True)
    for name in ("bunny.npy", "chair_0391.npy", "small.npy", "index.csv"):
        assert np.array_equal(np.load(out / name), np.load(single / name)) if name.endswith(".npy") else \
            (out / name).read_text() == (single / name).read_text()


# ----------------------------------------------------------------------------------------------
# The README's commands
# ----------------------------------------------------------------------------------------------


def readme_extract_commands() -> list[str]:
    """The ``mm3d extract`` commands of the README's "Extract features" section, continuation lines joined."""
    text = (PROJECT_ROOT / "README.md").read_text()
    section = re.search(r"^##+ Extract features\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no 'Extract features' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.strip().startswith("mm3d extract")]


def test_readme_extract_commands_run(realdata, ckpts, tmp_path, capsys, monkeypatch):
    """Every `mm3d extract` line of the README runs (the demo checkpoints replaced by the tiny ones)."""
    commands = readme_extract_commands()
    assert len(commands) >= 3
    stand_ins = {"runs/videomae_finetune_demo/checkpoints/best.pt": ckpts["video_cls"],
                 "runs/videomae_pretrain_demo/checkpoints/last.pt": ckpts["video_pre"],
                 "runs/pointmae_pretrain_demo/checkpoints/last.pt": ckpts["pc_pre"],
                 "runs/pointmae_finetune_demo/checkpoints/best.pt": ckpts["pc_cls"]}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for command in commands:
        words = [str(stand_ins.get(w, w)).replace("../shared/realdata", str(realdata)) for w in shlex.split(command)]
        assert words[:2] == ["mm3d", "extract"]
        rc, summary, err = run_extract(capsys, *words[2:])
        assert rc == 0 and summary["failed"] == 0 and summary["done"] >= 1, (command, err[-2000:])
