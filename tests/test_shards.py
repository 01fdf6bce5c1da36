"""Prepared shards: writer, manifest, resolving specs, reading (ours, wids, webdataset), the shard
sampler, training over shards (exact resume, 1 and 2 processes) and `mm3d data check` on shards."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset
import wids
from torch.utils.data import DataLoader

import mm3d.toy  # noqa: F401
from mm3d.config import load_config
from mm3d.data import ResumableSampler
from mm3d.registry import TASKS
from mm3d.shards import (MANIFEST, ShardError, ShardSampler, ShardSamples, ShardSet, ShardWriter, file_sha256,
                         read_manifest, resolve_shards, safe_key, train_sampler, write_manifest)
from mm3d.trainer import Trainer, run
from mm3d.testing import SilentProgress, train_losses


def sample_files(i: int) -> dict[str, bytes]:
    """Sample i: a (i % 7 + 1, 3) float32 array and its index (sizes vary, so shards fill unevenly)."""
    buf = io.BytesIO()
    np.save(buf, np.full((i % 7 + 1, 3), i, dtype=np.float32))
    return {"npy": buf.getvalue(), "json": json.dumps({"i": i}).encode()}


def write_shards(out, n=40, max_bytes=30720, meta=None):
    with ShardWriter(out, max_bytes=max_bytes) as w:
        for i in range(n):
            w.write(safe_key(i, f"clip.{i}"), sample_files(i))
    write_manifest(out, w.entries, meta or {"modality": "pointcloud", "kind": "test", "split": "train"})
    return w.entries


def test_writer_rolls_shards_under_the_size_cap_and_records_checksums(tmp_path):
    entries = write_shards(tmp_path, n=40)
    assert len(entries) >= 3 and sum(e["nsamples"] for e in entries) == 40
    assert [e["url"] for e in entries] == [f"shard-{k:06d}.tar" for k in range(len(entries))]
    for e in entries:
        path = tmp_path / e["url"]
        assert path.stat().st_size == e["filesize"] <= 30720
        assert file_sha256(path) == e["sha256"]
    assert not list(tmp_path.glob("*.tmp"))
    doc = read_manifest(tmp_path / MANIFEST)
    assert doc["wids_version"] == 1 and doc["mm3d"]["num_samples"] == 40 and doc["mm3d"]["kind"] == "test"
    # keys: no dots (webdataset splits at the first one), unique, index first
    assert safe_key(3, "a.b c/d") == "000003_a_b_c_d"
    w = ShardWriter(tmp_path / "x", max_bytes=30720)
    with pytest.raises(ValueError, match="first dot"):
        w.write("a.b", {"json": b"{}"})
    w.write("a", {"json": b"{}"})
    with pytest.raises(ValueError, match="already written"):
        w.write("a", {"json": b"{}"})
    with pytest.raises(TypeError, match="expected bytes"):
        w.write("b", {"json": "text"})


def test_one_sample_larger_than_the_cap_gets_a_shard_of_its_own(tmp_path):
    with ShardWriter(tmp_path, max_bytes=30720) as w:
        w.write("small", {"bin": b"x" * 100})
        w.write("big", {"bin": b"y" * 50_000})
        w.write("after", {"bin": b"z" * 100})
    assert [e["nsamples"] for e in w.entries] == [1, 1, 1]


def test_resolve_folder_manifest_brace_pattern_tar_and_prepared_root(tmp_path):
    entries = write_shards(tmp_path / "train")
    counts = [e["nsamples"] for e in entries]
    last = len(entries) - 1
    specs = [tmp_path / "train", tmp_path / "train" / MANIFEST, f"{tmp_path}/train/shard-{{000000..{last:06d}}}.tar"]
    for spec in specs:
        s = resolve_shards(spec)
        assert s.counts == counts and len(s) == 40, spec
        assert s.urls == [str((tmp_path / "train" / e["url"]).resolve()) for e in entries]
    assert resolve_shards(tmp_path / "train" / "shard-000001.tar").counts == [counts[1]]
    assert resolve_shards(tmp_path / "train").meta["kind"] == "test"
    # without a manifest: *.tar sorted, counts read from the tar index
    (tmp_path / "train" / MANIFEST).rename(tmp_path / "m.json")
    s = resolve_shards(tmp_path / "train")
    assert s.counts == counts and s.meta == {}
    # a prepared root: dataset.json names a folder per split
    (tmp_path / "m.json").rename(tmp_path / "train" / MANIFEST)
    (tmp_path / "dataset.json").write_text(json.dumps({"splits": {"train": "train"}}))
    assert resolve_shards(tmp_path, "train").counts == counts
    with pytest.raises(ShardError, match="no split 'val'"):
        resolve_shards(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        resolve_shards(f"{tmp_path}/train/shard-{{000000..000099}}.tar")
    with pytest.raises(FileNotFoundError, match="no such shard folder"):
        resolve_shards(tmp_path / "nope")


def test_samples_read_back_identically_by_us_wids_and_webdataset(tmp_path):
    write_shards(tmp_path)
    ours = ShardSamples(tmp_path)
    assert len(ours) == 40
    for i in (0, 13, 39):
        s = ours[i]
        assert s["__key__"] == safe_key(i, f"clip.{i}") and s["npy"] == sample_files(i)["npy"]
        assert json.loads(s["json"]) == {"i": i} and s["__shard__"] in ours.shard_set.urls
        assert ours.source(i) == (s["__shard__"], s["__key__"])
    # wids alone, from the manifest (no mm3d code)
    ds = wids.ShardListDataset(str(tmp_path / MANIFEST), transformations=[], cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 40
    got = ds[21]
    assert got["__key__"] == safe_key(21, "clip.21") and got[".npy"].read() == sample_files(21)["npy"]
    # webdataset streaming, in order
    stream = list(webdataset.WebDataset(ours.shard_set.urls, shardshuffle=False))
    assert [x["__key__"] for x in stream] == [safe_key(i, f"clip.{i}") for i in range(40)]
    assert all(x["npy"] == sample_files(i)["npy"] for i, x in enumerate(stream))


def test_local_shards_are_read_in_place_and_errors_name_the_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    entries = write_shards(tmp_path / "s")
    ours = ShardSamples(tmp_path / "s")
    assert [ours[i]["__key__"] for i in (0, 39)] == [safe_key(0, "clip.0"), safe_key(39, "clip.39")]
    assert not list((tmp_path / "cache").glob("*"))  # no copy into wids' download cache
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([MANIFEST, *(e["url"] for e in entries)])
    (tmp_path / "s" / entries[-1]["url"]).unlink()
    with pytest.raises(FileNotFoundError, match=f"{entries[-1]['url']}: no such shard"):
        ShardSamples(tmp_path / "s")[39]
    (tmp_path / "s" / entries[0]["url"]).write_bytes(b"not a tar" * 100)
    with pytest.raises(ShardError, match=f"{entries[0]['url']}: cannot read sample 0"):
        ShardSamples(tmp_path / "s")[0]


def test_shard_samples_load_in_dataloader_workers(tmp_path):
    write_shards(tmp_path)
    ours = ShardSamples(tmp_path)
    ours[0]  # opened here; the workers must re-open their own

    def collate(batch):
        return [json.loads(b["json"])["i"] for b in batch]

    loader = DataLoader(ours, batch_size=8, num_workers=2, collate_fn=collate)
    assert [i for b in loader for i in b] == list(range(40))
    with pytest.raises(IndexError):
        ours[40]


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------

COUNTS = [7, 3, 12, 5, 9, 1, 10]  # 47 samples in 7 shards of uneven sizes
STARTS = np.cumsum([0] + COUNTS)


def shard_of(i: int) -> int:
    return int(np.searchsorted(STARTS, i, side="right") - 1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_splits_every_sample_once_over_ranks(world):
    runs = [list(ShardSampler(COUNTS, shuffle_buffer=4, seed=1, rank=r, world_size=world, pad=False))
            for r in range(world)]
    assert sorted(i for r in runs for i in r) == list(range(47))  # no overlap, nothing missing
    padded = [list(ShardSampler(COUNTS, shuffle_buffer=4, seed=1, rank=r, world_size=world)) for r in range(world)]
    per = -(-47 // world)
    assert all(len(r) == per for r in padded)
    flat = [i for r in padded for i in r]
    assert set(flat) == set(range(47)) and len(flat) - len(set(flat)) == per * world - 47  # only the pad repeats


def test_sampler_is_deterministic_per_seed_and_epoch():
    def order(seed, epoch, rank=0):
        s = ShardSampler(COUNTS, shuffle_buffer=5, seed=seed, rank=rank, world_size=2)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0) and order(3, 2) == order(3, 2)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert order(0, 0, rank=0) != order(0, 0, rank=1)


def runs_of(idx):
    """The shards of `idx` in visiting order, one entry per contiguous run."""
    shards = [shard_of(i) for i in idx]
    return [k for j, k in enumerate(shards) if j == 0 or k != shards[j - 1]]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_keeps_shard_locality(world):
    for epoch in range(3):
        seen = []
        for r in range(world):
            s = ShardSampler(COUNTS, shuffle_buffer=1, seed=5, rank=r, world_size=world, pad=False)
            s.set_epoch(epoch)
            runs = runs_of(list(s))
            assert len(runs) == len(set(runs))  # each shard read in one sequential run
            seen.append(set(runs))
        # ranks take contiguous parts of the shard stream: at most one shard is split between two ranks
        assert sum(len(x) for x in seen) <= len(COUNTS) + world - 1
    assert list(ShardSampler(COUNTS, shuffle=False, seed=5)) == list(range(47))


def test_sampler_windows_permute_the_shard_stream_only_within_themselves():
    a = ShardSampler(COUNTS, shuffle_buffer=6, seed=2)
    b = ShardSampler(COUNTS, shuffle_buffer=1, seed=2)  # window 1: the shard stream itself
    ia, ib = list(a), list(b)
    assert ia != ib
    for w0 in range(0, 47, 6):
        assert sorted(ia[w0:w0 + 6]) == sorted(ib[w0:w0 + 6])
    assert len(runs_of(ib)) == len(COUNTS) and runs_of(ib) != list(range(len(COUNTS)))  # shards permuted


def test_sampler_set_start_skips_exactly():
    s = ShardSampler(COUNTS, shuffle_buffer=5, seed=9, rank=1, world_size=2)
    s.set_epoch(4)
    full = list(s)
    for k in (0, 1, 7, len(full) - 1, len(full)):
        s.set_start(k)
        assert list(s) == full[k:] and len(s) == len(full) - k


def test_trainer_sampler_choice(tmp_path):
    write_shards(tmp_path)
    over_shards = ShardSamples(tmp_path)
    s = train_sampler(over_shards, seed=0, rank=0, world_size=1, shuffle_buffer=8)
    assert isinstance(s, ShardSampler) and s.shuffle_buffer == 8 and len(s) == 40
    plain = train_sampler(list(range(10)), seed=0, rank=0, world_size=1)
    assert type(plain) is ResumableSampler

    class Wrong:
        shard_set = ShardSet(["a.tar"], [5])

        def __len__(self):
            return 4

    with pytest.raises(ValueError, match="one to one"):
        train_sampler(Wrong(), seed=0, rank=0, world_size=1)


# --------------------------------------------------------------------------------------------
# Training over shards of the toy task, and `mm3d data check`
# --------------------------------------------------------------------------------------------

def prepare_toy(out, *overrides):
    """The toy task's train/val splits as shards (through the CONFIG form of `mm3d data prepare`)."""
    from mm3d.cli import main

    cfg = out.parent / "toy_prepare.yaml"
    cfg.write_text("task: toy_regression\n")
    assert main(["data", "prepare", str(cfg), *overrides, "--out", str(out), "--shard-size", "30720",
                 "--workers", "1", "--no-progress"]) == 0
    return out


