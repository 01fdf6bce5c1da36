"""Eager PyTorch vs onnxruntime (CPU) latency of exported classifiers: videomae_small and pointmae_small,
batch 1 and 8, random weights (latency does not depend on them), 2 threads for both runtimes.

    python tools/bench_export.py [--out DIR] [--repeats N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from mm3d.config import load_config
from mm3d.export import example_input, export_model
from mm3d.modelcard import build_card
from mm3d.registry import TASKS, load_modalities

MODELS = {"videomae_small": ("videomae_finetune", ["model.variant=videomae_small", "model.num_classes=400"]),
          "pointmae_small": ("pointmae_classify", ["model.variant=pointmae_small", "model.num_classes=40",
                                                   "data.npoints=1024"])}


def median_ms(fn, x, repeats: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="export_bench_out")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    load_modalities()
    torch.set_num_threads(args.threads)
    import onnx
    import onnxruntime as ort

    out = Path(args.out)
    rows = []
    for name, (task_name, overrides) in MODELS.items():
        cfg = load_config(None, overrides, task=task_name)
        task = TASKS.get(task_name)
        torch.manual_seed(0)
        model = task.build_model(cfg).eval()
        card = build_card(task, cfg, model=model)
        t = time.perf_counter()
        res = export_model(model, task_name, card, out / f"{name}.onnx", fmt="onnx", output="logits", dynamic_batch=True)
        export_s = time.perf_counter() - t
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(res.path), so, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        proto = onnx.load(str(res.path), load_external_data=False)
        for batch in (1, 8):
            x = example_input(card["preprocessing"], batch)
            with torch.inference_mode():
                eager = median_ms(lambda v: model(v), x, args.repeats)
            onnx_ms = median_ms(lambda v: session.run(None, {input_name: v.numpy()}), x, args.repeats)
            rows.append({"model": name, "batch": batch, "eager_ms": round(eager, 1), "onnxruntime_ms": round(onnx_ms, 1),
                         "speedup": round(eager / onnx_ms, 2), "max_abs_diff": res.max_abs_diff,
                         "onnx_mb": round(os.path.getsize(res.path) / 2**20, 1), "nodes": len(proto.graph.node),
                         "export_s": round(export_s, 1)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
