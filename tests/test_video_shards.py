"""Prepared video shards: the video preparer (transcode, keys, labels, failures, the CONFIG form),
VideoShardDataset (the items of VideoDataset from shard bytes) and training from shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mm3d.cli import main as cli_main
from mm3d.config import ConfigError, load_config
from mm3d.registry import TASKS
from mm3d.shards import ShardSampler, ShardWriter, resolve_shards, write_manifest
from mm3d.testing import PROJECT_ROOT
from mm3d.video import transforms as TR
from mm3d.video.data import VideoDataset, VideoRecord, read_annotation_list
from mm3d.video.decode import VideoDecodeError
from mm3d.video.shards import VideoShardDataset, scaled_size
from mm3d.video.synth import CLASSES, SynthVideoSpec, render_clip, write_mp4, write_video_dataset

PRETRAIN = str(PROJECT_ROOT / "configs/video/videomae_pretrain_demo.yaml")
FINETUNE = str(PROJECT_ROOT / "configs/video/videomae_finetune_demo.yaml")
GOP = 4  # small, so that the 16-24 frame test clips hold several keyframes
SPEC = SynthVideoSpec(size=48, min_frames=16, max_frames=24, per_class=(1, 1, 1))


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """Synthetic clips: 9 per split (48x48, 24 fps, 16-24 frames), with frame folders for every split."""
    root = tmp_path_factory.mktemp("vshards") / "synth"
    write_video_dataset(root, SPEC, seed=0)
    return root


def _prepare(*args: str) -> None:
    assert cli_main(["data", "prepare", "--workers", "1", "--no-progress", *args]) == 0


@pytest.fixture(scope="module")
def prepared(synth, tmp_path_factory) -> Path:
    """train.txt prepared at short side 32 (from 48), keyframe every GOP frames, two shards or more.
    (decord 0.6 misreads some tiny sizes, e.g. 24x24 and 48x32; 32x32 and every size >= 240 tried are fine.)"""
    out = tmp_path_factory.mktemp("vshards") / "train"
    _prepare("--kind", "video", "--list", str(synth / "train.txt"), "--root", str(synth), "--label-map",
             str(synth / "label_map.txt"), "--out", str(out), "--short-side", "32", "--gop", str(GOP),
             "--shard-size", "31000")
    return out


def _members(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of the shards of `out`, read with tarfile only: key -> {ext: bytes}, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _av_stream(data: bytes) -> tuple[dict, list[bool]]:
    """(stream facts, key_frame flag per decoded frame) of mp4 bytes, read with PyAV."""
    import av

    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        facts = {"codec": s.codec_context.name, "width": s.width, "height": s.height, "fps": float(s.average_rate),
                 "header_frames": s.frames, "pix_fmt": s.codec_context.pix_fmt}
        keys = [bool(f.key_frame) for f in c.decode(s)]
    return facts, keys


# --------------------------------------------------------------------------------------------
# Preparing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, short, want", [((1280, 720), 320, (568, 320)), ((640, 360), 320, (568, 320)),
                                                ((340, 256), 320, (340, 256)), ((360, 640), 320, (320, 568)),
                                                ((101, 75), 50, (68, 50))])
def test_scaled_size_brings_the_short_side_down_never_up(size, short, want):
    assert scaled_size(*size, short) == want


def test_prepared_clips_keep_fps_and_frames_at_short_side_with_fixed_keyframes(synth, prepared):
    rows = read_annotation_list(synth / "train.txt", data_root=synth)
    samples = _members(prepared)
    assert len(samples) == len(rows) == len(CLASSES)
    manifest = json.loads((prepared / "manifest.json").read_text())
    meta = manifest["mm3d"]
    assert meta["modality"] == "video" and meta["num_samples"] == len(rows)
    assert meta["classes"] == list(CLASSES) and meta["settings"]["gop"] == GOP and meta["settings"]["short_side"] == 32
    assert len(manifest["shardlist"]) >= 2  # --shard-size 31000 splits the 9 clips (~50 kB)
    import av

    for (key, files), row, i in zip(samples.items(), rows, range(len(rows))):
        assert key == f"{i:06d}_{Path(row.path).stem}"  # row order, keys without dots
        head = json.loads(files["json"])
        with av.open(row.path) as src:
            s = src.streams.video[0]
            src_fps, src_frames = float(s.average_rate), sum(1 for _ in src.decode(s))
        facts, keys = _av_stream(files["mp4"])
        assert head["label"] == row.label and head["source"] == row.path and head["line"] == i + 1
        assert facts["codec"] == "h264" and facts["pix_fmt"] == "yuv420p"
        assert (facts["width"], facts["height"]) == (head["width"], head["height"]) == (32, 32)
        assert facts["fps"] == head["fps"] == src_fps == SPEC.fps
        assert len(keys) == facts["header_frames"] == head["frames"] == src_frames
        assert [j for j, k in enumerate(keys) if k] == list(range(0, src_frames, GOP))


def test_never_upscales_and_keeps_the_aspect_of_a_wide_clip(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.concatenate([render_clip("move_left", rng, num_frames=10, size=48)] * 2, axis=2)  # (10, 48, 96, 3)
    write_mp4(tmp_path / "wide.mp4", frames, fps=30)
    (tmp_path / "list.txt").write_text("wide.mp4 0 -1\n")
    for short, want in ((32, (64, 32)), (320, (96, 48))):
        out = tmp_path / f"s{short}"
        _prepare("--kind", "video", "--list", str(tmp_path / "list.txt"), "--root", str(tmp_path),
                 "--out", str(out), "--short-side", str(short))
        (files,) = _members(out).values()
        facts, keys = _av_stream(files["mp4"])
        assert (facts["width"], facts["height"]) == want and len(keys) == 10 and facts["fps"] == 30
        assert json.loads(files["json"])["label"] == -1  # a pretraining row is unlabelled


def test_source_keyframes_do_not_leak_into_the_fixed_interval(tmp_path):
    """A decoded frame keeps its picture type, which libx264 would obey: the source's keyframes (every 5th
    frame here) must not become extra keyframes of the prepared clip."""
    import av

    frames = render_clip("grow", np.random.default_rng(1), num_frames=20, size=48)
    with av.open(str(tmp_path / "src.mp4"), mode="w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 48, 48, "yuv420p"
        s.options = {"x264-params": "keyint=5:min-keyint=5:scenecut=0"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    assert [j for j, k in enumerate(_av_stream((tmp_path / "src.mp4").read_bytes())[1]) if k] == [0, 5, 10, 15]
    (tmp_path / "list.txt").write_text("src.mp4 0 -1\n")
    _prepare("--kind", "video", "--list", str(tmp_path / "list.txt"), "--root", str(tmp_path),
             "--out", str(tmp_path / "out"), "--gop", "8")
    (files,) = _members(tmp_path / "out").values()
    assert [j for j, k in enumerate(_av_stream(files["mp4"])[1]) if k] == [0, 8, 16]


def test_parallel_prepare_writes_the_same_bytes(synth, prepared, tmp_path):
    _prepare("--kind", "video", "--list", str(synth / "train.txt"), "--root", str(synth), "--label-map",
             str(synth / "label_map.txt"), "--out", str(tmp_path / "p"), "--short-side", "32", "--gop", str(GOP),
             "--shard-size", "31000", "--workers", "2")
    tars = sorted(prepared.glob("*.tar"))
    assert [t.read_bytes() for t in tars] == [(tmp_path / "p" / t.name).read_bytes() for t in tars]


def test_rawframe_folders_are_encoded_at_the_given_rate(synth, tmp_path):
    out = tmp_path / "raw"
    _prepare("--kind", "video", "--list", str(synth / "rawframes_val.txt"), "--root", str(synth), "--out", str(out),
             "--rawframe-fps", "12.5", "--gop", "8")
    rows = read_annotation_list(synth / "rawframes_val.txt", data_root=synth)
    for files, row in zip(_members(out).values(), rows):
        facts, keys = _av_stream(files["mp4"])
        assert json.loads(files["json"])["frames"] == len(keys) == row.total_frames
        assert facts["fps"] == 12.5 and [j for j, k in enumerate(keys) if k] == list(range(0, len(keys), 8))
    # the frames are those of the JPEG folder, within the codecs' loss
    ds = VideoShardDataset(str(out), mode="test", num_frames=4, sampling_rate=2, backend="pyav")
    ref = VideoDataset(rows, mode="test", num_frames=4, sampling_rate=2)
    diff = lambda a, b: float((a["video"].float() - b["video"].float()).abs().mean())  # noqa: E731
    # CRF 23 on these noisy 48x48 clips loses ~6 grey levels; another clip differs by ~50
    assert diff(ds[0], ref[0]) < 8.0 and diff(ds[0], ref[1]) > 4 * diff(ds[0], ref[0])


def test_a_corrupt_video_is_reported_and_left_out(synth, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    lines = (synth / "val.txt").read_text().splitlines()
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([*(f"{synth}/{ln}" for ln in lines[:2]), f"{tmp_path}/broken.mp4 3",
                              f"{synth}/{lines[2]}"]) + "\n")
    out = tmp_path / "out"
    _prepare("--kind", "video", "--list", str(lst), "--out", str(out))
    report = json.loads((out / "prepare_report.json").read_text())
    (bad,) = report["skipped"]
    assert bad["file"] == f"{tmp_path}/broken.mp4" and bad["line"] == f"{lst}:3" and bad["reason"]
    meta = json.loads((out / "manifest.json").read_text())["mm3d"]
    assert meta["num_samples"] == 3 and [(s["file"], s["line"]) for s in meta["skipped"]] == [(bad["file"], bad["line"])]
    assert [json.loads(f["json"])["line"] for f in _members(out).values()] == [1, 2, 4]


@pytest.fixture(scope="module")
def prepared_root(synth, tmp_path_factory) -> Path:
    """The fine-tuning demo config's train/val/test lists prepared by the CONFIG form (short side 32, gop 8)."""
    out = tmp_path_factory.mktemp("vshards") / "prepared"
    _prepare(str(FINETUNE), f"data.root={synth}", "--out", str(out), "--short-side", "32", "--gop", "8")
    return out


