"""mm3d: masked modeling for video and 3D point clouds.

The core (this package) holds config, registries, masking, the trainer, checkpoints, distributed
launch, logging, benchmarking and the synthetic-data base. It imports neither modality; the
modalities live in `mm3d.video` and `mm3d.pointcloud` and register themselves when imported
(:func:`mm3d.registry.load_modalities`).

The Python API, :func:`create_model` and :func:`list_models` (:mod:`mm3d.api`), is imported on first
use, so ``import mm3d`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["create_model", "list_models"]


def __getattr__(name: str):
    if name in ("create_model", "list_models"):
        from mm3d import api  # noqa: PLC0415  (lazy: torch and both modalities load on first use)

        return getattr(api, name)
    raise AttributeError(f"module 'mm3d' has no attribute {name!r}")
