"""`mm3d plan`: the memory per GPU of a config's training step, and the batch, accumulation and
strategy that fit a given GPU.

How it estimates. Nothing is guessed from a formula: one training step (forward, backward, the
optimizer's first step) of the config's own model, at the config's input size, runs under torch's
``FakeTensorMode`` on the CPU. Fake tensors carry shapes, dtypes and storages but no memory, so a
ViT-g step at batch 64 is traced on a laptop, through the same kernels a real step calls:
the CPU's flash attention (which, like CUDA's flash and memory-efficient kernels, saves q, k, v, the
output and the log-sum-exp, never the L x L matrix), ``torch.autocast`` for bf16/fp16 (weights stay
fp32: autocast keeps low-precision copies of them for the step, and the optimizer updates the fp32
weights), activation checkpointing as the trainer switches it on, and AdamW's foreach path (the one
CUDA takes). A ``TorchDispatchMode`` counts every storage an operator returns and notices when it is
freed, which gives the live bytes after every operator and their peak, split into parameters,
buffers, gradients, optimizer state, autocast's weight copies and the rest (activations and
temporaries).

A model with more than ``MAX_TRACED_BLOCKS`` blocks is traced with one block per stack (encoder,
decoder), then with one stack at two blocks, and every count is extrapolated over the real depths:
the blocks of a stack are identical, so each adds the same bytes (the tests check this against the
whole trace). A step that reads a tensor's value on the host (part segmentation checks its category
labels), which fake tensors cannot give, is traced with real tensors on the CPU instead.

Multi-GPU strategies are the traced single-process step with what a strategy changes, per GPU:

- ``ddp``: a full replica, plus DDP's gradient buckets (a second copy of the gradients; DDP is built
  with ``gradient_as_bucket_view=False``);
- ``fsdp``: parameters, gradients and optimizer state divided by the GPU count, plus the gathered
  parameters of two blocks (the one running and the one prefetched; all blocks when
  ``train.fsdp_reshard_after_forward`` is false) in the compute dtype, the
  unsharded gradients of one block before its reduce-scatter, and the unsharded root (what is not in a
  block); autocast makes no weight copies (FSDP2's ``param_dtype`` gathers bf16 weights); activations
  as one process.

Two constants are added that no tensor accounts for: the CUDA context with cuBLAS/cuDNN workspaces
(``CUDA_CONTEXT_GIB``) and a headroom share of the GPU left for allocator fragmentation
(``--headroom``, default 10%). The estimate is checked against the measured peak of real steps on
the CPU in ``tests/test_plan.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mm3d.config import load_config
from mm3d.engine import amp_dtype, autocast
from mm3d.errors import UserError
from mm3d.fsdp import shard_units
from mm3d.registry import COMMANDS, TASKS
from mm3d.trainer import build_optimizer

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 1.0  # CUDA context + cuBLAS/cuDNN workspaces: not tensors, ~0.5-1 GiB on current GPUs
DEFAULT_HEADROOM = 0.10  # share of the GPU kept free for the caching allocator's fragmentation
Strategy = Literal["ddp", "fsdp"]


# --------------------------------------------------------------------------------------------
# Tracing one training step
# --------------------------------------------------------------------------------------------


class LiveMemory(TorchDispatchMode):
    """Counts the bytes of live tensor storage after every operator (fake or real tensors).

    A storage is counted once however many views share it. `kinds` names what some storages are
    (``param``, ``buffer``, ``copy`` for a low-precision copy of a parameter); `timeline` holds the
    live bytes after each operator, `phases` the operator index at which each named phase began.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, tuple[int, int]] = {}  # storage -> (allocation id, bytes)
        self.births: list[int] = []  # allocation id -> operator index of its birth
        self.deaths: list[int | None] = []  # allocation id -> operator index of its death (None: alive)
        self.sizes: list[int] = []
        self.kinds: dict[int, str] = {}
        self.timeline: list[int] = []
        self.phases: dict[str, int] = {}
        self.now = 0
        self._param_ids: set[int] = set()

    def _id(self, t: torch.Tensor) -> int | None:
        entry = self.live.get(StorageWeakRef(t.untyped_storage()))
        return entry[0] if entry is not None else None

    def add(self, t: torch.Tensor, kind: str = "") -> int:
        """Count `t`'s storage (once) and return its allocation id."""
        ref = StorageWeakRef(t.untyped_storage())
        if ref in self.live:
            aid = self.live[ref][0]
        else:
            aid = len(self.sizes)
            nbytes = t.untyped_storage().nbytes()
            self.live[ref] = (aid, nbytes)
            self.sizes.append(nbytes)
            self.births.append(len(self.timeline))
            self.deaths.append(None)
            self.now += nbytes
        if kind:
            self.kinds[aid] = kind
            if kind == "param":
                self._param_ids.add(aid)
        return aid

    def _prune(self) -> None:
        dead = [ref for ref in self.live if ref.expired()]
        for ref in dead:
            aid, nbytes = self.live.pop(ref)
            self.deaths[aid] = len(self.timeline)
            self.now -= nbytes

    def mark(self, phase: str) -> None:
        self._prune()
        self.phases[phase] = len(self.timeline)
        self.timeline.append(self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        self._prune()
        out = func(*args, **(kwargs or {}))
        copy = func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor) \
            and self._id(args[0]) in self._param_ids
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t, "copy" if copy else "")
        self.timeline.append(self.now)
        return out

    def peak(self, start: str, end: str | None = None) -> tuple[int, int]:
        """(peak live bytes, operator index of the peak) between two marks."""
        lo = self.phases[start]
        hi = self.phases[end] if end is not None else len(self.timeline)
        i = max(range(lo, hi), key=self.timeline.__getitem__)
        return self.timeline[i], i

    def ids_of(self, kind: str) -> set[int]:
        return {a for a, k in self.kinds.items() if k == kind}

    def peak_without(self, start: str, end: str, ids: set[int]) -> int:
        """The peak live bytes between two marks not counting the allocations in `ids`."""
        lo, hi = self.phases[start], self.phases[end]
        delta = [0] * (len(self.timeline) + 1)
        for a in ids:
            delta[self.births[a]] += self.sizes[a]
            if self.deaths[a] is not None:
                delta[self.deaths[a]] -= self.sizes[a]
        excluded, best = 0, 0
        for i in range(hi):
            excluded += delta[i]
            if i >= lo:
                best = max(best, self.timeline[i] - excluded)
        return best

    def alive_at(self, index: int, ids: Iterable[int] | None = None, kind: str | None = None) -> int:
        """Bytes of the allocations (all, those in `ids`, or those of `kind`) alive at operator `index`."""
        pool = ids if ids is not None else (a for a, k in self.kinds.items() if k == kind) if kind else \
            range(len(self.sizes))
        total = 0
        for a in pool:
            death = self.deaths[a]
            if self.births[a] <= index and (death is None or death > index):
                total += self.sizes[a]
        return total