def test_config_form_prepares_every_split_of_a_finetune_config(synth, prepared_root):
    out = prepared_root
    index = json.loads((out / "dataset.json").read_text())
    assert index["splits"] == {"train": "train", "val": "val", "test": "test"}
    for split in ("train", "val", "test"):
        rows = read_annotation_list(synth / f"{split}.txt", data_root=synth)
        meta = json.loads((out / split / "manifest.json").read_text())["mm3d"]
        assert meta["num_samples"] == len(rows) and meta["split"] == split and meta["classes"] == list(CLASSES)
        assert (meta["settings"]["short_side"], meta["settings"]["gop"]) == (32, 8)  # the command line's
        samples = list(_members(out / split).values())
        assert [json.loads(f["json"])["label"] for f in samples] == [r.label for r in rows]
        assert _av_stream(samples[0]["mp4"])[0]["width"] == 32
        assert resolve_shards(out, split).counts == resolve_shards(out / split).counts


# --------------------------------------------------------------------------------------------
# Datasets over shards
# --------------------------------------------------------------------------------------------


def _file_records(prepared: Path, tmp_path: Path) -> list[VideoRecord]:
    """The prepared mp4s written out as files, as list rows with the labels of their key.json."""
    rows = []
    for key, files in _members(prepared).items():
        (tmp_path / f"{key}.mp4").write_bytes(files["mp4"])
        rows.append(VideoRecord(str(tmp_path / f"{key}.mp4"), json.loads(files["json"])["label"], None, key))
    return rows


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_shard_items_equal_decoding_the_prepared_files(prepared, tmp_path, backend):
    pytest.importorskip(backend if backend != "pyav" else "av")
    rows = _file_records(prepared, tmp_path)
    kw = dict(num_frames=4, sampling_rate=2, backend=backend, seed=3)
    # training: the same random clips, crops and repeated-augmentation views (2 per clip)
    train = dict(mode="train", transform=TR.pretrain_transform(24, (1.0, 0.75)), num_sample=2, **kw)
    shards, files = VideoShardDataset(str(prepared), **train), VideoDataset(rows, **train)
    assert len(shards) == len(files) == len(rows)
    for i in (0, 4, 8):
        a, b = shards[i], files[i]
        assert a["video"].shape == (2, 3, 4, 24, 24)
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
        assert int(a["label"]) == int(b["label"]) == rows[i].label and int(a["index"]) == i
    # evaluation: 2 clips x 2 crops
    test = dict(mode="test", num_clips=2, num_crops=2, transform=TR.test_transform(16, 24, 2), **kw)
    shards, files = VideoShardDataset(str(prepared), **test), VideoDataset(rows, **test)
    for i in (1, 7):
        assert shards[i]["video"].shape == (4, 3, 4, 16, 16)
        torch.testing.assert_close(shards[i]["video"], files[i]["video"], rtol=0, atol=0)
    assert shards.classes == list(CLASSES) and shards.shard_set.counts == resolve_shards(prepared).counts
    url, where = shards.sample_source(7)
    assert Path(url).parent == prepared and where == f"key {Path(rows[7].path).stem}"


