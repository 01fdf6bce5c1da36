"""Open3D reconstruction pictures and the Point-MAE pretraining task end to end (tiny)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("open3d")

from PIL import Image  # noqa: E402

from mm3d.config import load_config  # noqa: E402
from mm3d.errors import UserError  # noqa: E402
from mm3d.pointcloud.io import read_points  # noqa: E402
from mm3d.pointcloud.models import build_pretrain_model  # noqa: E402
from mm3d.pointcloud.visualize import (  # noqa: E402
    CAPTION_HEIGHT, DEFAULT_VIEW, INPUT_COLOR, PREDICTED_COLOR, VISIBLE_COLOR, CloudRenderer, View, principal_view,
    render_clouds, show_interactive, write_reconstruction_figure)
from mm3d.registry import SYNTH, TASKS, variant_config  # noqa: E402

W, H = 160, 120


def sphere_cloud(n: int = 256, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 3))
    return (0.8 * x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_non_blank(panel: np.ndarray, what: str) -> None:
    white = (panel == 255).all(axis=-1)
    assert white.any(), f"{what}: no background pixel"
    assert (~white).mean() > 0.005, f"{what}: almost no foreground ({(~white).mean():.4f})"
    assert panel.std() > 5, f"{what}: flat image (std {panel.std():.2f})"


def near(panel: np.ndarray, rgb) -> np.ndarray:
    target = np.asarray(rgb) * 255
    return (np.abs(panel.astype(float) - target) < 30).all(axis=-1)


def test_render_clouds_size_and_content():
    img = render_clouds([sphere_cloud()], [(0.1, 0.2, 0.9)], W, H)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert_non_blank(img, "render")
    # nothing drawn: pure white; a cloud outside the unit sphere's view is clipped, not an error
    r = CloudRenderer(W, H)
    assert (r.render([np.zeros((0, 3))], [(0, 0, 0)]) == 255).all()
    with pytest.raises(ValueError, match="colours"):
        r.render([sphere_cloud()], [])


def camera_pixel(point, width: int, height: int, direction=(1.0, 0.6, 1.6), up=(0.0, 1.0, 0.0)
                 ) -> tuple[float, float]:
    """(column, row) where the renderer puts a 3-D point seen from `direction` with `up` (by default
    the documented fixed view): a pinhole camera looking at the origin from that direction, a 30
    degree vertical field of view, at the distance where a sphere of radius 1.05 fills the narrower
    half-angle."""
    half = np.radians(15.0)
    narrow = min(half, np.arctan(np.tan(half) * width / height))
    eye = np.asarray(direction) / np.linalg.norm(direction) * 1.05 / np.sin(narrow)
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    v = np.asarray(point, dtype=np.float64) - eye
    focal = (height / 2) / np.tan(half)  # pixels
    return width / 2 + focal * (v @ right) / (v @ forward), height / 2 - focal * (v @ up) / (v @ forward)


def tinted(img: np.ndarray, rgb) -> np.ndarray:
    """Per pixel, how much of the pure colour `rgb` (components 0 or 1) covers the white background:
    1 inside a point, between 0 and 1 on an anti-aliased edge, 0 for white or any other colour."""
    on = np.asarray(rgb, dtype=bool)
    rest = img[..., ~on].astype(float)
    mask = (img[..., on] == 255).all(axis=-1) & (rest == rest[..., :1]).all(axis=-1) & (rest[..., 0] < 255)
    return np.where(mask, 1 - rest[..., 0] / 255, 0.0)


@pytest.mark.parametrize("size, view", [((W, H), "default"), ((100, 160), "default"), ((W, H), "tilted")])
def test_render_puts_points_where_the_camera_projects_them(size, view):
    """Four tight clusters in four colours: each is drawn in its colour, as a point-sized blob centred
    where the camera projects it (left/right, up/down and the framing all checked); nothing else is
    drawn. Seen from the fixed view, and from a view given to the renderer."""
    width, height = size
    centres = {(1, 0, 0): (0.6, 0, 0), (0, 1, 0): (0, 0.6, 0), (0, 0, 1): (0, 0, -0.6), (1, 0, 1): (-0.5, -0.4, 0.3)}
    rng = np.random.default_rng(0)
    clouds = [np.asarray(c, np.float32) + 0.005 * rng.normal(size=(20, 3)).astype(np.float32) for c in centres.values()]
    camera = DEFAULT_VIEW if view == "default" else View(np.array([-0.6, 0.0, 0.8]), np.array([0.0, 1.0, 0.0]))
    img = render_clouds(clouds, list(centres), width, height, view=camera)
    drawn = np.zeros(img.shape[:2], dtype=bool)
    for rgb, centre in centres.items():
        cover = tinted(img, rgb)
        assert 15 <= (cover == 1).sum() <= 60, rgb  # 20 points of 5 px within ~1 px of each other
        rows, cols = np.indices(cover.shape)
        row, col = (rows * cover).sum() / cover.sum(), (cols * cover).sum() / cover.sum()
        want_col, want_row = camera_pixel(centre, width, height, *((camera.direction, camera.up)
                                                                    if view == "tilted" else ()))
        assert abs(col - want_col) < 1.0 and abs(row - want_row) < 1.0, (rgb, col, row, want_col, want_row)
        drawn |= cover > 0
    assert (img[~drawn] == 255).all()  # white everywhere else


def flat_square(normal_to_view: np.ndarray, n: int = 3000, half: float = 0.7,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A square of side 2 * `half` whose plane contains the direction `normal_to_view` (so that a camera
    looking along it sees an edge), with slight noise off the plane; returns (points (n, 3), normal)."""
    along = normal_to_view / np.linalg.norm(normal_to_view)
    across = np.array([0.0, 1.0, 0.0]) - along[1] * along  # upright: the normal is horizontal
    across /= np.linalg.norm(across)
    normal = np.cross(along, across)
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(-half, half, size=(2, n, 1))
    pts = a * along + b * across + 0.005 * rng.normal(size=(n, 1)) * normal
    return pts.astype(np.float32), normal


