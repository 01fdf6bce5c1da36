"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the trainer.

``train.strategy=fsdp`` shards each transformer block as its own unit, then the root (what is left:
embeddings, norms, heads), so a rank holds 1/world of the parameters, gradients and optimizer state
and all-gathers one block at a time. Which modules are units is the model's to say, without the
trainer knowing its modality: a model may define ``fsdp_units() -> list[nn.Module]``; otherwise
every element of each ``nn.ModuleList`` attribute named ``blocks`` is one (the timm convention that
the video and point models follow for their encoder and decoder stacks).

Precision (``train.precision=bf16``): the blocks all-gather and compute with bf16 copies of their
parameters, and take their inputs in bf16 (``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``, as torchtitan shards its blocks): gradients are reduced and kept in fp32, the
sharded parameters and the optimizer stay fp32. ``torch.autocast`` runs around them as under DDP
(on CUDA it still runs norms and softmax in fp32). The root (stems, final norms, heads, BatchNorm
with its fp32 running statistics) keeps fp32 parameters under autocast, exactly as under DDP, and
the batch is never cast (point coordinates stay fp32 for FPS and KNN). So the residual stream is
bf16 inside the blocks, where DDP's autocast keeps it fp32: losses agree to bf16 precision, not
bit for bit. fp16 (a GradScaler whose skipped steps must agree across shards) and EMA (a second,
unsharded model on every rank) are refused by the config.

Checkpoints stay the single-process format: :func:`full_model_state` and
:func:`full_optimizer_state` gather full tensors on rank 0 (on the CPU) through
``torch.distributed.checkpoint.state_dict`` and write the optimizer state keyed by parameter index,
as ``optimizer.state_dict()`` of an unsharded run; :func:`load_model_state` and
:func:`load_optimizer_state` shard such a file into the running model. So a checkpoint of an FSDP
run loads into DDP, single-process runs and ``mm3d evaluate``, and the other way round.
Every function here is a no-op wrapper around the plain call for a model that is not sharded.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules `model` is sharded by, one FSDP unit each (the root is sharded last, apart).

    ``model.fsdp_units()`` when the model defines it; else every element of every ``nn.ModuleList``
    named ``blocks`` anywhere in the model (outermost lists first, in registration order).
    """
    if hasattr(model, "fsdp_units"):
        units = list(model.fsdp_units())
        for u in units:
            if not isinstance(u, nn.Module):
                raise TypeError(f"{type(model).__name__}.fsdp_units() returned a {type(u).__name__}, not an nn.Module")
        return units
    units: list[nn.Module] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, nn.ModuleList):
            units.extend(module)
    return units


def apply_fsdp(model: nn.Module, *, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> list[nn.Module]:
    """Shard `model` in place over the default process group: each of :func:`shard_units`, then
    the root. Call before building the optimizer (sharding replaces the parameters with DTensors).

    param_dtype: the dtype the units all-gather and compute in (bf16 under ``train.precision=bf16``;
    None: the parameters' own); their gradients are reduced in fp32. The root stays fp32.
    reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3: least
    memory, one more all-gather per unit in the backward); False keeps them to the backward (ZeRO-2).
    Ranks start from rank 0's parameters and buffers (broadcast first, as DDP does): each rank built
    its model from its own seed. Buffers are not sharded; running statistics (BatchNorm) follow
    DDP's rule (:class:`_RunningStatsSync`), so every rank evaluates with the statistics it would
    have under DDP. Returns the units sharded (without the root).
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    stats = _running_stats(model)
    if stats:
        model._mm3d_stats_sync = _RunningStatsSync(model, stats)
    units = shard_units(model)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in units:
        fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root (stems, norms, heads: few parameters, fp32 running statistics beside them) keeps fp32 weights
    # under autocast, as DDP does; torch's default reshard for a root: kept gathered for the backward
    fully_shard(model, mp_policy=MixedPrecisionPolicy(cast_forward_inputs=False))
    return units


