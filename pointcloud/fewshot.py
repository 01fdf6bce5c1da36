"""Few-shot ModelNet40: fold files (``mm3d data fewshot``) and the datasets they describe.

The protocol is Point-BERT's (also Point-MAE's): for every (way, shot) in {5, 10} x {10, 20}
there are 10 folds. A fold draws `way` classes at random; from the ModelNet40 *train* split it
takes `shot` shapes per class (the support set, used for fine-tuning) and from the *test* split
20 shapes per class (the query set, scored). Labels are renumbered 0..way-1 in the order the
classes were drawn.

Two file formats share one layout, ``<root>/<way>way_<shot>shot/<fold>.<json|pkl>``:

* ``.json`` (mm3d's default): a safe, reviewable list of shape ids of a ModelNet40 root::

    {"format": "mm3d-fewshot-v1", "way": 5, "shot": 10, "fold": 0, "seed": 0,
     "test_per_class": 20, "classes": ["chair", "lamp", ...],      # label i = classes[i]
     "train": [["chair_0042", 0], ...], "test": [["lamp_0127", 1], ...]}

  :class:`FewShotModelNet` reads it against a ModelNet40 root (through
  :class:`~mm3d.pointcloud.datasets.ModelNet` and its FPS cache).

* ``.pkl``: the official release (Point-BERT/Point-MAE ``data/ModelNetFewshot``), a pickle of
  ``{"train": [(points, label, key), ...], "test": [...]}`` with ``points`` an (8192, 6) float32
  array ``x y z nx ny nz`` in farthest-point order (a shape of ``modelnet40_<split>_8192pts_fps.dat``),
  ``label`` the class in the fold (0..way-1) and ``key`` the ModelNet40 label (a numpy int).
  :func:`read_pickled_fold` unpickles it with a restricted unpickler (numpy arrays and scalars
  and Python containers only) and only with ``allow_pickle=True``, then checks its structure;
  :class:`PickledFewShot` serves one split of it. ``mm3d data fewshot --format pkl`` writes folds
  in this layout from our ModelNet FPS cache, so folds can be exchanged with the official code.

Fold k of (way, shot) is drawn from ``numpy.random.default_rng([seed, way, shot, k])``, so the
files are reproducible and one (way, shot) can be regenerated alone; a ``.json`` and a ``.pkl``
fold of the same (way, shot, fold, seed) hold the same shapes in the same order.

Running all folds: the classification task (``pointmae_classify`` with
``data.dataset: modelnet40_fewshot``) takes the fold from ``data.fold``, or from the run's seed
when ``data.fold`` is -1, and the file from ``data.fewshot_format`` (:func:`open_fold_split`). A
config with ``seeds: [0, 1, ..., 9]`` therefore runs the 10 folds through the trainer's
multi-seed runner, each in ``<run_dir>/seed_<k>`` (= fold k), and reports mean ± std over the
folds in ``results.json`` / ``results.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mm3d.errors import MissingFileError, UserError
from mm3d.pointcloud.datasets import ModelNet
from mm3d.pointcloud.splits import require_root
from mm3d.pointcloud.transforms import normalize_unit_sphere
from mm3d.registry import DATA_COMMANDS

log = logging.getLogger(__name__)

FORMAT = "mm3d-fewshot-v1"
WAYS, SHOTS, FOLDS, TEST_PER_CLASS = (5, 10), (10, 20), 10, 20
OFFICIAL_POINTS = 8192  # points per shape in the official pickles (the FPS .dat files)
PICKLE_PROTOCOL = 4  # readable by Python >= 3.4 (the official code asks for 3.7)
FoldFormat = Literal["json", "pkl"]


class FoldFileError(UserError, ValueError):
    """A few-shot fold file that cannot be used; the message names the file (and split and entry)."""


def fold_path(root: str | Path, way: int, shot: int, fold: int, fmt: FoldFormat = "json") -> Path:
    """``<root>/<way>way_<shot>shot/<fold>.<fmt>``, the layout of both formats."""
    if fmt not in ("json", "pkl"):
        raise ValueError(f"fold file format must be 'json' or 'pkl', got {fmt!r}")
    return Path(root) / f"{way}way_{shot}shot" / f"{fold}.{fmt}"


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
                        test_per_class: int = TEST_PER_CLASS, num_classes: int = 40,
                        fmt: FoldFormat = "json", cache_points: int = OFFICIAL_POINTS, normals: bool = True,
                        cache_dir: str | Path | None = None) -> list[Path]:
    """Write every fold file of ``ways x shots x folds``; returns the paths written.

    ``fmt="json"`` writes the shape lists; ``fmt="pkl"`` writes the same draws in the official
    pickle layout (:func:`pickled_fold`), the points taken from the root's ModelNet FPS cache of
    `cache_points` points (8192 officially; built on first use, see
    :class:`~mm3d.pointcloud.datasets.ModelNet`), with normals (C = 6, as the release) unless
    `normals` is False (C = 3).
    """
    if fmt not in ("json", "pkl"):
        raise ValueError(f"fold file format must be 'json' or 'pkl', got {fmt!r}")
    lists = read_modelnet_lists(root, num_classes)
    clouds = {split: ModelNet(root, split, num_classes=num_classes, npoints=cache_points, use_normals=normals,
                              cache_points=cache_points, cache_dir=cache_dir)
              for split in ("train", "test")} if fmt == "pkl" else {}
    written = []
    for way in ways:
        for shot in shots:
            for k in range(folds):
                data = make_fold(lists, way, shot, k, seed=seed, test_per_class=test_per_class)
                path = fold_path(out, way, shot, k, fmt)
                path.parent.mkdir(parents=True, exist_ok=True)
                if fmt == "json":
                    path.write_text(json.dumps(data, indent=None) + "\n")
                else:
                    path.write_bytes(dump_fold_pickle(pickled_fold(data, clouds)))
                written.append(path)
    content = ("lists [shape id, label] pairs; label i is classes[i]" if fmt == "json" else
               f"is a pickle of {{'train': [(points, label, key)], 'test': [...]}}: points ({cache_points}, "
               f"{6 if normals else 3}) float32 in farthest-point order, label 0..way-1, key the ModelNet "
               f"label (numpy int32), the layout of the official Point-BERT/Point-MAE folds")
    (Path(out) / "README.txt").write_text(
        f"mm3d few-shot folds ({FORMAT}) of {Path(root).resolve()}: ways {list(ways)}, shots "
        f"{list(shots)}, {folds} folds, {test_per_class} test shapes per class, seed {seed}.\n"
        f"Each <way>way_<shot>shot/<fold>.{fmt} {content}.\n")
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
# Official pickles: a restricted unpickler, the structure check, the dataset
# ------------------------------------------------------------------------------------------------


class _PlainArray(np.ndarray):
    """``numpy.ndarray`` as the restricted unpickler hands it out.

    Official pickles name ``numpy.ndarray`` as the type argument of numpy's ``_reconstruct``
    (arrays come out as this subclass; :func:`read_pickled_fold` converts them to plain arrays).
    A pickle may also call it directly, ``ndarray(shape, dtype, buffer)`` (our writer does, see
    :func:`dump_fold_pickle`); with a dtype holding Python objects that would read object
    pointers from the buffer, so such a call is refused.
    """

    def __new__(cls, shape: Any, dtype: Any = float, buffer: Any = None, offset: int = 0, strides: Any = None,
                order: Any = None) -> np.ndarray:
        if np.dtype(dtype).hasobject:
            raise pickle.UnpicklingError(f"refused numpy.ndarray(...) with dtype {np.dtype(dtype)} (Python objects)")
        return np.ndarray(shape, dtype, buffer, offset, strides, order)


_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's own functions, whatever module numpy keeps them in
_SCALAR = np.float32(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _scalar(dtype: np.dtype, *args: Any) -> Any:
    """numpy's scalar unpickling for numeric dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"refused a numpy scalar of dtype {dtype!r}")
    return _SCALAR(dtype, *args)


