"""mm3d.layers.sdpa / SDPAAttention: torch's attention, in fp32 only where the CPU's bf16 backward is
the slower kernel (short sequences that need gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention

from mm3d.layers import CPU_BF16_SDPA_FP32_MAX_LEN, SDPAAttention, sdpa, vit_blocks
from mm3d.testing import assert_close


def qkv(b: int, h: int, n: int, d: int, dtype: torch.dtype, grad: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def test_short_bf16_attention_with_gradients_runs_in_fp32_and_returns_bf16():
    q, k, v = qkv(2, 3, 26, 16, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v)
    want = F.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want.to(torch.bfloat16))  # the fp32 result, rounded once
    out.float().square().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("case", ["long", "no_grad", "fp32"])
def test_elsewhere_it_is_exactly_torchs_call(case):
    n = CPU_BF16_SDPA_FP32_MAX_LEN + 1 if case == "long" else 26
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    q, k, v = qkv(1, 2, n, 16, dtype, grad=case != "no_grad")
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) > 0.3
    mask.fill_diagonal_(True)
    assert torch.equal(sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_sdpa_attention_is_timms_attention_with_its_state_dict():
    torch.manual_seed(0)
    ours, theirs = SDPAAttention(32, num_heads=4, qkv_bias=True).eval(), Attention(32, num_heads=4, qkv_bias=True).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 32)
    assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    assert isinstance(vit_blocks(dim=32, depth=1, num_heads=4, mlp_ratio=2, qkv_bias=False, drop_path=0)[0].attn,
                      SDPAAttention)


def test_bench_attention_prints_a_row_per_shape_and_dtype(capsys):
    import json

    from mm3d.bench import attention_main

    assert attention_main(["1,2,8,4", "1,1,5,8", "--reps", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["shape"], r["dtype"]) for r in rows] == [([1, 2, 8, 4], "float32"), ([1, 2, 8, 4], "bfloat16"),
                                                       ([1, 1, 5, 8], "float32"), ([1, 1, 5, 8], "bfloat16")]
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows)
