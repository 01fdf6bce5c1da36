"""mm3d.pointcloud: Point-MAE pretraining, fine-tuning and evaluation on 3D point clouds.

Importing this package registers its model variants, tasks, synthetic-data kinds and checkpoint
converters in the core registries (see :mod:`mm3d.registry`).
"""

from mm3d.pointcloud import convert, finetune, models, synth, tasks  # noqa: F401  (registration)
