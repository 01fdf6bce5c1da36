"""A user's mistake gives one line ``mm3d CMD: error: ...`` naming what is wrong and where, exit 2
(1 for `mm3d predict` when some inputs could not be read), and never a traceback.

The commands run in-process (``mm3d.cli.main``); only the start-up check of a shadowing ``mm3d/``
folder needs a real interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mm3d.cli import main
from mm3d.config import ConfigError, load_config, to_dict
from mm3d.registry import TASKS
from mm3d.testing import PROJECT_ROOT

PC_PRETRAIN = str(PROJECT_ROOT / "configs/pointcloud/pointmae_pretrain_demo.yaml")
PC_FINETUNE = str(PROJECT_ROOT / "configs/pointcloud/pointmae_finetune_demo.yaml")
PC_SVM = str(PROJECT_ROOT / "configs/pointcloud/pointmae_svm_modelnet40.yaml")
VIDEO_FINETUNE = str(PROJECT_ROOT / "configs/video/videomae_finetune_demo.yaml")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str, command: str, *names: str, count: int = 1) -> list[str]:
    """The ``mm3d COMMAND: error:`` lines of `err`: exactly `count`, the first naming every `names`."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == count and all(ln.startswith(f"mm3d {command}: error: ") for ln in lines), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines


@pytest.fixture
def toy_yaml(tmp_path) -> Path:
    """The toy regression task on the CPU (64 training samples)."""
    path = tmp_path / "toy.yaml"
    path.write_text(f"task: toy_regression\noutput_dir: {tmp_path / 'run'}\ntrain:\n  device: cpu\n"
                    f"  batch_size: 8\n  tensorboard: false\n  progress: 'off'\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the tiny test variants (random weights, each with its config) and input files."""
    d = tmp_path_factory.mktemp("cli_errors")
    (d / "points").mkdir()
    cloud = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    for name in ("a.npy", "b.npy"):
        np.save(d / "points" / name, cloud)
    (d / "cloud.foo").write_text("0 0 0\n1 1 1\n")
    (d / "notes.pt").write_text("not weights: my notes about the run\n")
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, d / "official.pt")

    def save(name: str, task: str, *overrides: str) -> None:
        torch.manual_seed(0)
        cfg = load_config(None, list(overrides), task=task)
        torch.save({"model": TASKS.get(task).build_model(cfg).state_dict(), "config": to_dict(cfg)}, d / name)

    save("pc_classify.pt", "pointmae_classify", "model.variant=pointmae_tiny_test", "model.num_classes=3",
         "data.npoints=64", "data.fps_points=64", "data.cache_points=64")
    save("pc_pretrain.pt", "pointmae_pretrain", "model.variant=pointmae_tiny_test", "data.npoints=64",
         "data.dataset=folder", f"data.root={d / 'points'}")
    save("video_classify.pt", "videomae_finetune", "model.variant=videomae_tiny_test", "model.num_classes=3")
    save("video_pretrain.pt", "videomae_pretrain", "model.variant=videomae_tiny_test")
    return {p.name: p for p in d.iterdir()} | {"dir": d}


# ----------------------------------------------------------------------------------------------
# Config values, refused at load with the key and where it was set
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=0", "command line: train.batch_size=0 must be >= 1"),
    ("train.batch_size=-4", "command line: train.batch_size=-4 must be >= 1"),
    ("train.accum_steps=0", "command line: train.accum_steps=0 must be >= 1"),
    ("optim.lr=-1", "command line: optim.lr=-1 must be > 0"),
    ("train.max_steps=-5", "command line: train.max_steps=-5 must be >= 1"),
    ("train.epochs=0", "command line: train.epochs=0 trains nothing"),
    ("optim.lr=1e39", "command line: optim.lr=1e+39 does not fit in float32"),
    ("optim.lr=1000", "command line: optim.lr=1000 is too large to be meaningful"),
])
def test_bad_numbers_are_refused_at_load(capsys, toy_yaml, override, expected):
    rc, out, err = run_cli(capsys, "finetune", toy_yaml, override)
    assert rc == 2 and out == ""
    error_lines(err, "finetune", expected)
    assert not (toy_yaml.parent / "run").exists()  # refused before any work


def test_bad_number_in_a_file_names_file_and_line(capsys, toy_yaml):
    toy_yaml.write_text(toy_yaml.read_text() + "optim:\n  lr: -0.5\n")
    rc, _, err = run_cli(capsys, "pretrain", toy_yaml)
    assert rc == 2
    error_lines(err, "pretrain", f"{toy_yaml}:9: optim.lr=-0.5 must be > 0")


