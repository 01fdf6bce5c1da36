"""Reading and writing point-cloud files.

:func:`read_points` returns an ``(N, C)`` float32 array for every format the datasets meet:

=============  ===========================================================================
extension      columns
=============  ===========================================================================
``.txt``       as in the file, comma or whitespace separated (ModelNet ``x,y,z,nx,ny,nz``,
``.xyz``       ShapeNetPart ``x y z nx ny nz part``); blank lines and ``#`` lines skipped
``.csv``
``.npy``       as stored; must be a 2-D array
``.bin``       raw little-endian float32, ``bin_columns`` values per point (KITTI: 4, the
               ScanNet sample: 6; 4 when not given, see :func:`bin_columns_that_fit`)
``.ply``       read with Open3D: ``x y z`` then ``nx ny nz`` when the file has normals, then
``.pcd``       ``r g b`` in [0, 1] when it has colours (other fields, e.g. curvature, are dropped)
=============  ===========================================================================

The first three columns are always ``x y z``. Bad input raises ``ValueError`` naming the file and
the line (text files) or the point index (binary files): a wrong column count, a value that is
not a number, an empty file, a ``.bin`` size that is no whole number of
points. A missing file raises ``FileNotFoundError``, a folder
``IsADirectoryError``.

Points with a non-finite value (NaN or infinity) are dropped by default, and how many is logged:
NaN is how PCL marks the invalid pixels of an organised scan (a ``.pcd`` with ``HEIGHT`` > 1), and
Open3D drops them the same way. A cloud left with fewer than ``min_points`` points is the error;
``drop_nonfinite=False`` (``data.drop_nonfinite=false``) makes any non-finite value an error
naming the file and line (or point).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".xyz", ".csv")
POINT_EXTENSIONS = (".txt", ".xyz", ".csv", ".npy", ".bin", ".ply", ".pcd")

#: values per point of a raw ``.bin`` file when none is given (KITTI's x y z intensity)
DEFAULT_BIN_COLUMNS = 4
#: the column counts a raw ``.bin`` file is matched against in messages
BIN_COLUMN_CHOICES = range(3, 11)
BIN_COLUMNS_HINT = "set data.bin_columns (--bin-columns for mm3d predict / visualize)"


def read_points(path: str | Path, *, bin_columns: int | None = None, drop_nonfinite: bool = True,
                min_points: int = 1) -> np.ndarray:
    """Read a point-cloud file into an ``(N, C)`` float32 array (see the module docstring).

    Args:
        path: the file; its extension picks the reader.
        bin_columns: values per point in a raw ``.bin`` file (ignored for other formats); None
            reads 4 and warns when the file's size fits other counts too.
        drop_nonfinite: drop points with a NaN or infinite value (logged); False: an error.
        min_points: fewer points than this (after dropping) is an error.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a point-cloud file ({', '.join(POINT_EXTENSIONS)})")
    if not path.is_file():
        raise FileNotFoundError(f"point-cloud file not found: {path}")
    ext = path.suffix.lower()
    finite = dict(drop_nonfinite=drop_nonfinite, min_points=min_points)
    if ext in TEXT_EXTENSIONS:
        return read_text_points(path, **finite)
    if ext == ".npy":
        return _read_npy(path, **finite)
    if ext == ".bin":
        return _read_bin(path, bin_columns, **finite)
    if ext in (".ply", ".pcd"):
        return _read_open3d(path, **finite)
    raise ValueError(f"{path}: unsupported point-cloud extension {ext!r}; "
                     f"supported: {', '.join(POINT_EXTENSIONS)}")


def read_text_points(path: str | Path, *, columns: int | None = None, drop_nonfinite: bool = True,
                     min_points: int = 1) -> np.ndarray:
    """Read a comma- or whitespace-separated text file into an ``(N, C)`` float32 array.

    Args:
        path: the text file.
        columns: the expected column count ``C``; ``None`` takes it from the first data line.
        drop_nonfinite, min_points: as for :func:`read_points`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point-cloud file not found: {path}")
    text = path.read_text()
    first = next(_data_lines(text), None)
    if first is None:
        raise ValueError(f"{path}: empty point-cloud file (no data lines)")
    delimiter = "," if "," in first[1] else None
    try:
        arr = np.loadtxt(io.StringIO(text), dtype=np.float32, delimiter=delimiter,
                         comments="#", ndmin=2)
    except ValueError:
        _raise_text_error(path, text, columns)
        raise  # _raise_text_error found nothing more precise
    if columns is not None and arr.shape[1] != columns:
        raise ValueError(f"{path}, line {first[0]}: {arr.shape[1]} columns, expected {columns}")
    return keep_finite(path, arr, drop=drop_nonfinite, min_points=min_points,
                       where=lambda row: f"line {data_row_line(path, row, text=text)}")


def data_row_line(path: str | Path, row: int, *, text: str | None = None) -> int:
    """The 1-based line number of data row `row` (0-based) of a text file.

    Blank and ``#`` comment lines are not data rows. Used to name the line in error messages.
    """
    text = Path(path).read_text() if text is None else text
    for i, (line_no, _) in enumerate(_data_lines(text)):
        if i == row:
            return line_no
    raise IndexError(f"{path}: no data row {row}")


def _data_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line)`` for the non-blank, non-comment lines of `text`."""
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s and not s.startswith("#"):
            yield i, s