@dataclass
class StepTrace:
    """Bytes of one traced training step of one process holding the whole model.

    params/buffers/grads/optimizer: the parameters, buffers, gradients after backward and optimizer
    state after the step. activations: what the forward left alive for the backward beyond the
    parameters (saved tensors, outputs, the input batch, autocast's weight copies). fb_peak: the peak
    during forward + backward, with fb_grads of gradients alive at that moment. fb_sharded: the peak
    during forward + backward of what FSDP does not shard or replace (all but parameters, buffers,
    gradients and autocast's weight copies): the activations and temporaries of an FSDP rank.
    opt_peak: the peak during the optimizer step (its temporaries included).
    """

    batch_size: int
    checkpointing: bool
    precision: str
    params: int
    buffers: int
    grads: int
    optimizer: int
    activations: int
    copies: int
    fb_peak: int
    fb_grads: int
    fb_sharded: int
    opt_peak: int
    num_params: int
    largest_unit: int  # bytes (fp32) of the largest FSDP unit's parameters (a block)
    root: int  # bytes (fp32) of the parameters outside every unit
    traced: str = "fake"  # "fake" (FakeTensorMode) or "real" (real CPU tensors), then ", extrapolated ..." or not


def _train_model(task: Any, cfg: Any, checkpointing: bool) -> nn.Module:
    with torch.device("meta"):  # built without memory or initialisation, never with its datasets
        model = task.build_model(cfg)
    if checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    return model


