"""The Triton FPS kernel (mm3d.pointcloud.ops.fps_triton) against the PyTorch reference loop.

Without a GPU the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set in a
subprocess because Triton reads it when a kernel is defined); on CUDA it runs for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mm3d.registry import load_modalities

load_modalities()

from mm3d.pointcloud.ops import farthest_point_sample  # noqa: E402
from mm3d.pointcloud.ops.fps import _fps_torch  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton ships with CUDA builds of torch; this install has none")

INTERPRETED = textwrap.dedent("""
    import torch
    from mm3d.registry import load_modalities
    load_modalities()
    from mm3d.pointcloud.ops.fps import _fps_torch, farthest_point_sample
    from mm3d.pointcloud.ops.fps_triton import fps_triton, usable
    g = torch.Generator().manual_seed(0)
    cases = [(3, 100, 10, torch.float32), (2, 1024, 64, torch.float32), (1, 8192, 24, torch.float32),
             (2, 300, 30, torch.float16), (1, 37, 37, torch.float32)]
    for b, n, k, dtype in cases:
        pts = torch.randn(b, n, 3, generator=g).to(dtype)
        first = torch.randint(n, (b,), generator=g)
        assert usable(pts)
        got = fps_triton(pts, k, first)
        want = _fps_torch(pts.float(), k, first)
        assert torch.equal(got, want), (b, n, k, dtype, got, want)
    # fewer distinct points than samples: the reference repeats index 0 once all distances are 0
    pts = torch.zeros(2, 16, 3); pts[:, 5] = 1.0; pts[1, 9] = -2.0
    first = torch.tensor([3, 0])
    assert torch.equal(fps_triton(pts, 5, first), _fps_torch(pts, 5, first))
    # a non-contiguous view (e.g. xyz of an xyz+normal cloud)
    full = torch.randn(2, 500, 6, generator=g)
    xyz = full[..., :3]
    assert torch.equal(fps_triton(xyz, 16, torch.zeros(2, dtype=torch.long)),
                       _fps_torch(xyz.contiguous(), 16, torch.zeros(2, dtype=torch.long)))
    assert torch.equal(farthest_point_sample(xyz, 16, backend="triton"),
                       farthest_point_sample(xyz, 16, backend="torch"))
    print("ok")
""")


def test_triton_kernel_picks_the_references_points_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_asking_for_triton_on_cpu_tensors_is_a_clear_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernel on the CPU")
    with pytest.raises(ValueError, match="Triton FPS kernel needs CUDA"):
        farthest_point_sample(torch.randn(1, 50, 3), 4, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        farthest_point_sample(torch.randn(1, 50, 3), 4, backend="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("b,n,k", [(32, 1024, 64), (8, 8192, 512), (4, 16384, 128)])
def test_triton_kernel_on_cuda_equals_the_reference(b, n, k):
    g = torch.Generator(device="cuda").manual_seed(0)
    pts = torch.randn(b, n, 3, device="cuda", generator=g)
    first = torch.randint(n, (b,), device="cuda", generator=g)
    want = _fps_torch(pts, k, first)
    from mm3d.pointcloud.ops.fps_triton import fps_triton

    assert torch.equal(fps_triton(pts, k, first), want)
    # auto picks the kernel for CUDA clouds (unless pytorch3d is installed): same picks
    assert torch.equal(farthest_point_sample(pts, k), farthest_point_sample(pts, k, backend="torch"))
