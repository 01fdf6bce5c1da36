"""Point-cloud features for ``mm3d extract``: a global feature per file, and optionally one per point.

Each file is read as the test protocol reads it (:func:`mm3d.pointcloud.load_cloud`): ``data.npoints``
points by farthest point sampling (a seeded draw with repeats when the file has fewer), centred and
scaled into the unit sphere. The model's tokens (``forward_features``; a classifier's class token
comes first) give, per file:

- ``NAME.npy``: the global feature (``--pool``): ``max+mean`` (default), the element-wise max plus
  the mean of the patch tokens, (D,): the published SVM-probe feature (ReCon, Point-M2AE; the
  ``max_plus_mean`` pooling of :func:`mm3d.pointcloud.probe.pool_patch_tokens`); ``mean``, (D,);
  ``cls``, a classifier's class token, (D,); ``none``, the tokens, (L, D), with the patch centres
  in ``NAME_centers.npy``, (G, 3), in the unit-sphere frame;
- ``NAME.csv``: its index row: ``input``, ``name``, ``points`` (read from the file), ``sampled``,
  ``dim`` and ``pool``.

With ``--per-point``, also:

- ``NAME_points.npy``: (N, D), a feature for every point of the file (every finite one, in file
  order), propagated from the G patch tokens to the points with
  :func:`~mm3d.pointcloud.ops.three_nn_interpolate` (inverse squared-distance weights of the three
  nearest patch centres, as Point-MAE's segmentation head), the points mapped into the sample's
  unit-sphere frame;
- ``NAME_pca.ply``: the points (original coordinates) coloured by the first three principal
  components of their features (:func:`pca_colors`);
- ``NAME_pca.png``: that cloud rendered headless with Open3D, the camera aimed by
  :func:`~mm3d.pointcloud.visualize.principal_view`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from mm3d.errors import UserError
from mm3d.extract import ExtractInput, ExtractOptions, ExtractResult, FeatureExtractor, register_extractor, save_npy
from mm3d.pointcloud.io import read_points, write_ply
from mm3d.pointcloud.ops import three_nn_interpolate
from mm3d.pointcloud.probe import pool_patch_tokens
from mm3d.pointcloud.transforms import sample_indices
from mm3d.pointcloud.visualize import CloudRenderer

log = logging.getLogger(__name__)

INTERPOLATION_CHUNK = 65536  # points given features per call (bounds the (points x G) distance table)
PICTURE_SIZE = 640


class EvalCloud(NamedTuple):
    """A file read for the model. points: (N, 3) every (finite) point as read; sample: (npoints, 3)
    the model's input on the unit sphere; center: (3,) and scale: () map a point p of the file to
    ``(p - center) / scale`` in the sample's frame."""

    points: torch.Tensor
    sample: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor


def read_cloud(path: str, data: Any, *, seed: int = 0) -> EvalCloud:
    """The file at `path` as the test protocol reads it (the sample equals
    :func:`mm3d.pointcloud.load_cloud`'s), with every point and the normalisation kept. `data`: the
    run's ``data`` section (``npoints``; ``bin_columns`` and ``drop_nonfinite`` where it has them)."""
    xyz = torch.from_numpy(np.ascontiguousarray(read_points(
        path, bin_columns=getattr(data, "bin_columns", None),
        drop_nonfinite=getattr(data, "drop_nonfinite", True))[:, :3]))
    n = data.npoints
    idx = sample_indices(xyz, n, "fps") if xyz.shape[0] >= n else \
        sample_indices(xyz, n, "random", generator=torch.Generator().manual_seed(seed))
    picked = xyz[idx]
    center = picked.mean(dim=0)
    scale = (picked - center).norm(dim=-1).amax().clamp_min(1e-12)
    return EvalCloud(xyz, (picked - center) / scale, center, scale)


