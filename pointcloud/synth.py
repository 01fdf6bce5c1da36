"""Procedural synthetic point-cloud datasets, written in the real on-disk formats.

``mm3d data synth KIND --out DIR`` (KIND: ``modelnet40``, ``shapenet55``, ``shapenetpart``,
``scanobjectnn``) writes a dataset that the loaders of :mod:`mm3d.pointcloud.datasets` read
exactly as they read the real one. Shapes are sampled on their surfaces with normals, from
primitives (:data:`PRIMITIVES`) and composite objects with labelled parts
(:data:`COMPOSITES`), each with random proportions, a random pose (any rotation about the up
axis y plus a tilt), an anisotropic scale and Gaussian noise, then centred and scaled to the
unit sphere. Classes differ in shape, not in size or position, so they are learnable but not
trivial. The output depends only on `seed` (a NumPy ``Generator``).

Class sets (the synthetic data is not the real taxonomy, only its format):

* ``modelnet40``: the 10 :data:`PRIMITIVES`; ``modelnet40_shape_names.txt`` lists only them.
* ``shapenet55``: the 15 :data:`SYNTH_SHAPES`, one made-up synset id each (:data:`SYNTH_SYNSETS`).
* ``scanobjectnn``: the 15 :data:`SYNTH_SHAPES`; label k is ``SYNTH_SHAPES[k]`` (the official
  class names do not apply).
* ``shapenetpart``: the 11 categories of :data:`COMPOSITES` under their real synsets and real
  global part ids (which real part each id names is not reproduced); the full official
  16-line ``synsetoffset2category.txt`` is written, so 5 categories have no shapes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from mm3d.pointcloud.datasets import (SCANOBJECTNN_FILES, SHAPENETPART_CATEGORIES,
                                      SHAPENETPART_SEG_CLASSES)
from mm3d.registry import register_synth

Rng = np.random.Generator
Scale = Literal["tiny", "small"]
Sampler = Callable[[Rng, int], tuple[np.ndarray, np.ndarray]]

# ----------------------------------------------------------------------------------------------
# Surface primitives: each is a Part (area, sampler) whose sampler returns n points (n, 3) on the
# surface and their outward unit normals (n, 3). Canonical frame: centred, y is up/axis.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A surface with its area (for area-proportional point counts) and a sampler."""

    area: float
    sample: Sampler

    def moved(self, rotation: np.ndarray | None = None, offset=(0.0, 0.0, 0.0)) -> Part:
        """The same surface rotated by `rotation` (3, 3) then translated by `offset`."""
        rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
        off = np.asarray(offset, dtype=np.float64)

        def sample(rng: Rng, n: int) -> tuple[np.ndarray, np.ndarray]:
            p, nrm = self.sample(rng, n)
            return p @ rot.T + off, nrm @ rot.T

        return Part(self.area, sample)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _rot(axis: Literal["x", "y", "z"], angle: float) -> np.ndarray:
    """Right-handed rotation matrix about a coordinate axis (column vectors)."""
    c, s = math.cos(angle), math.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _on_sphere(rng: Rng, n: int) -> np.ndarray:
    return _unit(rng.standard_normal((n, 3)))


def sphere(r: float) -> Part:
    def sample(rng: Rng, n: int):
        u = _on_sphere(rng, n)
        return r * u, u
    return Part(4 * math.pi * r * r, sample)


def hemisphere(r: float, up: bool = True) -> Part:
    """The upper (y >= 0) or lower half of a sphere, open."""
    def sample(rng: Rng, n: int):
        u = _on_sphere(rng, n)
        u[:, 1] = np.abs(u[:, 1]) * (1 if up else -1)
        return r * u, u
    return Part(2 * math.pi * r * r, sample)


def ellipsoid(a: float, b: float, c: float) -> Part:
    axes = np.array([a, b, c])
    p = 1.6075  # Knud Thomsen's approximation of the surface area
    area = 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)

    def sample(rng: Rng, n: int):
        u = _on_sphere(rng, n)
        return u * axes, _unit(u / axes)
    return Part(area, sample)


