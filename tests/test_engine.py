"""The shared step/eval plumbing (mm3d.engine) and layers (mm3d.layers): no host reads on the
training path, one optimizer step for trainer and bench, sync-free token bookkeeping."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mm3d
import mm3d.pointcloud
import mm3d.toy  # noqa: F401  (registers the toy task)
import mm3d.video
from mm3d.config import load_config
from mm3d.engine import OptimizerStep, SplitMeans, amp_dtype, batch_size_of, mean_loss, move_to_device, unwrap
from mm3d.layers import gather_tokens, run_blocks, token_mask_count, vit_blocks
from mm3d.registry import load_modalities, variant_config
from mm3d.testing import assert_close
from mm3d.trainer import Trainer

load_modalities()


# --------------------------------------------------------------------------------------------
# Host reads on the training path
# --------------------------------------------------------------------------------------------


class _HostReads:
    """Counts tensor -> host reads (item, float, int, bool, tolist) made by mm3d's own code while
    installed (torch's Adam reads its CPU-side step counter; that is not a device read)."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist")
    OURS = tuple(str(Path(m.__file__).parent) for m in (mm3d, mm3d.video, mm3d.pointcloud))

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=original, **k):
                if sys._getframe(1).f_code.co_filename.startswith(self.OURS):
                    self.count += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


def _host_reads(tmp_path, monkeypatch, steps: int, name: str) -> int:
    cfg = load_config(None, ["task=toy_regression", f"output_dir={tmp_path / name}", "train.batch_size=8",
                             "data.num_train=512", "optim.lr=0.01", "train.progress=off",
                             "train.tensorboard=false", "train.log_every=1000", "train.eval_every=0",
                             "train.save_every=0", f"train.max_steps={steps}", "optim.clip_grad=1.0"])
    trainer = Trainer(cfg)
    reads = _HostReads(monkeypatch)
    trainer.train_epoch(0, _Silent())
    monkeypatch.undo()
    return reads.count


class _Silent:
    def update(self, *a, **k):
        pass


def test_training_steps_do_not_read_the_device_between_log_steps(tmp_path, monkeypatch):
    """Host reads per epoch are a constant (the final check and log), not one or more per step:
    the loss, the non-finite flag and the clipped gradient norm stay on the device."""
    few = _host_reads(tmp_path, monkeypatch, 3, "few")
    many = _host_reads(tmp_path, monkeypatch, 30, "many")
    assert many == few, f"{few} host reads for 3 steps but {many} for 30: the step loop reads the device"
    assert few <= 5  # the epoch's shuffle, the final check, the logged loss and gradient norm


def test_nonfinite_loss_found_at_the_next_check_names_the_first_bad_step(tmp_path):
    from mm3d.trainer import NonFiniteLossError, run

    cfg = load_config(None, ["task=toy_regression", f"output_dir={tmp_path / 'r'}", "train.batch_size=8",
                             "optim.lr=0.01", "train.progress=off", "train.tensorboard=false",
                             "train.log_every=5", "train.eval_every=0", "train.save_every=0",
                             "train.save_every_steps=0", "model.nan_at_call=3", "train.epochs=2"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 \(found at step 5\)"):
        run(cfg)


# --------------------------------------------------------------------------------------------
# Model forwards: generated masks are never read back
# --------------------------------------------------------------------------------------------


def test_videomae_pretraining_forward_runs_on_the_meta_device():
    """A meta tensor has no data, so a forward that reads any tensor back to the host fails:
    the pretraining forward with its own masks does not."""
    from mm3d.video.models import build_pretrain_model

    cfg = variant_config("videomae_tiny")
    with torch.device("meta"):
        model = build_pretrain_model(cfg)
        out = model({"video": torch.empty(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)})
    from mm3d.masking import video_num_masked

    n_mask = video_num_masked(cfg.mask_type, model.grid, cfg.mask_ratio)
    assert out.loss.shape == () and out.pred.shape[:2] == (2, n_mask) and 0 < n_mask < model.num_tokens


def test_pointmae_pretraining_forward_runs_on_the_meta_device():
    """The same for Point-MAE: FPS, KNN, its own mask, the gathers and Chamfer read nothing back."""
    from mm3d.masking import num_masked
    from mm3d.pointcloud.models import build_pretrain_model

    cfg = variant_config("pointmae_tiny")
    with torch.device("meta"):
        model = build_pretrain_model(cfg)
        out = model({"points": torch.empty(2, 256, 3)})
    assert out.loss.shape == ()
    assert out.pred.shape == (2, num_masked(cfg.num_group, cfg.mask_ratio), cfg.group_size, 3)


def test_token_mask_count_trusts_generated_counts_off_the_cpu_and_checks_the_rest():
    meta = torch.empty(2, 8, dtype=torch.bool, device="meta")
    assert token_mask_count(meta, 2, 8, "mask", expected=6) == 6  # no read: meta has no data
    with pytest.raises(RuntimeError):  # a mask from outside is read and checked
        token_mask_count(meta, 2, 8, "mask")
    good = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert token_mask_count(good, 2, 4, "mask") == 2
    assert token_mask_count(good, 2, 4, "mask", expected=2) == 2
    with pytest.raises(ValueError, match=r"same number of tokens; got per-sample counts \[2, 2\] \(expected 3\)"):
        token_mask_count(good, 2, 4, "mask", expected=3)  # on the CPU the promise is checked too
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        token_mask_count(torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool), 2, 3, "mask")
    with pytest.raises(ValueError, match="at least one masked and one visible"):
        token_mask_count(torch.ones(2, 3, dtype=torch.bool), 2, 3, "mask", allow_all=False)
    with pytest.raises(ValueError, match=r"must be a \(2, 4\) bool tensor"):
        token_mask_count(good.long(), 2, 4, "mask")


def test_gather_tokens_equals_boolean_indexing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 5, generator=g)
    keep = torch.rand(3, 10, generator=g).argsort(dim=1) < 4  # 4 kept per row, scattered
    assert_close(gather_tokens(x, keep, 4), x[keep].reshape(3, 4, 5), atol=0, rtol=0)
    pos = torch.randn(1, 10, 5, generator=g)  # broadcast over the batch
    assert_close(gather_tokens(pos, keep, 4), pos.expand(3, -1, -1)[keep].reshape(3, 4, 5), atol=0, rtol=0)