def example_batch(preprocessing: dict[str, Any], batch_size: int, device: torch.device | str = "cpu"
                  ) -> dict[str, torch.Tensor]:
    """A training batch of the task's preprocessing: the input (``shape``; points inside the unit
    sphere for clouds, normal values otherwise) and each ``extra_inputs`` entry (zeros)."""
    if not preprocessing.get("input") or not preprocessing.get("shape"):
        raise NotImplementedError("the task does not state its input (Task.preprocessing), so its step cannot be "
                                  "traced")
    shape = [batch_size, *preprocessing["shape"]]
    if preprocessing["input"] == "points":
        x = torch.rand(shape, device=device) * 2 - 1
        x = x / x.norm(dim=-1, keepdim=True).amax(dim=1, keepdim=True)
    else:
        x = torch.randn(shape, device=device)
    batch = {preprocessing["input"]: x}
    for name, spec in (preprocessing.get("extra_inputs") or {}).items():
        dtype = getattr(torch, spec.get("dtype", "int64"))
        batch[name] = torch.zeros([batch_size, *spec.get("shape", [])], dtype=dtype, device=device)
    return batch


def step_loss(output: Any) -> torch.Tensor:
    """The loss of a model output; for a classifier given no labels (``loss`` None), the cross-entropy
    of its logits against class 0, which holds the memory the task's own cross-entropy would."""
    if getattr(output, "loss", None) is not None:
        return output.loss
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise NotImplementedError(f"{type(output).__name__} has neither a loss nor logits to train on")
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device))


def _unit_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the largest FSDP unit's parameters, bytes of the parameters in no unit), fp32."""
    units = shard_units(model)
    in_units: set[int] = set()
    largest = 0
    for u in units:
        size = sum(p.numel() * p.element_size() for p in u.parameters())
        largest = max(largest, size)
        in_units.update(id(p) for p in u.parameters())
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_units)
    return largest, root


def run_step(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Any, tracker: LiveMemory
             ) -> torch.optim.Optimizer:
    """One training step of `model` on `batch` under `tracker`, in the trainer's order: forward under
    autocast, backward, the optimizer's step (AdamW's foreach path, as on CUDA)."""
    optimizer = build_optimizer(model, cfg, 1e-4)
    for group in optimizer.param_groups:
        if "foreach" in group:
            group["foreach"] = True
    device = next(model.parameters()).device
    with tracker:
        tracker.mark("forward")
        with autocast(device, cfg.train.precision):
            output = model(batch)
        loss = step_loss(output)
        del output
        tracker.mark("backward")
        loss.backward()
        del loss
        tracker.mark("grads")
        for p in model.parameters():
            if p.grad is not None:
                tracker.add(p.grad)
        tracker.mark("optimizer")
        optimizer.step()
        tracker.mark("end")
    return optimizer


MAX_TRACED_BLOCKS = 8  # a model with more blocks is traced with fewer and extrapolated over its depth

# fields of a StepTrace that grow linearly with the number of blocks
_PER_BLOCK = ("params", "buffers", "grads", "optimizer", "activations", "copies", "fb_peak", "fb_grads", "fb_sharded",
              "opt_peak")


def block_lists(model: nn.Module) -> list[tuple[nn.Module, nn.ModuleList]]:
    """(parent, list) of every ``nn.ModuleList`` attribute named ``blocks`` (the block stacks FSDP shards)."""
    return [(parent, child) for parent in model.modules() for name, child in parent.named_children()
            if name == "blocks" and isinstance(child, nn.ModuleList)]


