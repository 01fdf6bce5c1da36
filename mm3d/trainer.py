"""The one trainer: every task is trained, evaluated, checkpointed and resumed the same way.

The trainer knows the :class:`mm3d.task.Task` contract only: a model maps a batch to an output
with ``.loss``; the task builds the model and datasets and scores a split. Features: single
process or DDP (torchrun / SLURM; gloo on CPU, nccl on GPU), fp32/bf16/fp16 autocast (GradScaler
for fp16), gradient accumulation with ``no_sync``, clipping, LR and weight-decay schedules from
the global step, layer-wise LR decay through timm, EMA, atomic checkpoints with exact mid-epoch
resume, a non-finite-loss stop, JSONL/TensorBoard logging and a loss/LR plot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mm3d.checkpoint import CheckpointManager, capture_rng, load_checkpoint, restore_rng
from mm3d.config import ConfigError, RunConfig, save_config, to_dict
from mm3d.data import ResumableSampler, build_loader
from mm3d.distributed import all_reduce_min, all_reduce_sum, barrier, gather_objects, get_info, init_distributed
from mm3d.engine import OptimizerStep, amp_dtype, autocast, batch_size_of, move_to_device, unwrap
from mm3d.registry import TASKS
from mm3d.results import jsonable, selection_split
from mm3d.task import EvalResult, Task

log = logging.getLogger("mm3d")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without overwriting good checkpoints."""


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)
    root.setLevel(level)


def peak_lr(cfg: RunConfig, world_size: int) -> float:
    """`optim.lr` if set, else ``optim.blr * total_batch / 256`` (MAE/VideoMAE scaling rule)."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    total = cfg.train.batch_size * cfg.train.accum_steps * world_size
    return cfg.optim.blr * total / 256


def cosine_schedule(step: int, total: int, warmup: int, start: float, peak: float, end: float,
                    kind: str = "cosine") -> float:
    """Linear warm-up from `start` to `peak` over `warmup` steps, then cosine (or flat) to `end`."""
    if step < warmup:
        return start + (peak - start) * step / max(1, warmup)
    if kind == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on norms, biases and `no_weight_decay()` names;
    layer-wise LR decay through the model's `group_matcher` when ``optim.layer_decay`` is set."""
    o = cfg.optim
    kwargs: dict[str, Any] = {"eps": o.eps}
    name = o.name.lower()
    if "adam" in name or "lamb" in name:
        kwargs["betas"] = tuple(o.betas)
    if "sgd" in name or "momentum" in name:
        kwargs = {"momentum": o.momentum}
    opt = create_optimizer_v2(model, opt=o.name, lr=lr, weight_decay=o.weight_decay,
                              layer_decay=o.layer_decay, **kwargs)
    for g in opt.param_groups:
        g.setdefault("lr_scale", 1.0)
        g["wd_base"] = g.get("weight_decay", 0.0)
    return opt


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed (this rank)
    best_metric: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Logging sinks
# --------------------------------------------------------------------------------------------


