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
