"""mm3d.pointcloud: Point-MAE pretraining, fine-tuning and evaluation on 3D point clouds.

Importing this package registers its entries in the core registries (see :mod:`mm3d.registry`);
every module that registers something is imported here, and only here, for that purpose:

============================  ================================================================
module                        registers
============================  ================================================================
``models``                    model variants (``pointmae_small``, the tiny test variants)
``tasks``                     task ``pointmae_pretrain``
``classification``            task ``pointmae_classify`` (ModelNet, ScanObjectNN, few-shot)
``probe``                     task ``pointmae_svm`` (linear-SVM probe)
``partseg``                   task ``pointmae_partseg`` (ShapeNetPart part segmentation)
``synth``                     synthetic-data kinds (``mm3d data synth KIND``)
``fewshot``                   data command ``mm3d data fewshot``
``convert``                   checkpoint converter ``pointmae-official``
============================  ================================================================
"""

from mm3d.pointcloud import (classification, convert, fewshot, models, partseg, probe,  # noqa: F401
                             synth, tasks)