def pca_colors(features: torch.Tensor, *, clip: float = 0.01) -> torch.Tensor:
    """features: (N, D) -> (N, 3) RGB in [0, 1]: the projections on the first three principal
    components (largest variance first; each signed so that its largest loading is positive), each
    scaled from its `clip` to its ``1 - clip`` quantile onto [0, 1] and clipped. A component the
    features do not have (D < 3, or no variance along it) is 0.5."""
    f = features.double()
    centred = f - f.mean(dim=0)
    variances, axes = torch.linalg.eigh(centred.T @ centred / max(1, len(f)))  # ascending
    k = min(3, f.shape[1])
    axes = axes[:, -k:].flip(-1)  # (D, k), largest variance first
    axes = axes * torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))
    proj = centred @ axes  # (N, k)
    lo = torch.quantile(proj, clip, dim=0) if len(proj) else proj.new_zeros(k)
    hi = torch.quantile(proj, 1 - clip, dim=0) if len(proj) else proj.new_zeros(k)
    span = hi - lo
    flat = span <= 1e-9 * max(1.0, float(variances[-1].clamp_min(0).sqrt()))
    rgb = torch.full((len(f), 3), 0.5, dtype=torch.float64)
    rgb[:, :k] = torch.where(flat, torch.full_like(proj, 0.5), ((proj - lo) / span.where(~flat, 1.0)).clamp(0, 1))
    return rgb.float()


def picture_point_size(num_points: int) -> float:
    """Pixels per point of a :data:`PICTURE_SIZE` picture: about half of the shape's area covered
    (2 px from ~19,000 points, 8 px below ~1,200)."""
    return float(np.clip(round(math.sqrt(0.18 * PICTURE_SIZE ** 2 / max(1, num_points))), 2, 8))


class _Read(NamedTuple):
    position: int
    cloud: EvalCloud | None
    error: str | None


class _Files(torch.utils.data.Dataset):
    """The inputs read in DataLoader workers (or in this process)."""

    def __init__(self, inputs: Sequence[ExtractInput], data: Any, seed: int) -> None:
        self.inputs, self.data, self.seed = list(inputs), data, seed

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> _Read:
        path = self.inputs[i].path
        try:
            return _Read(i, read_cloud(path, self.data, seed=self.seed), None)
        except (OSError, ValueError) as e:
            msg = str(e) or type(e).__name__
            return _Read(i, None, msg if path in msg else f"{path}: {msg}")


