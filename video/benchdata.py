"""``mm3d bench-data``: training clips per second of one loader worker, raw files vs prepared shards.

The question it answers (issue 13): how much faster does one DataLoader worker produce training
clips from shards made by ``mm3d data prepare`` (short side 320, a keyframe every 16 frames) than
from the videos as they were downloaded? Both paths run the same training item — a 16-frame clip at
rate 4, VideoMAE's multi-scale crop to 224 (:func:`mm3d.video.transforms.pretrain_transform`) —
through a ``DataLoader`` with one worker, for every decoder (decord, PyAV, torchcodec). The paths
alternate within one run (raw, prepared, raw, ... for every round) so that a change of load on
the machine affects both alike; the median of the rounds is reported.

Raw videos: a list of real downloads (``--raw-list``, ``--raw-root``), or generated ones that look
like Kinetics originals: 1280x720 (``--raw-size``) at 30 fps, ``--seconds`` long, x264 defaults
(CRF 23, preset medium, keyframe interval 250, B-frames, scene-cut keyframes), moving synthetic
content with film grain, so that the bitrate is that of real footage rather than of a flat
synthetic picture (the bitrate is reported). The prepared shards are made from them with the
video preparer (:mod:`mm3d.video.shards`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mm3d.errors import UserError
from mm3d.registry import COMMANDS, PREPARERS, PrepareItem
from mm3d.shards import ShardWriter, write_manifest
from mm3d.video import transforms as TR
from mm3d.video.data import VideoDataset, VideoRecord, read_annotation_list
from mm3d.video.decode import BACKENDS, check_decode_settings
from mm3d.video.shards import DEFAULT_GOP, DEFAULT_SHORT_SIDE, VideoShardDataset, sample_key
from mm3d.video.synth import CLASSES, render_clip

log = logging.getLogger(__name__)

__all__ = ["make_raw_videos", "prepare_shards", "bench_data", "format_table"]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_raw_videos(out_dir: str | Path, *, count: int = 8, size: tuple[int, int] = (1280, 720), fps: int = 30,
                    seconds: float = 10.0, grain: float = 4.0, seed: int = 0) -> list[VideoRecord]:
    """Write `count` Kinetics-like source videos (see the module docstring) unless they exist -> list rows.

    Content: a synthetic action clip (:func:`mm3d.video.synth.render_clip`) rendered at 144 pixels, scaled
    to `size` and overlaid with Gaussian film grain of standard deviation `grain` (8 grain frames cycled).
    """
    import av

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width, height = size
    frames = int(round(seconds * fps))
    rows = []
    for i in range(count):
        motion = CLASSES[i % len(CLASSES)]
        path = out / f"{motion}_{i:03d}_{width}x{height}.mp4"
        if not path.is_file():
            rng = np.random.default_rng([seed, i])
            base = render_clip(motion, rng, num_frames=frames, size=144)  # (T, 144, 144, 3)
            noise = rng.normal(0.0, grain, (8, height, width, 3)).astype(np.float32)
            tmp = path.with_suffix(".tmp.mp4")
            with av.open(str(tmp), mode="w") as c:
                s = c.add_stream("libx264", rate=fps)
                s.width, s.height, s.pix_fmt = width, height, "yuv420p"
                s.options = {"crf": "23", "preset": "medium"}  # x264 defaults: keyint 250, B-frames, scene cuts
                for t in range(frames):
                    big = av.VideoFrame.from_ndarray(base[t], format="rgb24").reformat(
                        width=width, height=height, format="rgb24", interpolation="BICUBIC").to_ndarray()
                    pic = np.clip(big.astype(np.float32) + noise[t % len(noise)], 0, 255).astype(np.uint8)
                    for packet in s.encode(av.VideoFrame.from_ndarray(pic, format="rgb24")):
                        c.mux(packet)
                for packet in s.encode():
                    c.mux(packet)
            os.replace(tmp, path)
        rows.append(VideoRecord(str(path), i % len(CLASSES), None, f"generated:{i + 1}"))
    return rows


def prepare_shards(rows: Sequence[VideoRecord], out_dir: str | Path, *, short_side: int = DEFAULT_SHORT_SIDE,
                   gop: int = DEFAULT_GOP) -> Path:
    """The rows prepared by the video preparer into one shard folder (reused when its manifest exists
    with the same settings and count)."""
    out = Path(out_dir)
    preparer = PREPARERS.get("video")
    settings = preparer.settings(argparse.Namespace(short_side=short_side, gop=gop))
    manifest = out / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text()).get("mm3d", {})
        if meta.get("settings") == settings and meta.get("num_samples") == len(rows):
            return out
    with ShardWriter(out) as writer:
        for i, r in enumerate(rows):
            item = PrepareItem(sample_key(i, r.path), r.path, r.line,
                               {"label": r.label, "total_frames": r.total_frames, "start_index": r.start_index})
            writer.write(item.key, preparer.convert(item, settings))
    write_manifest(out, writer.entries, {"modality": "video", "kind": "video", "split": "bench",
                                         "settings": settings, "skipped": []})
    return out


def _video_facts(path: str) -> dict[str, Any]:
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        seconds = float(c.duration / 1e6) if c.duration else float(s.frames / s.average_rate)
        return {"width": s.width, "height": s.height, "fps": round(float(s.average_rate), 3),
                "frames": int(s.frames), "seconds": round(seconds, 2),
                "mbps": round(os.path.getsize(path) * 8 / max(seconds, 1e-9) / 1e6, 2)}


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _clips_per_s(ds: torch.utils.data.Dataset, order: list[int], *, workers: int) -> float:
    """Clips per second of a DataLoader (batch 1, `workers` workers) over `order`, after its first clip
    (worker start-up and the first file's opening excluded)."""
    # workers from a forkserver: this process has just encoded the raw videos (and preparing may have run
    # here), and with PyAV 12 a loader worker forked after FFmpeg ran in its parent can deadlock in
    # av.open (seen in the test-floors run); start-up is outside the measured time
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=order, num_workers=workers,
                                         multiprocessing_context="forkserver")
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t)