def test_zero_epochs_only_for_a_task_that_trains_nothing():
    assert load_config(PC_SVM, ["data.root=x"]).train.epochs == 0  # the SVM probe trains no step
    with pytest.raises(ConfigError, match="train.epochs=0 trains nothing: task 'pointmae_classify'"):
        load_config(PC_FINETUNE, ["train.epochs=0"])


def test_empty_data_root(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "pretrain", PC_PRETRAIN, "data.root=", f"output_dir={tmp_path}")
    assert rc == 2
    error_lines(err, "pretrain", "data.root is empty")
    rc, _, err = run_cli(capsys, "pretrain", PC_PRETRAIN, f"data.root={tmp_path / 'nowhere'}",
                         f"output_dir={tmp_path}")
    assert rc == 2
    error_lines(err, "pretrain", f"data.root={tmp_path / 'nowhere'} is not a folder")


# ----------------------------------------------------------------------------------------------
# Found when the run starts
# ----------------------------------------------------------------------------------------------


def test_batch_larger_than_the_dataset(capsys, toy_yaml):
    rc, _, err = run_cli(capsys, "finetune", toy_yaml, "data.num_train=5")
    assert rc == 2
    error_lines(err, "finetune", "train.batch_size=8", "= 8 samples per optimizer step", "training split's 5")


def test_fp16_on_the_cpu(capsys, toy_yaml):
    rc, _, err = run_cli(capsys, "finetune", toy_yaml, "train.precision=fp16")
    assert rc == 2
    error_lines(err, "finetune", "train.precision=fp16 needs a CUDA device", "cpu")


def test_malformed_label_in_a_video_list(capsys, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("a.mp4 0\nb.mp4 zero\n")
    rc, _, err = run_cli(capsys, "finetune", VIDEO_FINETUNE, "model.variant=videomae_tiny_test",
                         f"data.root={tmp_path}", f"data.train_list={listing}", "data.label_map=",
                         f"output_dir={tmp_path / 'run'}", "train.device=cpu")
    assert rc == 2
    error_lines(err, "finetune", f"{listing}:2: label 'zero'")


@pytest.mark.parametrize("overrides, message", [
    (["data.label_map=", "data.train_list=nowhere.txt"], "annotation list 'nowhere.txt' not found (nor under data.root="),
    (["data.train_list=train.txt", "data.label_map=labels.txt"], "label map 'labels.txt' not found"),
    (["data.label_map=", "data.train_list="], "data.train_list is empty"),
], ids=["missing-list", "missing-label-map", "empty-list"])
def test_missing_video_lists_are_one_line(capsys, tmp_path, overrides, message):
    (tmp_path / "train.txt").write_text("a.mp4 0\n")
    rc, _, err = run_cli(capsys, "finetune", VIDEO_FINETUNE, "model.variant=videomae_tiny_test",
                         f"data.root={tmp_path}", *overrides, f"output_dir={tmp_path / 'run'}", "train.device=cpu")
    assert rc == 2
    error_lines(err, "finetune", message)


@pytest.mark.parametrize("config, ckpt, message", [
    (PC_FINETUNE, "video_pretrain.pt",
     "is a videomae_pretrain checkpoint (video); this run is pointmae_classify (pointcloud)"),
    (VIDEO_FINETUNE, "pc_pretrain.pt",
     "is a pointmae_pretrain checkpoint (pointcloud); this run is videomae_finetune (video)"),
], ids=["video-into-pointcloud", "pointcloud-into-video"])
def test_init_from_a_checkpoint_of_the_other_modality(capsys, tmp_path, files, config, ckpt, message):
    rc, _, err = run_cli(capsys, "finetune", config, f"init={files[ckpt]}", f"output_dir={tmp_path}")
    assert rc == 2
    error_lines(err, "finetune", f"init={files[ckpt]} {message}")


# ----------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------


def test_text_file_named_pt(capsys, files):
    rc, _, err = run_cli(capsys, "predict", "--checkpoint", files["notes.pt"], files["dir"] / "points" / "a.npy")
    assert rc == 2
    error_lines(err, "predict", f"{files['notes.pt']} is not a torch checkpoint: it is a text file")


def test_pickle_message_has_no_terminal_escapes(capsys, files):
    rc, _, err = run_cli(capsys, "predict", "--checkpoint", files["official.pt"], files["dir"] / "points" / "a.npy")
    assert rc == 2
    error_lines(err, "predict", str(files["official.pt"]), "argparse.Namespace", "--allow-pickle")
    assert "\x1b" not in err


# ----------------------------------------------------------------------------------------------
# mm3d predict / visualize inputs
# ----------------------------------------------------------------------------------------------


def test_predict_reports_every_bad_point_cloud_and_classifies_the_rest(capsys, files):
    points = files["dir"] / "points"
    bad = [points / "missing.npy", points, files["cloud.foo"]]
    rc, out, err = run_cli(capsys, "predict", "--checkpoint", files["pc_classify.pt"], "--topk", "2",
                           points / "a.npy", *bad, points / "b.npy")
    assert rc == 1
    lines = error_lines(err, "predict", count=3)
    for line, path, why in zip(lines, bad, ["not found", "is a folder", "unsupported point-cloud extension '.foo'"]):
        assert str(path) in line and why in line, line
    assert out.splitlines()[0] == str(points / "a.npy") and out.splitlines()[3] == str(points / "b.npy")
    assert len(out.splitlines()) == 6  # two good inputs, each with its top-2


def test_predict_json_keeps_one_row_per_input(capsys, files):
    points = files["dir"] / "points"
    rc, out, err = run_cli(capsys, "predict", "--checkpoint", files["pc_classify.pt"], "--json",
                           points / "missing.npy", points / "a.npy")
    assert rc == 1
    error_lines(err, "predict", str(points / "missing.npy"))
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["input"] for r in rows] == [str(points / "missing.npy"), str(points / "a.npy")]
    assert rows[0]["topk"] == [] and "not found" in rows[0]["error"] and len(rows[1]["topk"]) == 3