def box(sx: float, sy: float, sz: float) -> Part:
    size = np.array([sx, sy, sz])
    face_area = np.array([sy * sz, sx * sz, sx * sy])

    def sample(rng: Rng, n: int):
        p = (rng.random((n, 3)) - 0.5) * size
        axis = rng.choice(3, size=n, p=face_area / face_area.sum())
        sign = rng.choice(np.array([-1.0, 1.0]), size=n)
        rows = np.arange(n)
        p[rows, axis] = sign * size[axis] / 2
        nrm = np.zeros((n, 3))
        nrm[rows, axis] = sign
        return p, nrm
    return Part(2 * face_area.sum(), sample)


def _disk_points(rng: Rng, n: int, r: float, r_inner: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform points of an annulus in the xz plane: (x, z) and their angle."""
    rho = np.sqrt(r_inner ** 2 + (r ** 2 - r_inner ** 2) * rng.random(n))
    theta = 2 * math.pi * rng.random(n)
    return np.stack([rho * np.cos(theta), rho * np.sin(theta)], 1), theta


def disk(r: float, up: bool = True, r_inner: float = 0.0) -> Part:
    """A flat (annular) disk at y = 0 facing +y (or -y)."""
    def sample(rng: Rng, n: int):
        xz, _ = _disk_points(rng, n, r, r_inner)
        p = np.stack([xz[:, 0], np.zeros(n), xz[:, 1]], 1)
        nrm = np.zeros((n, 3))
        nrm[:, 1] = 1.0 if up else -1.0
        return p, nrm
    return Part(math.pi * (r * r - r_inner * r_inner), sample)


def _group(parts: list[Part]) -> Part:
    """Several surfaces as one, points split in proportion to area."""
    areas = np.array([p.area for p in parts])

    def sample(rng: Rng, n: int):
        counts = rng.multinomial(n, areas / areas.sum())
        got = [p.sample(rng, int(k)) for p, k in zip(parts, counts) if k > 0]
        return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    return Part(float(areas.sum()), sample)


def cylinder(r: float, h: float, caps: bool = True) -> Part:
    def side(rng: Rng, n: int):
        theta = 2 * math.pi * rng.random(n)
        y = (rng.random(n) - 0.5) * h
        nrm = np.stack([np.cos(theta), np.zeros(n), np.sin(theta)], 1)
        return nrm * [r, 0, r] + np.stack([np.zeros(n), y, np.zeros(n)], 1), nrm
    wall = Part(2 * math.pi * r * h, side)
    if not caps:
        return wall
    return _group([wall, disk(r, True).moved(offset=(0, h / 2, 0)),
                   disk(r, False).moved(offset=(0, -h / 2, 0))])


def cone(r: float, h: float, base: bool = True) -> Part:
    """Apex at y = +h/2, base circle at y = -h/2."""
    slant = math.hypot(r, h)

    def lateral(rng: Rng, n: int):
        t = np.sqrt(rng.random(n))  # distance from the apex, area density grows linearly
        theta = 2 * math.pi * rng.random(n)
        c, s = np.cos(theta), np.sin(theta)
        p = np.stack([r * t * c, h / 2 - h * t, r * t * s], 1)
        return p, _unit(np.stack([h * c, np.full(n, r), h * s], 1))
    surface = Part(math.pi * r * slant, lateral)
    if not base:
        return surface
    return _group([surface, disk(r, False).moved(offset=(0, -h / 2, 0))])


def torus(major: float, minor: float, arc: float = 2 * math.pi) -> Part:
    """A torus around the y axis (ring in the xz plane); `arc` < 2 pi keeps part of the ring."""
    def sample(rng: Rng, n: int):
        us, vs, have = [], [], 0
        while have < n:  # area-uniform: accept the tube angle v with prob (R + r cos v)/(R + r)
            m = 2 * (n - have) + 16
            u = arc * rng.random(m)
            v = 2 * math.pi * rng.random(m)
            keep = rng.random(m) * (major + minor) <= major + minor * np.cos(v)
            us.append(u[keep])
            vs.append(v[keep])
            have += int(keep.sum())
        u, v = np.concatenate(us)[:n], np.concatenate(vs)[:n]
        nrm = np.stack([np.cos(v) * np.cos(u), np.sin(v), np.cos(v) * np.sin(u)], 1)
        ring = np.stack([major * np.cos(u), np.zeros(n), major * np.sin(u)], 1)
        return ring + minor * nrm, nrm
    return Part(4 * math.pi ** 2 * major * minor * arc / (2 * math.pi), sample)


def capsule(r: float, h: float) -> Part:
    return _group([cylinder(r, h, caps=False), hemisphere(r, True).moved(offset=(0, h / 2, 0)),
                   hemisphere(r, False).moved(offset=(0, -h / 2, 0))])


def convex_mesh(vertices: np.ndarray, faces: np.ndarray) -> Part:
    """A convex polyhedron's triangles, normals oriented away from the vertex centroid."""
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[np.asarray(faces)]  # (F, 3, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    areas = 0.5 * np.linalg.norm(cross, axis=1)
    normals = _unit(cross)
    outward = np.einsum("fc,fc->f", normals, tri.mean(1) - v.mean(0)) >= 0
    normals = np.where(outward[:, None], normals, -normals)

    def sample(rng: Rng, n: int):
        f = rng.choice(len(tri), size=n, p=areas / areas.sum())
        s = np.sqrt(rng.random(n))[:, None]
        t = rng.random(n)[:, None]
        a, b, c = tri[f, 0], tri[f, 1], tri[f, 2]
        return (1 - s) * a + s * (1 - t) * b + s * t * c, normals[f]
    return Part(float(areas.sum()), sample)


def pyramid(base: float, h: float) -> Part:
    b = base / 2
    verts = np.array([[-b, -h / 2, -b], [b, -h / 2, -b], [b, -h / 2, b], [-b, -h / 2, b],
                      [0, h / 2, 0]])
    faces = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
    return convex_mesh(verts, faces)


def plate_with_hole(w: float, d: float, hole: float, thickness: float = 0.04) -> Part:
    """A thin w x d plate in the xz plane with a round hole of radius `hole` in its middle."""
    keep_frac = 1 - math.pi * hole * hole / (w * d)

    def sample(rng: Rng, n: int):
        out, have = [], 0
        while have < n:
            m = int((n - have) / keep_frac) + 16
            xz = (rng.random((m, 2)) - 0.5) * [w, d]
            xz = xz[(xz ** 2).sum(1) > hole * hole]
            out.append(xz)
            have += len(xz)
        xz = np.concatenate(out)[:n]
        sign = rng.choice(np.array([-1.0, 1.0]), size=n)
        p = np.stack([xz[:, 0], sign * thickness / 2, xz[:, 1]], 1)
        nrm = np.zeros((n, 3))
        nrm[:, 1] = sign
        return p, nrm
    return Part(2 * w * d * keep_frac, sample)


# ----------------------------------------------------------------------------------------------
# Classes: primitives with random proportions, and composites with labelled parts
# ----------------------------------------------------------------------------------------------

Labelled = list[tuple[Part, int]]  # (surface, part index within the object)


def _u(rng: Rng, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


PRIMITIVES: dict[str, Callable[[Rng], Part]] = {
    "sphere": lambda g: sphere(1.0),
    "box": lambda g: box(_u(g, 0.6, 1.4), _u(g, 0.6, 1.4), _u(g, 0.6, 1.4)),
    "cylinder": lambda g: cylinder(_u(g, 0.35, 0.6), _u(g, 1.0, 1.8)),
    "cone": lambda g: cone(_u(g, 0.4, 0.7), _u(g, 1.0, 1.6)),
    "torus": lambda g: torus(_u(g, 0.7, 1.0), _u(g, 0.15, 0.35)),
    "capsule": lambda g: capsule(_u(g, 0.3, 0.45), _u(g, 0.8, 1.4)),
    "pyramid": lambda g: pyramid(_u(g, 1.0, 1.6), _u(g, 0.8, 1.4)),
    "ellipsoid": lambda g: ellipsoid(_u(g, 0.9, 1.1), _u(g, 0.45, 0.6), _u(g, 0.25, 0.35)),
    "plate_with_hole": lambda g: plate_with_hole(_u(g, 1.4, 2.0), _u(g, 1.2, 1.8),
                                                 _u(g, 0.25, 0.45)),
    "tube": lambda g: cylinder(_u(g, 0.35, 0.6), _u(g, 1.0, 1.8), caps=False),
}


def _airplane(g: Rng) -> Labelled:
    length, r = _u(g, 1.8, 2.4), _u(g, 0.12, 0.18)
    span, chord = _u(g, 1.6, 2.2), _u(g, 0.3, 0.45)
    along_x = _rot("z", math.pi / 2)
    engines = [cylinder(0.07, 0.35).moved(along_x, (0.1, -0.12, s * span * 0.3)) for s in (-1, 1)]
    return [(capsule(r, length - 2 * r).moved(along_x), 0),
            (box(chord, 0.03, span), 1),
            (_group([box(0.25, 0.35, 0.03).moved(offset=(-length / 2 + 0.15, 0.25, 0)),
                     box(0.22, 0.02, 0.6).moved(offset=(-length / 2 + 0.15, 0.05, 0))]), 2),
            (_group(engines), 3)]


def _bag(g: Rng) -> Labelled:
    w, h, d = _u(g, 1.0, 1.4), _u(g, 0.8, 1.1), _u(g, 0.3, 0.5)
    handle = torus(_u(g, 0.25, 0.4), 0.04, arc=math.pi).moved(_rot("x", -math.pi / 2),
                                                               (0, h / 2, 0))
    return [(box(w, h, d), 0), (handle, 1)]


def _cap(g: Rng) -> Labelled:
    r = _u(g, 0.5, 0.65)
    visor_len = _u(g, 0.4, 0.6)
    visor = box(visor_len, 0.02, 1.4 * r).moved(offset=(r + visor_len / 2 - 0.05, 0.0, 0))
    return [(hemisphere(r), 0), (visor, 1)]


def _chair(g: Rng) -> Labelled:
    w, seat_h, back_h = _u(g, 0.8, 1.0), _u(g, 0.7, 0.9), _u(g, 0.7, 1.0)
    legs = [box(0.07, seat_h, 0.07).moved(offset=(sx * (w / 2 - 0.05), seat_h / 2,
                                                  sz * (w / 2 - 0.05)))
            for sx in (-1, 1) for sz in (-1, 1)]
    parts: Labelled = [(box(w, back_h, 0.07).moved(offset=(0, seat_h + back_h / 2, -w / 2)), 0),
                       (box(w, 0.08, w).moved(offset=(0, seat_h, 0)), 1),
                       (_group(legs), 2)]
    if g.random() < 0.5:
        arms = [box(0.07, 0.05, w * 0.8).moved(offset=(sx * w / 2, seat_h + 0.3, 0))
                for sx in (-1, 1)]
        parts.append((_group(arms), 3))
    return parts


def _guitar(g: Rng) -> Labelled:
    body_len, neck_len = _u(g, 0.9, 1.1), _u(g, 0.9, 1.2)
    body = _group([ellipsoid(0.45, 0.35, 0.12).moved(offset=(0, 0, 0)),
                   ellipsoid(0.35, 0.28, 0.12).moved(offset=(body_len * 0.55, 0, 0))])
    return [(box(0.25, 0.12, 0.04).moved(offset=(body_len * 0.6 + neck_len + 0.15, 0, 0)), 0),
            (box(neck_len, 0.08, 0.04).moved(offset=(body_len * 0.6 + neck_len / 2, 0, 0)), 1),
            (body, 2)]


def _knife(g: Rng) -> Labelled:
    blade_len, handle_len = _u(g, 1.0, 1.4), _u(g, 0.5, 0.7)
    blade = convex_mesh(np.array([[0, -0.12, -0.01], [0, -0.12, 0.01], [0, 0.12, -0.01],
                                  [0, 0.12, 0.01], [blade_len, -0.1, 0]]),
                        np.array([[0, 1, 4], [2, 3, 4], [0, 2, 4], [1, 3, 4], [0, 1, 2],
                                  [1, 2, 3]]))
    handle = cylinder(0.06, handle_len).moved(_rot("z", math.pi / 2), (-handle_len / 2, 0, 0))
    return [(blade, 0), (handle, 1)]


def _lamp(g: Rng) -> Labelled:
    pole_h, shade_r = _u(g, 1.0, 1.6), _u(g, 0.35, 0.55)
    return [(cylinder(_u(g, 0.3, 0.45), 0.06), 0),
            (cylinder(0.03, pole_h, caps=False).moved(offset=(0, pole_h / 2, 0)), 1),
            (cone(shade_r, 0.45, base=False).moved(offset=(0, pole_h + 0.1, 0)), 2),
            (sphere(0.1).moved(offset=(0, pole_h - 0.05, 0)), 3)]


def _laptop(g: Rng) -> Labelled:
    w, d = _u(g, 1.2, 1.5), _u(g, 0.8, 1.0)
    # the screen stands on the base's back edge, leaning back by up to ~35 degrees
    screen = box(w, d, 0.03).moved(offset=(0, d / 2, 0)).moved(_rot("x", -_u(g, 0.0, 0.6)),
                                                               (0, 0, -d / 2))
    return [(box(w, 0.05, d), 0), (screen, 1)]


def _mug(g: Rng) -> Labelled:
    r, h = _u(g, 0.4, 0.55), _u(g, 0.9, 1.3)
    handle = torus(_u(g, 0.22, 0.3), 0.05, arc=math.pi).moved(
        _rot("z", math.pi / 2) @ _rot("x", math.pi / 2), (r, 0, 0))
    return [(_group([cylinder(r, h, caps=False), disk(r, False).moved(offset=(0, -h / 2, 0))]),
             0), (handle, 1)]


def _rocket(g: Rng) -> Labelled:
    r, h = _u(g, 0.18, 0.25), _u(g, 1.4, 2.0)
    fins = [convex_mesh(np.array([[r, -h / 2, -0.01], [r, -h / 2, 0.01], [r, -h / 2 + 0.5, 0],
                                  [r + 0.3, -h / 2 - 0.1, 0]]),
                        np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
                        ).moved(_rot("y", k * math.pi / 2)) for k in range(4)]
    return [(cylinder(r, h, caps=False), 0), (_group(fins), 1),
            (cone(r, _u(g, 0.4, 0.6), base=False).moved(offset=(0, h / 2 + 0.25, 0)), 2)]


def _table(g: Rng) -> Labelled:
    w, d, h = _u(g, 1.4, 2.0), _u(g, 0.8, 1.2), _u(g, 0.8, 1.1)
    legs = [box(0.08, h, 0.08).moved(offset=(sx * (w / 2 - 0.08), h / 2, sz * (d / 2 - 0.08)))
            for sx in (-1, 1) for sz in (-1, 1)]
    parts: Labelled = [(box(w, 0.07, d).moved(offset=(0, h, 0)), 0), (_group(legs), 1)]
    if g.random() < 0.6:
        parts.append((box(w - 0.2, 0.04, d - 0.2).moved(offset=(0, h * 0.3, 0)), 2))
    return parts


#: ShapeNetPart category -> builder of a labelled composite; part index k maps to
#: ``SHAPENETPART_SEG_CLASSES[category][k]``.
COMPOSITES: dict[str, Callable[[Rng], Labelled]] = {
    "Airplane": _airplane, "Bag": _bag, "Cap": _cap, "Chair": _chair, "Guitar": _guitar,
    "Knife": _knife, "Lamp": _lamp, "Laptop": _laptop, "Mug": _mug, "Rocket": _rocket,
    "Table": _table,
}

#: The 15 shape classes of the shapenet55 and scanobjectnn kinds: primitives then composites.
SYNTH_SHAPES: tuple[str, ...] = tuple(PRIMITIVES) + ("table", "chair", "lamp", "mug",
                                                     "airplane")
#: Made-up synset ids for the shapenet55 kind (not real ShapeNet synsets).
SYNTH_SYNSETS: dict[str, str] = {name: f"{90000000 + k:08d}" for k, name in
                                 enumerate(SYNTH_SHAPES)}


def _shape(name: str, g: Rng) -> Labelled:
    if name in PRIMITIVES:
        return [(PRIMITIVES[name](g), 0)]
    return COMPOSITES[name.capitalize()](g)


# ----------------------------------------------------------------------------------------------
# Sampling a posed object
# ----------------------------------------------------------------------------------------------


@dataclass
class Cloud:
    points: np.ndarray   # (N, 3), centred, unit sphere
    normals: np.ndarray  # (N, 3), unit
    parts: np.ndarray    # (N,) part index within the object


def sample_object(parts: Labelled, n: int, rng: Rng, *, tilt: float = 0.35,
                  aniso: tuple[float, float] = (0.8, 1.25), noise: float = 0.008) -> Cloud:
    """Sample `n` surface points of a labelled object, pose it randomly and normalise it.

    The pose: anisotropic scale U(aniso) per axis, a tilt up to `tilt` radians about x and z,
    a uniform rotation about y; then Gaussian noise of std `noise` (unit-sphere units).
    """
    areas = np.array([p.area for p, _ in parts])
    counts = rng.multinomial(n, areas / areas.sum())
    pts, nrm, lab = [], [], []
    for (part, label), k in zip(parts, counts):
        if k == 0:
            continue
        p, q = part.sample(rng, int(k))
        pts.append(p)
        nrm.append(q)
        lab.append(np.full(int(k), label))
    p, q, lab = np.concatenate(pts), np.concatenate(nrm), np.concatenate(lab)
    order = rng.permutation(n)  # no part-ordered files
    p, q, lab = p[order], q[order], lab[order]
    linear = (_rot("y", rng.uniform(0, 2 * math.pi)) @ _rot("x", rng.uniform(-tilt, tilt))
              @ _rot("z", rng.uniform(-tilt, tilt)) @ np.diag(rng.uniform(*aniso, size=3)))
    p = p @ linear.T
    q = _unit(q @ np.linalg.inv(linear))  # normals transform by the inverse transpose
    p = p - p.mean(0)
    p = p / np.linalg.norm(p, axis=1).max()
    p = p + noise * rng.standard_normal(p.shape)
    return Cloud(p.astype(np.float32), q.astype(np.float32), lab)


def _shape_id(rng: Rng) -> str:
    return "".join(f"{b:02x}" for b in rng.integers(0, 256, size=16))


def _write_rows(path: Path, rows: np.ndarray, fmt: str) -> None:
    """Write rows with one %-format per value (fast: a single C-level format call)."""
    line = fmt + "\n"
    path.write_text((line * rows.shape[0]) % tuple(rows.ravel().tolist()))


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------

_SIZES = {
    # per class: train, test, points per file
    "modelnet40": {"tiny": (4, 2, 1024), "small": (30, 10, 2048)},
    "shapenet55": {"tiny": (2, 1, 8192), "small": (16, 4, 8192)},
    # per category: train, val, test, points per file (low, high)
    "shapenetpart": {"tiny": (2, 1, 1, 512, 768), "small": (12, 3, 5, 2048, 2816)},
    # per class: train, test, points per cloud
    "scanobjectnn": {"tiny": (2, 1, 2048), "small": (20, 6, 2048)},
}


def _check_scale(scale: str) -> None:
    if scale not in ("tiny", "small"):
        raise ValueError(f"scale must be 'tiny' or 'small', got {scale!r}")


@register_synth("modelnet40")
def synth_modelnet40(out_dir: Path, *, seed: int = 0, scale: Scale = "small") -> dict:
    """``modelnet40_normal_resampled`` layout with the 10 :data:`PRIMITIVES` as classes.

    Writes ``modelnet40_shape_names.txt`` (the synthetic class names only),
    ``modelnet40_train.txt``, ``modelnet40_test.txt`` and ``<class>/<class>_NNNN.txt`` with
    lines ``x,y,z,nx,ny,nz`` ('%.6f', as the release). tiny: 4 + 2 shapes per class of 1024
    points; small: 30 + 10 of 2048 points (use ``cache_points`` <= the points per file).
    """
    _check_scale(scale)
    out, rng = Path(out_dir), np.random.default_rng(seed)
    n_train, n_test, npts = _SIZES["modelnet40"][scale]
    classes = list(PRIMITIVES)
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for cls in classes:
        (out / cls).mkdir(parents=True, exist_ok=True)
        for k in range(n_train + n_test):
            shape_id = f"{cls}_{k + 1:04d}"
            cloud = sample_object(_shape(cls, rng), npts, rng)
            _write_rows(out / cls / f"{shape_id}.txt",
                        np.concatenate([cloud.points, cloud.normals], 1), ",".join(["%.6f"] * 6))
            splits["train" if k < n_train else "test"].append(shape_id)
    (out / "modelnet40_shape_names.txt").write_text("\n".join(classes) + "\n")
    for split, ids in splits.items():
        (out / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
    return {"classes": classes, "train": len(splits["train"]), "test": len(splits["test"]),
            "points_per_file": npts}


@register_synth("shapenet55")
def synth_shapenet55(out_dir: Path, *, seed: int = 0, scale: Scale = "small") -> dict:
    """ShapeNet-55 layout: ``shapenet_pc/<synset>-<id>.npy`` (8192, 3) float32 and
    ``ShapeNet-55/train.txt``, ``test.txt``, with the 15 :data:`SYNTH_SHAPES` under the made-up
    synsets of :data:`SYNTH_SYNSETS`. tiny: 2 + 1 files per shape; small: 16 + 4."""
    _check_scale(scale)
    out, rng = Path(out_dir), np.random.default_rng(seed)
    n_train, n_test, npts = _SIZES["shapenet55"][scale]
    (out / "shapenet_pc").mkdir(parents=True, exist_ok=True)
    (out / "ShapeNet-55").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for name in SYNTH_SHAPES:
        for k in range(n_train + n_test):
            fname = f"{SYNTH_SYNSETS[name]}-{_shape_id(rng)}.npy"
            cloud = sample_object(_shape(name, rng), npts, rng)
            np.save(out / "shapenet_pc" / fname, cloud.points)
            splits["train" if k < n_train else "test"].append(fname)
    for split, names in splits.items():
        (out / "ShapeNet-55" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return {"synsets": SYNTH_SYNSETS, "train": len(splits["train"]),
            "test": len(splits["test"]), "points_per_file": npts}


@register_synth("shapenetpart")
def synth_shapenetpart(out_dir: Path, *, seed: int = 0, scale: Scale = "small") -> dict:
    """ShapeNetPart layout: ``<synset>/<id>.txt`` lines ``x y z nx ny nz part`` with real
    global part ids, the official 16-line ``synsetoffset2category.txt`` and
    ``train_test_split/shuffled_{train,val,test}_file_list.json``. The 11 :data:`COMPOSITES`
    categories get shapes (tiny: 2/1/1 per category, 512-768 points; small: 12/3/5,
    2048-2816 points); the other 5 have none, as in partial downloads."""
    _check_scale(scale)
    out, rng = Path(out_dir), np.random.default_rng(seed)
    n_train, n_val, n_test, lo, hi = _SIZES["shapenetpart"][scale]
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for cat, build in COMPOSITES.items():
        synset, part_ids = SHAPENETPART_CATEGORIES[cat], np.array(SHAPENETPART_SEG_CLASSES[cat])
        (out / synset).mkdir(parents=True, exist_ok=True)
        for k in range(n_train + n_val + n_test):
            shape_id = _shape_id(rng)
            cloud = sample_object(build(rng), int(rng.integers(lo, hi + 1)), rng, tilt=0.15,
                                  aniso=(0.9, 1.1), noise=0.004)
            rows = np.concatenate([cloud.points, cloud.normals,
                                   part_ids[cloud.parts][:, None].astype(np.float32)], 1)
            _write_rows(out / synset / f"{shape_id}.txt", rows, " ".join(["%.6f"] * 7))
            split = "train" if k < n_train else "val" if k < n_train + n_val else "test"
            lists[split].append(f"shape_data/{synset}/{shape_id}")
    (out / "synsetoffset2category.txt").write_text(
        "".join(f"{c}\t{s}\n" for c, s in SHAPENETPART_CATEGORIES.items()))
    (out / "train_test_split").mkdir(parents=True, exist_ok=True)
    for split, entries in lists.items():
        order = rng.permutation(len(entries))  # "shuffled" lists
        (out / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(
            json.dumps([entries[i] for i in order]))
    return {"categories": list(COMPOSITES), **{s: len(v) for s, v in lists.items()}}


def _scan_view(cloud: Cloud, n: int, rng: Rng) -> np.ndarray:
    """`n` points of `cloud` seen from a random side (a partial scan): (n, 3)."""
    phi = rng.uniform(0, 2 * math.pi)
    view = _unit(np.array([math.cos(phi), 0.4, math.sin(phi)]))
    seen = np.flatnonzero(cloud.normals @ view > -0.15)
    if len(seen) < n // 4:
        seen = np.arange(len(cloud.points))
    pick = rng.choice(seen, size=n, replace=len(seen) < n)
    return cloud.points[pick]


def _background(n: int, rng: Rng) -> np.ndarray:
    """Scene clutter around a unit object: floor, a wall patch and a few boxes, (n, 3)."""
    k_floor, k_wall = int(n * 0.5), int(n * 0.3)
    floor = np.stack([rng.uniform(-1.6, 1.6, k_floor), np.full(k_floor, -1.0),
                      rng.uniform(-1.6, 1.6, k_floor)], 1)
    phi = rng.uniform(0, 2 * math.pi)
    along = rng.uniform(-1.6, 1.6, k_wall)
    wall = np.stack([1.4 * math.cos(phi) - along * math.sin(phi), rng.uniform(-1.0, 1.2, k_wall),
                     1.4 * math.sin(phi) + along * math.cos(phi)], 1)
    k_box = n - k_floor - k_wall
    clutter, _ = box(_u(rng, 0.2, 0.5), _u(rng, 0.2, 0.5), _u(rng, 0.2, 0.5)).sample(rng, k_box)
    angle = rng.uniform(0, 2 * math.pi)
    clutter = clutter + [1.2 * math.cos(angle), -0.75, 1.2 * math.sin(angle)]
    return np.concatenate([floor, wall, clutter]) + 0.01 * rng.standard_normal((n, 3))


def _normalise(p: np.ndarray) -> np.ndarray:
    p = p - p.mean(0)
    return (p / np.linalg.norm(p, axis=1).max()).astype(np.float32)


@register_synth("scanobjectnn")
def synth_scanobjectnn(out_dir: Path, *, seed: int = 0, scale: Scale = "small") -> dict:
    """ScanObjectNN h5 files (``data`` (M, 2048, 3) float32, ``label`` (M,) int64) for the
    three variants under their official names (:data:`mm3d.pointcloud.datasets.SCANOBJECTNN_FILES`).

    Each object (one of the 15 :data:`SYNTH_SHAPES`, label = its index) is seen from one side
    as a partial scan. OBJ_ONLY: the object alone; OBJ_BG: the object plus 15-35 % floor, wall
    and clutter points; PB_T50_RS: the OBJ_BG scene cropped by the object's box shifted up to
    50 % of its size, rotated about y and scaled by U(0.75, 1.25) per axis. Every cloud is
    centred and scaled to the unit sphere. tiny: 2 + 1 objects per class; small: 20 + 6.
    """
    import h5py

    _check_scale(scale)
    out, rng = Path(out_dir), np.random.default_rng(seed)
    n_train, n_test, npts = _SIZES["scanobjectnn"][scale]
    data: dict[tuple[str, str], list[np.ndarray]] = {}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for label, name in enumerate(SYNTH_SHAPES):
        for k in range(n_train + n_test):
            split = "train" if k < n_train else "test"
            cloud = sample_object(_shape(name, rng), 3 * npts, rng, tilt=0.1)
            obj = _scan_view(cloud, npts, rng)
            n_bg = int(npts * rng.uniform(0.15, 0.35))
            keep = rng.choice(npts, size=npts - n_bg, replace=False)
            scene = np.concatenate([obj[keep], _background(n_bg, rng)])
            big = np.concatenate([obj, _background(npts, rng)])
            lo, hi = obj.min(0), obj.max(0)
            shift = (hi - lo) * rng.uniform(-0.5, 0.5, size=3) * [1, 0, 1]
            inside = np.flatnonzero(((big >= lo - 0.1 + shift) & (big <= hi + 0.1 + shift)).all(1))
            if len(inside) < 64:
                inside = np.arange(len(big))
            crop = big[rng.choice(inside, size=npts, replace=len(inside) < npts)]
            crop = crop @ (_rot("y", rng.uniform(0, 2 * math.pi))
                           @ np.diag(rng.uniform(0.75, 1.25, size=3))).T
            for variant, cloud_pts in (("OBJ_ONLY", obj), ("OBJ_BG", scene), ("PB_T50_RS", crop)):
                data.setdefault((variant, split), []).append(_normalise(cloud_pts))
            labels[split].append(label)
    for variant, (folder, train_file, test_file) in SCANOBJECTNN_FILES.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for split, fname in (("train", train_file), ("test", test_file)):
            with h5py.File(out / folder / fname, "w") as f:
                f.create_dataset("data", data=np.stack(data[(variant, split)]))
                f.create_dataset("label", data=np.asarray(labels[split], dtype=np.int64))
    return {"classes": list(SYNTH_SHAPES), "train": len(labels["train"]),
            "test": len(labels["test"]), "variants": list(SCANOBJECTNN_FILES)}
