"""Bad data: found, all of it, and reported.

Three places meet samples that cannot be read, and all three speak of them the same way, as a
:class:`BadSample` (the file, where it is listed, why it is bad):

- **Loading** (training and evaluation): a dataset skips a bad sample, names it in a warning,
  counts it, and fails once more than ``data.max_failure_ratio`` of its samples are bad
  (:class:`FailureBudget`, :class:`BadDataError`). A dataset that reads files lazily returns
  another sample in place of a bad one (:func:`read_or_replace`); a dataset that reads every file
  when it is built leaves the bad ones out (:meth:`FailureBudget.leave_out`).
- **Checking** (``mm3d data check``): :func:`check_datasets` opens every sample of every split
  directly, with no replacement, and lists every bad one; :func:`check_report` is the JSON
  report.
- **Evaluation**: :func:`unscored_samples` names every sample of a split that an evaluation did
  not score, and :func:`account_missing` counts them beside the metrics and refuses to report a
  test metric with missing samples unless ``eval.allow_missing=true``.

Datasets take part through four optional, duck-typed members (none is required; a dataset
without them is checked by indexing it):

=====================  ========================================================================
``sample_source(i)``   ``(file, line)``: the file of sample ``i`` and where it is listed
``check_sample(i)``    read sample ``i`` directly (no replacement); raise when it is bad
``dropped``            the :class:`BadSample` s left out when the dataset was built
``failed``             ``{index: reason}`` of the samples replaced in this process
=====================  ========================================================================
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from mm3d.errors import UserError
from mm3d.shards import ShardSamples, file_sha256

log = logging.getLogger(__name__)

T = TypeVar("T")

#: at most this many bad samples are spelled out in one error message (all are in the logs/report)
LISTED_IN_ERRORS = 10


class BadDataError(UserError, RuntimeError):
    """More samples could not be read than ``data.max_failure_ratio`` allows; names them."""


class MissingSamplesError(UserError):
    """An evaluation did not score every sample of its test split (see ``eval.allow_missing``)."""


@dataclass(frozen=True)
class BadSample:
    """A sample that could not be read.

    file: the file (or folder of frames) of the sample.
    line: where the sample is listed, e.g. ``"train.txt:4"``, ``"list.json, entry 3"`` or
        ``"cloud 7"`` (of an h5 file); ``""`` for a file found by scanning a folder.
    reason: why it is bad (the reader's message, without the file name it repeats).
    index: its position in the dataset; None for a sample left out when the dataset was built.
    """

    file: str
    line: str = ""
    reason: str = ""
    index: int | None = None

    def __str__(self) -> str:
        where = f"{self.file} ({self.line})" if self.line else self.file
        return f"{where}: {self.reason}" if self.reason else where

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason, "index": self.index}


def bad_sample(file: str | Path, line: str, error: BaseException | str, index: int | None = None) -> BadSample:
    """A :class:`BadSample` from an exception (or message); a leading ``"<file>: "`` or
    ``"<file>, "`` the reader put in its message is dropped, since ``file`` says it."""
    file = str(file)
    reason = str(error) if isinstance(error, str) else _reason(error)
    for prefix in (f"{file}: ", f"{file}, "):
        if reason.startswith(prefix):
            reason = reason[len(prefix):]
    return BadSample(file, line, reason, index)


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, (FileNotFoundError, UserError, ValueError, RuntimeError, OSError)):
        return text
    return f"{type(error).__name__}: {text}"


def listing(bad: Sequence[BadSample], limit: int = LISTED_IN_ERRORS) -> str:
    """``"a (l:1): r; b: r; ... and 3 more"``: the first `limit` samples of `bad`, in one line."""
    shown = "; ".join(str(b) for b in bad[:limit])
    return shown + (f"; ... and {len(bad) - limit} more" if len(bad) > limit else "")


# --------------------------------------------------------------------------------------------
# Loading: skip, count, name, fail past a share
# --------------------------------------------------------------------------------------------


class FailureBudget:
    """The samples of one dataset that could not be read, and the share of them it tolerates.

    Every bad sample is named in a warning and counted; once more than ``max_ratio`` of the
    `total` samples are bad, :class:`BadDataError` names them (0 fails on the first). The count
    is per process: with DataLoader workers each worker counts the samples it met.

    Args:
        total: the number of samples of the dataset.
        max_ratio: the share of bad samples tolerated, in [0, 1].
        noun: what a sample is called in messages (``"videos"``, ``"point-cloud files"``).
        logger: where the warnings go (the dataset module's logger).
    """

    def __init__(self, total: int, max_ratio: float, *, noun: str = "samples",
                 logger: logging.Logger | None = None) -> None:
        if not 0.0 <= max_ratio <= 1.0:
            raise ValueError(f"max_failure_ratio must lie in [0, 1], got {max_ratio}")
        self.total, self.max_ratio, self.noun = int(total), float(max_ratio), noun
        self.log = logger or log
        self.bad: dict[int, BadSample] = {}  # dataset index -> the sample, in the order met

    @property
    def failed(self) -> dict[int, str]:
        """``{index: reason}`` of the samples replaced in this process."""
        return {i: b.reason for i, b in self.bad.items()}

    def record(self, index: int, sample: BadSample) -> None:
        """A sample could not be read and another one is returned in its place."""
        self.bad[index] = sample
        self.log.warning("cannot read %s -- replaced by another sample (%d/%d %s failed in this process)",
                         sample, len(self.bad), self.total, self.noun)
        self._check(list(self.bad.values()), self.total, "last errors", recent=True)

    def leave_out(self, bad: Sequence[BadSample], total: int | None = None) -> None:
        """Samples found bad while the dataset was built, and left out of it."""
        total = self.total if total is None else total
        for b in bad:
            self.log.warning("left out %s", b)
        if bad:
            self.log.warning("%d of %d %s left out as unreadable (data.max_failure_ratio=%g)", len(bad), total,
                             self.noun, self.max_ratio)
        self._check(list(bad), total, "bad")

    def _check(self, bad: list[BadSample], total: int, what: str, recent: bool = False) -> None:
        if len(bad) <= self.max_ratio * total:
            return
        shown = bad[-3:] if recent else bad
        raise BadDataError(f"{len(bad)} of {total} {self.noun} could not be read, more than "
                           f"data.max_failure_ratio={self.max_ratio:g} allows; {what}: {listing(shown)} "
                           f"(`mm3d data check CONFIG` lists every bad sample)")


def read_or_replace(index: int, total: int, read: Callable[[int], T], budget: FailureBudget,
                    describe: Callable[[int], tuple[str, str]],
                    errors: tuple[type[BaseException], ...] = (Exception,)) -> tuple[int, T]:
    """``(i, read(i))`` for the first readable sample from `index` on (wrapping around).

    A sample whose ``read`` raises one of `errors` is recorded in `budget` (which raises past its
    share) and the next one is tried; samples already known bad are skipped without a retry.
    `describe(i)` gives the ``(file, line)`` of sample i for the messages.
    """
    i = int(index)
    for _ in range(total):
        if i not in budget.bad:
            try:
                return i, read(i)
            except errors as e:
                file, line = describe(i)
                budget.record(i, bad_sample(file, line, e, i))
        i = (i + 1) % total
    raise BadDataError(f"no sample of the {total} could be read: {listing(list(budget.bad.values()))}")


# --------------------------------------------------------------------------------------------
# Checking: every sample, directly
# --------------------------------------------------------------------------------------------


def sample_source(dataset: Any, index: int) -> tuple[str, str]:
    """``(file, line)`` of sample `index`: the dataset's own ``sample_source``, else the index."""
    fn = getattr(dataset, "sample_source", None)
    return fn(index) if fn is not None else (f"sample {index}", "")


@dataclass
class SplitCheck:
    """What ``mm3d data check`` found in one split."""

    samples: int  # listed samples, bad ones included
    checked: int  # samples opened (all but those beyond --limit)
    bad: list[BadSample] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples, "checked": self.checked, "errors": len(self.bad),
                               "bad": [b.as_dict() for b in self.bad]}
        if self.note:
            out["note"] = self.note
        return out


def verify_shards(shard_set: Any) -> tuple[list[BadSample], set[int]]:
    """Compare each local shard of a :class:`~mm3d.shards.ShardSet` with its manifest entry.

    Returns the bad shards (missing; size or sha256 unlike the manifest's) and the numbers of the
    missing ones (their samples cannot be opened)."""
    bad, missing = [], set()
    where = Path(shard_set.spec).name if shard_set.spec else "manifest"
    for k, entry in enumerate(shard_set.entries):
        url, reason = entry["url"], ""
        if "://" in url:  # remote shards are checked through their samples only
            continue
        path = Path(url)
        if not path.is_file():
            reason = f"missing shard ({entry.get('nsamples', '?')} samples not checked)"
            missing.add(k)
        elif "filesize" in entry and path.stat().st_size != entry["filesize"]:
            reason = f"{path.stat().st_size} bytes, the manifest says {entry['filesize']}"
        elif "sha256" in entry and file_sha256(path) != entry["sha256"]:
            reason = "sha256 differs from the manifest's (the shard was changed or damaged)"
        if reason:
            bad.append(BadSample(url, f"{where}, shard {k + 1} of {len(shard_set.entries)}", reason))
            log.error("bad shard %s", bad[-1])
    return bad, missing


def check_dataset(dataset: Any, limit: int = 0) -> SplitCheck:
    """Open every sample of `dataset` directly (``check_sample``, else indexing) and collect the bad ones,
    after those it left out when it was built. `limit` > 0 opens at most that many.

    A dataset over prepared shards (``shard_set``) first has its shards compared with the manifest
    (:func:`verify_shards`); the samples of a missing shard are not opened, and a bad sample is
    named by its shard and key unless the dataset has its own ``sample_source``."""
    dropped = list(getattr(dataset, "dropped", []))
    n = len(dataset) if limit <= 0 else min(len(dataset), limit)
    check = getattr(dataset, "check_sample", None) or dataset.__getitem__
    bad = list(dropped)
    shard_set = getattr(dataset, "shard_set", None)
    skip: set[int] = set()
    describe = functools.partial(sample_source, dataset)
    if shard_set is not None:
        shard_bad, missing = verify_shards(shard_set)
        bad += shard_bad
        samples = ShardSamples(shard_set)
        skip = missing
        if getattr(dataset, "sample_source", None) is None:
            def describe(i: int) -> tuple[str, str]:
                url, key = samples.source(i)
                return url, f"key {key}" if key else f"sample {samples.locate(i)[1]} of the shard"
    step = max(n // 10, 1)
    opened = 0
    for i in range(n):
        if skip and samples.locate(i)[0] in skip:
            continue
        opened += 1
        try:
            check(i)
        except Exception as e:  # noqa: BLE001 - every bad sample is listed; the check fails once at the end
            file, line = describe(i)
            bad.append(bad_sample(file, line, e, i))
            log.error("bad sample %s", bad[-1])
        if n >= 1000 and (i + 1) % step == 0:  # progress of a long split, every 10 %
            log.info("  %d / %d checked, %d bad", i + 1, n, len(bad))
    return SplitCheck(len(dataset) + len(dropped), opened + len(dropped), bad)


def tolerant_config(cfg: Any) -> Any:
    """`cfg` with ``data.max_failure_ratio = 1``, where it has that key: datasets that read their files
    when built then leave every bad one out (and list it) instead of failing at the first."""
    data = getattr(cfg, "data", None)
    if data is None or not hasattr(data, "max_failure_ratio"):
        return cfg
    return replace(cfg, data=replace(data, max_failure_ratio=1.0))


def check_datasets(datasets: dict[str, Any], limit: int = 0) -> dict[str, SplitCheck]:
    """:func:`check_dataset` on every split; a split with exactly the samples of an earlier one (a
    folder of scans has no held-out split) is not opened twice."""
    out: dict[str, SplitCheck] = {}
    seen: dict[tuple, str] = {}
    for split, ds in datasets.items():
        shard_set = getattr(ds, "shard_set", None)
        key = (tuple(shard_set.urls) if shard_set is not None else
               tuple(sample_source(ds, i) for i in range(len(ds))) + tuple(getattr(ds, "dropped", [])))
        if key and key in seen:
            out[split] = SplitCheck(len(ds), 0, note=f"the same samples as {seen[key]} (checked there)")
            continue
        seen.setdefault(key, split)
        log.info("checking the %s split: %d samples", split, len(ds) + len(getattr(ds, "dropped", [])))
        out[split] = check_dataset(ds, limit)
    return out


def check_report(checks: dict[str, SplitCheck], **info: Any) -> dict[str, Any]:
    """The JSON report of ``mm3d data check``: `info` (config, task, report path...), ``ok``, the
    total of bad samples, then one entry per split (samples, checked, errors, every bad sample)."""
    errors = sum(len(c.bad) for c in checks.values())
    return {**info, "ok": errors == 0, "errors": errors, **{s: c.as_dict() for s, c in checks.items()}}


def write_check_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Evaluation: every sample not scored is counted and named
# --------------------------------------------------------------------------------------------


def unscored_samples(dataset: Any, scored: Iterable[int]) -> list[BadSample]:
    """The samples of `dataset` an evaluation did not score: those left out when it was built, then
    every index absent from `scored` (a loader replaced it). The reason is the one this process
    recorded, else the error of opening the sample again."""
    out = list(getattr(dataset, "dropped", []))
    seen = {int(i) for i in scored}
    failed = getattr(dataset, "failed", None) or {}
    check = getattr(dataset, "check_sample", None)
    for i in range(len(dataset)):
        if i in seen:
            continue
        file, line = sample_source(dataset, i)
        reason = failed.get(i)
        if reason is None and check is not None:
            try:
                check(i)
                reason = "not scored"
            except Exception as e:  # noqa: BLE001 - the reason is what we report
                reason = bad_sample(file, line, e).reason
        out.append(BadSample(file, line, reason or "not scored", i))
    return out


def account_missing(metrics: dict[str, Any], missing: Sequence[BadSample], split: str, *,
                    allow_missing: bool) -> None:
    """Count (``num_missing``) and name (``missing``) the unscored samples of `split` in `metrics`.

    A ``test`` split with missing samples is refused (:class:`MissingSamplesError`) unless
    `allow_missing`; other splits, and the test split when allowed, are reported with the shortfall
    beside the metrics (and a warning).
    """
    metrics["num_missing"] = float(len(missing))
    if not missing:
        return
    metrics["missing"] = [str(b) for b in missing]
    scored = metrics.get("num_samples")
    of = f" (the metrics cover the other {int(scored)})" if scored is not None else ""
    if split == "test" and not allow_missing:
        raise MissingSamplesError(
            f"{len(missing)} {split} sample(s) could not be scored: {listing(list(missing))}; refusing to report "
            f"a test metric with missing samples: fix or remove them (`mm3d data check CONFIG` lists every bad "
            f"file), or set eval.allow_missing=true to report it on the samples that were scored")
    log.warning("%s: %d sample(s) not scored%s: %s", split, len(missing), of, listing(list(missing)))


def missing_markdown(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """``## Not scored (split)`` sections of results.md, one per split with missing samples."""
    sections = []
    for split in ("val", "test"):
        names = (metrics.get(split) or {}).get("missing") or []
        if names:
            sections.append(f"## Not scored ({split}): {len(names)} sample(s)\n\n"
                            + "\n".join(f"- {n}" for n in names) + "\n")
    return sections