def trace_step(task: Any, cfg: Any, batch_size: int, *, checkpointing: bool = False,
               max_blocks: int = MAX_TRACED_BLOCKS) -> StepTrace:
    """Trace one training step of `cfg`'s model at `batch_size` (no memory is used).

    A model with more than `max_blocks` transformer blocks is traced with one block per stack, then with one
    stack at two blocks (for each stack), and every byte count is extrapolated linearly over the real depths
    (the blocks of a stack are identical, so each adds the same bytes); the parameter facts come from the full
    model. A model whose forward needs all its blocks (a head reading given block outputs) is traced whole.
    """
    model = _train_model(task, cfg, checkpointing)
    depths = [len(blocks) for _, blocks in block_lists(model)]
    if sum(depths) > max_blocks and min(depths) >= 2:
        try:
            base = _trace(task, cfg, batch_size, checkpointing, [1] * len(depths))
            grown = [_trace(task, cfg, batch_size, checkpointing, [2 if j == i else 1 for j in range(len(depths))])
                     for i in range(len(depths))]
        except (IndexError, KeyError, ValueError, RuntimeError):  # e.g. a head reading blocks the shallow copy lacks
            return _trace(task, cfg, batch_size, checkpointing, None)
        sizes = {k: getattr(base, k) + sum((d - 1) * (getattr(g, k) - getattr(base, k)) for d, g in zip(depths, grown))
                 for k in _PER_BLOCK}
        largest, root = _unit_bytes(model)
        return replace(base, **sizes, num_params=sum(p.numel() for p in model.parameters()), largest_unit=largest,
                       root=root, traced=f"{base.traced}, extrapolated over depths {depths}")
    return _trace(task, cfg, batch_size, checkpointing, None)


def _trace(task: Any, cfg: Any, batch_size: int, checkpointing: bool, depths: list[int] | None) -> StepTrace:
    """One traced step; `depths`: keep that many blocks of each block stack (None: all).

    Under FakeTensorMode first. A step that reads a tensor's value on the host (part segmentation checks its
    category labels), which a fake tensor has none of, is traced with real tensors on the CPU instead: the
    same counting, but it allocates what it counts (kept small by the depth extrapolation).
    """
    for medium in ("fake", "real"):
        model = _train_model(task, cfg, checkpointing)
        if depths is not None:
            for (parent, blocks), d in zip(block_lists(model), depths):
                parent.blocks = nn.ModuleList(list(blocks)[:d])
        largest, root = _unit_bytes(model)
        num_params = sum(p.numel() for p in model.parameters())
        tracker = LiveMemory()
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) if medium == "fake" else contextlib.nullcontext():
                model = model.to_empty(device="cpu").train()
                if medium == "real":  # values a real step computes with (to_empty leaves memory uninitialised)
                    torch.manual_seed(0)
                    for m in model.modules():
                        if hasattr(m, "reset_parameters"):
                            m.reset_parameters()
                batch = example_batch(task.preprocessing(cfg), batch_size)
                optimizer = run_step(_register(tracker, model, batch), batch, cfg, tracker)
                return _summarise(tracker, model, optimizer, cfg, batch_size, checkpointing, num_params, largest,
                                  root, medium)
        except DataDependentOutputException:
            continue
    raise AssertionError("unreachable: a real step can read its values")


def _register(tracker: LiveMemory, model: nn.Module, batch: dict[str, torch.Tensor]) -> nn.Module:
    for p in model.parameters():
        tracker.add(p, "param")
    for b in model.buffers():
        tracker.add(b, "buffer")
    for v in batch.values():
        tracker.add(v, "input")
    return model