def _raise_text_error(path: Path, text: str, columns: int | None) -> None:
    """Find the first bad line of a text point file and raise a ValueError that names it."""
    expected, first_line = columns, None
    for line_no, line in _data_lines(text):
        tokens = line.replace(",", " ").split()
        if expected is None:
            expected, first_line = len(tokens), line_no
        if len(tokens) != expected:
            why = f"as on line {first_line}" if first_line is not None else "columns argument"
            raise ValueError(f"{path}, line {line_no}: {len(tokens)} columns, expected {expected} "
                             f"({why}): {line[:80]!r}")
        for tok in tokens:
            try:
                float(tok)
            except ValueError:
                raise ValueError(f"{path}, line {line_no}: {tok!r} is not a number") from None


def keep_finite(path: str | Path, arr: np.ndarray, *, drop: bool = True, min_points: int = 1,
                where: Callable[[int], str] = lambda row: f"point {row} (0-based)") -> np.ndarray:
    """The rows of ``(N, C)`` `arr` without a NaN or infinite value.

    drop: drop such rows and log how many; False raises ValueError naming the first one with
        ``where(row)`` (e.g. ``"line 12"``).
    min_points: fewer rows than this left is a ValueError.
    """
    bad = ~np.isfinite(arr).all(axis=1)
    n_bad, total = int(bad.sum()), arr.shape[0]
    if n_bad:
        first = int(np.flatnonzero(bad)[0])
        if not drop:
            raise ValueError(f"{path}, {where(first)}: non-finite value (NaN or inf) in {arr[first].tolist()}; "
                             f"{n_bad} such point(s) in the file (data.drop_nonfinite=true drops them)")
        arr = arr[~bad]
        log.info("%s: dropped %d of %d points with a non-finite value (NaN or inf; the first at %s)",
                 path, n_bad, total, where(first))
    if arr.shape[0] < min_points:
        dropped = f" after dropping {n_bad} with a non-finite value (NaN or inf)" if n_bad else ""
        raise ValueError(f"{path}: {arr.shape[0]} of {total} points left{dropped}; at least {min_points} "
                         f"needed")
    return arr


def _read_npy(path: Path, *, drop_nonfinite: bool = True, min_points: int = 1) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a plain numeric .npy array ({e})") from None
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise ValueError(f"{path}: expected an (N, C>=3) array, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{path}: empty point cloud, shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return keep_finite(path, arr, drop=drop_nonfinite, min_points=min_points,
                       where=lambda row: f"row {row} (0-based)")


def bin_columns_that_fit(size: int) -> list[int]:
    """The column counts of :data:`BIN_COLUMN_CHOICES` (3 to 10) that split `size` bytes of float32
    values into whole points."""
    return [c for c in BIN_COLUMN_CHOICES if size and size % (4 * c) == 0]


def _fits(size: int) -> str:
    fits = bin_columns_that_fit(size)
    return ", ".join(map(str, fits)) if fits else f"none from {BIN_COLUMN_CHOICES[0]} to {BIN_COLUMN_CHOICES[-1]}"


def resolve_bin_columns(path: str | Path, bin_columns: int | None) -> int:
    """The values per point to read the raw ``.bin`` file `path` with.

    A size that is no whole number of points of ``bin_columns`` (4 when None) float32 values is a
    ValueError saying which counts would fit. When none was given and the size fits other counts
    too (a 6-column ScanNet scan often fits 4), a warning names the file and those counts.
    """
    columns = DEFAULT_BIN_COLUMNS if bin_columns is None else int(bin_columns)
    if columns < 3:
        raise ValueError(f"bin_columns must be >= 3 (x, y, z first), got {columns}")
    size = Path(path).stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty point-cloud file")
    if size % (4 * columns):
        given = f"bin_columns={columns}" if bin_columns is not None else f"the default bin_columns={columns}"
        raise ValueError(f"{path}: {size} bytes is no whole number of points of {given} float32 values "
                         f"({4 * columns} bytes each); column counts that fit: {_fits(size)}; {BIN_COLUMNS_HINT}")
    if bin_columns is None and bin_columns_that_fit(size) != [columns]:
        log.warning("%s: no column count was given for this raw .bin file and its size fits %s float32 values "
                    "per point; reading %d (x y z intensity, as KITTI); %s", path, _fits(size), columns,
                    BIN_COLUMNS_HINT)
    return columns


