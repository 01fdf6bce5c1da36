"""Dataset views and splits shared by the point-cloud fine-tuning tasks.

:class:`Indexed` wraps a dataset (or a subset of it) so that every item also carries its
position, which DDP evaluation uses to count each sample once; :func:`stratified_split` carves
the fixed validation split of the honest protocol (see :mod:`mm3d.pointcloud.protocol`) from a
training split; :func:`require_root` checks a data folder given in a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mm3d.config import ConfigError
from mm3d.datacheck import BadSample, sample_source


class Indexed(Dataset):
    """A view of `base` (optionally a subset of its items) whose items also carry ``index``: ()
    their position in this view, used to count each sample once when DDP ranks gather results.

    Attributes of the base dataset that the tasks read (``classes``, ``categories``) are copied, and
    a whole view (no `indices`) also copies ``shard_set``, so the trainer samples it shard by shard.
    What the base tells about its files (:mod:`mm3d.datacheck`) is seen through the view:
    ``sample_source(i)``, ``check_sample(i)`` and ``dropped``, the files the base left out when it
    was built (by default those of a whole view; a subset has none unless given).
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None,
                 dropped: Sequence[BadSample] | None = None) -> None:
        self.base = base
        self.indices = list(range(len(base))) if indices is None else [int(i) for i in indices]
        for attr in ("classes", "categories"):
            if hasattr(base, attr):
                setattr(self, attr, list(getattr(base, attr)))
        if indices is None and getattr(base, "shard_set", None) is not None:
            self.shard_set = base.shard_set
        if dropped is None:
            dropped = getattr(base, "dropped", []) if indices is None else []
        self.dropped = list(dropped)

    def __len__(self) -> int:
        return len(self.indices)

    def sample_source(self, i: int) -> tuple[str, str]:
        return sample_source(self.base, self.indices[i])

    def check_sample(self, i: int) -> object:
        check = getattr(self.base, "check_sample", None)
        return check(self.indices[i]) if check is not None else self.base[self.indices[i]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.base[self.indices[i]], "index": torch.tensor(i, dtype=torch.long)}


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(keep, held out) positions: about `fraction` of every class held out, chosen with `seed`.

    Classes with at least two samples give at least one held-out sample; a class with one sample
    stays in `keep`. The result depends only on (labels, fraction, seed).
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2 or fraction <= 0:
            continue
        n = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held += rng.choice(members, size=n, replace=False).tolist()
    held_set = set(held)
    keep = [i for i in range(len(labels)) if i not in held_set]
    return keep, sorted(held)


def require_root(path: str, what: str) -> Path:
    """The folder `path` named by config key `what`; fails when it is empty or not a folder."""
    if not path:
        raise ConfigError(f"{what} is empty: give the dataset folder (e.g. {what}=DIR on the command line)")
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{what}={p} is not a folder" + ("" if p.exists() else " (it does not exist)"))
    return p
