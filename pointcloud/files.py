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


def modelnet_classes(root: Path, num_classes: int) -> list[str]:
    """The classes of ``root/modelnet<n>_shape_names.txt`` in file order (label = position); a
    repeated name is an error naming both lines."""
    names_file = root / f"modelnet{num_classes}_shape_names.txt"
    first: dict[str, int] = {}
    for line_no, name in read_list_lines(names_file):
        if name in first:
            raise ValueError(f"{names_file}, line {line_no}: class {name!r} repeats line {first[name]}")
        first[name] = line_no
    return list(first)


def modelnet_shapes(root: Path, num_classes: int, list_file: Path,
                    classes: list[str]) -> list[tuple[int, str, str]]:
    """The shapes of a ModelNet list file (``airplane_0001`` per line) as (line number, shape id,
    class); a shape whose class (the id up to its last ``_``) is not in `classes` is an error naming
    the line and the class list."""
    known = set(classes)
    out = []
    for line_no, shape_id in read_list_lines(list_file):
        cls = shape_id.rsplit("_", 1)[0]
        if "_" not in shape_id or cls not in known:
            raise ValueError(f"{list_file}, line {line_no}: shape {shape_id!r} has class {cls!r}, which is not "
                             f"in {root / f'modelnet{num_classes}_shape_names.txt'} ({len(classes)} classes)")
        out.append((line_no, shape_id, cls))
    return out
