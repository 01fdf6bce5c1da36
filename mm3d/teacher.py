"""Teacher encoders of feature targets, shared by the modalities.

- :class:`FrozenModule` / :func:`frozen_copy`: a copy that never trains: no gradients, always in
  eval mode (``model.train()`` does not reach it), optionally left out of the state dict;
- :func:`load_frozen_teacher`: a frozen encoder loaded from ``model.target.checkpoint``
  (SIGMA / MVD style); its weights are not part of the student's checkpoints (non-persistent,
  reloaded from the file), so a run's checkpoints stay the student's size;
- :class:`MomentumSchedule`, :func:`ema_momentum`, :func:`ema_update_`: the EMA teacher of
  data2vec / the JEPA family: decay ramped linearly from ``momentum`` to ``momentum_end`` over
  ``momentum_steps`` optimizer steps (0: the whole run), then constant; parameters averaged
  with ``torch._foreach_lerp_``, buffers copied (data2vec's EMA copies whatever does not train).
  The EMA teacher is persistent: its weights are in the model's state dict, so resume is exact;
- :func:`teacher_layers`, :func:`layer_average`: data2vec's target, the average of the top-K
  block outputs, each instance-normalised over the tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mm3d.checkpoint import extract_state_dict, load_checkpoint, load_model_weights
from mm3d.config import ConfigError
from mm3d.errors import MissingFileError
from mm3d.targets import TargetConfig

__all__ = ["FrozenModule", "frozen_copy", "load_frozen_teacher", "MomentumSchedule", "ema_momentum",
           "ema_update_", "teacher_layers", "layer_average"]


# --------------------------------------------------------------------------------------------
# Frozen modules
# --------------------------------------------------------------------------------------------


class FrozenModule(nn.Module):
    """`module` frozen: ``requires_grad=False`` everywhere and eval mode that ``train()`` keeps.

    Calling it calls `module`; other methods are reached through ``.module``. With
    ``persistent=False`` its tensors are left out of the owner's ``state_dict()`` and a strict
    ``load_state_dict`` does not ask for them (they come from elsewhere, e.g. a teacher
    checkpoint). Gradients never reach it: its parameters do not require them, and callers run
    it under ``torch.no_grad()``.
    """

    def __init__(self, module: nn.Module, *, persistent: bool = True) -> None:
        super().__init__()
        self.module = module.requires_grad_(False)
        self.persistent = persistent
        self.train(False)
        if not persistent:
            self.register_state_dict_post_hook(_drop_own_keys)
            self.register_load_state_dict_pre_hook(_fill_own_keys)

    def train(self, mode: bool = True) -> "FrozenModule":
        """Stays in eval mode whatever `mode` is (dropout off, BatchNorm statistics fixed)."""
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"persistent={self.persistent}"


def _drop_own_keys(module: FrozenModule, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook of a non-persistent FrozenModule: leave its tensors out."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_own_keys(module: FrozenModule, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook of a non-persistent FrozenModule: a state dict without its tensors keeps the
    current ones (``load_state_dict`` works on a copy of the caller's dict)."""
    for key, value in module.module.state_dict(prefix=prefix + "module.", keep_vars=True).items():
        state_dict.setdefault(key, value.detach())


def frozen_copy(module: nn.Module, *, persistent: bool = True) -> FrozenModule:
    """A deep copy of `module` as a :class:`FrozenModule` (the EMA teacher starts as the student)."""
    return FrozenModule(copy.deepcopy(module), persistent=persistent)


