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
