"""VideoMAE pictures and the pretraining task end to end (trainer, report, `mm3d visualize`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mm3d.config import config_from_dict
from mm3d.masking import tube_mask
from mm3d.registry import TASKS, variant_config
from mm3d.video.models import build_pretrain_model
from mm3d.video.tokens import unpatchify
from mm3d.video.visualize import GREY, reconstruction_grid, reconstruction_views, write_visualization


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_pretrain_model(variant_config("videomae_tiny_test")).eval()


def smooth_clip(t: int = 4, size: int = 32) -> torch.Tensor:
    """A normalised clip of a moving colour gradient: (1, 3, T, H, W)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    frames = torch.stack([torch.stack([(xx + 0.1 * i) % 1, yy, 1 - xx]) for i in range(t)], dim=1)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None, None]
    return ((frames - mean) / std)[None]


def test_views_show_what_they_claim(model):
    cfg = variant_config("videomae_tiny_test")
    video = smooth_clip()
    mask = tube_mask(1, cfg.grid, 0.75, generator=torch.Generator().manual_seed(0))
    views = reconstruction_views(model, video, mask)
    assert views.shape == (4, 4, 32, 32, 3) and views.dtype == np.float32
    assert views.min() >= 0 and views.max() <= 1
    k = 3 * cfg.tubelet_size * cfg.patch_size ** 2
    hidden = unpatchify(mask[..., None].expand(-1, -1, k).float(), cfg.grid, cfg.tubelet_size,
                        cfg.patch_size)[0, 0].bool().numpy()  # (T, H, W)
    orig, masked, recon, pasted = views
    assert np.all(masked[hidden] == GREY) and np.array_equal(masked[~hidden], orig[~hidden])
    assert np.all(recon[~hidden] == GREY) and np.array_equal(pasted[hidden], recon[hidden])
    assert np.allclose(pasted[~hidden], orig[~hidden], atol=1e-6)
    # the original is the input, un-normalised
    ref = (video[0] * torch.tensor([0.229, 0.224, 0.225])[:, None, None, None]
           + torch.tensor([0.485, 0.456, 0.406])[:, None, None, None]).permute(1, 2, 3, 0).numpy()
    assert np.allclose(orig, ref, atol=1e-6)


def test_grid_shape_and_not_blank(model):
    cfg = variant_config("videomae_tiny_test")
    mask = tube_mask(1, cfg.grid, 0.75, generator=torch.Generator().manual_seed(1))
    grid = reconstruction_grid(model, smooth_clip(), mask, pad=2, labels=True)
    scale = math.ceil(96 / 32)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 + 4 * (32 * scale + 2), 110 + 2 + 4 * (32 * scale + 2), 3)
    assert grid.std() > 20
    bare = reconstruction_grid(model, smooth_clip(), mask, labels=False)
    assert bare.shape[1] == grid.shape[1] - 110


def cell(grid: np.ndarray, row: int, col: int, *, side: int = 96, pad: int = 2, label_width: int = 110) -> np.ndarray:
    """The (side, side, 3) picture of cell (row, frame) of a grid of square cells."""
    y, x = pad + row * (side + pad), label_width + pad + col * (side + pad)
    return grid[y:y + side, x:x + side]


def test_grid_cells_are_the_views_enlarged_with_masked_tubelets_grey(model):
    """Cell (i, j) of the grid is view i at frame j enlarged 3x by pixel repetition; the masked input
    is mid-grey (128) exactly on the masked tubelets; the separators are white; every row has its
    label on the left."""
    cfg = variant_config("videomae_tiny_test")
    mask = tube_mask(1, cfg.grid, 0.75, generator=torch.Generator().manual_seed(1))
    video = smooth_clip()
    views = reconstruction_views(model, video, mask)  # (4 rows, 4 frames, 32, 32, 3)
    grid = reconstruction_grid(model, video, mask, pad=2, labels=True)
    scale, side = 3, 96
    covered = np.zeros(grid.shape[:2], dtype=bool)
    covered[:, :110] = True  # the label column
    for i in range(4):
        for j in range(4):
            want = (views[i, j] * 255).round().astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
            assert np.array_equal(cell(grid, i, j), want), (i, j)
            y, x = 2 + i * (side + 2), 110 + 2 + j * (side + 2)
            covered[y:y + side, x:x + side] = True
    assert (grid[~covered] == 255).all()  # the separators are white
    k = 3 * cfg.tubelet_size * cfg.patch_size ** 2
    hidden = unpatchify(mask[..., None].expand(-1, -1, k).float(), cfg.grid, cfg.tubelet_size,
                        cfg.patch_size)[0, 0].bool().numpy()  # (T, H, W)
    assert hidden.mean() == 0.75  # 3 of every 4 tubelets
    for j in range(4):
        big = hidden[j].repeat(scale, axis=0).repeat(scale, axis=1)
        masked_input, original = cell(grid, 1, j), cell(grid, 0, j)
        assert (masked_input[big] == 128).all()
        assert np.array_equal(masked_input[~big], original[~big])
        assert (np.abs(original[big].astype(int) - 128) > 2).any()  # the clip is not grey there
    dark = grid[:, :110].min(axis=-1) < 100  # label text
    bands = [slice(2 + i * (side + 2), 2 + i * (side + 2) + side) for i in range(4)]
    assert all(dark[band].sum() > 20 for band in bands)
    assert dark.sum() == sum(dark[band].sum() for band in bands)  # text only beside its row