def _summarise(tracker: LiveMemory, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, batch_size: int,
               checkpointing: bool, num_params: int, largest: int, root: int, traced: str) -> StepTrace:
    params = tracker.alive_at(tracker.phases["forward"], kind="param")
    buffers = tracker.alive_at(tracker.phases["forward"], kind="buffer")
    grad_ids = [tracker._id(p.grad) for p in model.parameters() if p.grad is not None]
    grad_ids = [a for a in grad_ids if a is not None]
    grads = sum(tracker.sizes[a] for a in set(grad_ids))
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    opt_bytes = sum({StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes() for t in state}.values())
    start = tracker.timeline[tracker.phases["forward"]]
    fb_peak, at = tracker.peak("forward", "grads")
    opt_peak, _ = tracker.peak("optimizer")
    return StepTrace(
        batch_size=batch_size, checkpointing=checkpointing, precision=cfg.train.precision, params=params,
        buffers=buffers, grads=grads, optimizer=opt_bytes,
        activations=tracker.timeline[tracker.phases["backward"]] - start,
        copies=tracker.alive_at(tracker.phases["backward"], kind="copy"),
        fb_peak=fb_peak, fb_grads=tracker.alive_at(at, ids=set(grad_ids)),
        fb_sharded=tracker.peak_without("forward", "grads", set(grad_ids) | tracker.ids_of("copy")) - params - buffers,
        opt_peak=opt_peak, num_params=num_params, largest_unit=largest, root=root, traced=traced)


# --------------------------------------------------------------------------------------------
# Per-GPU estimates
# --------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Bytes per GPU of one strategy at one per-GPU batch. total = max(forward/backward peak,
    optimizer-step peak) + the CUDA context; parts are what is alive at the larger of the two."""

    strategy: str
    gpus: int
    batch_size: int
    checkpointing: bool
    params: int
    grads: int
    optimizer: int
    ema: int
    activations: int  # activations, temporaries and autocast copies at the peak
    comm: int  # DDP gradient buckets, or FSDP's gathered blocks and root
    peak_phase: str
    total: int
    fits: bool


def estimate(trace: StepTrace, strategy: Strategy, gpus: int, *, ema: bool, budget: int,
             reshard_after_forward: bool = True) -> Estimate:
    """The per-GPU bytes of `trace`'s step under `strategy` on `gpus` GPUs (see the module docstring)."""
    t = trace
    ema_bytes = t.params + t.buffers if ema else 0
    context = int(CUDA_CONTEXT_GIB * GIB)
    n = gpus if strategy == "fsdp" else 1
    bucket = t.grads if strategy == "ddp" and gpus > 1 else 0
    # the forward/backward peak of one process, without what a strategy divides or replaces
    # the forward/backward peak without what a strategy divides or replaces (FSDP: its own peak moment)
    fb_other = t.fb_sharded if strategy == "fsdp" else t.fb_peak - t.params - t.buffers - t.fb_grads
    opt_temps = t.opt_peak - t.params - t.buffers - t.grads - t.optimizer
    if strategy == "fsdp":
        low = 2 if amp_dtype(t.precision) is not None else 4
        held = 2 * t.largest_unit if reshard_after_forward else t.params - t.root  # 2 blocks, or all of them
        gathered = (held + t.root) * low // 4 + t.largest_unit  # in the compute dtype; one block's fp32 grads
        fb_grads = math.ceil(t.grads / n)
    else:
        gathered = bucket
        fb_grads = t.fb_grads
    params, grads, opt = math.ceil(t.params / n), math.ceil(t.grads / n), math.ceil(t.optimizer / n)
    fb = params + t.buffers + opt + ema_bytes + fb_grads + fb_other + gathered
    op = params + t.buffers + grads + opt + ema_bytes + math.ceil(opt_temps / n) + bucket
    if fb >= op:
        phase, parts = "backward", (params, fb_grads, opt, fb_other, gathered)
    else:
        phase, parts = "optimizer", (params, grads, opt, math.ceil(opt_temps / n), bucket)
    total = max(fb, op) + context
    return Estimate(strategy=strategy, gpus=gpus, batch_size=t.batch_size, checkpointing=t.checkpointing,
                    params=parts[0], grads=parts[1], optimizer=parts[2], ema=ema_bytes, activations=parts[3],
                    comm=parts[4], peak_phase=phase, total=total, fits=total <= budget)