def coverage(img: np.ndarray) -> float:
    """Share of the picture that is not white background."""
    return float((img != 255).any(axis=-1).mean())


def test_principal_view_looks_down_the_normal_of_a_flat_cloud():
    pts, normal = flat_square(DEFAULT_VIEW.direction)
    view = principal_view(pts)
    assert abs(view.direction @ normal) > 0.9999  # down the smallest axis: the plane's normal
    assert view.direction @ DEFAULT_VIEW.direction >= 0  # signed towards the default side
    assert abs(view.up @ view.direction) < 1e-9 and np.linalg.norm(view.up) == pytest.approx(1.0)
    # the up vector is the y axis as the camera sees it
    y_seen = np.array([0.0, 1.0, 0.0]) - view.direction[1] * view.direction
    assert view.up @ (y_seen / np.linalg.norm(y_seen)) == pytest.approx(1.0)
    # a flat shape lying in the x-z plane is seen from above, its longest side up in the picture
    rng = np.random.default_rng(1)
    lying = np.stack([rng.uniform(-0.9, 0.9, 2000), 0.01 * rng.normal(size=2000), rng.uniform(-0.3, 0.3, 2000)], 1)
    top = principal_view(lying)
    assert abs(top.direction[1]) > 0.999 and abs(top.up[0]) > 0.999
    # a cloud that is not flat (a ball; a box of sides 1 : 0.8 : 0.6) keeps the fixed view
    ball = sphere_cloud(2000)
    box = rng.uniform(-1, 1, size=(4000, 3)) * [0.5, 0.4, 0.3]
    for bulky in (ball, box):
        assert principal_view(bulky) is DEFAULT_VIEW
    assert principal_view(box * [1, 1, 0.4]).direction @ [0, 0, 1] > 0.999  # 1 : 0.8 : 0.24 is flat


def test_a_flat_cloud_faces_the_camera_in_every_picture(tmp_path):
    """A square whose plane contains the old fixed view direction: that view draws an edge; the
    renderer's own view, the reconstruction figure and the segmentation picture show its face."""
    from mm3d.pointcloud.partseg import render_segmentation

    pts, _ = flat_square(DEFAULT_VIEW.direction)
    renderer = CloudRenderer(W, W)
    edge = coverage(renderer.render([pts], [INPUT_COLOR], view=DEFAULT_VIEW))
    face = coverage(renderer.render([pts], [INPUT_COLOR]))
    assert edge < 0.06 and face > 0.3, (edge, face)  # (1.4 / 2.1)^2 = 0.44 of the frame, minus perspective

    torch.manual_seed(0)
    model = build_pretrain_model(variant_config("pointmae_tiny_test"))
    # one renderer for all (Open3D aborts when two renderers that have drawn are alive together)
    png = write_reconstruction_figure(model, pts[:256], tmp_path, size=(W, W), name="flat", renderer=renderer)[0]
    img = np.asarray(Image.open(png).convert("RGB"))[CAPTION_HEIGHT:]
    edge = coverage(renderer.render([pts[:256]], [INPUT_COLOR], view=DEFAULT_VIEW))
    assert coverage(img[:, :W]) > 0.15 > 3 * edge, (coverage(img[:, :W]), edge)  # input panel: 256 points of 5 px

    parts = np.where(pts[:, 0] > 0, 12, 13)  # two parts of the Lamp category (ids 12..15)
    seg = np.asarray(Image.open(render_segmentation(pts, parts, parts, [12, 13, 14, 15], tmp_path / "seg.png",
                                                    renderer=renderer)).convert("RGB"))[28:]
    for half in (seg[:, :W], seg[:, W:]):
        assert coverage(half) > 0.3


