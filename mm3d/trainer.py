"""The one trainer: every task is trained, evaluated, checkpointed and resumed the same way.

The trainer knows the :class:`mm3d.task.Task` contract only: a model maps a batch to an output
with ``.loss``; the task builds the model and datasets and scores a split. Features: single
process, DDP or FSDP2 (``train.strategy``; torchrun, multi-node included, or SLURM; gloo on CPU,
nccl on GPU), fp32/bf16/fp16 autocast (GradScaler for fp16), gradient accumulation with
``no_sync``, clipping, LR and weight-decay schedules from the global step, layer-wise LR decay
through timm, EMA, atomic checkpoints with exact mid-epoch resume, a non-finite-loss stop,
JSONL/TensorBoard logging and a loss/LR plot.

A run folder belongs to one run: starting again into a folder that holds an earlier run is an
error unless it is resumed (``train.resume``) or replaced (``overwrite=true``), and resuming with
a config that changes what the run computes is refused unless forced (``train.resume_force``).
SIGTERM and the first Ctrl-C stop after the current optimizer step with a checkpoint on every
rank, exit status 75 (:data:`EXIT_INTERRUPTED`); a resumed run's log and history equal those of
one never interrupted. A run that torchrun restarts (``--max-restarts``) continues from its own
newest checkpoint. Checkpoints hold full (unsharded) state whatever the strategy, so they move
between single-process, DDP and FSDP runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
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

from mm3d.checkpoint import (CheckpointManager, OutputError, capture_rng, load_checkpoint, output_errors,
                             restore_rng)
from mm3d.config import ConfigError, RunConfig, config_from_dict, flatten_keys, save_config, to_dict
from mm3d.data import ResumableSampler, build_loader
from mm3d.distributed import (StopVote, all_reduce_min, all_reduce_sum, barrier, broadcast_object,
                              elastic_restart_count, gather_objects, get_info, init_distributed)
from mm3d.engine import OptimizerStep, amp_dtype, autocast, batch_size_of, move_to_device, unwrap
from mm3d.errors import UserError
from mm3d.fsdp import (apply_fsdp, full_model_state, full_optimizer_state, gathered, load_model_state,
                       load_optimizer_state, no_sync)
from mm3d.modelcard import build_card, checkpoint_card, write_run_card
from mm3d.registry import TASKS
from mm3d.results import jsonable, published_markdown, selection_split
from mm3d.shards import train_sampler
from mm3d.task import EvalResult, Task

log = logging.getLogger("mm3d")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the run stops, naming the newest checkpoint that still
    computes a finite loss."""


# The exit status of a run stopped by SIGTERM or Ctrl-C after writing its checkpoint: sysexits.h
# EX_TEMPFAIL ("temporary failure; the user is invited to retry"). 130/143 would read as "killed by
# the signal, nothing saved", which is what a second Ctrl-C or a SIGKILL means.
EXIT_INTERRUPTED = 75


