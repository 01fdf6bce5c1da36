"""Decode speed of each video backend: random dense clips (T frames at a sampling rate) per video.

    python tools/bench_decode.py INPUT [INPUT ...]     (or python -m mm3d.video.benchdecode ...) [--frames 16] [--rate 4] [--clips 20] [--repeats 5]

An INPUT is a video file (read from its path; ``--bytes``: from memory), or prepared shards (a
folder with manifest.json, a manifest or a brace pattern: every ``mp4`` member, decoded from
memory as the shard loader does). Each clip opens the video, decodes its T frames and closes it,
as a loader worker does for one sample: one decoder thread and one torch thread (DataLoader
workers run with ``torch.set_num_threads(1)``). The backends take turns clip by clip, so load from
other processes falls on all of them alike. Per video and backend it prints the CPU time per clip
(process time, all threads), the fastest wall time per clip over the repeats, and the largest /
mean absolute difference from PyAV's frames.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from mm3d.shards import ShardSamples
from mm3d.video.decode import BACKENDS, VideoDecodeError, decode_frames, torchcodec_available, video_num_frames


def _videos(inputs: list[str], as_bytes: bool) -> list[tuple[str, str | bytes]]:
    """(name, path or encoded bytes) of every video to time."""
    out = []
    for spec in inputs:
        if os.path.isfile(spec) and not spec.endswith((".json", ".tar")):
            out.append((spec, open(spec, "rb").read() if as_bytes else spec))
            continue
        samples = ShardSamples(spec)
        for i in range(len(samples)):
            sample = samples[i]
            if "mp4" in sample:
                url, key = samples.source(i)
                out.append((f"{os.path.basename(url)}:{key}", sample["mp4"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--rate", type=int, default=4)
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bytes", action="store_true", help="decode video files from memory instead of their path")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1, as in a "
                                                                 "DataLoader worker)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    candidates = [b for b in BACKENDS if b != "auto"]
    ok, why = torchcodec_available()
    if not ok:
        print(f"torchcodec skipped: {why}")
        candidates.remove("torchcodec")
    print(f"{'video':36s} {'backend':11s} {'cpu ms/clip':>11s} {'wall ms/clip':>12s} {'max|d|':>7s} {'mean|d|':>8s}")
    for name, source in _videos(args.inputs, args.bytes):
        n = video_num_frames(source, "pyav", name=name)
        span = (args.frames - 1) * args.rate + 1
        rng = np.random.default_rng(args.seed)
        starts = rng.integers(0, max(1, n - span + 1), size=args.clips)
        clips = [np.minimum(s + args.rate * np.arange(args.frames), n - 1) for s in starts]
        ref = [decode_frames(source, c, backend="pyav", name=name) for c in clips]
        backends, diffs = [], {}
        for backend in candidates:  # warm-up, agreement with PyAV
            try:
                got = [decode_frames(source, c, backend=backend, name=name) for c in clips]
            except VideoDecodeError as e:
                print(f"{name[-36:]:36s} {backend:11s} refused: {str(e)[len(name) + 2:][:80]}")
                continue
            d = np.concatenate([np.abs(g.astype(np.int16) - r).ravel() for g, r in zip(got, ref)])
            backends.append(backend)
            diffs[backend] = (int(d.max()), float(d.mean()))
        cpu = {b: 0.0 for b in backends}
        wall: dict[str, list[float]] = {b: [] for b in backends}
        for _ in range(args.repeats):
            total = {b: 0.0 for b in backends}
            for c in clips:
                for b in backends:
                    t, p = time.perf_counter(), time.process_time()
                    decode_frames(source, c, backend=b, name=name)
                    total[b] += time.perf_counter() - t
                    cpu[b] += time.process_time() - p
            for b in backends:
                wall[b].append(total[b] / len(clips))
        for b in backends:
            print(f"{name[-36:]:36s} {b:11s} {1e3 * cpu[b] / (args.repeats * len(clips)):11.1f} "
                  f"{1e3 * min(wall[b]):12.1f} {diffs[b][0]:7d} {diffs[b][1]:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