def bench_data(rows: Sequence[VideoRecord], shards: str | Path, *, backends: Sequence[str], clips: int = 24,
               rounds: int = 3, num_frames: int = 16, sampling_rate: int = 4, crop: int = 224,
               scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66), workers: int = 1, seed: int = 0
               ) -> dict[str, Any]:
    """Clips/s per worker for every backend, raw vs prepared, alternating in `rounds` rounds of `clips`
    clips each (plus one warm-up clip) -> the result dict (see :func:`format_table`)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (a loader worker is what is measured), got {workers}")
    transform = TR.pretrain_transform(crop, tuple(scales))
    kw = dict(mode="train", num_frames=num_frames, sampling_rate=sampling_rate, transform=transform,
              max_failure_ratio=0.0, seed=seed)
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, list[float]]] = {b: {"raw": [], "prepared": []} for b in backends}
    for r in range(rounds):
        order = [int(i) for i in rng.integers(len(rows), size=clips + 1)]
        for b in backends:
            paths = ("raw", "prepared") if r % 2 == 0 else ("prepared", "raw")
            for path in paths:
                ds = (VideoDataset(rows, backend=b, **kw) if path == "raw"
                      else VideoShardDataset(str(shards), backend=b, **kw))
                rate = _clips_per_s(ds, order, workers=workers)
                results[b][path].append(rate)
                log.info("round %d %s %s: %.2f clips/s", r + 1, b, path, rate)
    rows_out = []
    for b in backends:
        raw, prep = statistics.median(results[b]["raw"]), statistics.median(results[b]["prepared"])
        # the ratio of each round's back-to-back pair, then the median: robust to load drifting between rounds
        ratio = statistics.median(p / r for r, p in zip(results[b]["raw"], results[b]["prepared"]))
        rows_out.append({"backend": b, "raw_clips_per_s": round(raw / workers, 2),
                         "prepared_clips_per_s": round(prep / workers, 2), "ratio": round(ratio, 2),
                         "rounds": {k: [round(v, 2) for v in vs] for k, vs in results[b].items()}})
    return {"clip": {"frames": num_frames, "sampling_rate": sampling_rate, "crop": crop, "scales": list(scales),
                     "transform": "pretrain_transform (multi-scale crop + resize)"},
            "workers": workers, "clips_per_round": clips, "rounds": rounds, "results": rows_out}


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`bench_data` result (clips/s per worker)."""
    raw, prep = result["raw"], result["prepared"]
    lines = [f"raw: {raw['videos']} videos, {raw['width']}x{raw['height']} @ {raw['fps']} fps, {raw['seconds']} s, "
             f"{raw['mbps']} Mbit/s; prepared: short side {prep['short_side']}, keyframe every {prep['gop']} frames, "
             f"{prep['width']}x{prep['height']}, {prep['mbps']} Mbit/s",
             f"clip: {result['clip']['frames']} frames at rate {result['clip']['sampling_rate']}, "
             f"{result['clip']['crop']} crop, {result['workers']} worker(s); median of {result['rounds']} rounds of "
             f"{result['clips_per_round']} clips; load average {result['machine']['load_before']} before",
             "", "| backend | raw files (clips/s/worker) | prepared shards (clips/s/worker) | prepared / raw (median of rounds) |",
             "|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['backend']} | {r['raw_clips_per_s']:.2f} | {r['prepared_clips_per_s']:.2f} | "
                     f"{r['ratio']:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def _available(backends: Sequence[str]) -> list[str]:
    import importlib.util

    out = []
    for b in backends:
        check_decode_settings(b)  # an unknown name is an error
        module = {"pyav": "av"}.get(b, b)
        if importlib.util.find_spec(module) is None:
            log.warning("backend %s is not installed: left out", b)
            continue
        out.append(b)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default="runs/bench_data", help="folder for the generated videos and the shards "
                   "(reused by later runs)")
    p.add_argument("--raw-list", help="measure these videos (any list format) instead of generated ones")
    p.add_argument("--raw-root", default="", help="folder that relative paths of --raw-list are under")
    p.add_argument("--videos", type=int, default=8, help="generated videos (default 8)")
    p.add_argument("--raw-size", default="1280x720", help="generated videos: WxH (default 1280x720)")
    p.add_argument("--seconds", type=float, default=10.0, help="generated videos: length (default 10)")
    p.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE, help="prepared: short side")
    p.add_argument("--gop", type=int, default=DEFAULT_GOP, help="prepared: keyframe interval")
    p.add_argument("--backends", default=",".join(b for b in BACKENDS if b != "auto"),
                   help="comma-separated decoders (default: all installed)")
    p.add_argument("--clips", type=int, default=24, help="clips per path per round (default 24)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--rate", type=int, default=4)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--workers", type=int, default=1, help="loader workers (the result is per worker)")
    p.add_argument("--out", help="JSON result (default: WORK/bench_data.json); the table goes beside it (.md)")


