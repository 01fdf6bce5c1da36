"""Few-shot ModelNet40: fold files (``mm3d data fewshot``) and the datasets they describe.

The protocol is Point-BERT's (also Point-MAE's): for every (way, shot) in {5, 10} x {10, 20}
there are 10 folds. A fold draws `way` classes at random; from the ModelNet40 *train* split it
takes `shot` shapes per class (the support set, used for fine-tuning) and from the *test* split
20 shapes per class (the query set, scored). Labels are renumbered 0..way-1 in the order the
classes were drawn.

The official splits are pickles of the point arrays (``5way_10shot/0.pkl``). mm3d writes a
safe, reviewable format instead, referring to the shapes of a ModelNet40 root by id:

``<out>/<way>way_<shot>shot/<fold>.json``::

    {"format": "mm3d-fewshot-v1", "way": 5, "shot": 10, "fold": 0, "seed": 0,
     "test_per_class": 20, "classes": ["chair", "lamp", ...],      # label i = classes[i]
     "train": [["chair_0042", 0], ...], "test": [["lamp_0127", 1], ...]}

Fold k of (way, shot) is drawn from ``numpy.random.default_rng([seed, way, shot, k])``, so the
files are reproducible and one (way, shot) can be regenerated alone. :class:`FewShotModelNet`
reads a fold file against a ModelNet40 root (through :class:`~mm3d.pointcloud.datasets.ModelNet`
and its FPS cache) and checks every entry before training starts.

Running all folds: the classification task (``pointmae_classify`` with
``data.dataset: modelnet40_fewshot``) takes the fold from ``data.fold``, or from the run's seed
when ``data.fold`` is -1. A config with ``seeds: [0, 1, ..., 9]`` therefore runs the 10 folds
through the trainer's multi-seed runner, each in ``<run_dir>/seed_<k>`` (= fold k), and reports
mean ± std over the folds in ``results.json`` / ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mm3d.registry import DATA_COMMANDS

log = logging.getLogger(__name__)

FORMAT = "mm3d-fewshot-v1"
WAYS, SHOTS, FOLDS, TEST_PER_CLASS = (5, 10), (10, 20), 10, 20


def fold_path(root: str | Path, way: int, shot: int, fold: int) -> Path:
    return Path(root) / f"{way}way_{shot}shot" / f"{fold}.json"


@dataclass
class ModelNetLists:
    """The class names and split lists of a ModelNet root: ``ids[split]`` = [(shape id, label)]."""

    classes: list[str]
    ids: dict[str, list[tuple[str, int]]]


def read_modelnet_lists(root: str | Path, num_classes: int = 40) -> ModelNetLists:
    """Parse ``modelnet<n>_shape_names.txt`` and the train/test lists (no point files are read).

    A listed shape whose class is not in the names file is an error naming the file and line.
    """
    root = Path(root)
    names_file = root / f"modelnet{num_classes}_shape_names.txt"
    if not names_file.is_file():
        raise FileNotFoundError(f"ModelNet class list not found: {names_file}")
    classes = [s.strip() for s in names_file.read_text().splitlines() if s.strip()]
    index = {c: i for i, c in enumerate(classes)}
    ids: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "test"):
        path = root / f"modelnet{num_classes}_{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"ModelNet split list not found: {path}")
        ids[split] = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            shape = line.strip()
            if not shape:
                continue
            cls = shape.rsplit("_", 1)[0]
            if cls not in index:
                raise ValueError(f"{path}, line {line_no}: shape {shape!r} has class {cls!r}, which is "
                                 f"not in {names_file}")
            ids[split].append((shape, index[cls]))
    return ModelNetLists(classes, ids)


def make_fold(lists: ModelNetLists, way: int, shot: int, fold: int, *, seed: int = 0,
              test_per_class: int = TEST_PER_CLASS) -> dict[str, Any]:
    """One fold as a plain dict (the JSON content; see the module docstring)."""
    by_class: dict[str, list[list[str]]] = {s: [[] for _ in lists.classes] for s in ("train", "test")}
    for split, entries in lists.ids.items():
        for shape, label in entries:
            by_class[split][label].append(shape)
    eligible = [c for c in range(len(lists.classes))
                if len(by_class["train"][c]) >= shot and len(by_class["test"][c]) >= test_per_class]
    if len(eligible) < way:
        raise ValueError(f"{way}-way {shot}-shot needs {way} classes with >= {shot} train and >= "
                         f"{test_per_class} test shapes; only {len(eligible)} of {len(lists.classes)} "
                         f"classes have that many")
    rng = np.random.default_rng([seed, way, shot, fold])
    chosen = [eligible[i] for i in rng.permutation(len(eligible))[:way]]
    train, test = [], []
    for new_label, c in enumerate(chosen):
        pick = rng.permutation(len(by_class["train"][c]))[:shot]
        train += [[by_class["train"][c][i], new_label] for i in sorted(pick)]
        pick = rng.permutation(len(by_class["test"][c]))[:test_per_class]
        test += [[by_class["test"][c][i], new_label] for i in sorted(pick)]
    return {"format": FORMAT, "way": way, "shot": shot, "fold": fold, "seed": seed,
            "test_per_class": test_per_class, "classes": [lists.classes[c] for c in chosen],
            "train": train, "test": test}


def write_fewshot_folds(root: str | Path, out: str | Path, *, ways: Sequence[int] = WAYS,
                        shots: Sequence[int] = SHOTS, folds: int = FOLDS, seed: int = 0,
                        test_per_class: int = TEST_PER_CLASS, num_classes: int = 40) -> list[Path]:
    """Write every fold file of ``ways x shots x folds``; returns the paths written."""
    lists = read_modelnet_lists(root, num_classes)
    written = []
    for way in ways:
        for shot in shots:
            for k in range(folds):
                data = make_fold(lists, way, shot, k, seed=seed, test_per_class=test_per_class)
                path = fold_path(out, way, shot, k)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(data, indent=None) + "\n")
                written.append(path)
    (Path(out) / "README.txt").write_text(
        f"mm3d few-shot folds ({FORMAT}) of {Path(root).resolve()}: ways {list(ways)}, shots "
        f"{list(shots)}, {folds} folds, {test_per_class} test shapes per class, seed {seed}.\n"
        f"Each <way>way_<shot>shot/<fold>.json lists [shape id, label] pairs; label i is classes[i].\n")
    return written


def read_fold(path: str | Path) -> dict[str, Any]:
    """Load and check the structure of a fold file (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"few-shot fold file not found: {path} (write the folds with "
                                f"`mm3d data fewshot --root MODELNET40 --out DIR`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{path}: not an {FORMAT} fold file (format={found!r})")
    for key in ("classes", "train", "test"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing list {key!r}")
    for split in ("train", "test"):
        for k, entry in enumerate(data[split]):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], int)):
                raise ValueError(f"{path}, {split} entry {k}: expected [shape id, label], got {entry!r}")
            if not 0 <= entry[1] < len(data["classes"]):
                raise ValueError(f"{path}, {split} entry {k}: label {entry[1]} is outside the fold's "
                                 f"{len(data['classes'])} classes")
    return data


