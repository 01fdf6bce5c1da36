"""`mm3d bench`: time training steps of any task config and count their FLOPs.

One JSON line: samples/s, ms/step (median over `bench.steps` after `bench.warmup`), model FLOPs per
sample for a training step (forward + backward, from ``torch.utils.flop_counter`` with SDPA
attention counted on every device), achieved GFLOP/s, peak memory (CUDA allocator or process
RSS), and, when the task offers one, the same step of a peer implementation timed alternately in
the same process with the ratio. The fp32 (or the run's autocast dtype) matmul peak of the device is
measured in the same run, so the achieved share of it (``peak_fraction``) reads the same on any
machine. `bench.data_loader=true` adds loader throughput; `bench.profile=N` profiles N steps of ours
(and of the peer) with ``torch.profiler``, lists the operators with the most self time, and splits
the step into GEMMs, attention and the rest, each with its own share of the matmul peak
(``ours_by_kind``), which says where a step falls short of the peak.
"""

from __future__ import annotations

import importlib
import logging
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from mm3d.config import RunConfig
from mm3d.data import ResumableSampler, build_loader
from mm3d.distributed import DistInfo, resolve_device
from mm3d.engine import OptimizerStep, autocast, batch_size_of, move_to_device
from mm3d.registry import TASKS
from mm3d.trainer import build_optimizer, peak_lr, seed_everything

_aten = torch.ops.aten
log = logging.getLogger(__name__)


def _cpu_sdpa_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop(query_shape, key_shape, value_shape)


def _cpu_sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the CPU flash-attention kernels (not counted by torch)."""
    mapping: dict[Any, Callable[..., int]] = {}
    fwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        mapping[fwd] = _cpu_sdpa_fwd
    if bwd is not None:
        mapping[bwd] = _cpu_sdpa_bwd
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per call of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


class PeerUnavailable(RuntimeError):
    """A peer implementation cannot be timed here (the message says why); the bench goes on without."""


def import_from_checkout(root: str | Path, module: str, *, marker: str, what: str,
                         packages: tuple[str, ...] = (), replace: dict[str, Any] | None = None,
                         hint: str = "") -> Any:
    """Import `module` from a user's checkout of another project (a peer), leaving no trace.

    `root` must hold the file `marker`. While importing, `root` is first on ``sys.path`` and the
    modules of `replace` (name -> module object: stand-ins for compiled extensions) are installed;
    afterwards every module under the top-level names `packages` (and `module`'s own) and the
    stand-ins are removed from ``sys.modules`` again and what was there before is put back, so
    generic names such as ``utils`` or ``models`` do not shadow anything of this process. The
    returned module keeps working: its objects hold their own references.

    Raises:
        PeerUnavailable naming the checkout and what is missing (`hint` says how to get it).
    """
    root = Path(root).expanduser().resolve()
    if not (root / marker).is_file():
        raise PeerUnavailable(f"{root}: not a {what} checkout (no {marker}){'; ' + hint if hint else ''}")
    replace = replace or {}
    tops = set(packages) | {module.split(".")[0]} | {n.split(".")[0] for n in replace}
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in tops}
    for n in saved:
        del sys.modules[n]
    sys.modules.update(replace)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise PeerUnavailable(f"{root}: the {what} code imports {e.name!r}, which is not installed") from e
    finally:
        sys.path.remove(str(root))
        for n in [n for n in sys.modules if n.split(".")[0] in tops]:
            del sys.modules[n]
        sys.modules.update(saved)


def peer_or_none(build: Callable[..., Any], *args: Any) -> Any:
    """`build(*args)`, or None with the reason logged when it raises :class:`PeerUnavailable`."""
    try:
        return build(*args)
    except PeerUnavailable as e:
        log.warning("no peer timing: %s", e)
        return None


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, *, seconds: float = 1.0) -> float:
    """The device's matmul throughput in GFLOP/s: the best of repeated square matmuls (n = 2048 on
    the CPU, 8192 on a GPU) over about `seconds`, with torch's current thread count."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, spent = float("inf"), 0.0
    (a @ b).sum()  # warm-up
    _sync(device)
    while spent < seconds or best == float("inf"):
        t = time.perf_counter()
        a @ b
        _sync(device)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return 2 * n ** 3 / best / 1e9


_GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_scaled_mm",
                       "convolution", "_convolution", "convolution_backward", "mkldnn_convolution",
                       "cudnn_convolution", "_convolution_mode"})


def op_kind(name: str) -> str:
    """"gemm", "attention" or "other" for an operator named as the profiler ("aten::mm") or the FLOP
    counter ("aten.mm", "aten.mm.default") names it."""
    base = name.split("::")[-1]
    if base.startswith("aten."):
        base = base[len("aten."):]
    base = base.split(".")[0]
    if "attention" in base:
        return "attention"
    return "gemm" if base in _GEMM_OPS else "other"