@dataclass
class Plan:
    """`mm3d plan`'s answer: the traces, an estimate per strategy and checkpointing at the config's batch,
    the largest batch per option and the suggestion."""

    config: str
    task: str
    variant: str
    num_params: int
    precision: str
    gpus: int
    gpu_mem_gib: float
    budget: int
    total_batch: int
    per_sample_activations: dict[str, int]
    estimates: list[Estimate]
    largest_batch: dict[str, int]
    suggestion: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class Planner:
    """Traces a config's step (cached per batch size and checkpointing) and answers per-GPU questions."""

    def __init__(self, task: Any, cfg: Any) -> None:
        self.task, self.cfg = task, cfg
        self.reshard = bool(getattr(cfg.train, "fsdp_reshard_after_forward", True))
        self._traces: dict[tuple[int, bool], StepTrace] = {}

    def trace(self, batch_size: int, checkpointing: bool) -> StepTrace:
        key = (batch_size, checkpointing)
        if key not in self._traces:
            self._traces[key] = trace_step(self.task, self.cfg, batch_size, checkpointing=checkpointing)
        return self._traces[key]

    def linear(self, checkpointing: bool) -> tuple[StepTrace, StepTrace]:
        """Traces at two batch sizes that :meth:`at` interpolates between: 2 (BatchNorm heads cannot train on
        one sample) and the config's (at least 4)."""
        return self.trace(2, checkpointing), self.trace(max(4, self.cfg.train.batch_size), checkpointing)

    def at(self, batch_size: int, checkpointing: bool) -> StepTrace:
        """The step at `batch_size`, linear in the batch from two traces (every part of a step is)."""
        a, b = self.linear(checkpointing)
        if (batch_size, checkpointing) in self._traces:
            return self._traces[(batch_size, checkpointing)]
        w = (batch_size - a.batch_size) / (b.batch_size - a.batch_size)
        mix = {k: round(getattr(a, k) + w * (getattr(b, k) - getattr(a, k)))
               for k in ("activations", "fb_peak", "fb_grads", "fb_sharded", "opt_peak", "copies")}
        return replace(a, batch_size=batch_size, **mix)

    def largest_batch(self, strategy: Strategy, gpus: int, checkpointing: bool, budget: int, *, ema: bool,
                      limit: int = 1 << 16) -> int:
        """The largest per-GPU batch whose estimate fits `budget` (0: not even batch 1)."""
        def fits(b: int) -> bool:
            return estimate(self.at(b, checkpointing), strategy, gpus, ema=ema, budget=budget,
                            reshard_after_forward=self.reshard).fits

        if not fits(1):
            return 0
        lo, hi = 1, 2
        while hi <= limit and fits(hi):
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:  # largest lo that fits, smallest hi that does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def make_plan(cfg: Any, *, config: str, gpus: int, gpu_mem_gib: float, headroom: float = DEFAULT_HEADROOM,
              total_batch: int | None = None) -> Plan:
    """Plan `cfg`'s training on `gpus` GPUs of `gpu_mem_gib` GiB each (see the module docstring)."""
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if not gpu_mem_gib > 0:
        raise UserError(f"--gpu-mem must be > 0 GiB, got {gpu_mem_gib}")
    if not 0 <= headroom < 1:
        raise UserError(f"--headroom must lie in [0, 1), got {headroom}")
    task = TASKS.get(cfg.task)
    if getattr(type(cfg), "trains_nothing", False):
        raise UserError(f"task {cfg.task!r} runs no training step (it fits a probe on frozen features): "
                        f"nothing to plan")
    planner = Planner(task, cfg)
    budget = int(gpu_mem_gib * GIB * (1 - headroom))
    ema = bool(cfg.train.ema)
    total = total_batch or cfg.train.batch_size * cfg.train.accum_steps * gpus
    if total < gpus:
        raise UserError(f"a total batch of {total} gives less than one sample to each of {gpus} GPUs")
    per_sample: dict[str, int] = {}
    estimates: list[Estimate] = []
    largest: dict[str, int] = {}
    strategies: list[Strategy] = ["ddp", "fsdp"] if gpus > 1 else ["ddp"]
    for ckpt in (False, True):
        a, b = planner.linear(ckpt)
        per_sample["checkpointing" if ckpt else "plain"] = round((b.activations - a.activations)
                                                                 / (b.batch_size - a.batch_size))
        for s in strategies:
            estimates.append(estimate(planner.at(cfg.train.batch_size, ckpt), s, gpus, ema=ema, budget=budget,
                                      reshard_after_forward=planner.reshard))
            largest[_option(s, ckpt)] = planner.largest_batch(s, gpus, ckpt, budget, ema=ema)
    notes = ["bf16/fp16 autocast: weights, gradients and AdamW moments stay fp32; autocast adds low-precision "
             "weight copies for the step" if amp_dtype(cfg.train.precision) is not None else
             "fp32: weights, gradients and AdamW moments fp32"]
    first = planner.linear(False)[0]
    how = first.traced
    notes.append(f"traced: {'FakeTensorMode (no memory used)' if how.startswith('fake') else 'real tensors on the CPU'}"
                 + (how[how.index(','):] if ',' in how else ""))
    if ema and gpus > 1:
        notes.append("train.ema keeps a full fp32 copy of the model on every GPU (strategy=fsdp refuses EMA)")
    return Plan(config=config, task=cfg.task, variant=getattr(getattr(cfg, "model", None), "variant", "") or "",
                num_params=first.num_params, precision=cfg.train.precision, gpus=gpus,
                gpu_mem_gib=gpu_mem_gib, budget=budget, total_batch=total, per_sample_activations=per_sample,
                estimates=estimates, largest_batch=largest,
                suggestion=checked_suggestion(planner, largest, total, gpus, ema, budget), notes=notes)