def test_write_visualization_files(model, tmp_path):
    files = write_visualization(model, smooth_clip(), tmp_path / "out", seed=3, fps=5, name="clip")
    png, gif = files
    assert png.name == "clip_grid.png" and gif.name == "clip.gif"
    img = np.asarray(Image.open(png))
    assert img.ndim == 3 and img.std() > 20
    anim = Image.open(gif)
    assert anim.n_frames == 4
    assert np.asarray(anim.convert("RGB")).std() > 10
    # the PNG is the grid of the mask the seed draws
    mask, _ = model.sample_masks(1, torch.device("cpu"), generator=torch.Generator().manual_seed(3))
    assert np.array_equal(img, reconstruction_grid(model, smooth_clip(), mask, pad=2, labels=True))
    # GIF frame j: the four views at frame j side by side (up to the GIF palette), 1000 / fps ms each
    side, errors = 96, []
    for j in range(4):
        anim.seek(j)
        assert anim.info["duration"] == 200
        frame = np.asarray(anim.convert("RGB"), dtype=np.float32)
        assert frame.shape == (2 + side + 2, 2 + 4 * (side + 2), 3)
        row = []
        for t in range(4):  # the grid's column t laid out as a strip
            strip = np.full(frame.shape, 255, np.float32)
            for i in range(4):
                strip[2:2 + side, 2 + i * (side + 2):2 + i * (side + 2) + side] = cell(img, i, t)
            row.append(float(np.abs(frame - strip).mean()))
        errors.append(row)
    for j, row in enumerate(errors):
        assert row[j] < 8 and row[j] == min(row), errors  # each frame shows its own time step


def test_write_visualization_from_real_videos(model, tmp_path, realdata):
    for rel in ("kinetics400/arm_wrestling/demo.mp4", "ucf101/ApplyEyeMakeup/test.avi"):
        png, gif = write_visualization(model, realdata / "video" / rel, tmp_path, seed=0)
        assert png.is_file() and gif.is_file()
        assert np.asarray(Image.open(png)).std() > 20


def test_pretrain_task_end_to_end(tmp_path, realdata):
    """Train the tiny model two steps on the real clips, then the report and `mm3d visualize`."""
    from mm3d.cli import main
    from mm3d.trainer import run

    root = realdata / "video"
    cfg = config_from_dict(TASKS.get("videomae_pretrain").config_class, {
        "task": "videomae_pretrain", "name": "vtest", "output_dir": str(tmp_path / "run"),
        "model": {"variant": "videomae_tiny_test"},
        "data": {"root": str(root), "train_list": "annotations/kinetics400_videos.txt",
                 "val_list": str(root / "annotations/ucf101_videos.txt"), "sampling_rate": 2, "report_clips": 1},
        "optim": {"lr": 1e-3, "betas": [0.9, 0.95]},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 1, "device": "cpu", "progress": "off",
                  "tensorboard": False, "select_on": "last", "drop_last": True},
    })
    results = run(cfg)
    assert math.isfinite(results["val"]["loss"])
    plots = sorted((tmp_path / "run" / "plots").glob("reconstruction_val_*"))
    assert [p.suffix for p in plots] == [".gif", ".png"]
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert main(["visualize", "--checkpoint", str(ckpt), "--input", str(root / "ucf101/ApplyEyeMakeup/test.avi"),
                 "--out", str(tmp_path / "vis"), "--seed", "1"]) == 0
    assert (tmp_path / "vis" / "test_grid.png").is_file()


def test_pretrain_config_validation():
    cls = TASKS.get("videomae_pretrain").config_class
    from mm3d.config import ConfigError

    with pytest.raises(ConfigError, match="data.num_frames=8 differs from model.num_frames=4"):
        config_from_dict(cls, {"model": {"variant": "videomae_tiny_test"}, "data": {"num_frames": 8}})
    cfg = config_from_dict(cls, {"model": {"variant": "videomae_tiny_test"}, "data": {"input_size": 32}})
    assert dataclasses.asdict(cfg)["model"]["img_size"] == 32


def test_bench_extra_measures_loader_throughput(realdata):
    task = TASKS.get("videomae_pretrain")
    root = realdata / "video"
    cfg = config_from_dict(task.config_class, {
        "model": {"variant": "videomae_tiny_test"}, "bench": {"loader_batches": 2},
        "data": {"root": str(root), "train_list": "annotations/kinetics400_videos.txt,annotations/ucf101_videos.txt"}})
    rows = task.bench_extra(cfg, torch.device("cpu"))
    assert rows and {r["backend"] for r in rows} <= {"pyav", "decord"}
    for r in rows:
        assert r["videos"] == 2 and r["failed"] == 0 and r["clips_per_s"] > 0