def bin_columns_for(paths: Sequence[str | Path], bin_columns: int | None) -> int:
    """The values per point to read the raw ``.bin`` files among `paths` with: `bin_columns`, else 4
    with one warning (naming the first file) when the sizes of the files all fit other counts too."""
    if bin_columns is not None:
        return int(bin_columns)
    bins = [Path(p) for p in paths if Path(p).suffix.lower() == ".bin"]
    common = set(BIN_COLUMN_CHOICES)
    for p in bins:
        common &= set(bin_columns_that_fit(p.stat().st_size))
    if bins and common - {DEFAULT_BIN_COLUMNS}:
        log.warning("%s%s: no column count was given for these raw .bin files and their sizes fit %s float32 "
                    "values per point; reading %d (x y z intensity, as KITTI); %s", bins[0],
                    f" and {len(bins) - 1} more" if len(bins) > 1 else "", ", ".join(map(str, sorted(common))),
                    DEFAULT_BIN_COLUMNS, BIN_COLUMNS_HINT)
    return DEFAULT_BIN_COLUMNS


def _read_bin(path: Path, bin_columns: int | None, *, drop_nonfinite: bool = True,
              min_points: int = 1) -> np.ndarray:
    columns = resolve_bin_columns(path, bin_columns)
    arr = np.fromfile(path, dtype="<f4").reshape(-1, columns).astype(np.float32)
    return keep_finite(path, arr, drop=drop_nonfinite, min_points=min_points)


def _read_open3d(path: Path, *, drop_nonfinite: bool = True, min_points: int = 1) -> np.ndarray:
    import open3d as o3d  # slow import: only when needed

    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty point-cloud file")
    pcd = o3d.io.read_point_cloud(str(path), remove_nan_points=False,
                                  remove_infinite_points=False)
    xyz = np.asarray(pcd.points, dtype=np.float32)
    if xyz.shape[0] == 0:
        raise ValueError(f"{path}: no points could be read (empty or unreadable "
                         f"{path.suffix} file)")
    cols = [xyz]
    if pcd.has_normals():
        cols.append(np.asarray(pcd.normals, dtype=np.float32))
    if pcd.has_colors():
        cols.append(np.asarray(pcd.colors, dtype=np.float32))
    arr = np.concatenate(cols, axis=1)

    def where(idx: int) -> str:
        line = _pcd_ascii_line(path, idx) if path.suffix.lower() == ".pcd" else None
        return f"line {line}" if line is not None else f"point {idx} (0-based)"

    return keep_finite(path, arr, drop=drop_nonfinite, min_points=min_points, where=where)


def _pcd_ascii_line(path: Path, idx: int) -> int | None:
    """Line number of point `idx` in an ASCII PCD file, or None for a binary one."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip().upper().startswith(b"DATA"):
                return line_no + 1 + idx if b"ascii" in raw.lower() else None
    return None


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray | None = None,
              normals: np.ndarray | None = None) -> Path:
    """Write a binary little-endian PLY file that Open3D, MeshLab and CloudCompare read.

    Args:
        path: the output file (its parent folders are created).
        points: (N, 3) coordinates (array or tensor).
        colors: optional (N, 3) colours, floats in [0, 1] or uint8 in [0, 255].
        normals: optional (N, 3) normals.
    """
    path = Path(path)
    xyz = _as_numpy(points).astype("<f4")
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"write_ply: points must be (N, 3), got shape {xyz.shape}")
    n = xyz.shape[0]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    arrays = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}
    if normals is not None:
        nrm = _as_numpy(normals).astype("<f4")
        if nrm.shape != (n, 3):
            raise ValueError(f"write_ply: normals must be ({n}, 3), got shape {nrm.shape}")
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
        arrays.update(nx=nrm[:, 0], ny=nrm[:, 1], nz=nrm[:, 2])
    if colors is not None:
        rgb = _as_numpy(colors)
        if rgb.shape != (n, 3):
            raise ValueError(f"write_ply: colors must be ({n}, 3), got shape {rgb.shape}")
        if rgb.dtype != np.uint8:
            rgb = np.clip(np.rint(rgb.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
        arrays.update(red=rgb[:, 0], green=rgb[:, 1], blue=rgb[:, 2])
    record = np.empty(n, dtype=fields)
    for name, values in arrays.items():
        record[name] = values
    type_names = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {type_names[t]} {name}" for name, t in fields]
    header.append("end_header")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(record.tobytes())
    return path


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)
