"""mm3d.video: VideoMAE pretraining, action-recognition fine-tuning and evaluation.

Importing this package registers its model variants, tasks, synthetic-data kinds and checkpoint
converters in the core registries (see :mod:`mm3d.registry`).
"""

from mm3d.video import convert, extract, finetune, models, synth, tasks  # noqa: F401  (registration)
