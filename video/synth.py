"""Synthetic action clips, written in the real formats the video loaders read.

``mm3d data synth video --out DIR`` writes short H.264 mp4 clips (PyAV; MPEG-4 Part 2 where
libx264 is missing) of one textured object moving in one of :data:`CLASSES` ways over a textured
background, plus the same clips as JPEG frame folders. Everything depends only on `seed`.

Layout (every list path is relative to DIR, so ``data_root=DIR`` reads them)::

    DIR/label_map.txt                       class names, label = line number (0-based)
    DIR/videos/<class>/<clip>.mp4           the clips
    DIR/{train,val,test}.txt                'videos/<class>/<clip>.mp4 label'   (Kinetics-style)
    DIR/pretrain.txt                        'videos/<class>/<clip>.mp4 0 -1'   (VideoMAEv2-style)
    DIR/rawframes/<clip>/img_00001.jpg ...  the same frames as JPEG files
    DIR/rawframes_{train,val,test}.txt      'rawframes/<clip> total_frames label' (mmaction2-style)

Frame folders are written for the splits in ``SynthVideoSpec.rawframe_splits``: all three at
scale ``tiny``, val and test at ``small`` (its 900 training clips as JPEG files would take 150 MB).

Each class has its actor (:data:`ACTORS`: a shape and a colour family, like the people and objects
that make Kinetics classes partly recognisable from one frame), and opposite motions share an actor:
left/right, up/down, clockwise/anticlockwise, grow/shrink. Appearance therefore narrows a clip down
to a pair of classes, and only the order of the frames decides within the pair. Everything else is
random per clip: colour jitter, background gradient and texture, size, start position, speed, an
optional static distractor of any shape and colour, sensor noise. A tiny model fine-tuned for a
few CPU minutes learns the actors first (about half the clips right, chance 1/9); telling the
motions apart takes longer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from mm3d.registry import register_synth

log = logging.getLogger(__name__)

CLASSES = ("move_left", "move_right", "move_up", "move_down", "rotate_cw", "rotate_ccw", "grow",
           "shrink", "static")
SHAPES = ("square", "bar", "triangle", "cross", "ellipse")
# The actor of each class, a shape and a colour (RGB, jittered per clip), like the people and objects
# that make Kinetics classes partly recognisable from one frame. Opposite motions share their actor,
# so appearance narrows a clip down to a pair of classes and only the motion decides between the two.
ACTORS = {"move_left": "square", "move_right": "square", "move_up": "ellipse", "move_down": "ellipse",
          "rotate_cw": "bar", "rotate_ccw": "bar", "grow": "triangle", "shrink": "triangle",
          "static": "cross"}
ACTOR_COLOURS = {"square": (220, 50, 50), "ellipse": (60, 200, 70), "bar": (50, 90, 230),
                 "triangle": (235, 210, 40), "cross": (200, 60, 220)}
COLOUR_JITTER = 30.0  # +- per channel


@dataclass(frozen=True)
class SynthVideoSpec:
    """Sizes of a synthetic video dataset."""

    size: int  # frame height = width (pixels, even)
    min_frames: int
    max_frames: int
    per_class: tuple[int, int, int]  # clips per class in train, val, test
    fps: int = 24
    rawframe_splits: tuple[str, ...] = ("train", "val", "test")  # also written as JPEG folders


SCALES = {
    "tiny": SynthVideoSpec(size=32, min_frames=16, max_frames=24, per_class=(2, 1, 1)),
    "small": SynthVideoSpec(size=64, min_frames=32, max_frames=40, per_class=(100, 10, 10),
                            rawframe_splits=("val", "test")),
}


def _smooth_box(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance (in object units) to the box |u| <= a, |v| <= b."""
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (< 0 inside) of object-frame coordinates to a unit-size shape."""
    if shape == "square":
        return _smooth_box(u, v, 1.0, 1.0)
    if shape == "bar":
        return _smooth_box(u, v, 1.0, 0.55)
    if shape == "cross":
        return np.minimum(_smooth_box(u, v, 1.0, 0.4), _smooth_box(u, v, 0.4, 1.0))
    if shape == "triangle":  # equilateral, circumradius 1.2, centred
        angles = np.deg2rad([90.0, 210.0, 330.0])
        return np.max(np.stack([u * np.cos(a) + v * np.sin(a) for a in angles]), axis=0) - 0.6
    if shape == "ellipse":
        return (np.sqrt(u**2 + (v / 0.7) ** 2) - 1.0) * 0.7
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _colour_far_from(rng: np.random.Generator, ref: np.ndarray,
                     min_dist: float = 90.0) -> np.ndarray:
    colour = rng.uniform(0, 255, 3)
    for _ in range(20):
        if np.linalg.norm(colour - ref) >= min_dist:
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) float: a two-colour linear gradient plus a few low-frequency sinusoids."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    phi = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(phi) + yy * np.sin(phi)) / size
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    bg = c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(3):
        f = rng.uniform(0.5, 3.0, 2) * 2 * np.pi / size
        wave = np.sin(xx * f[0] + yy * f[1] + rng.uniform(0, 2 * np.pi))
        bg = bg + rng.uniform(2, 8) * wave[..., None] * rng.choice([-1.0, 1.0], 3)
    return bg


def _trajectory(motion: str, rng: np.random.Generator, num_frames: int, size: int, radius: float):
    """Centre (T, 2) as (x, y), angle (T,) in radians and scale (T,) of the object per frame."""
    t = np.arange(num_frames) / max(num_frames - 1, 1)
    angle = np.full(num_frames, rng.uniform(0, 2 * np.pi))
    scale = np.ones(num_frames)
    lo, hi = radius, size - radius
    centre = np.stack([np.full(num_frames, rng.uniform(lo, hi)),
                       np.full(num_frames, rng.uniform(lo, hi))], axis=1)
    if motion.startswith("move_"):
        travel = rng.uniform(0.3, 0.55) * size
        travel = min(travel, hi - lo)
        axis = 0 if motion in ("move_left", "move_right") else 1
        sign = -1.0 if motion in ("move_left", "move_up") else 1.0
        start = rng.uniform(lo + travel, max(hi, lo + travel)) if sign < 0 else rng.uniform(lo, max(lo, hi - travel))
        centre[:, axis] = start + sign * travel * t
    else:
        if motion != "static":  # a small drift, so that position alone tells nothing
            drift = rng.uniform(-0.06, 0.06, 2) * size
            centre = centre + drift[None, :] * t[:, None]
        if motion in ("rotate_cw", "rotate_ccw"):
            speed = np.deg2rad(rng.uniform(4.0, 9.0)) * (num_frames - 1)  # total turn
            # image y points down, so an increasing angle turns clockwise on screen
            angle = angle + (speed if motion == "rotate_cw" else -speed) * t
        elif motion in ("grow", "shrink"):
            small, large = rng.uniform(0.45, 0.65), rng.uniform(1.05, 1.25)
            a, b = (small, large) if motion == "grow" else (large, small)
            scale = a + (b - a) * t
        elif motion != "static":
            raise ValueError(f"unknown motion {motion!r}; expected one of {CLASSES}")
    return centre, angle, scale


def _render_object(yy, xx, shape, centre, angle, scale, radius):
    """(T, H, W) coverage in [0, 1] and (T, H, W) object-frame u coordinate."""
    f32 = np.float32
    dx = xx[None] - centre[:, 0, None, None].astype(f32)
    dy = yy[None] - centre[:, 1, None, None].astype(f32)
    cos = np.cos(angle)[:, None, None].astype(f32)
    sin = np.sin(angle)[:, None, None].astype(f32)
    r = (radius * scale)[:, None, None].astype(f32)
    u = (dx * cos + dy * sin) / r
    v = (-dx * sin + dy * cos) / r
    dist = _shape_distance(shape, u, v) * r  # pixels
    return np.clip(0.5 - dist, 0.0, 1.0, dtype=f32), u


def render_clip(motion: str, rng: np.random.Generator, *, num_frames: int = 16,
                size: int = 32) -> np.ndarray:
    """One clip of class `motion` with random appearance -> (T, H, W, 3) uint8 frames."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    if motion not in ACTORS:
        raise ValueError(f"unknown motion {motion!r}; expected one of {CLASSES}")
    shape = ACTORS[motion]
    colour = np.clip(np.asarray(ACTOR_COLOURS[shape], dtype=np.float64)
                     + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
    for _ in range(20):  # a background that leaves the actor visible
        frame = _background(rng, yy, xx, size)  # (H, W, 3)
        if np.linalg.norm(frame.mean(axis=(0, 1)) - colour) >= 100.0:
            break
    if rng.random() < 0.5:  # a small static distractor of any shape and colour
        d_radius = rng.uniform(0.07, 0.12) * size
        d_cover, _ = _render_object(yy, xx, SHAPES[rng.integers(len(SHAPES))],
                                    rng.uniform(d_radius, size - d_radius, (1, 2)),
                                    np.array([rng.uniform(0, 2 * np.pi)]), np.ones(1), d_radius)
        d_colour = _colour_far_from(rng, frame.mean(axis=(0, 1)), 60.0)
        frame = frame * (1 - d_cover[0, ..., None]) + d_colour * d_cover[0, ..., None]
    radius = rng.uniform(0.22, 0.3) * size
    centre, angle, scale = _trajectory(motion, rng, num_frames, size, radius)
    cover, u = _render_object(yy, xx, shape, centre, angle, scale, radius)
    stripes = 1.0 + np.float32(rng.uniform(0.05, 0.12)) * np.sin(
        np.float32(np.pi * rng.uniform(2.0, 4.0)) * u)
    frame, colour = frame.astype(np.float32), colour.astype(np.float32)
    cover = cover[..., None]
    video = frame[None] + cover * (colour * stripes[..., None] - frame[None])
    noise = rng.standard_normal(video.shape, dtype=np.float32)
    video += np.float32(rng.uniform(1.0, 3.0)) * noise
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def write_mp4(path: str | Path, frames: np.ndarray, *, fps: int = 24,
              codec: Literal["libx264", "mpeg4"] | None = None) -> str:
    """Encode (T, H, W, 3) uint8 frames (even H and W) as a yuv420p mp4 with PyAV.

    Returns the codec used: libx264 (crf 18) where PyAV has it, else mpeg4.
    """
    import av

    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    T, H, W, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = W, H
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1  # deterministic output
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        else:
            stream.options = {"qscale": "2"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def write_jpegs(folder: Path, frames: np.ndarray, *, template: str = "img_{:05d}.jpg",
                start: int = 1, quality: int = 95) -> None:
    """Write (T, H, W, 3) uint8 frames as ``folder/template.format(start + i)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / template.format(start + i), quality=quality)


def write_video_dataset(out_dir: str | Path, spec: SynthVideoSpec, *, seed: int = 0,
                        rawframes: bool = True) -> dict:
    """Render, encode and list a dataset of ``len(CLASSES) x sum(spec.per_class)`` clips."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "label_map.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    lists: dict[str, list[str]] = {s: [] for s in ("train", "val", "test")}
    raw_lists: dict[str, list[str]] = {s: [] for s in ("train", "val", "test")}
    pretrain: list[str] = []
    codec = ""
    frames_total = 0
    for split_i, split in enumerate(("train", "val", "test")):
        for label, motion in enumerate(CLASSES):
            for k in range(spec.per_class[split_i]):
                rng = np.random.default_rng([seed, split_i, label, k])
                num_frames = int(rng.integers(spec.min_frames, spec.max_frames + 1))
                frames = render_clip(motion, rng, num_frames=num_frames, size=spec.size)
                name = f"{motion}_{split}_{k:03d}"
                rel = f"videos/{motion}/{name}.mp4"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                codec = write_mp4(out / rel, frames, fps=spec.fps)
                lists[split].append(f"{rel} {label}")
                if split == "train":
                    pretrain.append(f"{rel} 0 -1")
                if rawframes and split in spec.rawframe_splits:
                    write_jpegs(out / "rawframes" / name, frames)
                    raw_lists[split].append(f"rawframes/{name} {num_frames} {label}")
                frames_total += num_frames
    for split in lists:
        (out / f"{split}.txt").write_text("".join(f"{ln}\n" for ln in lists[split]))
        if rawframes and split in spec.rawframe_splits:
            (out / f"rawframes_{split}.txt").write_text(
                "".join(f"{ln}\n" for ln in raw_lists[split]))
    (out / "pretrain.txt").write_text("".join(f"{ln}\n" for ln in pretrain))
    return {"kind": "video", "root": str(out), "classes": len(CLASSES), "codec": codec,
            "size": spec.size, "frames": [spec.min_frames, spec.max_frames],
            "train": len(lists["train"]), "val": len(lists["val"]), "test": len(lists["test"]),
            "total_frames": frames_total,
            "rawframes": [s for s in spec.rawframe_splits if rawframes]}


@register_synth("video")
def synth_video(out_dir: Path, *, seed: int = 0, scale: Literal["tiny", "small"] = "small") -> dict:
    """``mm3d data synth video``: motion-class clips (tiny: 36 clips of 32x32, 16-24 frames;
    small: 1080 clips of 64x64, 32-40 frames), as mp4 and (see SynthVideoSpec) JPEG frame folders."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    summary = write_video_dataset(out_dir, SCALES[scale], seed=seed)
    log.info("wrote %d synthetic clips to %s", summary["train"] + summary["val"] +
             summary["test"], out_dir)
    return summary