class PointFeatureExtractor(FeatureExtractor):
    """Global (and per-point) features of Point-MAE pretraining and classification checkpoints (see
    the module docstring); files are read ahead by ``--num-workers`` processes and ``--batch-size``
    samples go through the model together."""

    def __init__(self, model: nn.Module, cfg: Any, options: ExtractOptions, device: torch.device) -> None:
        given = [f"--{n}" for n in ("window", "stride", "fps") if getattr(options, n) is not None]
        if given:
            raise UserError(f"{', '.join(given)}: for videos only; this is a point-cloud checkpoint")
        if not hasattr(model, "forward_head"):
            raise UserError(f"{type(model).__name__} ({cfg.task}) has no feature interface: extract from its "
                            f"pretraining or classification checkpoint")
        self.model, self.cfg, self.options, self.device = model.eval(), cfg, options, device
        self.pool = options.pool or "max+mean"
        self.has_cls = getattr(model, "cls_token", None) is not None
        if self.pool == "cls" and not self.has_cls:
            raise UserError("--pool cls: this model has no class token (a pretraining checkpoint); use max+mean, "
                            "mean or none")
        self.suffixes = (".npy",) + (("_centers.npy",) if self.pool == "none" else ()) + \
            (("_points.npy", "_pca.ply", "_pca.png") if options.per_point else ())
        self._renderer: CloudRenderer | None = None

    @torch.no_grad()
    def features(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """samples: (B, npoints, 3) -> (global features (B, D) or tokens (B, L, D) for ``none``, patch
        tokens (B, G, D), patch centres (B, G, 3))."""
        tokens = self.model.forward_features(samples)  # (B, (1 +) G, D)
        patches = tokens[:, 1:] if self.has_cls else tokens
        centers = self.model.group(samples).center  # the patches' centres, in token order
        if self.pool == "none":
            pooled = tokens
        elif self.pool == "cls":
            pooled = tokens[:, 0]
        elif self.pool == "mean":
            pooled = patches.mean(dim=1)
        else:
            pooled = pool_patch_tokens(patches, "max_plus_mean")
        return pooled, patches, centers

    def run(self, inputs: Sequence[ExtractInput]) -> Iterator[ExtractResult]:
        files = _Files(inputs, self.cfg.data, self.cfg.seed)
        reads: Any = (files[i] for i in range(len(files))) if self.options.num_workers == 0 else \
            torch.utils.data.DataLoader(files, batch_size=None, num_workers=self.options.num_workers)
        batch: list[_Read] = []
        for r in reads:
            if r.error is not None:
                yield ExtractResult(inputs[r.position], error=r.error)
                continue
            batch.append(r)
            if len(batch) == self.options.batch_size:
                yield from self._batch(inputs, batch)
                batch = []
        if batch:
            yield from self._batch(inputs, batch)

    def _batch(self, inputs: Sequence[ExtractInput], batch: list[_Read]) -> Iterator[ExtractResult]:
        samples = torch.stack([r.cloud.sample for r in batch]).to(self.device)
        pooled, patches, centers = self.features(samples)
        for b, r in enumerate(batch):
            item, cloud = inputs[r.position], r.cloud
            files = {".npy": save_npy(pooled[b].float().cpu().numpy())}
            if self.pool == "none":
                files["_centers.npy"] = save_npy(centers[b].float().cpu().numpy())
            if self.options.per_point:
                files.update(self._per_point(cloud, patches[b], centers[b]))
            row = {"input": item.path, "name": item.name, "points": len(cloud.points), "sampled": len(cloud.sample),
                   "dim": int(pooled.shape[-1]), "pool": self.pool}
            yield ExtractResult(item, files=files, rows=[row])

    @torch.no_grad()
    def _per_point(self, cloud: EvalCloud, tokens: torch.Tensor, centers: torch.Tensor) -> dict[str, Any]:
        """The per-point files of one cloud; tokens: (G, D) patch tokens, centers: (G, 3)."""
        frame = ((cloud.points - cloud.center) / cloud.scale).to(self.device)  # (N, 3) in the sample's frame
        feats = torch.cat([three_nn_interpolate(part[None], centers[None], tokens[None])[0].float().cpu()
                           for part in frame.split(INTERPOLATION_CHUNK)])  # (N, D)
        rgb = pca_colors(feats.to(self.device)).cpu().numpy()
        picture = self.renderer().render([frame.cpu().numpy()], [rgb], point_size=picture_point_size(len(frame)))
        points = cloud.points.numpy()
        return {"_points.npy": save_npy(feats.numpy()),
                "_pca.ply": lambda path: write_ply(path, points, colors=rgb),
                "_pca.png": lambda path: Image.fromarray(picture).save(path)}

    def renderer(self) -> CloudRenderer:
        """The job's one Open3D renderer (Open3D cannot hold two that have drawn)."""
        if self._renderer is None:
            self._renderer = CloudRenderer(PICTURE_SIZE, PICTURE_SIZE)
        return self._renderer


@register_extractor("pointcloud")
def pointcloud_extractor(model: nn.Module, cfg: Any, options: ExtractOptions, device: torch.device) -> FeatureExtractor:
    """The default ``mm3d extract`` of point-cloud tasks."""
    return PointFeatureExtractor(model, cfg, options, device)


__all__ = ["EvalCloud", "read_cloud", "pca_colors", "PointFeatureExtractor"]
