from pathlib import Path

import pytest

from mm3d.registry import load_modalities
from mm3d.testing import realdata_dir

load_modalities()


@pytest.fixture
def realdata():
    """Path to ../shared/realdata (or $MM3D_REALDATA); skips the test when it is absent."""
    path = realdata_dir()
    if path is None:
        pytest.skip("real-data samples not found (set MM3D_REALDATA or place ../shared/realdata)")
    return path


@pytest.fixture(scope="session")
def mn_root(tmp_path_factory) -> Path:
    """Synthetic ModelNet40 layout (``mm3d data synth modelnet40 --scale tiny``): 10 classes, 4 train +
    2 test shapes each, 1024 points with normals. Shared by the session: tests that change files
    copy it first."""
    from mm3d.pointcloud.synth import synth_modelnet40

    root = tmp_path_factory.mktemp("modelnet") / "mn"
    synth_modelnet40(root, seed=0, scale="tiny")
    return root


@pytest.fixture(scope="session")
def tiny_pointmae_pretrain_ckpt(tmp_path_factory) -> Path:
    """One of our Point-MAE pretraining checkpoints of the tiny test variant (random weights, seed 0)."""
    import torch

    from mm3d.config import to_dict
    from mm3d.pointcloud.models import build_pretrain_model
    from mm3d.pointcloud.tasks import PointPretrainConfig
    from mm3d.registry import variant_config

    torch.manual_seed(0)
    model_cfg = variant_config("pointmae_tiny_test")
    model = build_pretrain_model(model_cfg)
    path = tmp_path_factory.mktemp("ckpt") / "pretrain.pt"
    torch.save({"model": model.state_dict(),
                "config": to_dict(PointPretrainConfig(task="pointmae_pretrain", model=model_cfg))}, path)
    return path