def _hand_made(out: Path, samples: list[tuple[str, dict[str, bytes]]], modality: str = "video") -> Path:
    with ShardWriter(out) as w:
        for key, files in samples:
            w.write(key, files)
    write_manifest(out, w.entries, {"modality": modality, "kind": "test"})
    return out


def test_bad_samples_are_replaced_in_training_and_named_by_check(prepared, tmp_path):
    good = list(_members(prepared).items())[:3]
    bad_json = json.dumps({"label": 2, "frames": 20}).encode()
    out = _hand_made(tmp_path / "s", [good[0], ("000001_broken", {"mp4": b"not a video", "json": bad_json}),
                                      good[1], ("000003_nojson", {"mp4": good[2][1]["mp4"]})])
    ds = VideoShardDataset(str(out), mode="train", num_frames=4, backend="pyav", max_failure_ratio=1.0)
    item = ds[1]  # replaced by the next readable sample
    assert int(item["index"]) == 2 and ds.failed.keys() == {1}
    with pytest.raises(VideoDecodeError, match="shard-000000.tar:000001_broken"):
        ds.check_sample(1)
    with pytest.raises(VideoDecodeError, match="000003_nojson: the sample has no key.mp4 \\+ key.json"):
        ds.check_sample(3)
    ds.check_sample(0)
    strict = VideoShardDataset(str(out), mode="train", num_frames=4, backend="pyav", max_failure_ratio=0.0)
    with pytest.raises(Exception, match="000001_broken"):
        strict[1]


