"""One layout for what a run reports, for every task of both modalities.

::

    <run_dir>/results.json              protocol, selected checkpoint, metrics per split, history, files
    <run_dir>/results.md                the protocol and metrics table (one row per split); for
                                        classification also the per-class accuracy of the test split
    <run_dir>/<split>/predictions.json  classification: one row per sample: its id (file or index),
                                        label, label name, correct, top-k classes with probabilities
    <run_dir>/<split>/per_class.csv     classification: label, class, samples, correct, accuracy
    <run_dir>/<split>/confusion.png     classification: the row-normalised confusion matrix

Tasks call :func:`write_results_md` and, for classification, :func:`write_classification_split`
from their ``write_report``; the trainer writes ``results.json`` with :func:`jsonable`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mm3d.metrics import ClassificationResult, per_class_accuracy, plot_confusion

# the run-description columns of results.md, in order, before the metric columns
INFO_COLUMNS = ("config", "task", "seed", "protocol")


def jsonable(x: Any) -> Any:
    """A JSON-serialisable copy of `x` (tensors and numpy scalars become lists/numbers)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def selection_split(select_on: str, splits: Sequence[str]) -> str:
    """The split whose metric picks the reported checkpoint: `select_on` (``val``/``test``/
    ``last``), falling back to ``last`` when that split does not exist."""
    return select_on if select_on == "last" or select_on in splits else "last"


def protocol_label(selected_on: str, checkpoint: str = "", protocol: str = "honest", reference: str = "") -> str:
    """How the reported weights were chosen, in words, for every results file.

    The words start with the protocol: ``paper (<the official scripts>)`` under ``protocol=paper``,
    ``honest`` for our default, and ``custom`` for a run that selects on test without the paper
    switch (neither the paper's procedure as a whole nor ours).
    """
    how = {"val": "best on val", "test": "best on test", "last": "last checkpoint"}[selected_on]
    if checkpoint:
        how = f"given checkpoint ({Path(checkpoint).name})"
    if protocol == "paper":
        return f"paper ({reference}): {how}" if reference else f"paper: {how}"
    if selected_on == "test" and not checkpoint:
        return f"custom: {how} (protocol=paper runs the paper's procedure as a whole)"
    return f"honest: {how}"


def run_protocol_label(cfg: Any, selected_on: str) -> str:
    """:func:`protocol_label` of a run config (its ``protocol``, ``checkpoint`` and the task's reference)."""
    return protocol_label(selected_on, getattr(cfg, "checkpoint", ""), getattr(cfg, "protocol", "honest"),
                          getattr(type(cfg), "paper_reference", ""))


def published_markdown(cfg: Any, results: Mapping[str, Any]) -> str:
    """A results.md paragraph putting the config's published number (``published.*``) beside this
    run's value of the same metric (``results[split][metric]``, or the mean ± std over seeds), with
    the protocols of both; "" when the config names no published number."""
    pub = getattr(cfg, "published", None)
    if pub is None or pub.value is None:
        return ""
    split, _, metric = pub.metric.partition("/")
    if "mean" in results:  # a multi-seed summary
        key = f"{split}/{metric}"
        ours = (f"{100 * results['mean'][key]:.2f} ± {100 * results['std'][key]:.2f} over {len(results['seeds'])} seeds"
                if key in results["mean"] else "not measured")
    else:
        value = results.get(split, {}).get(metric)
        ours = f"{100 * value:.2f}" if isinstance(value, (int, float)) else "not measured"
    protocol = getattr(cfg, "protocol", "honest")
    pretrain = (f", pretrained by `{pub.pretrain}`" + (f" ({pub.pretrain_epochs} epochs)" if pub.pretrain_epochs else "")
                if pub.pretrain else "")
    note = ("" if protocol == "paper" else
            " The published number follows the paper's protocol; this run's does not (`protocol=paper` runs it).")
    return (f"## Published\n\n| | {pub.metric} | protocol |\n|---|---|---|\n"
            f"| published ({pub.source}{pretrain}) | {pub.value:.2f} | paper |\n"
            f"| this run | {ours} | {protocol} |\n\n" + (note.strip() + "\n" if note else ""))


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def metric_table(info: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]],
                 columns: Sequence[str], extra_info: Sequence[str] = ()) -> str:
    """A Markdown table, one row per split of `metrics` (val, test order): the run's
    `INFO_COLUMNS` and `extra_info` keys of `info`, then the metric `columns` (– where absent)."""
    head = [*INFO_COLUMNS, *extra_info, "split", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split in ("val", "test"):
        if split not in metrics:
            continue
        m = metrics[split]
        row = [_cell(info.get(k)) for k in (*INFO_COLUMNS, *extra_info)] + [split]
        row += [_cell(m.get(c)) for c in columns]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_results_md(run_dir: str | Path, title: str, info: Mapping[str, Any],
                     metrics: Mapping[str, Mapping[str, Any]], columns: Sequence[str], *,
                     extra_info: Sequence[str] = (), sections: Sequence[str] = ()) -> Path:
    """``<run_dir>/results.md``: a title, the metric table, then any further Markdown `sections`."""
    path = Path(run_dir) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f"# {title}", "", metric_table(info, metrics, columns, extra_info), *sections]
    path.write_text("\n".join(body).rstrip() + "\n")
    return path