class FewShotModelNet(Dataset):
    """The `split` (``train`` = support, ``test`` = query) of a fold, read from a ModelNet root.

    Items are those of ``base`` (a :class:`~mm3d.pointcloud.datasets.ModelNet` of the same
    split) with ``label`` renumbered to the fold's labels. Every entry is checked: the shape
    must be in the root's split list and its class must be the fold's class of its label.

    Args:
        base: the ModelNet dataset of `split`.
        fold_file: the fold's JSON file.
        split: ``train`` or ``test``.
    """

    def __init__(self, base: Any, fold_file: str | Path, split: str) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"few-shot split must be 'train' or 'test', got {split!r}")
        data = read_fold(fold_file)
        self.base, self.classes = base, list(data["classes"])
        unknown = [c for c in self.classes if c not in base.classes]
        if unknown:
            raise ValueError(f"{fold_file}: classes {unknown} are not in the ModelNet class list of "
                             f"{base.root} ({len(base.classes)} classes)")
        position = {shape: i for i, shape in enumerate(base.ids)}
        left_out = {Path(b.file).stem: b for b in getattr(base, "dropped", [])}
        indices, labels, self.dropped = [], [], []
        for k, (shape, label) in enumerate(data[split]):
            if shape in left_out:  # unreadable: the base left it out (and named it)
                self.dropped.append(left_out[shape])
                continue
            if shape not in position:
                raise ValueError(f"{fold_file}, {split} entry {k}: shape {shape!r} is not in the {split} "
                                 f"list of {base.root}")
            i = position[shape]
            actual = base.classes[int(base.labels[i])]
            if actual != self.classes[label]:
                raise ValueError(f"{fold_file}, {split} entry {k}: shape {shape!r} is a {actual!r}, but label "
                                 f"{label} is {self.classes[label]!r} in this fold")
            indices.append(i)
            labels.append(label)
        self.indices = indices
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def sample_source(self, i: int) -> tuple[str, str]:
        return self.base.sample_source(self.indices[i])

    def check_sample(self, i: int) -> dict[str, torch.Tensor]:
        return self[i]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.base[self.indices[i]], "label": self.labels[i]}


# ------------------------------------------------------------------------------------------------
# `mm3d data fewshot`
# ------------------------------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="ModelNet40 root (modelnet40_normal_resampled layout)")
    p.add_argument("--out", required=True, help="output folder of the fold files")
    p.add_argument("--ways", type=int, nargs="+", default=list(WAYS))
    p.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    p.add_argument("--folds", type=int, default=FOLDS)
    p.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS, help="query shapes per class (20 officially)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, choices=[10, 40], default=40,
                   help="which modelnet<N>_* list files to read")


def _run(args: argparse.Namespace) -> int:
    paths = write_fewshot_folds(args.root, args.out, ways=args.ways, shots=args.shots, folds=args.folds,
                                seed=args.seed, test_per_class=args.test_per_class, num_classes=args.num_classes)
    print(json.dumps({"out": str(args.out), "files": len(paths), "ways": args.ways, "shots": args.shots,
                      "folds": args.folds, "seed": args.seed}))
    return 0


DATA_COMMANDS.add("fewshot", ("Write few-shot fold files (way x shot x folds) from a ModelNet40 root.",
                              _add_arguments, _run))