def _op_rows(prof: Any, device: torch.device) -> list[Any]:
    """The profiler's operator rows with self time on `device` (no kernel rows: their time is the ops')."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    cpu = torch.autograd.DeviceType.CPU
    return [e for e in prof.key_averages() if getattr(e, key) > 0 and getattr(e, "device_type", cpu) == cpu]


def profile_steps(step: Callable[[], Any], device: torch.device, steps: int,
                  top: int = 12) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Profile `steps` calls of `step` (``torch.profiler``).

    Returns the `top` operators by self time, per step, and the share of the profiled self time in
    each :func:`op_kind` (``{"gemm": s, "attention": s, "other": s}``, summing to 1).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = _op_rows(prof, device)
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    rows = [{"op": e.key, "self_ms_per_step": round(getattr(e, key) / 1e3 / steps, 2),
             "share": round(getattr(e, key) / total, 4), "calls_per_step": e.count // steps}
            for e in events[:top]]
    kinds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        kinds[op_kind(e.key)] += getattr(e, key) / total
    return rows, kinds


def by_kind(shares: dict[str, float], flops: dict[str, int], seconds: float, peak_gflops: float) -> dict[str, Any]:
    """Where a step's time goes against the peak: per :func:`op_kind`, its share of the step (from a
    profile), its milliseconds of the unprofiled `seconds`, and, for GEMMs and attention, the FLOPs
    counted for it, its own GFLOP/s and share of the matmul peak."""
    out: dict[str, Any] = {}
    for kind, share in shares.items():
        row: dict[str, Any] = {"share": round(share, 4), "ms_per_step": round(share * seconds * 1e3, 2)}
        if kind != "other" and share > 0:
            rate = flops.get(kind, 0) / (share * seconds) / 1e9
            row.update(flops=flops.get(kind, 0), gflops_per_s=round(rate, 2),
                       peak_fraction=round(rate / peak_gflops, 3))
        out[kind] = row
    return out


def flops_by_kind(fc: FlopCounterMode) -> dict[str, int]:
    """FLOPs a counter saw, per :func:`op_kind`."""
    out = {"gemm": 0, "attention": 0, "other": 0}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        out[op_kind(str(op))] += int(n)
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_bench(cfg: RunConfig) -> dict[str, Any]:
    """Benchmark one training step of `cfg` (see module docstring)."""
    task = TASKS.get(cfg.task)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device, DistInfo())
    model = task.build_model(cfg).to(device).train()
    step_model = torch.compile(model, mode=cfg.train.compile_mode) if cfg.train.compile else model
    ds = task.build_datasets(cfg, ["train"])["train"]
    sampler = ResumableSampler(len(ds), shuffle=True, seed=cfg.seed)
    loader = build_loader(ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.train.num_workers,
                          collate_fn=task.collate_fn(cfg), drop_last=False, pin_memory=False, seed=cfg.seed)
    batch = move_to_device(next(iter(loader)), device)
    tf = task.batch_transform(cfg, device)
    if tf is not None:
        batch = tf(batch)
    bsz = batch_size_of(batch)
    # the trainer's optimizer step (precision, scaler, clipping) on the trainer's optimizer
    opt_step = OptimizerStep(build_optimizer(model, cfg, peak_lr(cfg, 1)), device=device,
                             precision=cfg.train.precision, clip_grad=cfg.optim.clip_grad,
                             double_step=cfg.optim.double_step)

    def fwd_bwd(m: torch.nn.Module = step_model) -> None:
        with autocast(device, cfg.train.precision):
            loss = m(batch).loss
        opt_step.backward(loss)

    # the trainer's per-step model hook (a target's EMA teacher update) is part of a training step
    after_step = getattr(model, "after_optimizer_step", None)
    total_steps = cfg.bench.warmup + cfg.bench.steps + cfg.bench.profile
    steps_done = [0]

    def step() -> None:
        fwd_bwd()
        opt_step.step()
        if after_step is not None:
            after_step(steps_done[0], total_steps)
            steps_done[0] += 1

    with flop_counter() as fc:  # counted on the eager model (a compiled one runs the same math)
        fwd_bwd(model)
    opt_step.optimizer.zero_grad(set_to_none=True)
    train_flops = fc.get_total_flops()
    with torch.no_grad(), flop_counter() as fc_fwd, autocast(device, cfg.train.precision):
        model(batch)
    fwd_flops = fc_fwd.get_total_flops()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peer = task.bench_peer(cfg, model, batch, device) if cfg.bench.peer else None
    ours: list[float] = []
    theirs: list[float] = []
    time_steps(step, device, cfg.bench.warmup, 0)
    if peer is not None:
        time_steps(peer[1], device, cfg.bench.warmup, 0)
    for _ in range(cfg.bench.steps):  # alternate so both see the same machine conditions
        ours += time_steps(step, device, 0, 1)
        if peer is not None:
            theirs += time_steps(peer[1], device, 0, 1)
    med = statistics.median(ours)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    peak = matmul_peak_gflops(device, amp)  # in the dtype the GEMMs run in (bf16: AMX on a CPU that has it)
    result: dict[str, Any] = {
        "config": cfg.name,
        "task": cfg.task,
        "variant": getattr(getattr(cfg, "model", None), "variant", ""),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": cfg.train.precision,
        "batch_size": bsz,
        "threads": torch.get_num_threads(),
        "ms_per_step": round(med * 1e3, 2),
        "samples_per_s": round(bsz / med, 3),
        "train_gflops_per_sample": round(train_flops / bsz / 1e9, 4),
        "fwd_gflops_per_sample": round(fwd_flops / bsz / 1e9, 4),
        "train_flops_per_sample": train_flops // bsz,
        "fwd_flops_per_sample": fwd_flops // bsz,
        "achieved_gflops_per_s": round(train_flops / med / 1e9, 2),
        "matmul_peak_gflops_per_s": round(peak, 1),
        "peak_fraction": round(train_flops / med / 1e9 / peak, 3),
        "peak_mem_mb": round(peak_memory_mb(device), 1),
        "torch": torch.__version__,
    }
    if peer is not None:
        pmed = statistics.median(theirs)
        result["peer"] = peer[0]
        result["peer_ms_per_step"] = round(pmed * 1e3, 2)
        result["speedup_vs_peer"] = round(pmed / med, 3)
    if cfg.bench.profile:
        rows, shares = profile_steps(step, device, cfg.bench.profile)
        result["profile"] = {"ours": rows, "ours_by_kind": by_kind(shares, flops_by_kind(fc), med, peak)}
        if peer is not None:
            rows, shares = profile_steps(peer[1], device, cfg.bench.profile)
            result["profile"]["peer"] = rows
            result["profile"]["peer_by_kind"] = {k: {"share": round(v, 4), "ms_per_step": round(v * pmed * 1e3, 2)}
                                                 for k, v in shares.items()}
    if cfg.bench.data_loader:
        result.update(bench_loader(cfg, task, ds))
    extra = task.bench_extra(cfg, device) if cfg.bench.extra else None
    if extra:
        result["extra"] = extra
    return result


def bench_loader(cfg: RunConfig, task: Any, ds: Any) -> dict[str, Any]:
    """Training-loader throughput over `bench.loader_batches` batches (first batch excluded)."""
    workers = cfg.train.num_workers
    sampler = ResumableSampler(len(ds), shuffle=True, seed=cfg.seed)
    loader = build_loader(ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=task.collate_fn(cfg), drop_last=False, pin_memory=False, seed=cfg.seed)
    it = iter(loader)
    next(it)
    n, t = 0, time.perf_counter()
    for _ in range(cfg.bench.loader_batches):
        try:
            n += batch_size_of(next(it))
        except StopIteration:
            break
    dt = time.perf_counter() - t
    rate = n / max(dt, 1e-9)
    return {"loader_samples_per_s": round(rate, 2), "loader_workers": workers,
            "loader_samples_per_s_per_worker": round(rate / max(1, workers), 2), "loader_samples": n}


def attention_timings(shapes: list[tuple[int, int, int, int]], dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
                      device: torch.device | str = "cpu", reps: int = 5) -> list[dict[str, Any]]:
    """Forward and backward milliseconds of torch's ``F.scaled_dot_product_attention`` (the kernel the
    device picks) for q = k = v of each (B, H, L, d) in `shapes` and each dtype: the measurement
    behind :data:`mm3d.layers.CPU_BF16_SDPA_FP32_MAX_LEN`. Medians over `reps` after 2 warm-ups."""
    import torch.nn.functional as F

    device = torch.device(device)
    rows = []
    for b, h, n, d in shapes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
            grad = torch.randn(b, h, n, d, generator=g).to(device, dtype)
            fwd, bwd = [], []
            for i in range(2 + reps):
                t0 = time.perf_counter()
                out = F.scaled_dot_product_attention(q, k, v)
                _sync(device)
                t1 = time.perf_counter()
                out.backward(grad)
                _sync(device)
                if i >= 2:
                    fwd.append(t1 - t0)
                    bwd.append(time.perf_counter() - t1)
            rows.append({"shape": [b, h, n, d], "dtype": str(dtype).replace("torch.", ""),
                         "fwd_ms": round(statistics.median(fwd) * 1e3, 3), "bwd_ms": round(statistics.median(bwd) * 1e3, 3)})
    return rows


def attention_main(argv: list[str] | None = None) -> int:
    """``python tools/bench_attention.py [--device cpu] [--reps 5] B,H,L,d ...``: one JSON line per
    shape and dtype (fp32 and bf16)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=attention_main.__doc__)
    p.add_argument("shapes", nargs="*", default=["32,6,26,64", "32,6,64,64", "8,6,256,64", "4,6,512,64",
                                                  "2,6,1024,64", "2,3,1568,64", "16,12,197,64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    if any(len(s) != 4 for s in shapes):
        p.error("each shape is B,H,L,d")
    for row in attention_timings(shapes, device=args.device, reps=args.reps):  # type: ignore[arg-type]
        print(json.dumps(row))
    return 0
