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
``shards``                    preparers ``shapenet55``, ``modelnet``, ``scanobjectnn``, ``pointfolder``
                              (``mm3d data prepare --kind KIND``)
``api``                       the Point-MAE model family of :func:`mm3d.create_model`
``extract``                   the point-cloud feature extractor of ``mm3d extract``
============================  ================================================================

:func:`load_cloud` reads a point-cloud file as the test protocol does.
"""

from mm3d.pointcloud import (api, classification, convert, extract, fewshot, models, partseg,  # noqa: F401
                             probe, shards, synth, tasks)
from mm3d.pointcloud.api import load_cloud

__all__ = ["load_cloud"]
