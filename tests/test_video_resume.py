"""Video training resumes mid-epoch exactly, from files and from prepared shards: an item's frames
and crop come from (seed, epoch, index) alone, whatever loader worker reads it and wherever a
resumed run restarts the epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm3d.cli import main as cli_main
from mm3d.config import load_config
from mm3d.registry import SYNTH, load_modalities
from mm3d.testing import SilentProgress, train_losses
from mm3d.trainer import Trainer, run

load_modalities()

CONFIG = Path(__file__).resolve().parents[1] / "configs/video/videomae_pretrain_demo.yaml"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_video")
    SYNTH.get("video")(root, seed=0, scale="tiny")
    return root


@pytest.fixture(scope="module")
def shards(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video_shards") / "train"
    assert cli_main(["data", "prepare", "--kind", "video", "--list", str(synth / "train.txt"), "--root", str(synth),
                     "--out", str(out), "--workers", "2", "--no-progress", "--short-side", "32"]) == 0
    # (--workers 2: the transcode runs in worker processes; libx264 run in this process before the
    # training forks its loader workers deadlocks PyAV 12's decoder in them, the test-floors install)
    return out


def _cfg(root: Path, tmp_path: Path, name: str, *extra: str):
    return load_config(CONFIG, [f"data.root={root}", "data.val_list=", "data.report_clips=0", "model.depth=1",
                                "model.decoder_depth=1", "train.batch_size=4", "train.max_steps=4",
                                "train.epochs=1", "train.log_every=1", "train.save_every_steps=2",
                                "optim.warmup_steps=1", "train.num_workers=1", f"output_dir={tmp_path / name}",
                                *extra])


@pytest.mark.parametrize("source", ["files", "shards"])
def test_video_pretraining_resumes_mid_epoch_exactly(source, synth, shards, tmp_path):
    extra = () if source == "files" else ("data.format=shards", f"data.shards={shards}", "data.train_list=")
    run(_cfg(synth, tmp_path, "straight", *extra))
    interrupted = Trainer(_cfg(synth, tmp_path, "resumed", *extra))
    interrupted.total_steps = 2  # stop mid-epoch after 2 of 4 steps (the schedule still spans 4)
    interrupted.train_epoch(0, SilentProgress())
    interrupted._save()
    again = Trainer(_cfg(synth, tmp_path, "resumed", *extra, "train.resume=auto"))
    assert again.state.step == 2 and again.state.batch_in_epoch == 2
    again.fit()
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert len(a) == len(b) == 4
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-6)


def test_an_items_clip_depends_on_epoch_and_index_only(synth, tmp_path):
    trainer = Trainer(_cfg(synth, tmp_path, "items"))
    ds = trainer.datasets["train"]
    ds.set_epoch(3)
    first = [ds[i]["video"] for i in (0, 1, 2)]
    ds[5], ds[7]  # other reads in between (another worker's share) change nothing
    again = [ds[i]["video"] for i in (2, 1, 0)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    ds.set_epoch(4)
    assert not torch.equal(ds[0]["video"], first[0])  # a new epoch draws a new clip / crop