def test_reconstruction_figure_panels_and_ply_files(tmp_path):
    torch.manual_seed(0)
    model = build_pretrain_model(variant_config("pointmae_tiny_test"))
    pts = sphere_cloud(256)
    files = write_reconstruction_figure(model, pts, tmp_path, seed=0, size=(W, H), name="fig")
    assert [f.name for f in files] == ["fig.png", "fig_input.ply", "fig_visible.ply", "fig_reconstruction.ply"]
    img = np.asarray(Image.open(files[0]).convert("RGB"))
    assert img.shape == (CAPTION_HEIGHT + H, 3 * W, 3)
    panels = [img[CAPTION_HEIGHT:, i * W:(i + 1) * W] for i in range(3)]
    for i, p in enumerate(panels):
        assert p.shape == (H, W, 3)
        assert_non_blank(p, f"panel {i + 1}")
    # the predicted patches (their own colour) appear in panel 3 only
    assert near(panels[2], PREDICTED_COLOR).sum() > 20
    assert near(panels[1], PREDICTED_COLOR).sum() == 0 and near(panels[0], PREDICTED_COLOR).sum() == 0
    assert model.training  # the train/eval mode is restored

    g, k = model.num_group, model.group_size
    m = int(0.6 * g)
    counts = [len(read_points(f)) for f in files[1:]]
    assert counts == [256, (g - m) * k, g * k]
    recon = read_points(files[3])
    assert recon.shape[1] == 6 and np.allclose(recon[-1, 3:], PREDICTED_COLOR, atol=1 / 255)
    assert np.allclose(read_points(files[1])[:, :3], pts, atol=1e-6)

    # each panel is exactly the render of its .ply (panel order, offsets and colours); the
    # reconstruction is the visible points, then the predicted ones
    inp, vis = read_points(files[1]), read_points(files[2])
    n_vis = (g - m) * k
    renderer = CloudRenderer(W, H)
    view = principal_view(inp[:, :3])  # every panel from the input's view
    assert np.array_equal(panels[0], renderer.render([inp[:, :3]], [INPUT_COLOR]))
    assert np.array_equal(panels[1], renderer.render([vis[:, :3]], [VISIBLE_COLOR], view=view))
    assert np.array_equal(panels[2], renderer.render([recon[:n_vis, :3], recon[n_vis:, :3]],
                                                     [VISIBLE_COLOR, PREDICTED_COLOR], view=view))
    assert np.allclose(recon[:n_vis], vis) and np.allclose(vis[:, 3:], VISIBLE_COLOR, atol=1 / 255)
    # the visible patches are input points (masked ones removed): drawn only where the input is drawn,
    # and on less of the picture
    nearest = np.linalg.norm(vis[:, None, :3] - pts[None], axis=-1).min(axis=1)
    assert nearest.max() < 1e-6
    drawn = [(p != 255).any(axis=-1) for p in panels]
    assert not (drawn[1] & ~drawn[0]).any() and drawn[1].sum() < 0.6 * drawn[0].sum()


def test_interactive_without_display_is_a_clear_message(monkeypatch, caplog):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with caplog.at_level(logging.WARNING):
        assert show_interactive([([sphere_cloud()], [(0, 0, 1)])]) is False
    assert "no display" in caplog.text


@pytest.fixture(scope="module")
def synth_shapenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapenet55")
    SYNTH.get("shapenet55")(root, seed=0, scale="tiny")
    return root