def toy_cfg(tmp_path, shards, *extra, name="run"):
    return load_config(None, ["task=toy_regression", f"output_dir={tmp_path / name}", "train.batch_size=8",
                              "optim.lr=0.01", "train.log_every=1", "train.progress=off",
                              "train.tensorboard=false", "data.format=shards", f"data.shards={shards}",
                              "data.shuffle_buffer=16", *extra])


losses = train_losses


def test_toy_shards_hold_the_toy_samples_and_train(tmp_path):
    root = prepare_toy(tmp_path / "prep")
    assert json.loads((root / "dataset.json").read_text()) == {"splits": {"train": "train", "val": "val"}}
    cfg = toy_cfg(tmp_path, root, "train.max_steps=2")
    ds = TASKS.get("toy_regression").build_datasets(cfg, ["train", "val"])
    files = mm3d.toy.ToyDataset(64, 8, 0.05, seed=0)
    assert len(ds["train"]) == 64 and len(ds["val"]) == 16 and len(ds["train"].shard_set.urls) > 1
    for i in (0, 37, 63):
        torch.testing.assert_close(ds["train"][i]["x"], files[i]["x"], rtol=0, atol=0)
        torch.testing.assert_close(ds["train"][i]["y"], files[i]["y"], rtol=0, atol=1e-6)
    trainer = Trainer(cfg)
    assert isinstance(trainer.train_sampler, ShardSampler) and trainer.train_sampler.shuffle_buffer == 16
    trainer.fit()
    assert len(losses(tmp_path / "run")) == 2


