"""The protocols of the point-cloud fine-tuning tasks: which split selects the reported
checkpoint, how a run is labelled, and the ``results.md`` columns.

``protocol: honest`` (the default): ``train.select_on=val`` carves a stratified validation split
of ``data.val_fraction`` from train with the fixed ``data.val_seed``
(:func:`~mm3d.pointcloud.splits.stratified_split`; ShapeNetPart uses its official val list) and
reports the test metrics of the checkpoint best on it; ``last`` keeps the final weights.
``protocol: paper`` applies each task config's ``paper_protocol()`` (Point-MAE's
``tools/runner_finetune.py`` and ``segmentation/main.py``: train on all of train, select on test,
the published voting and per-epoch statistics); ``train.select_on=test`` without it is labelled
``custom``. The label (:func:`mm3d.results.run_protocol_label`) is in ``results.json``
(``protocol_name``, ``protocol.protocol``) and in the ``results.md`` table, which (the common
layout of :mod:`mm3d.results`, written by each task's ``write_report``) carries config, seed,
protocol, voting and augmentation next to the metrics. The README's "Protocols" section lists
every difference between the two.
"""

from __future__ import annotations

from typing import Any, Mapping

# the run-description columns of the point-cloud results.md tables, after config/task/seed/protocol
TABLE_INFO = ("voting", "augmentation")


def table_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """`info` (a task's ``run_info``) with ``voting`` in words, for the results.md table."""
    voting = info.get("voting", "–")
    if isinstance(voting, dict):
        voting = f"{voting['votes']} votes on {'/'.join(voting['splits'])}" if voting["votes"] else "off"
    return {**info, "voting": voting}