def test_pretrain_task_end_to_end(synth_shapenet, tmp_path):
    """Config -> trainer -> loss, evaluation with fixed masks, and the report pictures."""
    from mm3d.trainer import run

    out = tmp_path / "run"
    cfg = load_config("configs/pointcloud/pointmae_pretrain_demo.yaml", [
        f"data.root={synth_shapenet}", f"output_dir={out}", "model.variant=pointmae_tiny_test",
        "data.npoints=256", "train.max_steps=4", "train.batch_size=8", "data.report_shapes=2",
        "train.progress=off", "train.log_every=1"])
    task = TASKS.get(cfg.task)
    ds = task.build_datasets(cfg, ["train", "val", "test"])
    assert set(ds) == {"train", "test"} and ds["train"][0]["points"].shape == (256, 3)
    tf = task.batch_transform(cfg, torch.device("cpu"))
    batch = {"points": ds["train"][0]["points"][None]}
    assert not torch.equal(tf(batch)["points"], batch["points"])
    results = run(cfg)
    assert np.isfinite(results["test"]["loss"]) and set(results["test"]) == {"loss", "cd_l2", "cd_l1"}
    pngs = sorted((out / "plots").glob("reconstruction_*.png"))
    assert len(pngs) == 2
    assert json.loads((out / "results.json").read_text())["test"]["loss"] == results["test"]["loss"]
    # evaluation draws its masks from the seed: two evaluations agree
    model = task.build_model(cfg)
    loader = torch.utils.data.DataLoader(ds["test"], batch_size=4)
    a = task.evaluate(model, loader, cfg, torch.device("cpu"), "test").metrics
    b = task.evaluate(model, loader, cfg, torch.device("cpu"), "test").metrics
    assert a == b


def test_visualize_files_and_dataset_items(synth_shapenet, tmp_path):
    cfg = load_config("configs/pointcloud/pointmae_pretrain_demo.yaml", [
        f"data.root={synth_shapenet}", "model.variant=pointmae_tiny_test", "data.npoints=256"])
    task = TASKS.get(cfg.task)
    model = task.build_model(cfg).eval()
    src = tmp_path / "scan.xyz"
    np.savetxt(src, 5.0 * sphere_cloud(100) + 3.0)  # fewer points than npoints, off-centre
    files = task.visualize(model, cfg, inputs=[str(src)], dataset_index=1, out_dir=tmp_path / "vis",
                           interactive=False, seed=0, device=torch.device("cpu"))
    names = [f.name for f in files if f.suffix == ".png"]
    assert names == ["scan.png", "test_00001.png"]
    inp = read_points(tmp_path / "vis" / "scan_input.ply")[:, :3]
    assert inp.shape == (256, 3) and np.linalg.norm(inp, axis=1).max() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(UserError, match="out of range"):
        task.visualize(model, cfg, inputs=[], dataset_index=10_000, out_dir=tmp_path / "vis",
                       interactive=False, seed=0, device=torch.device("cpu"))


def test_realdata_scan_visualises(realdata, tmp_path):
    """The Stanford bunny (PCD) through the same path as `mm3d visualize --input`."""
    cfg = load_config("configs/pointcloud/pointmae_pretrain_demo.yaml", [
        "model.variant=pointmae_tiny_test", "data.npoints=256"])
    task = TASKS.get(cfg.task)
    model = task.build_model(cfg).eval()
    files = task.visualize(model, cfg, inputs=[str(realdata / "pointcloud" / "scans" / "bunny.pcd")],
                           dataset_index=None, out_dir=tmp_path, interactive=False, seed=0,
                           device=torch.device("cpu"))
    img = np.asarray(Image.open(files[0]).convert("RGB"))
    for i in range(3):
        assert_non_blank(img[CAPTION_HEIGHT:, i * 480:(i + 1) * 480], f"bunny panel {i + 1}")


def test_pretrain_datasets_on_real_layouts(realdata, tmp_path):
    """ModelNet40 files and a folder of real scans as pretraining data (the config's dataset choices)."""
    from mm3d.pointcloud.tasks import PointDataConfig, build_pretrain_datasets

    pc = realdata / "pointcloud"
    mn = build_pretrain_datasets(PointDataConfig(dataset="modelnet40", root=str(pc / "modelnet40_sample"),
                                                 npoints=256, cache_points=256, cache_dir=str(tmp_path)),
                                 ["train", "test"])
    assert len(mn["train"]) == 8 and len(mn["test"]) == 4 and mn["train"][0]["points"].shape == (256, 3)
    folder = build_pretrain_datasets(PointDataConfig(dataset="folder", root=str(pc / "scans"), npoints=256,
                                                     bin_columns=6), ["train"])
    assert len(folder["train"]) == 3
    for i in range(3):
        p = folder["train"][i]["points"]
        assert p.shape == (256, 3) and torch.linalg.norm(p, dim=1).max() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="data.root is empty"):
        build_pretrain_datasets(PointDataConfig(), ["train"])
