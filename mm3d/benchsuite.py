"""`mm3d bench-suite`: the GPU check of the performance issue as one command and one JSON file.

``mm3d bench-suite --suite gpu --out gpu_check.json`` runs, in one process, each entry of the suite
through :func:`mm3d.bench.run_bench` (our step and the peer's, alternating) and the point ops at the
suite's batch, and writes every result, error and skip into one JSON file:

- ``videomae_small`` and ``videomae_base`` pretraining at batch 32, bf16, against Hugging Face's
  ``VideoMAEForPreTraining`` (skipped, saying so, without transformers);
- ``pointmae_small`` pretraining at batch 128 (the official batch), fp32 and bf16, against the
  official Point-MAE of ``$MM3D_POINTMAE_ROOT`` (no peer without a checkout), and once more compiled
  (``train.compile=true train.compile_mode=reduce-overhead``: CUDA graphs for the launch-bound step);
- FPS (PyTorch loop, Triton kernel), KNN and Chamfer at B=128.

The data are the synthetic sets of ``mm3d data synth`` (written under the output's folder), so the
suite needs nothing but the package. ``--device cpu --tiny`` runs the same entries with the tiny
variants and two samples, in a minute on a laptop: the test of this path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mm3d.config import load_config
from mm3d.demo import configs_dir
from mm3d.registry import COMMANDS, SYNTH, load_modalities

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuiteEntry:
    """One timed configuration: a shipped bench config, its synthetic data and overrides."""

    name: str
    config: str  # relative to configs/
    synth: str  # SYNTH kind whose output folder becomes data.root
    overrides: tuple[str, ...] = ()
    tiny: tuple[str, ...] = ()  # replaces the model variant and sizes for --tiny
    needs: tuple[str, ...] = field(default=())  # importable modules the entry's peer needs


VIDEO_TINY = ("model.variant=videomae_tiny", "train.batch_size=2", "data.input_size=null")
POINT_TINY = ("model.variant=pointmae_tiny", "train.batch_size=2")

SUITES: dict[str, tuple[SuiteEntry, ...]] = {
    "gpu": (
        SuiteEntry("videomae_small_bf16_b32", "video/videomae_small_bench.yaml", "video",
                   ("train.batch_size=32", "train.precision=bf16", "train.num_workers=0"), VIDEO_TINY),
        SuiteEntry("videomae_base_bf16_b32", "video/videomae_small_bench.yaml", "video",
                   ("model.variant=videomae_base", "train.batch_size=32", "train.precision=bf16",
                    "train.num_workers=0"), VIDEO_TINY),
        SuiteEntry("pointmae_small_fp32_b128", "pointcloud/pointmae_small_bench.yaml", "shapenet55",
                   ("train.batch_size=128", "train.precision=fp32"), POINT_TINY),
        SuiteEntry("pointmae_small_bf16_b128", "pointcloud/pointmae_small_bench.yaml", "shapenet55",
                   ("train.batch_size=128", "train.precision=bf16"), POINT_TINY),
        SuiteEntry("pointmae_small_bf16_b128_compiled", "pointcloud/pointmae_small_bench.yaml", "shapenet55",
                   ("train.batch_size=128", "train.precision=bf16", "train.compile=true",
                    "train.compile_mode=reduce-overhead", "bench.peer=false"), POINT_TINY),
    ),
}


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run_suite(suite: str, device: str, out: Path, *, tiny: bool = False, steps: int | None = None,
              only: list[str] | None = None) -> dict[str, Any]:
    """Run `suite` on `device`; write and return ``{"machine", "entries": [...], "ops": [...]}``."""
    load_modalities()
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    out.parent.mkdir(parents=True, exist_ok=True)
    data_dir = out.parent / f"{out.stem}_data"
    report: dict[str, Any] = {"suite": suite, "device": str(dev), "tiny": tiny, "machine": _machine(dev),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "entries": [], "ops": []}
    made: dict[str, Path] = {}
    peer_root = os.environ.get("MM3D_POINTMAE_ROOT", "")
    for entry in SUITES[suite]:
        if only and entry.name not in only:
            continue
        row: dict[str, Any] = {"name": entry.name, "config": entry.config}
        t0 = time.time()
        try:
            if entry.synth not in made:
                made[entry.synth] = data_dir / entry.synth
                if not (made[entry.synth] / ".done").exists():
                    SYNTH.get(entry.synth)(made[entry.synth], seed=0, scale="tiny" if tiny else "small")
                    (made[entry.synth] / ".done").touch()
            overrides = [f"data.root={made[entry.synth]}", f"train.device={dev}", *entry.overrides]
            if entry.synth == "video":
                overrides += [f"data.train_list={made[entry.synth] / 'train.txt'}"]
            if tiny:
                overrides += [*entry.tiny, "bench.warmup=1", "bench.steps=1", "bench.extra=false"]
            else:
                overrides += ["bench.extra=false"] + ([f"bench.steps={steps}"] if steps else [])  # ops: once, below
            if "pointcloud/" in entry.config and peer_root:
                overrides.append(f"bench.peer_root={peer_root}")
            cfg = load_config(configs_dir() / entry.config, overrides)
            from mm3d.bench import run_bench

            row["result"] = run_bench(cfg)
            if "peer" not in row["result"]:
                row["peer_note"] = _peer_note(entry, cfg)
        except Exception as e:  # noqa: BLE001 - one failing entry must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=6)
            log.error("%s failed: %s", entry.name, row["error"])
        row["seconds"] = round(time.time() - t0, 1)
        report["entries"].append(row)
        out.write_text(json.dumps(report, indent=1))  # what finished survives a kill
    try:
        from mm3d.pointcloud.ops.bench import bench_ops  # the ops of the point modality, by name

        report["ops"] = bench_ops(dev, repeats=1 if tiny else 5, batch=2 if tiny else 128,
                                  numpy_repeats=0, large=not tiny)
    except Exception as e:  # noqa: BLE001
        report["ops_error"] = f"{type(e).__name__}: {e}"
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out.write_text(json.dumps(report, indent=1))
    return report


def _peer_note(entry: SuiteEntry, cfg: Any) -> str:
    if cfg.bench.peer is False:
        return "no peer for this entry (bench.peer=false)"
    if cfg.task == "pointmae_pretrain":
        return "no peer: set MM3D_POINTMAE_ROOT to a checkout of github.com/Pang-Yatian/Point-MAE"
    return "no peer: transformers is not installed (or cannot build this model)"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="gpu", choices=sorted(SUITES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="gpu_check.json", help="the JSON file written (and its _data folder beside it)")
    p.add_argument("--tiny", action="store_true", help="tiny variants, batch 2, one step: the CPU check of the path")
    p.add_argument("--steps", type=int, default=None, help="timed steps per entry (default: the configs')")
    p.add_argument("--only", nargs="*", default=None, help="entry names to run (default: all)")


def _run(args: argparse.Namespace) -> int:
    report = run_suite(args.suite, args.device, Path(args.out), tiny=args.tiny, steps=args.steps, only=args.only)
    for row in report["entries"]:
        r = row.get("result", {})
        what = row.get("error") or (f"{r.get('ms_per_step')} ms/step, {r.get('samples_per_s')} samples/s, "
                                    f"peak fraction {r.get('peak_fraction')}, vs peer {r.get('speedup_vs_peer', '-')}")
        print(f"{row['name']:<36} {what}")
    print(f"wrote {args.out}")
    return 1 if any("error" in row for row in report["entries"]) else 0


COMMANDS.add("bench-suite", ("Run a benchmark suite (e.g. the GPU check) and write one JSON file.",
                             _add_arguments, _run))

__all__ = ["SUITES", "SuiteEntry", "run_suite"]