def _running_stats(model: nn.Module) -> list[torch.Tensor]:
    """The buffers training changes: running statistics of BatchNorm / InstanceNorm layers."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            for b in m.buffers(recurse=False)]


class _RunningStatsSync:
    """DDP's ``broadcast_buffers`` rule for the running statistics of a sharded model: before a
    training forward that follows a forward with gradient synchronisation (the first forward, and
    the first micro-step of each accumulation group), rank 0's statistics are broadcast to every
    rank. :func:`no_sync` marks the forwards without synchronisation."""

    def __init__(self, model: nn.Module, stats: list[torch.Tensor]) -> None:
        self.stats, self.due, self.paused = stats, True, False
        model.register_forward_pre_hook(self.before)
        model.register_forward_hook(self.after)

    def before(self, model: nn.Module, args: Any) -> None:
        if model.training and self.due:
            with torch.no_grad():
                for b in self.stats:
                    dist.broadcast(b, src=0)

    def after(self, model: nn.Module, args: Any, output: Any) -> None:
        if model.training:
            self.due = torch.is_grad_enabled() and not self.paused


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or the module inside a ``torch.compile`` wrapper) is an FSDP2 module."""
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (micro-steps before the last of an accumulation group).

    FSDP: ``set_requires_gradient_sync(False)`` (unsharded gradients are kept until the last
    micro-step reduce-scatters them); DDP (compiled or not): ``no_sync()``; else nothing.
    """
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, FSDPModule):
        stats_sync = getattr(inner, "_mm3d_stats_sync", None)
        inner.set_requires_gradient_sync(False)
        if stats_sync is not None:
            stats_sync.paused = True
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
            if stats_sync is not None:
                stats_sync.paused = False
    elif hasattr(inner, "no_sync"):
        with inner.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def gathered(model: nn.Module, reshard_after_forward: bool = True) -> Iterator[None]:
    """Full parameters on every rank for the duration: forwards then issue no collective, so ranks
    may run different numbers of them (an evaluation split that does not divide evenly, a report
    drawn on rank 0 only). Enter on every rank (the all-gather is collective); needs the memory
    of the full parameters (as DDP does). A no-op for a model that is not sharded.

    reshard_after_forward: the units' setting to restore on leaving (as given to :func:`apply_fsdp`;
    the root goes back to torch's default for a root, kept gathered after its forward)."""
    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, FSDPModule):
        yield
        return
    modules = [m for m in inner.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(reshard_after_forward and m is not inner, recurse=False)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict (plain tensors). Sharded: collective, the full tensors land on
    rank 0's CPU and other ranks get ``{}``; else ``model.state_dict()``."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=_FULL)
    return model.state_dict()


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load a full state dict (a checkpoint's ``model``) into `model`, sharding it when `model` is
    sharded (every rank passes the full dict; collective)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, FSDPModule):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        model.load_state_dict(state, strict=strict)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's order (the index order of ``optimizer.state_dict()``)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in name_of:
                raise ValueError("the optimizer holds a parameter that is not the model's")
            names.append(name_of[id(p)])
    return names


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as an unsharded run writes it (state keyed by parameter index).
    Sharded: collective, gathered on rank 0's CPU, ``{}`` on the other ranks."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, FSDPModule):
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not by_name:
        return {}
    order = [n for g in by_name["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an index-keyed ``optimizer.state_dict()`` (any strategy's checkpoint) into `optimizer`,
    sharding its tensors when `model` is sharded (every rank passes the full dict; collective)."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, FSDPModule):
        optimizer.load_state_dict(state)
        return
    names = _param_names(model, optimizer)
    n_saved = sum(len(g["params"]) for g in state["param_groups"])
    if n_saved != len(names) or len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {n_saved} parameters in {len(state['param_groups'])} "
                         f"groups, this one {len(names)} in {len(optimizer.param_groups)}")
    by_name = {"state": {names[int(i)]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