#: (module, name) -> object: all that numpy arrays, dtypes and scalars need, under numpy 1.x
#: (``numpy.core``) and 2.x (``numpy._core``) names, whichever numpy reads the file.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _PlainArray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "bytearray"): bytearray,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and scalars and Python containers, nothing else:
    any other global (a function, a class) is refused before it is looked up."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "numpy":  # a scalar type by name (numpy.int32 ...), as our writer stores keys
            kind = getattr(np, name, None)
            if isinstance(kind, type) and issubclass(kind, (np.number, np.bool_)):
                return kind
        raise pickle.UnpicklingError(
            f"{self.path}: refused global {module}.{name}: a few-shot fold pickle may hold only numpy "
            f"arrays, numpy scalars and Python containers (is this an official fold file?)")


def load_fold_pickle(path: str | Path, *, allow_pickle: bool) -> Any:
    """Unpickle `path` with the restricted unpickler (no structure check; see :func:`read_pickled_fold`).

    Reading a pickle is opt-in, as for checkpoints: without `allow_pickle` this raises
    :class:`FoldFileError`. Errors name the file (and a refused global).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"few-shot fold file not found: {path}")
    if not allow_pickle:
        raise FoldFileError(
            f"{path} is a pickle; mm3d reads fold pickles only when asked to: check where the file comes "
            f"from (the official few-shot folds), then set the config key allow_pickle=true (also as a "
            f"command-line override). Only numpy arrays and numpy scalars are unpickled.")
    try:
        with path.open("rb") as f:
            return _NumpyOnlyUnpickler(f, path).load()
    except pickle.UnpicklingError as e:
        message = str(e)
        raise FoldFileError(message if message.startswith(str(path)) else f"{path}: not a readable pickle "
                            f"({message})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise FoldFileError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclass
class PickledFold:
    """A checked official fold: ``splits[split]`` = [(points (N, C) float32, label, key)], and
    ``keys[label]``, the ModelNet label of each of the `way` fold labels."""

    path: Path
    way: int
    keys: list[int]
    splits: dict[str, list[tuple[np.ndarray, int, int]]]


def read_pickled_fold(path: str | Path, *, allow_pickle: bool, way: int | None = None) -> PickledFold:
    """Read and check an official few-shot fold pickle (the module docstring has the layout).

    Checks, with errors naming the file, the split and the entry index: a dict with ``train``
    and ``test`` lists of (points, label, key) triples; points an (N, C) float array with
    N >= 1, C >= 3 and finite values; label an integer in 0..way-1 (`way`, or one more than the
    largest label when it is None), key a non-negative integer; one key per label and one label
    per key over both splits; every label present.
    """
    path = Path(path)
    data = load_fold_pickle(path, allow_pickle=allow_pickle)
    if not isinstance(data, dict) or not all(isinstance(data.get(s), (list, tuple)) for s in ("train", "test")):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise FoldFileError(f"{path}: expected a dict with 'train' and 'test' lists of (points, label, key), "
                            f"got {found}")
    splits: dict[str, list[tuple[np.ndarray, int, int]]] = {}
    key_of_label: dict[int, tuple[int, str]] = {}  # label -> (key, where first seen)
    label_of_key: dict[int, tuple[int, str]] = {}  # key -> (label, where first seen)
    for split in ("train", "test"):
        if not data[split]:
            raise FoldFileError(f"{path}: the {split} split has no entries")
        splits[split] = []
        for k, entry in enumerate(data[split]):
            where = f"{split} entry {k}"
            if not (isinstance(entry, (tuple, list)) and len(entry) == 3):
                raise FoldFileError(f"{path}, {where}: expected a (points, label, key) triple, got "
                                    f"{type(entry).__name__}" + (f" of {len(entry)}" if isinstance(entry, (tuple, list))
                                                                 else ""))
            points, label, key = entry
            if not (isinstance(points, np.ndarray) and points.ndim == 2 and points.shape[0] >= 1
                    and points.shape[1] >= 3 and points.dtype.kind == "f"):
                desc = (f"a {points.dtype} array of shape {points.shape}" if isinstance(points, np.ndarray)
                        else type(points).__name__)
                raise FoldFileError(f"{path}, {where}: points must be an (N, C >= 3) float array, got {desc}")
            if not np.isfinite(points).all():
                raise FoldFileError(f"{path}, {where}: points hold NaN or inf")
            if not _is_int(label) or not 0 <= label < (way if way is not None else label + 1):
                raise FoldFileError(f"{path}, {where}: label {label!r} is not an integer in 0.."
                                    f"{'way-1' if way is None else way - 1}")
            if not _is_int(key) or key < 0:
                raise FoldFileError(f"{path}, {where}: key {key!r} is not a ModelNet label (an integer >= 0)")
            label, key = int(label), int(key)
            seen_key, first = key_of_label.setdefault(label, (key, where))
            if seen_key != key:
                raise FoldFileError(f"{path}, {where}: label {label} has key {key} here but key {seen_key} at {first}")
            seen_label, first = label_of_key.setdefault(key, (label, where))
            if seen_label != label:
                raise FoldFileError(f"{path}, {where}: key {key} has label {label} here but label {seen_label} "
                                    f"at {first}")
            splits[split].append((np.asarray(points, dtype=np.float32), label, key))
    n = way if way is not None else max(key_of_label) + 1
    absent = [c for c in range(n) if c not in key_of_label]
    if absent:
        raise FoldFileError(f"{path}: labels {absent} of the {n}-way fold have no entry")
    return PickledFold(path, n, [key_of_label[c][0] for c in range(n)], splits)


def read_shape_names(path: str | Path) -> list[str]:
    """The class names of a ``modelnet40_shape_names.txt`` (label = 0-based line of the names)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ModelNet class list not found: {path}")
    return [s.strip() for s in path.read_text().splitlines() if s.strip()]


