"""optim.fused: torch's fused optimizer step (auto on CUDA), equal to the default step."""

from __future__ import annotations

import pytest
import torch

import mm3d.toy  # noqa: F401  (registers the toy task)
from mm3d.config import ConfigError, load_config
from mm3d.trainer import Trainer, build_optimizer


def cfg(tmp_path, *extra):
    return load_config(None, ["task=toy_regression", f"output_dir={tmp_path}", "train.batch_size=8", "optim.lr=0.01",
                              "train.max_steps=4", "train.eval_every=0", "train.progress=off",
                              "train.tensorboard=false", "model.dropout=0.0", *extra])


def test_fused_step_is_the_default_and_trains_like_the_plain_step(tmp_path):
    plain = Trainer(cfg(tmp_path / "a", "optim.fused=false"))
    fused = Trainer(cfg(tmp_path / "b"))
    assert not plain.optimizer.defaults.get("fused") and fused.optimizer.defaults.get("fused") is True
    plain.fit()
    fused.fit()
    for p, q in zip(plain.model.parameters(), fused.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_auto_fuses_except_under_fsdp_peers_opt_out_and_unfusable_optimizers_refuse(tmp_path):
    model = torch.nn.Linear(4, 2)
    assert build_optimizer(model, cfg(tmp_path), 0.1).defaults.get("fused") is True
    assert not build_optimizer(model, cfg(tmp_path, "train.strategy=fsdp"), 0.1).defaults.get("fused")
    assert not build_optimizer(model, cfg(tmp_path, "optim.fused=false"), 0.1).defaults.get("fused")
    assert not build_optimizer(model, cfg(tmp_path), 0.1, fused=False).defaults.get("fused")  # a peer's default step
    assert not build_optimizer(model, cfg(tmp_path, "optim.name=lamb"), 0.1).defaults.get("fused")  # auto: no fused lamb
    with pytest.raises(ConfigError, match="no fused step"):
        build_optimizer(model, cfg(tmp_path, "optim.fused=true", "optim.name=lamb"), 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_is_on_for_cuda_parameters(tmp_path):
    model = torch.nn.Linear(4, 2).cuda()
    assert build_optimizer(model, cfg(tmp_path), 0.1).defaults.get("fused") is True
    assert not build_optimizer(model, cfg(tmp_path, "train.strategy=fsdp"), 0.1).defaults.get("fused")
