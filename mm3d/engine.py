"""What every training and evaluation loop shares, once: batches to the device, precision,
one optimizer step, and sample-weighted means over a split.

The trainer, ``mm3d bench`` and the bench peers all step through :class:`OptimizerStep`, so a
timed step is the trained step. Nothing here reads a tensor back to the host per batch: the
optimizer step returns the gradient norm as a device tensor, and :class:`SplitMeans` keeps its
sums on the device until :meth:`SplitMeans.compute` (one reduction and one host read per split).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from mm3d.distributed import all_reduce_sum

# `train.precision` -> the autocast dtype (None: plain fp32)
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (``fp32`` -> None)."""
    try:
        return PRECISION_DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISION_DTYPES)}") from None


def autocast(device: torch.device, precision: str) -> ContextManager[Any]:
    """``torch.autocast`` for `precision` on `device`'s type; a no-op context for fp32."""
    dtype = amp_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Recursively move the tensors of a batch (dict / list / tuple / tensor) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Number of samples in a collated batch (first tensor's leading dimension)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        for v in batch.values():
            n = batch_size_of(v)
            if n:
                return n
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = batch_size_of(v)
            if n:
                return n
    return 0


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)


class OptimizerStep:
    """Backward of (micro-batch) losses, then one optimizer step: GradScaler for fp16 (a no-op
    otherwise), optional gradient-norm clipping, ``zero_grad(set_to_none=True)``.

    `params`: what clipping measures (default: every parameter of the optimizer's groups).
    `double_step`: Point-MAE's part-segmentation script (``segmentation/main.py``) instead steps
    with the raw gradient, clips it, and steps again with the clipped gradient (``optim.double_step``;
    two optimizer updates per batch: AdamW's step count and decoupled weight decay advance twice).
    It is refused with fp16: that script has no GradScaler, and a scaler steps once per update.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, device: torch.device, precision: str,
                 clip_grad: float | None = None, params: Iterable[torch.Tensor] | None = None,
                 double_step: bool = False) -> None:
        self.optimizer = optimizer
        self.clip_grad = clip_grad or None
        self.double_step = bool(double_step)
        self.params = list(params) if params is not None else \
            [p for g in optimizer.param_groups for p in g["params"]]
        fp16 = amp_dtype(precision) is torch.float16
        if self.double_step and fp16:
            raise ValueError("optim.double_step=true with train.precision=fp16: the second step of Point-MAE's "
                             "segmentation script has no fp16 GradScaler counterpart; use fp32 or bf16")
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def backward(self, loss: torch.Tensor, scale: float = 1.0) -> None:
        """loss: () tensor; its gradient (times `scale`, e.g. 1 / accumulation steps) is added."""
        self.scaler.scale(loss * scale if scale != 1.0 else loss).backward()

    def step(self) -> torch.Tensor | None:
        """Apply the accumulated gradients. Returns the pre-clip gradient norm as a () device
        tensor when clipping, else None (no host read here)."""
        if self.double_step:  # the scaler is disabled (no fp16): its step would be a plain step
            self.optimizer.step()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad) if self.clip_grad else None
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm
        grad_norm = None
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
            if isinstance(grad_norm, DTensor):  # FSDP: the norm over every shard, as a plain tensor
                grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


class SplitMeans:
    """Sample-weighted means of per-batch scalars over a split, summed on the device and reduced
    across ranks once, in :meth:`compute`.

    `keys` fixes the metrics (every rank reduces the same vector, even one that saw no batch).
    """

    def __init__(self, keys: Sequence[str], device: torch.device) -> None:
        self.keys = tuple(keys)
        self.sums = torch.zeros(len(self.keys) + 1, dtype=torch.float64, device=device)  # ..., count

    def update(self, n: int, values: dict[str, torch.Tensor]) -> None:
        """n: samples in the batch; values: key -> () tensor, the batch mean of that metric."""
        if set(values) != set(self.keys):
            raise KeyError(f"SplitMeans expects {sorted(self.keys)}, got {sorted(values)}")
        batch = torch.stack([values[k].detach().double().reshape(()) for k in self.keys])
        self.sums[:-1] += batch * n
        self.sums[-1] += n

    def compute(self) -> dict[str, float]:
        total = all_reduce_sum(self.sums).tolist()
        count = max(total[-1], 1.0)
        return {k: v / count for k, v in zip(self.keys, total[:-1])}


@torch.no_grad()
def mean_loss(model: nn.Module, loader: Iterable[Any], device: torch.device) -> dict[str, float]:
    """``{"loss": ...}``: the sample-weighted mean of ``model(batch).loss`` over `loader`."""
    model.eval()
    means = SplitMeans(["loss"], device)
    for batch in loader:
        batch = move_to_device(batch, device)
        means.update(batch_size_of(batch), {"loss": model(batch).loss})
    return means.compute()
