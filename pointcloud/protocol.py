"""The honest protocol of the point-cloud fine-tuning tasks: which split selects the reported
checkpoint, how a run is labelled, and the ``results.md`` table.

``train.select_on`` (the papers' ``select_on_test``) decides which split picks the reported
checkpoint: ``val`` (default) carves a stratified validation split of ``data.val_fraction`` from
train with the fixed ``data.val_seed`` (:func:`~mm3d.pointcloud.splits.stratified_split`;
ShapeNetPart uses its official val list) and reports the test metrics of the checkpoint best on
it; ``test`` reproduces the papers' protocol (train on all of train, select on test) and is
labelled so in ``results.json`` (``selected_on``) and in the ``results.md`` table; ``last`` keeps
the final weights. ``results.md`` (written by each task's ``write_report`` through
:func:`write_results_md`) carries config, seed, protocol, voting and augmentation next to the
metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from mm3d.config import RunConfig
from mm3d.task import EvalResult


def effective_selection(cfg: RunConfig, datasets: Mapping[str, Any]) -> str:
    """The split that selects the reported checkpoint, with the trainer's fall-backs."""
    s = cfg.train.select_on
    if s in ("val", "test") and s not in datasets:
        return "last"
    return s


def protocol_label(cfg: RunConfig, selected_on: str) -> str:
    if cfg.checkpoint:
        return f"given checkpoint ({Path(cfg.checkpoint).name})"
    return {"val": "selected on val (honest)", "test": "selected on test (papers' protocol)",
            "last": "last checkpoint"}[selected_on]


def metric_table(cfg: RunConfig, info: Mapping[str, Any], results: Mapping[str, EvalResult],
                 columns: Sequence[str]) -> str:
    """The results.md table: one row per split, with the run's protocol description."""
    head = ["config", "task", "seed", "protocol", "voting", "augmentation", "split", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split in ("val", "test"):
        if split not in results:
            continue
        m = results[split].metrics
        vals = [f"{m[c]:.4f}" if isinstance(m.get(c), float) else ("–" if c not in m else str(m[c])) for c in columns]
        voting = info.get("voting", "–")
        if isinstance(voting, dict):
            voting = f"{voting['votes']} votes on {'/'.join(voting['splits'])}" if voting["votes"] else "off"
        lines.append("| " + " | ".join([str(info["config"]), str(info["task"]), str(info["seed"]), info["protocol"],
                                         str(voting), str(info.get("augmentation", "–")), split, *vals]) + " |")
    return "\n".join(lines) + "\n"


def write_results_md(run_dir: Path, cfg: RunConfig, info: Mapping[str, Any], results: Mapping[str, EvalResult],
                     columns: Sequence[str], extra: str = "") -> Path:
    path = Path(run_dir) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {cfg.name} ({cfg.task})\n\n" + metric_table(cfg, info, results, columns) + extra)
    return path
