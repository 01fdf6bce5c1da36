"""Process-group setup for single-process, torchrun and SLURM launches.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (and
``TORCHELASTIC_RESTART_COUNT`` when it restarts failed workers: :func:`elastic_restart_count`);
under ``srun`` we read ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` and take the first
host of ``SLURM_JOB_NODELIST`` as the master when ``MASTER_ADDR`` is not given. The backend is
nccl when the process drives a CUDA device and gloo otherwise.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_info() -> DistInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        info = DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_JOB_NODELIST", "localhost")
            try:
                host = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                                      text=True, check=True).stdout.split()[0]
            except (OSError, subprocess.CalledProcessError, IndexError):
                host = nodes.split(",")[0]
            env["MASTER_ADDR"] = host
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
        env.setdefault("RANK", str(info.rank))
        env.setdefault("WORLD_SIZE", str(info.world_size))
        env.setdefault("LOCAL_RANK", str(info.local_rank))
        return info
    return DistInfo()


def elastic_restart_count() -> int:
    """How many times torchrun has restarted this job's workers (``--max-restarts``): 0 for the first
    attempt and outside torchrun (``TORCHELASTIC_RESTART_COUNT``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``auto`` picks ``cuda:<local_rank>`` when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise the default process group if launched with several processes."""
    info = _env_info()
    device = resolve_device(device_name, info)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                device_id=device if device.type == "cuda" else None)
    return info, device


def get_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of a tensor over ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate (N_r, ...) tensors from every rank along dim 0; ranks may differ in N_r."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    max_n = int(max(int(s) for s in sizes))
    padded = torch.zeros((max_n, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's picklable `obj` on every rank (`obj` itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StopVote:
    """Ranks agree, at the same optimizer step, to stop when any one of them asks.

    :meth:`poll` is called by every rank at every step boundary with its own request (a signal
    number, 0 for none). In a single process it returns the request itself: no collective, no
    device. Under DDP each call starts a non-blocking MAX all-reduce of one integer on a gloo
    group of its own (CPU only: the GPU stream never waits for it) and collects the one started at
    the previous boundary, so every rank sees a request one step after the first rank made it, and
    all stop at that same step.
    """

    def __init__(self) -> None:
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")
        self._pending: tuple[torch.Tensor, object] | None = None

    def poll(self, request: int) -> int:
        """The agreed request (0: go on); call on every rank at every step boundary."""
        if self.group is None:
            return request
        agreed = self._collect()
        if agreed:
            return agreed
        buf = torch.tensor([request], dtype=torch.int64)
        self._pending = (buf, dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return 0

    def now(self, request: int) -> int:
        """The agreed request, at once (a blocking all-reduce; for the end of training)."""
        if self.group is None:
            return request
        buf = torch.tensor([max(request, self._collect())], dtype=torch.int64)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        return int(buf[0])

    def _collect(self) -> int:
        if self._pending is None:
            return 0
        buf, work = self._pending
        self._pending = None
        work.wait()
        return int(buf[0])


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
