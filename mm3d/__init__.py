"""mm3d: masked modeling for video and 3D point clouds.

The core (this package) holds config, registries, masking, the trainer, checkpoints, distributed
launch, logging, benchmarking and the synthetic-data base. It imports neither modality; the
modalities live in `mm3d.video` and `mm3d.pointcloud` and register themselves when imported
(:func:`mm3d.registry.load_modalities`).
"""

__version__ = "0.1.0"