def _encoder_weights(path: str, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The weights under the first of `prefixes` that a checkpoint has, prefix removed."""
    sd = extract_state_dict(load_checkpoint(path))
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            return sub
    raise ConfigError(f"model.target.checkpoint={path}: no weights under any of the prefixes "
                      f"{list(prefixes)}; its keys start {sorted(sd)[:8]}")


def load_frozen_teacher(build_encoder: Callable[[], nn.Module], checkpoint: str, *,
                        load: Callable[[nn.Module, str], list[str]] | None = None,
                        prefixes: Sequence[str] = ("encoder.", "")) -> tuple[FrozenModule, list[str]]:
    """A frozen, non-persistent teacher encoder: ``build_encoder()`` loaded from `checkpoint`.

    load: ``load(encoder, path) -> notes``, the modality's loader (one that also reads converted
    official weights); default: the checkpoint's weights under the first of `prefixes` it has
    (an mm3d pretraining or classification checkpoint keeps its encoder under ``encoder.``),
    loaded strictly. Returns (the teacher, the loader's notes).
    """
    if not checkpoint:
        raise ConfigError("model.target.checkpoint is empty: the teacher target needs the checkpoint of "
                          "the frozen teacher encoder (an mm3d checkpoint or converted official weights)")
    if not Path(checkpoint).is_file():
        raise MissingFileError(f"model.target.checkpoint={checkpoint}: no such file")
    encoder = build_encoder()
    if load is not None:
        notes = load(encoder, checkpoint)
    else:
        notes = load_model_weights(encoder, _encoder_weights(checkpoint, prefixes), strict=True)
    return FrozenModule(encoder, persistent=False), notes


# --------------------------------------------------------------------------------------------
# EMA teacher
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MomentumSchedule:
    """The EMA teacher's decay per optimizer step (data2vec's ``ema_decay`` -> ``ema_end_decay``).

    Linear from `start` at step 0 to `end` at step `steps` (0: the run's total), then `end`.
    """

    start: float = 0.999
    end: float = 0.9999
    steps: int = 0

    @classmethod
    def from_config(cls, tcfg: TargetConfig) -> "MomentumSchedule":
        return cls(tcfg.momentum, tcfg.momentum_end, tcfg.momentum_steps)

    def __call__(self, step: int, total_steps: int) -> float:
        """Decay for the update after optimizer step `step` (0-based) of `total_steps`."""
        ramp = self.steps or total_steps
        if ramp <= 0 or step >= ramp:
            return self.end
        return self.start + (self.end - self.start) * step / ramp


def ema_momentum(step: int, total_steps: int, tcfg: TargetConfig) -> float:
    """``model.target``'s EMA decay at optimizer step `step` (0-based) of `total_steps`."""
    return MomentumSchedule.from_config(tcfg)(step, total_steps)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float, *,
                buffers: Literal["copy", "ema"] = "copy") -> None:
    """In place: ``teacher = decay * teacher + (1 - decay) * student`` for every parameter.

    `teacher` and `student` have the same structure (``teacher`` started as a copy). Parameters
    the student does not train (``requires_grad=False``) are copied, as are the buffers
    (``buffers="copy"``, data2vec); ``buffers="ema"`` averages the floating-point buffers too
    (timm's ModelEmaV3); integer buffers (BatchNorm's counter) are always copied.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    t_bufs, s_bufs = dict(teacher.named_buffers()), dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
        diff = sorted((t_params.keys() ^ s_params.keys()) | (t_bufs.keys() ^ s_bufs.keys()))
        raise ValueError(f"EMA teacher and student differ in structure: {diff[:8]}")
    avg_t, avg_s, copy_t, copy_s = [], [], [], []
    for name, s in s_params.items():
        if s.requires_grad:
            avg_t.append(t_params[name])
            avg_s.append(s)
        else:
            copy_t.append(t_params[name])
            copy_s.append(s)
    for name, s in s_bufs.items():
        if buffers == "ema" and s.is_floating_point():
            avg_t.append(t_bufs[name])
            avg_s.append(s)
        else:
            copy_t.append(t_bufs[name])
            copy_s.append(s)
    if avg_t:
        torch._foreach_lerp_(avg_t, avg_s, 1.0 - decay)
    if copy_t:
        torch._foreach_copy_(copy_t, copy_s)


# --------------------------------------------------------------------------------------------
# Layer targets
# --------------------------------------------------------------------------------------------


def teacher_layers(depth: int, tcfg: TargetConfig) -> tuple[int, ...]:
    """The 0-based indices of the blocks whose outputs form the target: the ``model.target.layers``
    blocks ending at ``model.target.layer`` (-1: the last) of an encoder with `depth` blocks."""
    top = tcfg.layer if tcfg.layer >= 0 else depth + tcfg.layer
    if not 0 <= top < depth:
        raise ConfigError(f"model.target.layer={tcfg.layer} is outside the teacher's {depth} blocks "
                          f"(0..{depth - 1}, or -1..-{depth} from the end)")
    if tcfg.layers > top + 1:
        raise ConfigError(f"model.target.layers={tcfg.layers} blocks ending at block {top} would start before "
                          f"the first block; at most {top + 1}")
    return tuple(range(top + 1 - tcfg.layers, top + 1))


def layer_average(hidden: Sequence[torch.Tensor], tcfg: TargetConfig, norm: nn.Module | None = None
                  ) -> torch.Tensor:
    """data2vec's target: the mean of normalised block outputs, in float32.

    hidden: K block outputs, each (B, L, D) (see :func:`teacher_layers`). Each is normalised by
    `norm` (the encoder's final LayerNorm) when ``model.target.final_norm``, else by an instance
    norm over the L tokens (per sample and channel, no affine; data2vec's
    ``instance_norm_target_layer``) when ``model.target.instance_norm``, else left as is; then
    averaged. Returns (B, L, D).
    """
    if not hidden:
        raise ValueError("layer_average needs at least one block output")
    if tcfg.final_norm:
        if norm is None:
            raise ConfigError("model.target.final_norm=true but this teacher has no final norm to apply")
        ys = [norm(h).float() for h in hidden]
    elif tcfg.instance_norm:
        if hidden[0].shape[1] < 2:
            raise ValueError(f"instance norm over the tokens needs at least 2 tokens, got {hidden[0].shape[1]}")
        ys = [rearrange(F.instance_norm(rearrange(h.float(), "b l d -> b d l")), "b d l -> b l d")
              for h in hidden]
    else:
        ys = [h.float() for h in hidden]
    return sum(ys) / len(ys)