def checked_suggestion(planner: Planner, largest: dict[str, int], total: int, gpus: int, ema: bool, budget: int
                       ) -> dict[str, Any]:
    """:func:`suggest`, with the suggested step traced at its batch (from 2 up); while that trace does not fit,
    the option's largest batch is lowered by one and the suggestion made again."""
    largest = dict(largest)
    while True:
        s = suggest(largest, planner.cfg.train.batch_size, total, gpus, ema)
        if s.get("strategy") is None:
            return s
        strategy = "fsdp" if s["strategy"] == "fsdp" else "ddp"
        b, ckpt = s["batch_size"], s["grad_checkpointing"]
        step = planner.trace(b, ckpt) if b >= 2 else planner.at(b, ckpt)  # (batch 1: BatchNorm heads refuse it)
        e = estimate(step, strategy, gpus, ema=ema, budget=budget, reshard_after_forward=planner.reshard)
        if e.fits:
            return {**s, "traced_total_gib": round(e.total / GIB, 2)}
        largest[_option(strategy, s["grad_checkpointing"])] = s["batch_size"] - 1


def _option(strategy: str, checkpointing: bool) -> str:
    return strategy + ("+checkpointing" if checkpointing else "")


def suggest(largest: dict[str, int], batch_size: int, total: int, gpus: int, ema: bool) -> dict[str, Any]:
    """DDP when a replica fits, else FSDP; activation checkpointing only when the plain step cannot hold
    the config's per-GPU batch (activations dominate) and checkpointing holds more. Then the per-GPU
    batch and accumulation that reach `total` samples per optimizer step."""
    order = ["ddp", "fsdp"] if not (ema and gpus > 1) else ["ddp"]
    for strategy in order:
        plain, ckpt = largest.get(strategy, 0), largest.get(_option(strategy, True), 0)
        if plain == 0 and ckpt == 0:
            continue
        use_ckpt = plain < min(batch_size, math.ceil(total / gpus)) and ckpt > plain
        fit = ckpt if use_ckpt else plain
        accum = math.ceil(total / (gpus * fit))
        per_gpu = math.ceil(total / (gpus * accum))
        why = (f"a full replica fits ({'with' if use_ckpt else 'without'} activation checkpointing)"
               if strategy == "ddp" else f"a replica does not fit; sharded over {gpus} GPUs it does"
               + (" with activation checkpointing" if use_ckpt else ""))
        return {"strategy": strategy if gpus > 1 else "single", "grad_checkpointing": use_ckpt,
                "batch_size": per_gpu, "accum_steps": accum, "total_batch": per_gpu * accum * gpus,
                "largest_batch": fit, "why": why,
                "overrides": [f"train.strategy={strategy}", f"train.batch_size={per_gpu}",
                              f"train.accum_steps={accum}", f"train.grad_checkpointing={str(use_ckpt).lower()}"]}
    return {"strategy": None, "why": "does not fit even at batch 1: not as a replica, not sharded, not with activation "
                                     "checkpointing; use more or larger GPUs, or a smaller model or input"}