def per_class_rows(conf: torch.Tensor, names: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per class: label, class, samples, correct, accuracy (None without samples)."""
    acc = per_class_accuracy(conf)
    return [{"label": i, "class": name, "samples": int(conf[i].sum()), "correct": int(conf[i, i]),
             "accuracy": None if torch.isnan(acc[i]) else float(acc[i])} for i, name in enumerate(names)]


def per_class_markdown(conf: torch.Tensor, names: Sequence[str], split: str = "test") -> str:
    """The ``## Per-class accuracy (split)`` section of results.md."""
    rows = [f"| {r['class']} | {r['samples']} | {_cell(r['accuracy'])} |" for r in per_class_rows(conf, names)]
    return (f"## Per-class accuracy ({split})\n\n| class | samples | accuracy |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")


def write_classification_split(run_dir: str | Path, split: str, result: ClassificationResult,
                               names: Sequence[str], *, sample_ids: Sequence[Any] | None = None,
                               title: str = "", topk: int = 5) -> list[Path]:
    """``<run_dir>/<split>/`` predictions.json, per_class.csv and confusion.png of one split.

    `names`: class names (index = label); `sample_ids`: what identifies sample ``i`` of the
    dataset (a file path), indexed by ``result.index`` (default: the index itself). A result
    without scores (``result.probs`` with no rows, e.g. an SVM's hard predictions) writes no
    predictions.json.
    """
    if len(names) != result.confusion.shape[0]:
        raise ValueError(f"{len(names)} class names for a {result.confusion.shape[0]}-class result")
    out = Path(run_dir) / split
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if result.probs.shape[0]:
        k = min(topk, result.probs.shape[1])
        top = result.probs.topk(k, dim=1)
        rows = []
        for i, idx in enumerate(result.index.tolist()):
            label = int(result.labels[i])
            rows.append({"sample": sample_ids[idx] if sample_ids is not None else idx, "index": idx,
                         "label": label, "label_name": names[label], "correct": int(top.indices[i, 0]) == label,
                         "topk": [[names[c], round(float(p), 6)] for c, p in
                                  zip(top.indices[i].tolist(), top.values[i].tolist())]})
        files.append(out / "predictions.json")
        files[-1].write_text("[\n" + ",\n".join(json.dumps(jsonable(r)) for r in rows) + "\n]\n")
    per_class = out / "per_class.csv"
    with per_class.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "class", "samples", "correct", "accuracy"])
        for r in per_class_rows(result.confusion, names):
            w.writerow([r["label"], r["class"], r["samples"], r["correct"],
                        "" if r["accuracy"] is None else f"{r['accuracy']:.4f}"])
    m = result.metrics
    title = title or (f"{split}: top-1 {m.get('top1', 0):.3f}, mean class acc {m.get('mean_class_acc', 0):.3f} "
                      f"({int(result.confusion.sum())} samples)")
    confusion = plot_confusion(result.confusion, names, out / "confusion.png", title=title)
    return [*files, per_class, confusion]
