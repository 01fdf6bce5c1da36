"""Pure-PyTorch point-cloud ops (one op per file): FPS, KNN, Chamfer, three-NN interpolation.

Each op runs on CPU and GPU as plain PyTorch; with ``backend="auto"`` the neighbour search is
handed to pytorch3d's kernels when pytorch3d is importable (:func:`pytorch3d_available`).
"""

from mm3d.pointcloud.ops._backend import pytorch3d_available
from mm3d.pointcloud.ops.chamfer import chamfer_distance
from mm3d.pointcloud.ops.fps import farthest_point_sample
from mm3d.pointcloud.ops.gather import gather_points
from mm3d.pointcloud.ops.interpolate import three_nn_interpolate
from mm3d.pointcloud.ops.knn import KNNResult, knn

__all__ = [
    "KNNResult",
    "chamfer_distance",
    "farthest_point_sample",
    "gather_points",
    "knn",
    "pytorch3d_available",
    "three_nn_interpolate",
]
