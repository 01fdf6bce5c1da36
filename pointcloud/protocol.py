"""The honest protocol of the point-cloud fine-tuning tasks: which split selects the reported
checkpoint, how a run is labelled, and the ``results.md`` columns.

``train.select_on`` (the papers' ``select_on_test``) decides which split picks the reported
checkpoint: ``val`` (default) carves a stratified validation split of ``data.val_fraction`` from
train with the fixed ``data.val_seed`` (:func:`~mm3d.pointcloud.splits.stratified_split`;
ShapeNetPart uses its official val list) and reports the test metrics of the checkpoint best on
it; ``test`` reproduces the papers' protocol (train on all of train, select on test) and is
labelled so in ``results.json`` (``selected_on``) and in the ``results.md`` table; ``last`` keeps
the final weights. ``results.md`` (the common layout of :mod:`mm3d.results`, written by each
task's ``write_report``) carries config, seed, protocol, voting and augmentation next to the
metrics.
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