def run(args: argparse.Namespace) -> int:
    work = Path(args.work)
    backends = _available([b.strip() for b in args.backends.split(",") if b.strip()])
    if not backends:
        raise UserError("--backends: none of the decoders is installed")
    if args.raw_list:
        rows = read_annotation_list(args.raw_list, data_root=args.raw_root)
        source = {"list": str(Path(args.raw_list).resolve())}
    else:
        try:
            w, h = (int(v) for v in args.raw_size.lower().split("x"))
        except ValueError:
            raise UserError(f"--raw-size {args.raw_size!r}: expected WxH, e.g. 1280x720") from None
        log.info("generating %d source videos of %dx%d in %s (once)", args.videos, w, h, work / "raw")
        rows = make_raw_videos(work / "raw", count=args.videos, size=(w, h), seconds=args.seconds)
        source = {"generated": f"{w}x{h}, 30 fps, {args.seconds} s, x264 defaults (keyint 250)"}
    shards = prepare_shards(rows, work / f"prepared_s{args.short_side}_g{args.gop}", short_side=args.short_side,
                            gop=args.gop)
    raw_facts = [_video_facts(r.path) for r in rows if not r.is_rawframes]
    from mm3d.shards import ShardSamples

    first = ShardSamples(str(shards))[0]
    prep_path = work / "prepared_sample.mp4"
    prep_path.write_bytes(first["mp4"])
    load_before = os.getloadavg()[0]
    result = bench_data(rows, shards, backends=backends, clips=args.clips, rounds=args.rounds,
                        num_frames=args.frames, sampling_rate=args.rate, crop=args.crop, workers=args.workers)
    mean = lambda k: round(statistics.mean(f[k] for f in raw_facts), 2)  # noqa: E731
    result["raw"] = {"videos": len(rows), **source, "width": raw_facts[0]["width"], "height": raw_facts[0]["height"],
                     "fps": raw_facts[0]["fps"], "seconds": mean("seconds"), "mbps": mean("mbps")}
    prep = _video_facts(str(prep_path))
    result["prepared"] = {"shards": str(shards), "short_side": args.short_side, "gop": args.gop,
                          "width": prep["width"], "height": prep["height"], "mbps": prep["mbps"]}
    result["machine"] = {"cpus": os.cpu_count(), "load_before": round(load_before, 2),
                         "load_after": round(os.getloadavg()[0], 2), "python": platform.python_version(),
                         "torch": torch.__version__}
    out = Path(args.out) if args.out else work / "bench_data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = format_table(result)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {out} and {out.with_suffix('.md')}")
    return 0


COMMANDS.add("bench-data", ("Loader throughput per worker (training clips/s) of raw videos vs prepared shards, "
                            "for every decoder; writes a JSON and a markdown table.", add_arguments, run))