def test_labels_outside_the_head_and_frame_counts_that_disagree_are_errors(prepared, tmp_path):
    (key, files), = list(_members(prepared).items())[8:9]  # the last class: label 8
    head = json.loads(files["json"])
    out = _hand_made(tmp_path / "s", [(key, files)])
    with pytest.raises(ValueError, match=f"{key}: key.json label 8 is outside the classes \\[0, 4\\)"):
        VideoShardDataset(str(out), mode="test", num_frames=4, num_classes=4)[0]
    lying = _hand_made(tmp_path / "l", [(key, {**files, "json": json.dumps({**head, "frames": 99}).encode()})])
    with pytest.raises(VideoDecodeError, match=f"key.json says 99 frames, the mp4 has {head['frames']}"):
        VideoShardDataset(str(lying), mode="test", num_frames=4).check_sample(0)
    with pytest.raises(ConfigError, match="the manifest names 9 classes, the model has num_classes=4"):
        VideoShardDataset(str(prepared), mode="test", num_frames=4, num_classes=4)


# --------------------------------------------------------------------------------------------
# Configs and training
# --------------------------------------------------------------------------------------------


TINY_FT = ["model.variant=videomae_tiny_test", "model.img_size=24", "train.batch_size=2", "train.num_workers=0",
           "train.progress=off", "train.tensorboard=false", "data.backend=pyav"]
TINY = [*TINY_FT, "model.mask_ratio=0.5", "data.report_clips=0"]


def test_shard_config_errors(prepared, tmp_path):
    with pytest.raises(ConfigError, match="data.*format=shards needs data.shards"):
        load_config(PRETRAIN, [*TINY, "data.format=shards"])
    with pytest.raises(ConfigError, match="format=files reads the lists"):
        load_config(PRETRAIN, [*TINY, f"data.shards={prepared}"])
    points = _hand_made(tmp_path / "pc", [("000000_chair", {"npy": b"x", "json": b"{}"})], modality="pointcloud")
    cfg = load_config(PRETRAIN, [*TINY, "data.format=shards", f"data.shards={points}"])
    with pytest.raises(ConfigError, match="hold pointcloud samples .* --kind video"):
        TASKS.get(cfg.task).build_datasets(cfg, ["train"])


