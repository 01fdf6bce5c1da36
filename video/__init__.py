"""mm3d.video: VideoMAE pretraining, action-recognition fine-tuning and evaluation.

Importing this package registers its model variants, tasks, synthetic-data kinds and checkpoint
converters in the core registries (see :mod:`mm3d.registry`), and its model family for
:func:`mm3d.create_model`. :func:`load_clip` reads a video as the evaluation does.
"""

from mm3d.video import api, benchdata, convert, extract, finetune, models, shards, synth, tasks  # noqa: F401  (registration)
from mm3d.video.api import load_clip

__all__ = ["load_clip"]