def test_predict_bad_video_files(capsys, files):
    missing, foo = files["dir"] / "missing.mp4", files["cloud.foo"]
    rc, out, err = run_cli(capsys, "predict", "--checkpoint", files["video_classify.pt"], missing, foo)
    assert rc == 1 and out == ""
    lines = error_lines(err, "predict", str(missing), count=2)
    assert str(foo) in lines[1]


@pytest.mark.parametrize("args, expected", [
    (["--topk", "0"], "--topk must be >= 1, got 0"),
    (["--label-map", "nowhere.txt"], "nowhere.txt does not exist"),
])
def test_predict_bad_options(capsys, files, args, expected):
    rc, out, err = run_cli(capsys, "predict", "--checkpoint", files["pc_classify.pt"], *args,
                           files["dir"] / "points" / "a.npy")
    assert rc == 2 and out == ""
    error_lines(err, "predict", expected)


@pytest.mark.parametrize("name, expected", [
    ("points/missing.npy", "point-cloud file not found"),
    ("points", "is a folder, not a point-cloud file"),
    ("cloud.foo", "unsupported point-cloud extension '.foo'"),
])
def test_visualize_bad_point_cloud_input(capsys, files, name, expected):
    path = files["dir"] / name
    rc, _, err = run_cli(capsys, "visualize", "--checkpoint", files["pc_pretrain.pt"], "--input", path,
                         "--out", files["dir"] / "vis")
    assert rc == 2
    error_lines(err, "visualize", "--input: ", str(path), expected)


def test_visualize_missing_video(capsys, files):
    path = files["dir"] / "missing.mp4"
    rc, _, err = run_cli(capsys, "visualize", "--checkpoint", files["video_pretrain.pt"], "--input", path,
                         "--out", files["dir"] / "vis")
    assert rc == 2
    error_lines(err, "visualize", f"--input: {path}: file does not exist")


@pytest.mark.parametrize("index, expected", [
    ("999", "--dataset-index 999 is out of range: the test split of {root} has 2 items"),
    ("-1", "--dataset-index must be >= 0, got -1"),
])
def test_visualize_dataset_index_out_of_range(capsys, files, index, expected):
    rc, _, err = run_cli(capsys, "visualize", "--checkpoint", files["pc_pretrain.pt"], "--dataset-index", index,
                         "--out", files["dir"] / "vis")
    assert rc == 2
    error_lines(err, "visualize", expected.format(root=files["dir"] / "points"))


# ----------------------------------------------------------------------------------------------
# Start-up
# ----------------------------------------------------------------------------------------------


def test_checkout_folder_named_mm3d_shadowing_the_package(tmp_path):
    """`python -m mm3d.cli` from the folder that holds a checkout named mm3d/: `import mm3d` finds
    the checkout as a namespace package. Said at start-up, before any work."""
    (tmp_path / "mm3d").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import mm3d; print(mm3d.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    if probe.stdout.strip() != "None":  # a regular install wins over a namespace folder
        pytest.skip(f"this install is not shadowed by a folder named mm3d ({probe.stdout.strip()})")
    proc = subprocess.run([sys.executable, "-m", "mm3d.cli", "tasks"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    error_lines(proc.stderr, "tasks", f"found the folder {tmp_path / 'mm3d'}", "run from another folder")