def test_tiny_pretraining_runs_from_shards(prepared, tmp_path):
    from mm3d.trainer import Trainer

    cfg = load_config(PRETRAIN, [*TINY, "data.format=shards", f"data.shards={prepared}", "data.shuffle_buffer=4",
                                 "train.max_steps=2", f"output_dir={tmp_path}", "data.val_list="])
    trainer = Trainer(cfg)
    assert isinstance(trainer.datasets["train"], VideoShardDataset) and "val" not in trainer.datasets
    assert isinstance(trainer.train_sampler, ShardSampler)
    trainer.fit()
    res = json.loads((tmp_path / "results.json").read_text())
    losses = [h["loss"] for h in res["history"] if "loss" in h]
    assert losses and all(np.isfinite(losses))
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_bench_data_measures_raw_and_prepared_for_each_backend(tmp_path, capsys):
    work = tmp_path / "bench"
    assert cli_main(["bench-data", "--work", str(work), "--videos", "2", "--raw-size", "128x72", "--seconds", "1",
                     "--short-side", "48", "--backends", "pyav", "--clips", "2", "--rounds", "2", "--frames", "4",
                     "--rate", "2", "--crop", "32"]) == 0
    res = json.loads((work / "bench_data.json").read_text())
    (row,) = res["results"]
    assert row["backend"] == "pyav" and len(row["rounds"]["raw"]) == len(row["rounds"]["prepared"]) == 2
    pairs = sorted(p / r for r, p in zip(row["rounds"]["raw"], row["rounds"]["prepared"]))
    assert row["ratio"] == pytest.approx((pairs[0] + pairs[1]) / 2, rel=0.02)  # median of the rounds' ratios
    assert (res["raw"]["width"], res["raw"]["height"], res["raw"]["fps"]) == (128, 72, 30.0)
    assert (res["prepared"]["width"], res["prepared"]["height"]) == (86, 48)
    assert "| pyav |" in (work / "bench_data.md").read_text() and "| pyav |" in capsys.readouterr().out
    assert cli_main(["bench-data", "--backends", "nope", "--work", str(work)]) == 2
    assert "unknown video backend 'nope'" in capsys.readouterr().err


def test_tiny_finetuning_trains_and_evaluates_from_a_prepared_root(synth, prepared_root, tmp_path):
    """data.shards = the prepared root: train, val and test come from its dataset.json; the scores count
    every test video once (labels from key.json)."""
    from mm3d.trainer import Trainer

    cfg = load_config(FINETUNE, [*TINY_FT, "model.num_classes=9", "data.format=shards", f"data.shards={prepared_root}",
                                 "data.label_map=",
                                 "data.num_sample=1", "train.max_steps=2", "train.eval_every=0", "train.save_every=0",
                                 "train.select_on=last", f"output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    assert {s: type(d) for s, d in trainer.datasets.items()} == dict.fromkeys(("train", "val", "test"),
                                                                               VideoShardDataset)
    assert isinstance(trainer.train_sampler, ShardSampler)
    trainer.fit()
    res = json.loads((tmp_path / "results.json").read_text())
    test = res["test"]
    assert test["num_samples"] == len(read_annotation_list(synth / "test.txt")) and test["num_missing"] == 0
    assert "rotate_ccw" in (tmp_path / "test" / "per_class.csv").read_text()  # class names from the manifest
    predictions = (tmp_path / "test" / "predictions.json").read_text()
    assert "shard-000000.tar:000008_static_test_000" in predictions  # each video named by shard and key
    with pytest.raises(ConfigError, match="the manifest names 9 classes, the model has num_classes=5"):
        cfg5 = load_config(FINETUNE, [*TINY_FT, "model.num_classes=5", "data.format=shards", f"data.shards={prepared_root}"])
        TASKS.get(cfg5.task).build_datasets(cfg5, ["train"])


def test_data_check_lists_a_broken_shard_sample_by_shard_and_key(prepared, tmp_path):
    good = list(_members(prepared).items())[:2]
    out = _hand_made(tmp_path / "s", [good[0], ("000001_broken", {"mp4": b"garbage", "json": b'{"label": 1}'}),
                                      good[1]])
    report = tmp_path / "check.json"
    code = cli_main(["data", "check", PRETRAIN, *TINY, "data.format=shards", f"data.shards={out}",
                     "--report", str(report)])
    assert code == 1
    train = json.loads(report.read_text())["train"]
    assert train["samples"] == 3 and train["errors"] == 1
    (bad,) = train["bad"]
    assert bad["file"] == str(out / "shard-000000.tar") and bad["line"] == "key 000001_broken"