def fold_class_names(fold: PickledFold, shape_names: str | Path | None = None) -> list[str]:
    """Names of the fold's labels: ``names[key]`` from a ModelNet40 names file, else ``class_<key>``."""
    if shape_names is None:
        return [f"class_{key}" for key in fold.keys]
    names = read_shape_names(shape_names)
    beyond = [key for key in fold.keys if key >= len(names)]
    if beyond:
        raise FoldFileError(f"{fold.path}: keys {beyond} are not ModelNet labels of {shape_names} "
                            f"({len(names)} classes)")
    return [names[key] for key in fold.keys]


class PickledFewShot(Dataset):
    """One split (``train`` = support, ``test`` = query) of an official few-shot fold pickle.

    Items are ``points`` (npoints, 3) float32 and ``label`` () long: the stored cloud's x y z
    (normals dropped), centred and scaled to the unit sphere over all N stored points as the
    official loader does, then its first `npoints` points, which are a farthest-point sample
    because the clouds are stored in FPS order. (The official loader also shuffles the points of
    training items; mm3d draws training subsets on the device instead.) Every entry is checked
    when the dataset is built (:func:`read_pickled_fold`).

    Args:
        path: the fold's ``.pkl``.
        split: ``train`` or ``test``.
        npoints: points per item, at most the points stored per shape.
        allow_pickle: must be True to read the file (see :func:`load_fold_pickle`).
        way: the fold's classes (checked), or None to infer them from the labels.
        shape_names: a ModelNet40 ``modelnet40_shape_names.txt`` naming the classes, or None
            for ``class_<key>``.
    """

    def __init__(self, path: str | Path, split: str, *, npoints: int, allow_pickle: bool, way: int | None = None,
                 shape_names: str | Path | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"few-shot split must be 'train' or 'test', got {split!r}")
        if npoints < 1:
            raise ValueError(f"npoints must be >= 1, got {npoints}")
        fold = read_pickled_fold(path, allow_pickle=allow_pickle, way=way)
        self.path, self.split, self.npoints = Path(path), split, int(npoints)
        self.classes = fold_class_names(fold, shape_names)
        entries = fold.splits[split]
        short = next((k for k, (p, _, _) in enumerate(entries) if p.shape[0] < npoints), None)
        if short is not None:
            raise FoldFileError(f"{self.path}, {split} entry {short}: {entries[short][0].shape[0]} points, fewer "
                                f"than the {npoints} asked for")
        points = torch.empty(len(entries), npoints, 3)
        sizes = np.array([p.shape[0] for p, _, _ in entries])
        for n in np.unique(sizes):  # clouds of one size are normalised together (the release: all 8192)
            members = np.flatnonzero(sizes == n)
            clouds = torch.from_numpy(np.stack([entries[k][0][:, :3] for k in members]))
            points[torch.from_numpy(members)] = normalize_unit_sphere(clouds)[:, :npoints]
        self.points = points  # (M, npoints, 3)
        self.labels = torch.tensor([label for _, label, _ in entries], dtype=torch.long)  # (M,)
        self.keys = torch.tensor([key for _, _, key in entries], dtype=torch.long)  # (M,) ModelNet labels

    def __len__(self) -> int:
        return len(self.labels)

    def sample_source(self, i: int) -> tuple[str, str]:
        return str(self.path), f"{self.split} entry {i}"

    def check_sample(self, i: int) -> dict[str, torch.Tensor]:
        return self[i]  # every entry was checked when the dataset was built

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"points": self.points[i], "label": self.labels[i]}