# --------------------------------------------------------------------------------------------
# `mm3d plan`
# --------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan) -> str:
    """The table `mm3d plan` prints."""
    lines = [f"config      {plan.config} ({plan.task}{', ' + plan.variant if plan.variant else ''})",
             f"parameters  {plan.num_params:,} ({plan.num_params / 1e6:.1f}M), precision {plan.precision}",
             f"GPUs        {plan.gpus} x {plan.gpu_mem_gib:g} GiB; usable {_gib(plan.budget)} GiB per GPU "
             f"(headroom kept free), CUDA context {CUDA_CONTEXT_GIB:g} GiB counted in each total",
             "activations per sample: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB"
                                                    for k, v in plan.per_sample_activations.items()),
             "",
             f"GiB per GPU at batch {plan.estimates[0].batch_size} per GPU (peak of forward/backward or optimizer "
             f"step):",
             f"  {'strategy':24s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'ema':>6s} {'activ.':>7s} "
             f"{'comm':>6s} {'total':>7s}  fits  largest batch"]
    for e in plan.estimates:
        opt = _option(e.strategy, e.checkpointing)
        lines.append(f"  {opt:24s} {_gib(e.params):>7s} {_gib(e.grads):>7s} {_gib(e.optimizer):>7s} {_gib(e.ema):>6s} "
                     f"{_gib(e.activations):>7s} {_gib(e.comm):>6s} {_gib(e.total):>7s}  "
                     f"{'yes' if e.fits else 'NO ':4s}"
                     f"  {plan.largest_batch[opt] or '-'}")
    s = plan.suggestion
    lines.append("")
    if s.get("strategy") is None:
        lines.append(f"suggestion: {s['why']}")
    else:
        lines.append(f"suggestion: {s['strategy']}{' + activation checkpointing' if s['grad_checkpointing'] else ''}, "
                     f"{s['batch_size']} per GPU x {s['accum_steps']} accumulation x {plan.gpus} GPUs = "
                     f"{s['total_batch']} per step (target {plan.total_batch}): {s['why']}")
        lines.append("  " + " ".join(s["overrides"]))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (configs/...)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the run will use (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory per GPU in GiB (default 80)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help="share of each GPU kept free for allocator fragmentation (default 0.1)")
    p.add_argument("--total-batch", type=int, default=None, metavar="N",
                   help="samples per optimizer step to reach (default: train.batch_size x train.accum_steps x --gpus)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, config=args.config, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, headroom=args.headroom,
                     total_batch=args.total_batch)
    print(json.dumps(asdict(plan), indent=1) if args.json else format_plan(plan))
    return 0


COMMANDS.add("plan", ("Estimate the memory per GPU of a config's training step (parameters, gradients, optimizer, "
                      "activations with and without checkpointing, DDP vs FSDP) and suggest batch, accumulation and "
                      "strategy.", add_arguments, run))
