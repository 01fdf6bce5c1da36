"""What the point-cloud datasets know about their files, for :mod:`mm3d.datacheck`.

:class:`ListedFiles` is the base of every dataset in :mod:`mm3d.pointcloud.datasets`: the readable
files (``paths``), where each is listed (``where``: list file and line), the files left out when
the dataset was built (``dropped``) and those replaced while loading (``failed``).
:func:`file_present` and :func:`read_list_lines` read folders and list files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mm3d.datacheck import BadSample, FailureBudget

MISSING = "listed file does not exist"
READ_ERRORS = (ValueError, OSError)  # what a bad file raises in the readers of mm3d.pointcloud.io


class ListedFiles(Dataset):
    """What every dataset here tells about its files (:mod:`mm3d.datacheck`): ``paths`` and ``where``
    (list file and line) of the readable ones, ``dropped`` (left out when built), ``failed``."""

    paths: list[Path]
    where: list[str]
    dropped: list[BadSample]
    budget: FailureBudget | None = None

    @property
    def failed(self) -> dict[int, str]:
        return self.budget.failed if self.budget is not None else {}

    def sample_source(self, i: int) -> tuple[str, str]:
        return str(self.paths[i]), self.where[i]

    def check_sample(self, i: int) -> dict[str, torch.Tensor]:
        return self[i]  # datasets that read their files when built (and checked them then)


def file_present(folder: Path, name: str, listings: dict[Path, set[str]]) -> bool:
    """Whether ``folder / name`` exists, checked against one cached directory listing per folder
    (cheaper than a stat per file on network file systems)."""
    if folder not in listings:
        listings[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
    return name in listings[folder]


def read_list_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank stripped lines of a list file with their 1-based line numbers."""
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    return [(i, s.strip()) for i, s in enumerate(path.read_text().splitlines(), start=1)
            if s.strip()]