class MetricLogger:
    """metrics.jsonl + TensorBoard on rank 0; no-ops on other ranks."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard missing: JSONL still works
                log.warning("tensorboard is not installed; writing metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """PNG of the training loss and LR (and validation metrics) against the step."""
    if not metrics_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train" and "loss" in r]
    evals = [r for r in rows if r.get("split") in ("val", "test")]
    if not train:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train loss")
    for split in ("val", "test"):
        pts = [(r["step"], r["loss"]) for r in evals if r.get("split") == split and "loss" in r]
        if pts:
            axes[0].plot(*zip(*pts), "o-", label=f"{split} loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


class Progress:
    """A tqdm bar on a terminal, plain periodic log lines otherwise."""

    def __init__(self, total: int, initial: int, mode: str, enabled: bool, every: int) -> None:
        use_bar = enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
        self.lines = enabled and not use_bar and mode != "off"
        self.every, self.total, self.t0, self.start = max(1, every), total, time.time(), initial
        self.bar = None
        if use_bar:
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

    def update(self, step: int, stats: dict[str, float] | None) -> None:
        """One optimizer step done; `stats` (read at log steps only) refresh the numbers shown."""
        if self.bar is not None:
            self.bar.update(1)
            if stats:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()}, refresh=False)
        elif self.lines and stats is not None:
            done = step - self.start
            rate = done / max(1e-9, time.time() - self.t0)
            eta = (self.total - step) / max(rate, 1e-9)
            kv = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
            log.info("step %d/%d  %s  %.2f it/s  eta %s", step, self.total, kv, rate,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _LossTracker:
    """The training loss and the first non-finite step, kept on the device between host reads.

    `add` takes each micro-batch loss; `end_step` closes an optimizer step. Only
    :meth:`step_loss` and :meth:`first_bad_step` read back to the host (and reduce across ranks).
    """

    NONE = 2**62  # "no bad step yet", larger than any step

    def __init__(self, device: torch.device, step: int, accum: int) -> None:
        self.accum = accum
        self.step = torch.tensor(step, dtype=torch.int64, device=device)  # optimizer steps done
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.current = torch.zeros((), dtype=torch.float64, device=device)  # this step's loss sum
        self.last = torch.zeros((), dtype=torch.float64, device=device)  # the last step's mean

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().double()
        bad = ~torch.isfinite(loss)
        self.first_bad = torch.where(bad, torch.minimum(self.first_bad, self.step + 1), self.first_bad)
        self.current += loss

    def end_step(self) -> None:
        self.last = self.current / self.accum
        self.current = torch.zeros_like(self.current)
        self.step += 1

    def step_loss(self, world_size: int) -> float:
        """The last optimizer step's loss, averaged over micro-batches and ranks."""
        return float(all_reduce_sum(self.last)) / world_size

    def first_bad_step(self) -> int | None:
        """The first optimizer step (1-based) whose loss was not finite on any rank, or None."""
        bad = int(all_reduce_min(self.first_bad))
        return None if bad == self.NONE else bad


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Train `task` with `cfg`; call :meth:`fit` (training + evaluation + report)."""

    def __init__(self, cfg: RunConfig, task: Task | None = None, *, train: bool = True) -> None:
        """`train=False` (``mm3d evaluate``) builds only the val and test splits: no training list
        is needed and :meth:`fit` is unavailable."""
        self.cfg = cfg
        self.task = task or TASKS.get(cfg.task)
        self.info, self.device = init_distributed(cfg.train.device)
        setup_logging(self.info.rank)
        self.run_dir = cfg.run_dir
        self.is_main = self.info.is_main
        seed_everything(cfg.seed + self.info.rank, cfg.deterministic)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        barrier()
        self.amp_dtype = amp_dtype(cfg.train.precision)
        if self.amp_dtype is torch.float16 and self.device.type == "cpu":
            raise ConfigError(f"train.precision=fp16 needs a CUDA device, but this run is on the {self.device.type}: "
                              f"use train.precision=bf16 or fp32 there")
        if self.amp_dtype is torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16 is not supported by this GPU; use fp16 or fp32")

        self.datasets = self.task.build_datasets(cfg, ["train", "val", "test"] if train else ["val", "test"])
        if train and "train" not in self.datasets:
            raise ValueError(f"task {cfg.task!r} built no 'train' split")
        self.model = self.task.build_model(cfg).to(self.device)
        self.init_notes: list[str] = []
        if cfg.init:
            self.init_notes = self.task.init_weights(self.model, cfg.init, cfg)
            for note in self.init_notes:
                log.info("init %s: %s", cfg.init, note)
        if cfg.train.grad_checkpointing and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        self.lr = peak_lr(cfg, self.info.world_size)
        self.optimizer = build_optimizer(self.model, cfg, self.lr)
        self.opt_step = OptimizerStep(self.optimizer, device=self.device, precision=cfg.train.precision,
                                      clip_grad=cfg.optim.clip_grad, params=self.model.parameters())
        self.scaler = self.opt_step.scaler
        self.ema = None
        if cfg.train.ema:
            self.ema = ModelEmaV3(self.model, decay=cfg.train.ema_decay)
        self.ddp_model: nn.Module = self.model
        if self.info.enabled:
            self.ddp_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                 find_unused_parameters=cfg.train.find_unused_parameters)
        if cfg.train.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        self.collate = self.task.collate_fn(cfg)
        self.batch_tf = self.task.batch_transform(cfg, self.device)
        self.train_sampler = ResumableSampler(len(self.datasets["train"]), shuffle=True, seed=cfg.seed,
                                              rank=self.info.rank, world_size=self.info.world_size) if train else None
        n_train = len(self.train_sampler) if self.train_sampler is not None else 0
        micro = n_train // cfg.train.batch_size if cfg.train.drop_last else math.ceil(n_train / cfg.train.batch_size)
        self.steps_per_epoch = micro // cfg.train.accum_steps
        if train and self.steps_per_epoch == 0:
            per_step = cfg.train.batch_size * cfg.train.accum_steps * self.info.world_size
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} x train.accum_steps={cfg.train.accum_steps} "
                              f"x {self.info.world_size} process(es) = {per_step} samples per optimizer step, more "
                              f"than the training split's {len(self.datasets['train'])}: lower train.batch_size")
        epoch_steps = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(cfg.train.max_steps, epoch_steps) if cfg.train.max_steps else epoch_steps
        o = cfg.optim
        self.warmup_steps = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_epochs * self.steps_per_epoch)
        self.state = TrainState()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last, cfg.train.keep_best,
                                      cfg.train.best_mode)
        self.logger = MetricLogger(self.run_dir, self.is_main, cfg.train.tensorboard)
        if cfg.train.resume:
            self._resume(cfg.train.resume)

    # ---- schedule --------------------------------------------------------------------------

    def _apply_schedule(self, step: int) -> float:
        o = self.cfg.optim
        lr = cosine_schedule(step, self.total_steps, self.warmup_steps, o.warmup_lr, self.lr, o.min_lr, o.schedule)
        wd_scale = 1.0
        if o.weight_decay_end is not None and o.weight_decay > 0:
            wd = cosine_schedule(step, self.total_steps, 0, o.weight_decay, o.weight_decay, o.weight_decay_end)
            wd_scale = wd / o.weight_decay
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
            g["weight_decay"] = g["wd_base"] * wd_scale
        return lr

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "batch_in_epoch": self.state.batch_in_epoch,
            "best_metric": self.state.best_metric,
            "rng": capture_rng(),
            "rng_per_rank": None,
            "config": to_dict(self.cfg),
            "world_size": self.info.world_size,
            "mm3d_version": __import__("mm3d").__version__,
        }

    def _save(self, metric: float | None = None) -> None:
        rngs = gather_objects(capture_rng())  # every rank's RNG streams, for an exact resume
        if self.is_main:
            state = self.state_dict()
            state["rng_per_rank"] = rngs
            path = self.ckpt.save(state, self.state.step, metric)
            log.info("saved %s", path)
        barrier()

    def _resume(self, spec: str) -> None:
        if spec == "auto":
            path = self.ckpt.latest()
            if path is None:
                log.info("resume=auto: no checkpoint in %s, starting fresh", self.ckpt.dir)
                return
        else:
            path = Path(spec)
        ck = load_checkpoint(path, allow_pickle=self.cfg.allow_pickle)
        unwrap(self.model).load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.module.load_state_dict(ck["ema"])
        if ck.get("world_size", 1) != self.info.world_size:
            log.warning("checkpoint was written with world_size=%s, resuming with %s: the sampler "
                        "position is rescaled", ck.get("world_size"), self.info.world_size)
            ck["batch_in_epoch"] = ck["batch_in_epoch"] * ck.get("world_size", 1) // self.info.world_size
        self.state = TrainState(step=ck["step"], epoch=ck["epoch"], batch_in_epoch=ck["batch_in_epoch"],
                                best_metric=ck.get("best_metric"))
        per_rank = ck.get("rng_per_rank") or [ck["rng"]]
        if len(per_rank) == self.info.world_size:
            restore_rng(per_rank[self.info.rank])
        else:  # a different world size: fresh, distinct streams per rank
            seed_everything(self.cfg.seed + self.info.rank + 7919 * self.state.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                 self.state.epoch, self.state.batch_in_epoch)

    # ---- evaluation ------------------------------------------------------------------------

    def loader(self, split: str, *, train: bool = False, batch_size: int | None = None) -> Iterable[Any]:
        ds = self.datasets[split]
        sampler = ResumableSampler(len(ds), shuffle=False, rank=self.info.rank,
                                   world_size=self.info.world_size, pad=False) if not train else self.train_sampler
        return build_loader(ds, batch_size=batch_size or self.cfg.train.batch_size, sampler=sampler,
                            num_workers=self.cfg.train.num_workers, collate_fn=self.collate,
                            drop_last=train and self.cfg.train.drop_last,
                            pin_memory=self.cfg.train.pin_memory and self.device.type == "cuda",
                            seed=self.cfg.seed + self.info.rank)

    def evaluate(self, split: str, model: nn.Module | None = None) -> EvalResult:
        model = model if model is not None else (self.ema.module if self.ema is not None else unwrap(self.model))
        with self._autocast():
            res = self.task.evaluate(model, self.loader(split), self.cfg, self.device, split)
        model.train()
        return res

    def _autocast(self):
        return autocast(self.device, self.cfg.train.precision)

    # ---- training --------------------------------------------------------------------------

    def _check_finite(self, tracker: "_LossTracker") -> None:
        """Stop on a non-finite loss seen since the last check (one host read; all ranks agree)."""
        first_bad = tracker.first_bad_step()
        if first_bad is None:
            return
        last = self.ckpt.latest()
        raise NonFiniteLossError(
            f"non-finite loss at step {first_bad} (found at step {self.state.step}); stopping. The last "
            f"good checkpoint is {last if last else 'none (no checkpoint written yet)'}; it was not "
            f"overwritten.")

    def train_epoch(self, epoch: int, progress: Progress) -> bool:
        """Run one epoch from the saved position. Returns False once max_steps is reached.

        The step's loss, gradient norm and non-finite flag stay on the device; the host reads
        them only at log steps (``train.log_every``), before a checkpoint and at the end.
        """
        cfg, accum = self.cfg, self.cfg.train.accum_steps
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.set_start(self.state.batch_in_epoch * cfg.train.batch_size)
        loader = self.loader("train", train=True)
        self.ddp_model.train()
        tracker = _LossTracker(self.device, self.state.step, accum)
        t0, seen = time.time(), 0
        micro = 0
        for batch in loader:
            if self.state.batch_in_epoch + accum > self.steps_per_epoch * accum and micro == 0:
                break  # a trailing partial accumulation group is skipped
            if micro == 0:
                lr = self._apply_schedule(self.state.step)
            batch = move_to_device(batch, self.device)
            if self.batch_tf is not None:
                batch = self.batch_tf(batch)
            last_micro = micro == accum - 1
            sync = contextlib.nullcontext() if (last_micro or not self.info.enabled) else self.ddp_model.no_sync()
            with sync:
                with self._autocast():
                    out = self.ddp_model(batch)
                tracker.add(out.loss)
                self.opt_step.backward(out.loss, 1.0 / accum)
            seen += batch_size_of(batch)
            micro += 1
            self.state.batch_in_epoch += 1
            if not last_micro:
                continue
            micro = 0
            grad_norm = self.opt_step.step()
            if self.ema is not None:
                self.ema.update(self.model, step=self.state.step)
            self.state.step += 1
            tracker.end_step()
            log_now = self.state.step % cfg.train.log_every == 0 or self.state.step == self.total_steps
            save_now = bool(cfg.train.save_every_steps) and self.state.step % cfg.train.save_every_steps == 0
            if log_now or save_now:
                self._check_finite(tracker)
            if log_now:
                step_loss = tracker.step_loss(self.info.world_size)  # the global mean, not rank 0's share
                progress.update(self.state.step, {"loss": step_loss})
                dt = time.time() - t0
                rec = {"step": self.state.step, "epoch": epoch, "split": "train", "loss": step_loss, "lr": lr,
                       "samples_per_s": seen * self.info.world_size / max(dt, 1e-9)}
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                self.logger.write(rec)
                self.state.history.append(rec)
                t0, seen = time.time(), 0
            else:
                progress.update(self.state.step, None)
            if save_now:
                self._save()
            if self.state.step >= self.total_steps:
                if not (log_now or save_now):
                    self._check_finite(tracker)
                return False
        self._check_finite(tracker)
        return True

    def fit(self) -> dict[str, Any]:
        """Train to the end, evaluating and checkpointing per epoch; then test and report."""
        cfg = self.cfg
        if self.train_sampler is None:
            raise RuntimeError("this Trainer was built with train=False (evaluation only)")
        log.info("task %s | %d train samples | %d steps/epoch | %d total steps | lr %.3g | device %s x%d",
                 cfg.task, len(self.datasets["train"]), self.steps_per_epoch, self.total_steps, self.lr,
                 self.device, self.info.world_size)
        select_split = selection_split(cfg.train.select_on, list(self.datasets))
        progress = Progress(self.total_steps, self.state.step, cfg.train.progress, self.is_main, cfg.train.log_every)
        results: dict[str, Any] = {"selected_on": select_split,
                                   "protocol": self.task.run_info(cfg, self.datasets)}
        try:
            while self.state.step < self.total_steps:
                epoch = self.state.epoch
                more = self.train_epoch(epoch, progress)
                end_of_epoch = more or self.state.batch_in_epoch >= self.steps_per_epoch * cfg.train.accum_steps
                finished = self.state.step >= self.total_steps
                if end_of_epoch:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                metric = None
                do_eval = cfg.train.eval_every and (self.state.epoch % cfg.train.eval_every == 0 or finished)
                if select_split in ("val", "test") and do_eval:
                    res = self.evaluate(select_split)
                    self.logger.write({"step": self.state.step, "epoch": epoch, "split": select_split, **res.metrics})
                    log.info("epoch %d %s: %s", epoch, select_split, _fmt(res.metrics))
                    metric = res.metrics.get(cfg.train.best_metric)
                    if metric is None:
                        raise KeyError(f"train.best_metric={cfg.train.best_metric!r} is not among the "
                                       f"{select_split} metrics {sorted(res.metrics)}")
                save_now = finished or (cfg.train.save_every and self.state.epoch % cfg.train.save_every == 0)
                if save_now:
                    self._save(metric)
        finally:
            progress.close()
        results.update(self._final_evaluation(select_split))
        if self.is_main:
            plot = plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "plots" / "curves.png")
            files = self.task.write_report(self.run_dir, unwrap(self.model), cfg,
                                           results.get("eval_results", {}), self.datasets, self.device)
            results["files"] = [str(p) for p in ([plot] if plot else []) + list(files)]
            results.pop("eval_results", None)
            results["history"] = self.state.history
            (self.run_dir / "results.json").write_text(json.dumps(jsonable(results), indent=1))
        else:
            results.pop("eval_results", None)
        self.logger.close()
        barrier()
        return results

    def _final_evaluation(self, select_split: str) -> dict[str, Any]:
        """Evaluate the selected checkpoint on every split (honest protocol: selected on val)."""
        out: dict[str, Any] = {"eval_results": {}}
        best = self.ckpt.best() if select_split in ("val", "test") else None
        model = unwrap(self.model)
        if best is not None and self.ckpt.latest() != best:
            ck = load_checkpoint(best)
            model.load_state_dict(ck["ema"] if (self.ema is not None and ck.get("ema")) else ck["model"])
            out["checkpoint"] = str(best)
            log.info("evaluating the checkpoint selected on %s: %s", select_split, best)
        elif self.ema is not None:
            model = self.ema.module
        for split in ("val", "test"):
            if split in self.datasets:
                res = self.evaluate(split, model)
                out[split] = res.metrics
                out["eval_results"][split] = res
                self.logger.write({"step": self.state.step, "epoch": self.state.epoch, "split": split,
                                   "final": True, **res.metrics})
                log.info("final %s: %s", split, _fmt(res.metrics))
        return out


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train (and evaluate) one config. With ``cfg.seeds`` set, run every seed and aggregate."""
    if cfg.seeds:
        return run_seeds(cfg)
    return Trainer(cfg).fit()