# ------------------------------------------------------------------------------------------------
# Official pickles: writing
# ------------------------------------------------------------------------------------------------


OfficialEntries = dict[str, list[tuple[np.ndarray, int, np.int32]]]


def pickled_fold(fold: dict[str, Any], clouds: dict[str, ModelNet]) -> OfficialEntries:
    """A fold (:func:`make_fold`) as the official pickle holds it: ``{split: [(points, label, key)]}``.

    points: (cache_points, C) float32 copies of the shapes' FPS-cache points (C = 6 with
    normals), in the fold's order; label: the fold label (int); key: the ModelNet label of the
    shape, a numpy int32. `clouds` holds the ModelNet dataset of each split.
    """
    out: OfficialEntries = {}
    for split in ("train", "test"):
        ds = clouds[split]
        position = {shape: i for i, shape in enumerate(ds.ids)}
        out[split] = []
        for shape, label in fold[split]:
            i = position[shape]  # the dataset was built without leaving files out
            key = int(ds.labels[i])
            assert ds.classes[key] == fold["classes"][label], (shape, label, key)
            out[split].append((np.array(ds.points[i], dtype=np.float32), int(label), np.int32(key)))
    return out


class _PortablePickler(pickle.Pickler):
    """Writes numpy arrays and scalars through public names only (``numpy.ndarray`` on a
    ``bytearray``, ``numpy.int32``...), never numpy's internal modules, whose names changed
    from ``numpy.core`` (1.x, the official environment) to ``numpy._core`` (2.x): any numpy
    loads the file with a plain ``pickle.load``, and the arrays it gets are writable."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and not obj.dtype.hasobject:
            arr = np.ascontiguousarray(obj)
            return np.ndarray, (arr.shape, arr.dtype.str, bytearray(arr.tobytes()))
        if isinstance(obj, (np.number, np.bool_)):
            return type(obj), (obj.item(),)
        return NotImplemented


def dump_fold_pickle(data: Any) -> bytes:
    """`data` (a fold of :func:`pickled_fold`) as pickle bytes, protocol 4 (see :class:`_PortablePickler`)."""
    buf = io.BytesIO()
    _PortablePickler(buf, protocol=PICKLE_PROTOCOL).dump(data)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# The fold of a classification config
# ------------------------------------------------------------------------------------------------


def find_fold_file(root: str | Path, way: int, shot: int, fold: int,
                   fmt: Literal["auto", "json", "pkl"] = "auto") -> Path | None:
    """The fold file to read: ``<fold>.<fmt>``, or with ``auto`` the ``.json`` when present, else
    the ``.pkl``; None when it does not exist."""
    if fmt not in ("auto", "json", "pkl"):
        raise ValueError(f"data.fewshot_format must be 'auto', 'json' or 'pkl', got {fmt!r}")
    for kind in (("json", "pkl") if fmt == "auto" else (fmt,)):
        path = fold_path(root, way, shot, fold, kind)
        if path.is_file():
            return path
    return None


def _require_fold_file(d: Any, fold: int) -> Path:
    root = require_root(d.fewshot_root, "data.fewshot_root")
    path = find_fold_file(root, d.way, d.shot, fold, d.fewshot_format)
    if path is None:
        kinds = ("json", "pkl") if d.fewshot_format == "auto" else (d.fewshot_format,)
        tried = " and ".join(str(fold_path(root, d.way, d.shot, fold, k)) for k in kinds)
        raise MissingFileError(
            f"few-shot fold {fold} of {d.way}-way {d.shot}-shot not found: no {tried} "
            f"(data.fewshot_format={d.fewshot_format}); write the folds with `mm3d data fewshot --root "
            f"MODELNET40 --out {root}` (add --format pkl for the official layout), or put the official "
            f"<way>way_<shot>shot/<fold>.pkl folders there")
    return path


def _shape_names_of(d: Any) -> Path | None:
    """``<data.root>/modelnet40_shape_names.txt`` when data.root is set and has it (pickled folds)."""
    if not d.root:
        return None
    names = Path(d.root) / "modelnet40_shape_names.txt"
    if names.is_file():
        return names
    log.warning("%s does not exist: the classes of the pickled few-shot fold are named class_<ModelNet label>",
                names)
    return None


def open_fold_split(d: Any, split: str, fold: int, *, allow_pickle: bool, npoints: int,
                    modelnet: Callable[[str], Any] | None) -> Dataset:
    """The `split` of few-shot fold `fold` of a classification data config `d` (``ClsDataConfig``).

    The file is chosen by ``d.fewshot_format`` under ``d.fewshot_root`` (:func:`find_fold_file`;
    missing: :class:`~mm3d.errors.MissingFileError` naming the paths tried). A ``.json`` fold is
    read against ``modelnet(split)``, a ModelNet40 dataset of that split (:class:`FewShotModelNet`);
    a ``.pkl`` fold is read with :class:`PickledFewShot` (`npoints` points per item, needs
    `allow_pickle`), its class names from ``d.root`` when that ModelNet40 root is given.
    """
    path = _require_fold_file(d, fold)
    if path.suffix == ".json":
        if modelnet is None:
            raise FoldFileError(f"{path} lists shapes of a ModelNet40 root: set data.root")
        return FewShotModelNet(modelnet(split), path, split)
    return PickledFewShot(path, split, npoints=npoints, allow_pickle=allow_pickle, way=d.way,
                          shape_names=_shape_names_of(d))


def fold_classes(d: Any, fold: int, *, allow_pickle: bool) -> list[str] | None:
    """Class names of few-shot fold `fold` of `d` in label order, or None when its file is absent
    (a pickled fold still needs `allow_pickle`)."""
    if not d.fewshot_root:
        return None
    path = find_fold_file(d.fewshot_root, d.way, d.shot, fold, d.fewshot_format)
    if path is None:
        return None
    if path.suffix == ".json":
        return list(read_fold(path)["classes"])
    return fold_class_names(read_pickled_fold(path, allow_pickle=allow_pickle, way=d.way), _shape_names_of(d))


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
    p.add_argument("--format", choices=["json", "pkl"], default="json",
                   help="json: shape-id lists (safe, reviewable); pkl: the official pickle layout with the points "
                        "(exchangeable with Point-BERT/Point-MAE few-shot folds)")
    p.add_argument("--cache-points", type=int, default=OFFICIAL_POINTS,
                   help="pkl: FPS points stored per shape (8192 officially)")
    p.add_argument("--no-normals", action="store_true", help="pkl: store x y z only (the release stores normals too)")


def _run(args: argparse.Namespace) -> int:
    paths = write_fewshot_folds(args.root, args.out, ways=args.ways, shots=args.shots, folds=args.folds,
                                seed=args.seed, test_per_class=args.test_per_class, num_classes=args.num_classes,
                                fmt=args.format, cache_points=args.cache_points, normals=not args.no_normals)
    print(json.dumps({"out": str(args.out), "files": len(paths), "format": args.format, "ways": args.ways,
                      "shots": args.shots, "folds": args.folds, "seed": args.seed}))
    return 0


DATA_COMMANDS.add("fewshot", ("Write few-shot fold files (way x shot x folds) from a ModelNet40 root.",
                              _add_arguments, _run))