def test_resume_mid_epoch_over_shards_reproduces_losses(tmp_path):
    root = prepare_toy(tmp_path / "prep")
    # 64 samples / batch 8 = 8 steps per epoch; stop at step 3 (mid-epoch), resume, go to 6
    common = ["train.max_steps=6", "train.epochs=1", "train.eval_every=0", "train.save_every=0",
              "train.save_every_steps=3", "optim.warmup_steps=2", "train.num_workers=0"]
    run(toy_cfg(tmp_path, root, *common, name="straight"))
    trainer = Trainer(toy_cfg(tmp_path, root, *common, name="resumed"))
    trainer.total_steps = 3  # interrupt after 3 steps (the schedule still spans 6)
    trainer.train_epoch(0, SilentProgress())
    trainer._save()
    again = Trainer(toy_cfg(tmp_path, root, *common, "train.resume=auto", name="resumed"))
    assert again.state.step == 3 and again.state.batch_in_epoch == 3
    again.fit()
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(a) == 6 and len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-7)
    # the shard order matters: another shuffle window gives other losses (the test can fail)
    run(toy_cfg(tmp_path, root, *common, "data.shuffle_buffer=3", name="other"))
    assert losses(tmp_path / "other") != a


@pytest.mark.slow
def test_two_process_resume_over_shards_reproduces_losses(tmp_path):
    root = prepare_toy(tmp_path / "prep")
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(f"task: toy_regression\ndata:\n  format: shards\n  shards: {root}\n  shuffle_buffer: 8\n")
    common = ["model.dropout=0.0", "optim.lr=0.05", "optim.schedule=constant", "optim.warmup_steps=0",
              "train.log_every=1", "train.progress=off", "train.tensorboard=false", "train.eval_every=0",
              "train.save_every=0", "train.epochs=1", "train.batch_size=4", "train.num_workers=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(*overrides):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mm3d.cli", "finetune", str(cfg), *common, *overrides]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]

    # 64 samples / (2 ranks x 4) = 8 steps per epoch: stop at 3, resume to 6, against a straight run to 6
    torchrun(f"output_dir={tmp_path / 'straight'}", "train.max_steps=6")
    torchrun(f"output_dir={tmp_path / 'resumed'}", "train.max_steps=3", "train.save_every_steps=3")
    torchrun(f"output_dir={tmp_path / 'resumed'}", "train.max_steps=6", "train.resume=auto")
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(a) == 6 and len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-6, atol=1e-7)