def run_seeds(cfg: RunConfig) -> dict[str, Any]:
    """Run the config once per seed in ``<run_dir>/seed_<s>`` and report mean ± std per metric."""
    per_seed = {}
    for s in cfg.seeds:
        sub = replace(cfg, seed=s, seeds=[], output_dir=str(cfg.run_dir / f"seed_{s}"))
        per_seed[s] = Trainer(sub).fit()
    summary: dict[str, Any] = {"seeds": list(cfg.seeds), "per_seed": {}, "mean": {}, "std": {},
                               "protocol": next(iter(per_seed.values())).get("protocol", {})}
    for split in ("val", "test"):
        keys = set().union(*(r.get(split, {}).keys() for r in per_seed.values()))
        for k in sorted(keys):
            vals = [r[split][k] for r in per_seed.values() if k in r.get(split, {})]
            name = f"{split}/{k}"
            summary["mean"][name] = float(np.mean(vals))
            summary["std"][name] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            for s, r in per_seed.items():
                summary["per_seed"].setdefault(str(s), {})[name] = r.get(split, {}).get(k)
    if get_info().is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "results.json").write_text(json.dumps(summary, indent=1))
        lines = ["| metric | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " | mean ± std |",
                 "|---|" + "---|" * (len(cfg.seeds) + 1)]
        for name in summary["mean"]:
            vals = " | ".join(f"{summary['per_seed'][str(s)].get(name, float('nan')):.4f}" for s in cfg.seeds)
            lines.append(f"| {name} | {vals} | {summary['mean'][name]:.4f} ± {summary['std'][name]:.4f} |")
        (cfg.run_dir / "results.md").write_text(f"# {cfg.name} ({cfg.task}), selected on "
                                                f"{cfg.train.select_on}\n\n" + "\n".join(lines) + "\n")
    return summary
