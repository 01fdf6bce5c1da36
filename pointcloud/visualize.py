"""Pictures of point clouds (reconstructions, part segmentations, feature colours), rendered
headless with Open3D.

Every picture frames the unit sphere on a white background from a camera aimed by
:func:`principal_view`: down the cloud's smallest principal axis, so that a flat object (a guitar, a
plane's wings) shows its two largest extents instead of an edge; a cloud that is not flat keeps
the fixed oblique view :data:`DEFAULT_VIEW`. :func:`write_reconstruction_figure` writes one PNG
with three panels, all seen from the view of the input cloud:

1. the input cloud;
2. the visible patches (the masked ones removed);
3. the reconstruction: the visible patches plus the predicted masked patches in another colour;

and a ``.ply`` per panel (coloured as in the picture) for MeshLab, CloudCompare or Open3D.
Open3D is imported only inside the functions that render.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from mm3d.pointcloud.io import write_ply

log = logging.getLogger(__name__)

Color = tuple[float, float, float]
INPUT_COLOR: Color = (0.45, 0.45, 0.50)
VISIBLE_COLOR: Color = (0.16, 0.40, 0.80)
PREDICTED_COLOR: Color = (0.90, 0.33, 0.10)
CAPTION_HEIGHT = 28  # pixels of the title strip above the panels
PANEL_TITLES = ("input", "visible patches", "reconstruction (predicted in orange)")

_FOV_DEG = 30.0
_UP = np.array([0.0, 1.0, 0.0])  # ShapeNet's up axis: up in the picture whenever the view allows
#: a cloud is flat when its smallest principal variance is below this share of the middle one
FLAT_RATIO = 0.5


class View(NamedTuple):
    """A camera around the origin. direction: (3,) unit vector from the origin towards the eye;
    up: (3,) unit vector perpendicular to it, drawn upwards."""

    direction: np.ndarray
    up: np.ndarray


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64) / np.linalg.norm(v)


def _view(direction: np.ndarray, up_hint: np.ndarray) -> View:
    d = _unit(direction)
    return View(d, _unit(up_hint - (up_hint @ d) * d))


#: the fixed oblique view: from the front-right, slightly above, y up
DEFAULT_VIEW = _view(np.array([1.0, 0.6, 1.6]), _UP)


def principal_view(points: np.ndarray | torch.Tensor, *, flat_ratio: float = FLAT_RATIO) -> View:
    """The view of a cloud: down its smallest principal axis when it is flat, so that its two largest
    extents face the camera; otherwise :data:`DEFAULT_VIEW`.

    points: (N, 3). With principal variances l1 >= l2 >= l3 (eigenvalues of the covariance), the
    cloud is flat when ``l3 < flat_ratio * l2``; a cloud that is not has no axis worth looking down
    (the smallest one is decided by sampling noise) and keeps the fixed view, so that pictures of
    bulky shapes stay comparable. The axis is signed towards the default view (the eye stays in
    front, right and above when it can); up is the y axis as seen by the camera, or the largest
    principal axis when the camera looks along y (a flat shape lying in the x-z plane).
    """
    pts = _np(points).astype(np.float64).reshape(-1, 3)
    if len(pts) < 3:
        return DEFAULT_VIEW
    centred = pts - pts.mean(axis=0)
    variances, axes = np.linalg.eigh(centred.T @ centred / len(pts))  # ascending
    if not variances[0] < flat_ratio * variances[1]:
        return DEFAULT_VIEW
    normal = axes[:, 0] if axes[:, 0] @ DEFAULT_VIEW.direction >= 0 else -axes[:, 0]
    if abs(normal @ _UP) < 0.9:
        return _view(normal, _UP)
    longest = axes[:, 2] if axes[np.argmax(np.abs(axes[:, 2])), 2] > 0 else -axes[:, 2]
    return _view(normal, longest)


class CloudRenderer:
    """One Open3D ``OffscreenRenderer`` (creating one costs ~0.5 s): render many clouds with it.

    width, height: image size in pixels; point_size: point diameter in pixels; radius: the
    camera frames a sphere of this radius at the origin, from any :class:`View`. Keep one alive at a
    time: Open3D aborts the process when two renderers that have drawn exist together.
    """

    def __init__(self, width: int = 480, height: int = 480, *, point_size: float = 5.0,
                 radius: float = 1.0) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        from open3d.visualization import rendering

        self.width, self.height, self.radius, self.point_size = width, height, radius, point_size
        self._renderer = rendering.OffscreenRenderer(width, height)
        self._material = rendering.MaterialRecord()
        self._material.shader = "defaultUnlit"
        self._material.point_size = float(point_size)
        scene = self._renderer.scene
        scene.set_background([1.0, 1.0, 1.0, 1.0])
        scene.view.set_post_processing(False)  # exact colours, pure white background
        half = math.radians(_FOV_DEG) / 2  # vertical half-angle; the horizontal one may be narrower
        half = min(half, math.atan(math.tan(half) * width / height))
        self.distance = 1.05 * radius / math.sin(half)
        # explicit projection: setup_camera() would derive near/far from the (still empty) scene
        scene.camera.set_projection(_FOV_DEG, width / height, 0.05 * self.distance, self.distance + 4.0 * radius,
                                    rendering.Camera.FovType.Vertical)

    def render(self, clouds: Sequence[np.ndarray], colors: Sequence[Any], *, view: View | None = None,
               point_size: float | None = None) -> np.ndarray:
        """clouds: list of (N_i, 3) arrays; colors: per cloud an RGB triple in [0, 1] or an
        (N_i, 3) array; view: the camera (None: :func:`principal_view` of all the clouds together);
        point_size: in pixels, for this picture (None: the renderer's). Returns the (H, W, 3) uint8 image."""
        if len(clouds) != len(colors):
            raise ValueError(f"{len(clouds)} clouds but {len(colors)} colours")
        if view is None:
            view = principal_view(np.concatenate([_np(c).reshape(-1, 3) for c in clouds]) if clouds
                                  else np.zeros((0, 3)))
        eye = view.direction * self.distance
        self._renderer.scene.camera.look_at([0.0, 0.0, 0.0], eye.tolist(), view.up.tolist())
        scene = self._renderer.scene
        scene.clear_geometry()
        self._material.point_size = float(self.point_size if point_size is None else point_size)
        for i, (pts, col) in enumerate(zip(clouds, colors)):
            pcd = to_open3d(pts, col)
            if len(pcd.points):
                scene.add_geometry(f"cloud{i}", pcd, self._material)
        return np.asarray(self._renderer.render_to_image()).copy()


def to_open3d(points: np.ndarray | torch.Tensor, color: Any):
    """An ``open3d.geometry.PointCloud`` of (N, 3) points coloured by an RGB triple or (N, 3) array."""
    import open3d as o3d

    pts = _np(points).astype(np.float64).reshape(-1, 3)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    col = np.asarray(color, dtype=np.float64)
    col = np.broadcast_to(col, pts.shape) if col.shape == (3,) else col.reshape(pts.shape)
    pcd.colors = o3d.utility.Vector3dVector(np.array(col, dtype=np.float64))  # a writable copy
    return pcd


def render_clouds(clouds: Sequence[np.ndarray], colors: Sequence[Any], width: int = 480, height: int = 480,
                  *, point_size: float = 5.0, radius: float = 1.0, view: View | None = None) -> np.ndarray:
    """Render clouds together in one (H, W, 3) uint8 image (creates a renderer; see :class:`CloudRenderer`)."""
    return CloudRenderer(width, height, point_size=point_size, radius=radius).render(clouds, colors, view=view)


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _caption(width: int, titles: Sequence[str], panel_width: int) -> np.ndarray:
    img = Image.new("RGB", (width, CAPTION_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, title in enumerate(titles):
        draw.text((i * panel_width + 8, 8), title, fill=(0, 0, 0))
    return np.asarray(img)


def display_available() -> bool:
    """Whether an on-screen window can be opened (X11 or Wayland display set)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def write_reconstruction_figure(model: torch.nn.Module, points: np.ndarray | torch.Tensor, out_dir: str | Path,
                                *, seed: int = 0, size: tuple[int, int] = (480, 480), name: str = "reconstruction",
                                interactive: bool = False, point_size: float = 5.0,
                                renderer: CloudRenderer | None = None) -> list[Path]:
    """Reconstruct one cloud with a :class:`~mm3d.pointcloud.models.PointMAEPretrain` and draw it.

    points: (N, 3) cloud, already normalised to the unit sphere and sampled to the model's input
    size; seed: seed of the patch mask; size: (width, height) of each panel. Writes
    ``NAME.png`` (three panels side by side under a caption strip of :data:`CAPTION_HEIGHT`
    pixels) and ``NAME_input.ply``, ``NAME_visible.ply``, ``NAME_reconstruction.ply``; returns
    their paths (PNG first). `renderer` reuses an Open3D renderer of that size across figures.
    """
    pts = torch.as_tensor(_np(points))
    if pts.dim() != 2 or pts.shape[1] < 3:
        raise ValueError(f"points must be an (N, 3) cloud, got shape {tuple(pts.shape)}")
    pts = pts[:, :3]
    width, height = size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    try:
        rec = model.reconstruct(pts.unsqueeze(0).to(device), generator=gen)
    finally:
        model.train(was_training)
    visible = _np(rec.visible[0]).reshape(-1, 3)
    predicted = _np(rec.predicted[0]).reshape(-1, 3)
    inp = _np(pts)

    panels = [([inp], [INPUT_COLOR]), ([visible], [VISIBLE_COLOR]),
              ([visible, predicted], [VISIBLE_COLOR, PREDICTED_COLOR])]
    renderer = renderer or CloudRenderer(width, height, point_size=point_size)
    if (renderer.width, renderer.height) != (width, height):
        raise ValueError(f"renderer is {renderer.width}x{renderer.height}, figure panels {width}x{height}")
    view = principal_view(inp)  # every panel from the input's view
    images = [renderer.render(clouds, colors, view=view) for clouds, colors in panels]
    figure = np.concatenate([_caption(3 * width, PANEL_TITLES, width), np.concatenate(images, axis=1)], axis=0)
    png = out_dir / f"{name}.png"
    Image.fromarray(figure).save(png)

    files = [png]
    for suffix, (clouds, colors) in zip(("input", "visible", "reconstruction"), panels):
        xyz = np.concatenate(clouds, axis=0)
        rgb = np.concatenate([np.broadcast_to(np.asarray(c, np.float32), (len(p), 3)) for p, c in zip(clouds, colors)])
        files.append(write_ply(out_dir / f"{name}_{suffix}.ply", xyz, colors=rgb))
    log.info("reconstruction of %d points (Chamfer %.5f on the masked patches): %s",
             len(inp), float(rec.loss), png)
    if interactive:
        show_interactive(panels)
    return files


def show_interactive(panels: Sequence[tuple[Sequence[np.ndarray], Sequence[Any]]],
                     title: str = "mm3d: input | visible | reconstruction") -> bool:
    """Open an Open3D window with the panels side by side; False (with a logged reason) when no
    display is available."""
    if not display_available():
        log.warning("--interactive: no display (DISPLAY / WAYLAND_DISPLAY unset); wrote the PNG and "
                    "PLY files only. Open the .ply files in any viewer, or run where a display exists.")
        return False
    import open3d as o3d

    geoms = []
    for i, (clouds, colors) in enumerate(panels):
        for pts, col in zip(clouds, colors):
            pcd = to_open3d(pts, col)
            pcd.translate([2.5 * i, 0.0, 0.0])
            geoms.append(pcd)
    o3d.visualization.draw_geometries(geoms, window_name=title)
    return True