def test_data_check_reports_bad_samples_changed_and_missing_shards(tmp_path):
    from mm3d.cli import main

    root = prepare_toy(tmp_path / "prep")
    train = root / "train"
    entries = read_manifest(train / MANIFEST)["shardlist"]
    assert len(entries) >= 3
    # shard 0: one sample's .npy replaced by garbage of the same length (the tar stays valid)
    raw = bytearray((train / entries[0]["url"]).read_bytes())
    at = raw.index(b"\x93NUMPY")
    raw[at:at + 6] = b"garbag"
    (train / entries[0]["url"]).write_bytes(bytes(raw))
    # shard 1 removed
    (train / entries[1]["url"]).unlink()
    report = tmp_path / "check.json"
    cfg = tmp_path / "check.yaml"
    cfg.write_text(f"task: toy_regression\ndata:\n  format: shards\n  shards: {root}\n")
    assert main(["data", "check", str(cfg), "--report", str(report)]) == 1
    got = json.loads(report.read_text())
    bad = got["train"]["bad"]
    url0, url1 = (str((train / e["url"]).resolve()) for e in entries[:2])
    shards = {b["file"]: b["reason"] for b in bad if b["index"] is None}
    assert shards.keys() == {url0, url1}
    assert "sha256 differs" in shards[url0] and "missing shard" in shards[url1]
    sample = [b for b in bad if b["index"] is not None]
    assert len(sample) == 1 and sample[0]["file"] == url0 and sample[0]["line"] == "key 000000_train"
    assert got["train"]["checked"] == 64 - entries[1]["nsamples"]
    assert got["val"]["errors"] == 0 and got["val"]["checked"] == 16