def test_run_blocks_adds_pos_before_every_block_and_taps_outputs():
    torch.manual_seed(0)
    blocks = vit_blocks(dim=16, depth=3, num_heads=2, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0).eval()
    x, pos = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    out, taps = run_blocks(blocks, x, pos=pos, taps=(0, 2))
    ref, refs = x, []
    for blk in blocks:
        ref = blk(ref + pos)
        refs.append(ref)
    assert_close(out, ref)
    assert len(taps) == 2
    assert_close(taps[0], refs[0])
    assert_close(taps[1], refs[2])
    ckpt, _ = run_blocks(blocks.train(), x.requires_grad_(), grad_checkpointing=True)
    ckpt.sum().backward()
    assert x.grad is not None


def test_vit_blocks_drop_path_rises_linearly():
    blocks = vit_blocks(dim=8, depth=5, num_heads=2, mlp_ratio=2.0, qkv_bias=False, drop_path=0.4)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


# --------------------------------------------------------------------------------------------
# Engine pieces
# --------------------------------------------------------------------------------------------


def test_optimizer_step_returns_the_preclip_norm_and_clips():
    p = nn.Parameter(torch.zeros(4))
    step = OptimizerStep(torch.optim.SGD([p], lr=1.0), device=torch.device("cpu"), precision="fp32", clip_grad=1.0)
    step.backward((p * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum(), scale=0.5)  # grad (1.5, 2, 0, 0): norm 2.5
    norm = step.step()
    assert float(norm) == pytest.approx(2.5)
    assert float(p.detach().norm()) == pytest.approx(1.0)  # the update was clipped to norm 1
    assert p.grad is None  # zero_grad(set_to_none=True)


def test_split_means_weight_by_samples():
    means = SplitMeans(["loss", "acc"], torch.device("cpu"))
    means.update(2, {"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)})
    means.update(6, {"loss": torch.tensor(3.0), "acc": torch.tensor(1.0)})
    assert means.compute() == pytest.approx({"loss": 2.5, "acc": 0.875})
    with pytest.raises(KeyError, match="expects"):
        means.update(1, {"loss": torch.tensor(1.0)})
    assert SplitMeans(["loss"], torch.device("cpu")).compute() == {"loss": 0.0}  # a rank with no batch


def test_mean_loss_and_batch_helpers():
    class Half(nn.Module):
        def forward(self, batch):
            return type("Out", (), {"loss": batch["x"].mean()})()

    loader = [{"x": torch.full((2,), 1.0)}, {"x": torch.full((6,), 3.0)}]
    assert mean_loss(Half(), loader, torch.device("cpu")) == {"loss": pytest.approx(2.5)}
    batch = move_to_device({"a": [torch.ones(3, 2)], "b": "name"}, torch.device("cpu"))
    assert batch_size_of(batch) == 3 and batch["b"] == "name"
    model = nn.Linear(2, 2)
    assert unwrap(torch.compile(model, backend="eager")) is model
    assert amp_dtype("bf16") is torch.bfloat16 and amp_dtype("fp32") is None
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        amp_dtype("fp8")
