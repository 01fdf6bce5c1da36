"""Point-MAE pretraining resumes mid-epoch exactly with loader workers, from files and from prepared
shards: an item's points come from (seed, epoch, index) alone (EpochDraws), whatever worker reads it
and wherever a resumed run restarts the epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm3d.cli import main as cli_main
from mm3d.config import load_config
from mm3d.pointcloud.synth import synth_shapenet55
from mm3d.testing import SilentProgress, train_losses
from mm3d.trainer import Trainer, run


@pytest.fixture(scope="module")
def sn_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sn55") / "sn"
    synth_shapenet55(root, seed=0, scale="tiny")
    return root


@pytest.fixture(scope="module")
def sn_shards(sn_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sn55_shards") / "train"
    assert cli_main(["data", "prepare", "--kind", "shapenet55", "--list", str(sn_root / "ShapeNet-55" / "train.txt"),
                     "--root", str(sn_root), "--out", str(out), "--no-progress"]) == 0
    return out


def _cfg(root: Path, out: Path, *extra: str):
    return load_config(None, [
        "task=pointmae_pretrain", "model.variant=pointmae_tiny_test", "data.dataset=shapenet55", f"data.root={root}",
        "data.npoints=256", "data.report_shapes=0", f"output_dir={out}", "train.batch_size=4", "train.max_steps=4",
        "train.epochs=1", "train.num_workers=2", "train.log_every=1", "train.progress=off", "train.tensorboard=false",
        "train.save_every_steps=2", "train.eval_every=0", "optim.warmup_steps=1", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("source", ["files", "shards"])
def test_point_pretraining_resumes_mid_epoch_exactly_with_workers(source, sn_root, sn_shards, tmp_path):
    extra = () if source == "files" else ("data.format=shards", f"data.shards={sn_shards}")
    run(_cfg(sn_root, tmp_path / "straight", *extra))
    interrupted = Trainer(_cfg(sn_root, tmp_path / "resumed", *extra))
    interrupted.total_steps = 2  # stop mid-epoch after 2 of 4 steps (the schedule still spans 4)
    interrupted.train_epoch(0, SilentProgress())
    interrupted._save()
    again = Trainer(_cfg(sn_root, tmp_path / "resumed", *extra, "train.resume=auto"))
    assert again.state.step == 2 and again.state.batch_in_epoch == 2
    again.fit()
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert len(a) == len(b) == 4
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["files", "shards"])
def test_a_training_items_points_depend_on_epoch_and_index_only(source, sn_root, sn_shards, tmp_path):
    extra = () if source == "files" else ("data.format=shards", f"data.shards={sn_shards}")
    ds = Trainer(_cfg(sn_root, tmp_path / "items", *extra)).datasets["train"]
    ds.set_epoch(3)
    first = [ds[i]["points"] for i in (0, 1, 2)]
    torch.rand(5), ds[5], ds[7]  # global draws and other reads (another worker's share) change nothing
    again = [ds[i]["points"] for i in (2, 1, 0)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    ds.set_epoch(4)
    assert not torch.equal(ds[0]["points"], first[0])  # a new epoch draws new points