class TrainingInterrupted(SystemExit):
    """SIGTERM or Ctrl-C stopped training after a checkpoint; run again with ``train.resume=auto``.

    A :class:`SystemExit` with status :data:`EXIT_INTERRUPTED`, so ``mm3d`` exits with it and no
    traceback; a caller of :meth:`Trainer.fit` may catch it.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(EXIT_INTERRUPTED)
        self.message, self.signum = message, signum

    def __str__(self) -> str:
        return self.message


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


def epoch_schedule(epoch: int, epochs: int, warmup: float, start: float, peak: float, end: float,
                   kind: str = "cosine") -> float:
    """The rate of `epoch` under timm's ``CosineLRScheduler(t_in_epochs=True)`` as Point-MAE steps it
    (``scheduler.step(epoch)`` after each epoch, so epoch e trains at the scheduler's value for
    e - 1): linear warm-up from `start` over `warmup` epochs, then a cosine from `peak` to `end` over
    all `epochs` counted from 0 (timm's ``warmup_prefix=False``), `end` from epoch `epochs` on."""
    t = max(epoch - 1, 0)
    if t < warmup:
        return start + (peak - start) * t / warmup
    if kind == "constant":
        return peak
    if t >= epochs:
        return end
    return end + 0.5 * (peak - end) * (1.0 + math.cos(math.pi * t / epochs))


FUSABLE = ("adam", "adamw", "sgd", "momentum")  # timm names whose torch optimizer has a fused step


def build_optimizer(model: nn.Module, cfg: RunConfig, lr: float, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on norms, biases and `no_weight_decay()` names;
    layer-wise LR decay through the model's `group_matcher` when ``optim.layer_decay`` is set.

    `fused` (default ``optim.fused``; None: when every parameter is on the CPU or CUDA and the run is
    not FSDP) takes torch's fused step for AdamW, Adam and SGD (6% of a Point-MAE step on the CPU,
    BENCHMARKS.md). Peers pass False: they are timed with torch's default step, as their code runs."""
    o = cfg.optim
    kwargs: dict[str, Any] = {"eps": o.eps}
    name = o.name.lower()
    if "adam" in name or "lamb" in name:
        kwargs["betas"] = tuple(o.betas)
    if "sgd" in name or "momentum" in name:
        kwargs = {"momentum": o.momentum}
    fused = o.fused if fused is None else fused
    if fused is None:
        params = [p for p in model.parameters() if p.requires_grad]
        fused = (bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
                 and getattr(cfg.train, "strategy", "ddp") != "fsdp")
    if fused and name in FUSABLE:
        kwargs["fused"] = True
    elif o.fused and name not in FUSABLE:
        raise ConfigError(f"optim.fused=true: optimizer {o.name!r} has no fused step in torch (use one of {FUSABLE})")
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
    """metrics.jsonl + TensorBoard on rank 0; no-ops on other ranks.

    `records` counts the lines of metrics.jsonl (`records` already there when resumed); every
    checkpoint stores it, so a resumed run cuts the log back to what its checkpoint had seen.
    `purge_step` makes TensorBoard drop the events from that step on (a resumed run).
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, *, records: int = 0,
                 purge_step: int | None = None) -> None:
        self.enabled, self.records = enabled, records
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                with output_errors("the TensorBoard log", run_dir / "tensorboard"):
                    self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
            except ImportError:  # tensorboard missing: JSONL still works
                log.warning("tensorboard is not installed; writing metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with output_errors("the metrics log", self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.records += 1
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


class _StopSignals:
    """SIGTERM and the first Ctrl-C (SIGINT) ask the run to stop after the current optimizer step,
    with a checkpoint; a later Ctrl-C aborts at once, without one.

    The handlers only set :attr:`signum`; the training loop reads it at step boundaries (a Python
    attribute: no device read). Installed on the main thread only; a signal the process ignores
    (SIG_IGN, e.g. SIGINT of a background job) stays ignored.
    """

    REPEAT_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C (torchrun forwards it)

    def __init__(self) -> None:
        self.signum = 0
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN or previous is None:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signum:
            self.signum, self._at = signum, time.monotonic()
            again = "; Ctrl-C again aborts at once, without a checkpoint" if signum == signal.SIGINT else ""
            log.warning("%s: stopping after this optimizer step, with a checkpoint%s", _signal_name(signum), again)
        elif signum == signal.SIGINT and time.monotonic() - self._at > self.REPEAT_S:
            sys.stderr.write("mm3d: Ctrl-C again: aborting at once, without a checkpoint\n")
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------------------------
# One run per folder: the folder, the log and the config of a resumed run
# --------------------------------------------------------------------------------------------


def earlier_run_files(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that a run already wrote there (checkpoints, a metrics log, results)."""
    found = []
    ck = run_dir / "checkpoints"
    if (ck / "index.json").is_file() or any(ck.glob("step_*.pt")):
        found.append("checkpoints/")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if (run_dir / "results.json").is_file():
        found.append("results.json")
    return found


def clear_run_dir(run_dir: Path) -> None:
    """Delete everything in `run_dir` (``overwrite=true``); never the folder the command runs in
    (or one above it), the home folder or a file-system root."""
    target, here = run_dir.resolve(), Path.cwd().resolve()
    if here.is_relative_to(target) or target in (Path(target.anchor), Path.home().resolve()):
        raise UserError(f"overwrite=true will not clear {run_dir}: it holds the current folder, or is the home "
                        f"folder or a root; give the run its own output_dir=")
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def truncate_log(path: Path, keep: int | None, step: int) -> list[dict[str, Any]]:
    """Cut metrics.jsonl back to its first `keep` records (the ones a checkpoint had seen), or to
    the records up to `step` when the checkpoint did not count them; returns the records kept.

    A line cut short by a kill ends the log. The shorter log replaces the old one atomically.
    """
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    kept = rows[:keep] if keep is not None else [r for r in rows if r.get("step", 0) <= step and not r.get("final")]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept


def _neutral_keys(cfg: Any, prefix: str = "") -> set[str]:
    """Dotted keys (or sections) listed in the ``run_neutral_keys`` of `cfg`'s dataclasses."""
    keys = {prefix + k for k in getattr(type(cfg), "run_neutral_keys", ())}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys |= _neutral_keys(value, f"{prefix}{f.name}.")
    return keys


def config_changes(stored: dict[str, Any] | None, cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted key, stored value, new value)`` for every key that changes what the run computes.

    The stored config is read through `cfg`'s class first (defaults for keys added since, renamed
    keys); keys a section lists in ``run_neutral_keys`` (lengths, logging, devices, paths) are not
    compared.
    """
    if not stored:
        return []
    try:
        old = to_dict(config_from_dict(type(cfg), copy.deepcopy(stored)))
    except UserError:  # written by another mm3d version: compare the keys both have
        old = stored
    neutral = _neutral_keys(cfg)
    old_flat, new_flat = flatten_keys(old), flatten_keys(to_dict(cfg))
    return [(k, old_flat[k], v) for k, v in new_flat.items()
            if k in old_flat and old_flat[k] != v and not any(k == n or k.startswith(n + ".") for n in neutral)]


def _describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {old!r} → {new!r}" for k, old, new in changes)


def elastic_restart(cfg: RunConfig, attempt: int) -> RunConfig:
    """`cfg` for a training run that torchrun restarted (``--max-restarts``, after a worker or node
    failed; `attempt` > 0): its run folder holds this very run's earlier attempt, so it continues
    from the newest checkpoint (``train.resume=auto``) and ``overwrite=true`` does not clear it
    again. Unchanged on a first attempt and when the config resumes already (``auto`` or a
    checkpoint)."""
    if not attempt or cfg.train.resume:
        return cfg
    if get_info().is_main:
        log.warning("torchrun restart %d: continuing this run from its newest checkpoint in %s (train.resume=auto%s)",
                    attempt, cfg.run_dir, "; overwrite=true applied to the first attempt only" if cfg.overwrite else "")
    return replace(cfg, overwrite=False, train=replace(cfg.train, resume="auto"))


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Train `task` with `cfg`; call :meth:`fit` (training + evaluation + report)."""

    def __init__(self, cfg: RunConfig, task: Task | None = None, *, train: bool = True) -> None:
        """`train=False` (``mm3d evaluate``) builds only the val and test splits: no training list
        is needed and :meth:`fit` is unavailable."""
        self.task = task or TASKS.get(cfg.task)
        self.info, self.device = init_distributed(cfg.train.device)
        setup_logging(self.info.rank)
        if train:  # torchrun counts restarts per node (a node whose workers did not fail may say 0): any rank's
            cfg = elastic_restart(cfg, max(gather_objects(elastic_restart_count())))
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.is_main = self.info.is_main
        seed_everything(cfg.seed + self.info.rank, cfg.deterministic)
        self._claim_run_dir(train)
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
        self.sharded = self._shard_model() if train else False  # before the optimizer: it replaces the parameters
        self.lr = peak_lr(cfg, self.info.world_size)
        self.optimizer = build_optimizer(self.model, cfg, self.lr)
        self.opt_step = OptimizerStep(self.optimizer, device=self.device, precision=cfg.train.precision,
                                      clip_grad=cfg.optim.clip_grad, params=self.model.parameters(),
                                      double_step=cfg.optim.double_step)
        self.ema = None
        if cfg.train.ema:
            self.ema = ModelEmaV3(self.model, decay=cfg.train.ema_decay)
        self.ddp_model: nn.Module = self.model
        if self.info.enabled and not self.sharded:
            self.ddp_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                 find_unused_parameters=cfg.train.find_unused_parameters)
        if cfg.train.compile:
            self.ddp_model = torch.compile(self.ddp_model, mode=cfg.train.compile_mode)
        self.collate = self.task.collate_fn(cfg)
        self.batch_tf = self.task.batch_transform(cfg, self.device)
        # a dataset over prepared shards (`.shard_set`) gets shard locality, else a plain permutation
        self.train_sampler = train_sampler(self.datasets["train"], seed=cfg.seed, rank=self.info.rank,
                                           world_size=self.info.world_size,
                                           shuffle_buffer=getattr(cfg.data, "shuffle_buffer", 1000)) if train else None
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
        self.signals = _StopSignals()
        self.stop_vote = StopVote() if train else None
        resumed, log_records, changes = (self._resume(cfg.train.resume) if cfg.train.resume else (None, 0, []))
        records: list[dict[str, Any]] = []
        error: str | None = None
        if self.is_main:
            try:
                with output_errors("the run folder", self.run_dir):
                    if cfg.train.resume:  # the log of a resumed run ends where its checkpoint was written
                        records = truncate_log(self.run_dir / "metrics.jsonl", log_records, self.state.step)
                    save_config(cfg, self.run_dir / "config.yaml")
            except OutputError as e:
                if not self.info.enabled:
                    raise
                error = str(e)
        error = broadcast_object(error)  # every rank stops on a folder rank 0 cannot write
        if error is not None:
            raise OutputError(error)
        self.state.history = [r for r in records if r.get("split") == "train"]
        # the per-epoch evaluations of the selection split (for `eval.report_max`), as far as the log goes
        select_split = selection_split(cfg.train.select_on, list(self.datasets))
        self.eval_records = [r for r in records if r.get("split") == select_split and not r.get("final")]
        self.logger = MetricLogger(self.run_dir, self.is_main, cfg.train.tensorboard, records=len(records),
                                   purge_step=self.state.step + 1 if cfg.train.resume else None)
        if changes:
            self.logger.write({"step": self.state.step, "epoch": self.state.epoch, "split": "event",
                               "event": "resume_force", "checkpoint": str(resumed),
                               "changed": {k: [old, new] for k, old, new in changes}})
        if not self.is_main:
            self.ckpt.reload()  # rank 0 may have set later checkpoints aside

    def _shard_model(self) -> bool:
        """``train.strategy=fsdp`` with several processes: shard the model (:mod:`mm3d.fsdp`).
        Returns whether it was sharded; one process trains the plain model."""
        t = self.cfg.train
        if t.strategy != "fsdp":
            return False
        if not self.info.enabled:
            log.info("train.strategy=fsdp with one process: nothing to shard, training the plain model")
            return False
        assert not t.ema and self.amp_dtype is not torch.float16, "refused by TrainConfig.validate"
        units = apply_fsdp(self.model, param_dtype=self.amp_dtype,
                           reshard_after_forward=t.fsdp_reshard_after_forward)
        if not units:
            log.warning("train.strategy=fsdp: %s names no blocks to shard one by one (no fsdp_units(), no "
                        "ModuleList 'blocks'): the whole model is one unit, gathered at once",
                        type(self.model).__name__)
        log.info("fsdp: %d units + the root, sharded over %d processes", len(units), self.info.world_size)
        return True

    def _gathered(self):
        """Every rank holds the full parameters meanwhile (:func:`mm3d.fsdp.gathered`)."""
        return gathered(self.model, self.cfg.train.fsdp_reshard_after_forward)

    # ---- the run folder ----------------------------------------------------------------------

    def _claim_run_dir(self, train: bool) -> None:
        """Make the run folder this run's own (rank 0 checks, clears or repairs it; every rank gets
        its verdict): a folder holding an earlier run is an error unless this run resumes it or
        ``overwrite=true`` clears it; leftovers of a save killed midway are put right."""
        error: str | None = None
        if self.is_main:
            try:
                self._check_run_dir(train)
            except UserError as e:
                if not self.info.enabled:
                    raise
                error = str(e)
        error = broadcast_object(error)
        if error is not None:
            raise UserError(error)

    def _check_run_dir(self, train: bool) -> None:
        cfg, run_dir = self.cfg, self.run_dir
        ckpt_dir = run_dir / "checkpoints"
        resume = cfg.train.resume
        here = resume == "auto" or bool(resume and Path(resume).resolve().parent == ckpt_dir.resolve())
        if cfg.overwrite and here:
            raise UserError(f"overwrite=true clears {run_dir}, train.resume={resume} continues the run in it: "
                            f"give only one of them")
        with output_errors("the run folder", run_dir):
            found = earlier_run_files(run_dir) if run_dir.is_dir() else []
            if found and not here:
                if not cfg.overwrite:
                    ways = ("continue it with train.resume=auto, start a new run with another name= or "
                            "output_dir=, or replace it with overwrite=true" if train else
                            "replace it with overwrite=true, or write elsewhere with another output_dir=")
                    raise UserError(f"{run_dir} already holds an earlier run ({', '.join(found)}): {ways}")
                clear_run_dir(run_dir)
                log.info("overwrite=true: cleared %s", run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            if train:
                for note in CheckpointManager(ckpt_dir, mode=cfg.train.best_mode).recover():
                    log.warning("%s: %s", ckpt_dir, note)

    # ---- schedule --------------------------------------------------------------------------

    def _apply_schedule(self, step: int) -> float:
        o = self.cfg.optim
        if o.schedule_unit == "epoch":
            lr = epoch_schedule(step // self.steps_per_epoch, self.cfg.train.epochs, o.warmup_epochs, o.warmup_lr,
                                self.lr, o.min_lr, o.schedule)
        else:
            lr = cosine_schedule(step, self.total_steps, self.warmup_steps, o.warmup_lr, self.lr, o.min_lr,
                                 o.schedule)
        wd_scale = 1.0
        if o.weight_decay_end is not None and o.weight_decay > 0:
            wd = cosine_schedule(step, self.total_steps, 0, o.weight_decay, o.weight_decay, o.weight_decay_end)
            wd_scale = wd / o.weight_decay
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
            g["weight_decay"] = g["wd_base"] * wd_scale
        return lr

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self, weights: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint. `weights`: ``{"model", "optimizer"}`` gathered already (:meth:`_weights`)."""
        weights = weights if weights is not None else self._weights()
        return {
            "model": weights["model"],
            "optimizer": weights["optimizer"],
            "scaler": self.opt_step.scaler.state_dict(),
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
            "model_card": self.model_card(),
        }

    def _weights(self) -> dict[str, Any]:
        """The model's and optimizer's full state dicts, the single-process format whatever the strategy
        (sharded: collective, on rank 0 only)."""
        return {"model": full_model_state(self.model), "optimizer": full_optimizer_state(self.model, self.optimizer)}

    @functools.cached_property
    def _card(self) -> dict[str, Any]:
        return build_card(self.task, self.cfg, model=unwrap(self.model),
                          protocol=self.task.run_info(self.cfg, self.datasets))

    def model_card(self) -> dict[str, Any]:
        """The card stored in each checkpoint (:mod:`mm3d.modelcard`), with the selection split's
        evaluation when one was made at this step; the final metrics go to ``model_card.json``."""
        last = self.eval_records[-1] if self.eval_records else None
        return checkpoint_card(self._card, step=self.state.step, epoch=self.state.epoch,
                               evaluation=last if last is not None and last["step"] == self.state.step else None)

    def _save(self, metric: float | None = None) -> None:
        """Rank 0 writes the checkpoint; every rank learns whether it could (a full or read-only
        disk stops every rank with the same one-line error)."""
        rngs = gather_objects(capture_rng())  # every rank's RNG streams, for an exact resume
        weights = self._weights() if self.sharded or self.is_main else None  # sharded: every rank gathers
        error: str | None = None
        if self.is_main:
            state = self.state_dict(weights)
            state["rng_per_rank"] = rngs
            state["log_records"] = self.logger.records
            before = self.ckpt.latest()
            try:
                path = self.ckpt.save(state, self.state.step, metric)
                log.info("saved %s", path)
            except OutputError as e:
                error = (f"cannot write the checkpoint of step {self.state.step}: {e}; the earlier checkpoints "
                         f"are intact (newest: {before or 'none yet'}): make room, then continue with "
                         f"train.resume=auto")
        error = broadcast_object(error)
        if error is not None:
            raise OutputError(error)
        if not self.is_main:
            self.ckpt.reload()

    def _resume(self, spec: str) -> tuple[Path | None, int | None, list[tuple[str, Any, Any]]]:
        """Load the checkpoint `spec` (``auto``: the newest of this run, if any). Returns its path,
        the metrics.jsonl records it had seen (None: not stored) and the config changes forced."""
        if spec == "auto":
            path = self.ckpt.latest()
            if path is None:
                log.info("resume=auto: no checkpoint in %s, starting fresh", self.ckpt.dir)
                return None, 0, []
        else:
            path = Path(spec)
        ck = load_checkpoint(path, allow_pickle=self.cfg.allow_pickle)
        changes = config_changes(ck.get("config"), self.cfg)
        if changes and not self.cfg.train.resume_force:
            raise UserError(f"{path} was written with another config ({_describe_changes(changes)}): resuming it "
                            f"would mix two runs. Start a new run (another name= or output_dir=), or resume "
                            f"anyway with train.resume_force=true")
        if changes:
            log.warning("train.resume_force=true: resuming %s with a changed config: %s", path,
                        _describe_changes(changes))
        load_model_state(self.model, ck["model"])  # shards it under FSDP: checkpoints of every strategy load
        load_optimizer_state(self.model, self.optimizer, ck["optimizer"])
        self.opt_step.scaler.load_state_dict(ck["scaler"])
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
        if self.is_main and spec != "auto" and path.resolve().parent == self.ckpt.dir.resolve():
            for moved in self.ckpt.set_aside_after(self.state.step):  # an earlier checkpoint of this run
                log.warning("resuming at step %d: the later %s was moved to %s", self.state.step, moved.name,
                            moved.parent)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                 self.state.epoch, self.state.batch_in_epoch)
        return path, ck.get("log_records"), changes

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

    def evaluate(self, split: str, model: nn.Module | None = None, *, final: bool = False) -> EvalResult:
        """Score `model` (default: the EMA or the trained model) on `split`; `final`: the reported
        evaluation (:meth:`Task.final_evaluate`, e.g. repeated voting runs), else a per-epoch one."""
        model = model if model is not None else (self.ema.module if self.ema is not None else unwrap(self.model))
        score = self.task.final_evaluate if final else self.task.evaluate
        with self._autocast(), self._gathered():  # FSDP: ranks' splits may differ in batches
            res = score(model, self.loader(split), self.cfg, self.device, split)
        model.train()
        return res

    def _autocast(self):
        return autocast(self.device, self.cfg.train.precision)

    # ---- training --------------------------------------------------------------------------

    def _check_finite(self, tracker: "_LossTracker") -> None:
        """Stop on a non-finite loss seen since the last check (one host read; all ranks agree).

        Every loss up to now being finite shows that every checkpoint written before this step
        computes a finite loss (the next step's loss came from its weights): they are marked
        verified, and retention keeps the newest of them. On a non-finite loss the message names
        the newest checkpoint that computes a finite loss: verified, or checked with a forward pass.
        """
        first_bad = tracker.first_bad_step()
        if first_bad is None:
            if self.is_main:
                self.ckpt.mark_verified(self.state.step)
            return
        good, bad = self._newest_finite_checkpoint()
        msg = f"non-finite loss at step {first_bad} (found at step {self.state.step}); stopping."
        not_good = f" ({', '.join(bad)} give a non-finite loss too)" if bad else ""
        if good is not None:
            msg += (f" The newest checkpoint that computes a finite loss is {good}{not_good}; it was not "
                    f"overwritten. Lower optim.lr (or check the data), then continue from it with "
                    f"train.resume={good} train.resume_force=true")
        elif bad:
            msg += (f" No kept checkpoint computes a finite loss ({', '.join(bad)}): start again with a lower "
                    f"optim.lr (overwrite=true)")
        else:
            msg += " No checkpoint was written yet"
        raise NonFiniteLossError(msg)

    def _newest_finite_checkpoint(self) -> tuple[str | None, list[str]]:
        """The newest kept checkpoint that computes a finite loss (None: none does), and the newer
        ones that do not. Unverified ones are checked with a forward pass on the first training
        batch of every rank; all ranks agree."""
        kept = [(str(self.ckpt.dir / e["file"]), bool(e.get("verified"))) for e in self.ckpt.newest_first()]
        kept = broadcast_object(kept)
        bad: list[str] = []
        batch = None
        for path, verified in kept:
            if not verified:
                if batch is None:
                    batch = move_to_device(next(iter(self.loader("train"))), self.device)
                    if self.batch_tf is not None:
                        with torch.no_grad():
                            batch = self.batch_tf(batch)
                if not self._computes_finite_loss(path, batch):
                    bad.append(path)
                    continue
            return path, bad
        return None, bad

    def _computes_finite_loss(self, path: str, batch: Any) -> bool:
        model = unwrap(self.model)  # its weights are spoiled already: the run stops
        load_model_state(model, load_checkpoint(path, allow_pickle=self.cfg.allow_pickle)["model"])
        model.eval()
        with torch.no_grad(), self._autocast():
            loss = model(batch).loss.detach().float()
        return not bool(all_reduce_sum((~torch.isfinite(loss)).float()) > 0)

    def _interrupted(self, signum: int) -> TrainingInterrupted:
        msg = (f"stopped by {_signal_name(signum)} at step {self.state.step}/{self.total_steps}: saved "
               f"{self.ckpt.latest()}; continue with train.resume=auto (exit status {EXIT_INTERRUPTED})")
        if self.is_main:
            log.warning("%s", msg)
        return TrainingInterrupted(msg, signum)

    def train_epoch(self, epoch: int, progress: Progress) -> bool:
        """Run one epoch from the saved position. Returns False once max_steps is reached.

        The step's loss, gradient norm and non-finite flag stay on the device; the host reads
        them only at log steps (``train.log_every``), before a checkpoint and at the end.
        """
        cfg, accum = self.cfg, self.cfg.train.accum_steps
        self.train_sampler.set_epoch(epoch)
        set_epoch = getattr(self.datasets["train"], "set_epoch", None)  # per-epoch item randomness (video)
        if set_epoch is not None:
            set_epoch(epoch)
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
            sync = contextlib.nullcontext() if (last_micro or not self.info.enabled) else no_sync(self.ddp_model)
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
            after_step = getattr(self.model, "after_optimizer_step", None)  # e.g. a target's EMA teacher
            if after_step is not None:  # step: the 0-based index of the step just taken
                after_step(self.state.step, self.total_steps)
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
            # SIGTERM / Ctrl-C: every rank stops at the same step, with a checkpoint
            stop = self.stop_vote.poll(self.signals.signum) if self.state.step < self.total_steps else 0
            if stop:
                if not save_now:
                    self._check_finite(tracker)
                    self._save()
                raise self._interrupted(stop)
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
        select_split = selection_split(cfg.train.select_on, list(self.datasets))
        results: dict[str, Any] = {"selected_on": select_split, "protocol_name": cfg.protocol,
                                   "protocol": self.task.run_info(cfg, self.datasets)}
        if cfg.published.value is not None:
            results["published"] = to_dict(cfg.published)
        progress = Progress(self.total_steps, self.state.step, cfg.train.progress, self.is_main, cfg.train.log_every)
        self.signals.install()  # before the first line: once it shows, SIGTERM and Ctrl-C stop cleanly
        try:
            log.info("task %s | %d train samples | %d steps/epoch | %d total steps | lr %.3g | device %s x%d",
                     cfg.task, len(self.datasets["train"]), self.steps_per_epoch, self.total_steps, self.lr,
                     self.device, self.info.world_size)
            while self.state.step < self.total_steps:
                epoch = self.state.epoch
                more = self.train_epoch(epoch, progress)
                end_of_epoch = more or self.state.batch_in_epoch >= self.steps_per_epoch * cfg.train.accum_steps
                finished = self.state.step >= self.total_steps
                if end_of_epoch:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                metric, improved = None, False
                do_eval = cfg.train.eval_every and (self.state.epoch % cfg.train.eval_every == 0 or finished)
                if select_split in ("val", "test") and do_eval:
                    res = self.evaluate(select_split)
                    record = {"step": self.state.step, "epoch": epoch, "split": select_split, **res.metrics}
                    self.logger.write(record)
                    self.eval_records.append(record)
                    log.info("epoch %d %s: %s", epoch, select_split, _fmt(res.metrics))
                    metric = res.metrics.get(cfg.train.best_metric)
                    if metric is None:
                        raise KeyError(f"train.best_metric={cfg.train.best_metric!r} is not among the "
                                       f"{select_split} metrics {sorted(res.metrics)}")
                    best = self.state.best_metric
                    improved = best is None or (metric > best if cfg.train.best_mode == "max" else metric < best)
                    if improved:
                        self.state.best_metric = float(metric)
                # an evaluated epoch that beats every earlier one is saved even between checkpoint epochs,
                # so the selected checkpoint is the best evaluated epoch, not the best saved one
                save_now = finished or improved or (cfg.train.save_every and self.state.epoch % cfg.train.save_every == 0)
                if save_now:
                    self._save(metric)
            stop = self.stop_vote.now(self.signals.signum)  # a signal during the last step or evaluation
            if stop:
                raise self._interrupted(stop)
        except TrainingInterrupted:
            self.logger.close()
            raise
        finally:
            self.signals.restore()  # from here on a signal ends the process as usual
            progress.close()
        results.update(self._final_evaluation(select_split))
        self._report_epoch_max(results, select_split)
        with self._gathered():  # FSDP: the report may run the model on rank 0 alone
            self._write_results(results)
        self.logger.close()
        barrier()
        return results

    def _write_results(self, results: dict[str, Any]) -> None:
        """Rank 0: the curves, the task's report, results.json and the model card."""
        cfg = self.cfg
        if self.is_main:
            with output_errors("the results", self.run_dir):
                plot = plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "plots" / "curves.png")
                files = self.task.write_report(self.run_dir, unwrap(self.model), cfg,
                                               results.get("eval_results", {}), self.datasets, self.device)
                published = published_markdown(cfg, results)
                if published and (self.run_dir / "results.md").is_file():
                    with (self.run_dir / "results.md").open("a") as f:
                        f.write("\n" + published)
                results["files"] = [str(p) for p in ([plot] if plot else []) + list(files)]
                results.pop("eval_results", None)
                results["history"] = self.state.history
                (self.run_dir / "results.json").write_text(json.dumps(jsonable(results), indent=1))
                scored = Path(results["checkpoint"]) if results.get("checkpoint") else self.ckpt.latest()
                write_run_card(self.run_dir, scored, results, weights="ema" if self.ema is not None else "model")
        else:
            results.pop("eval_results", None)

    def _report_epoch_max(self, results: dict[str, Any], select_split: str) -> None:
        """``eval.report_max``: each named metric's maximum over the per-epoch evaluations of the
        selection split, as ``<metric>_epoch_max`` beside that split's final metrics (each maximised
        on its own: the maxima may come from different epochs), and the epoch of each under
        ``epoch_max`` in results.json."""
        names = self.cfg.eval.report_max
        if not names:
            return
        if select_split not in ("val", "test") or not self.eval_records:
            log.warning("eval.report_max=%s: no per-epoch evaluations to take the maximum of (select_on=%s)",
                        names, select_split)
            return
        where = results.setdefault("epoch_max", {})
        for name in names:
            scored = [r for r in self.eval_records if isinstance(r.get(name), (int, float))]
            if not scored:
                raise KeyError(f"eval.report_max: {name!r} is not among the {select_split} metrics "
                               f"{sorted(k for k in self.eval_records[-1] if k not in ('step', 'epoch', 'split'))}")
            top = max(scored, key=lambda r: r[name])  # the first epoch reaching the maximum
            where[name] = {"split": select_split, "value": top[name], "epoch": top["epoch"], "step": top["step"]}
            results.setdefault(select_split, {})[f"{name}_epoch_max"] = top[name]
            res = results.get("eval_results", {}).get(select_split)
            if res is not None:
                res.metrics[f"{name}_epoch_max"] = top[name]
            log.info("%s %s: max over %d evaluated epochs %.4g (epoch %d)", select_split, name, len(scored),
                     top[name], top["epoch"])

    def _final_evaluation(self, select_split: str) -> dict[str, Any]:
        """Evaluate the selected checkpoint (best on the selection split, else the last) on every
        split with the task's reported evaluation (:meth:`Task.final_evaluate`)."""
        out: dict[str, Any] = {"eval_results": {}}
        best = self.ckpt.best() if select_split in ("val", "test") else None
        model = unwrap(self.model)
        if best is not None and self.ckpt.latest() != best:
            ck = load_checkpoint(best)
            load_model_state(model, ck["ema"] if (self.ema is not None and ck.get("ema")) else ck["model"])
            out["checkpoint"] = str(best)
            log.info("evaluating the checkpoint selected on %s: %s", select_split, best)
        elif self.ema is not None:
            model = self.ema.module
        for split in ("val", "test"):
            if split in self.datasets:
                res = self.evaluate(split, model, final=True)
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
                               "protocol_name": cfg.protocol,
                               "protocol": next(iter(per_seed.values())).get("protocol", {})}
    if cfg.published.value is not None:
        summary["published"] = to_dict(cfg.published)
    for split in ("val", "test"):
        keys = set().union(*(r.get(split, {}).keys() for r in per_seed.values()))
        for k in sorted(keys):
            vals = [r[split][k] for r in per_seed.values() if k in r.get(split, {})]
            name = f"{split}/{k}"
            for s, r in per_seed.items():
                summary["per_seed"].setdefault(str(s), {})[name] = r.get(split, {}).get(k)
            if not all(isinstance(v, (int, float)) for v in vals):  # e.g. the names of unscored samples
                continue
            summary["mean"][name] = float(np.mean(vals))
            summary["std"][name] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    if get_info().is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "results.json").write_text(json.dumps(summary, indent=1))
        lines = ["| metric | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " | mean ± std |",
                 "|---|" + "---|" * (len(cfg.seeds) + 1)]
        for name in summary["mean"]:
            vals = " | ".join(f"{summary['per_seed'][str(s)].get(name, float('nan')):.4f}" for s in cfg.seeds)
            lines.append(f"| {name} | {vals} | {summary['mean'][name]:.4f} ± {summary['std'][name]:.4f} |")
        label = summary["protocol"].get("protocol", f"selected on {cfg.train.select_on}")
        published = published_markdown(cfg, summary)
        (cfg.run_dir / "results.md").write_text(f"# {cfg.name} ({cfg.task}), protocol {label}\n\n"
                                                + "\n".join(lines) + "\n" + ("\n" + published if published else ""))
    return summary
