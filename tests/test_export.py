"""`mm3d export`: ONNX and torch.export files of the tiny variants, run from disk on real samples and
compared with the eager model; the grouping of Point-MAE inside the graph; the model card inside the
files; the traced FPS / KNN formulations against the eager ops."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import mm3d.pointcloud
import mm3d.video
from mm3d.checkpoint import model_from_checkpoint
from mm3d.cli import main
from mm3d.config import load_config, to_dict
from mm3d.export import example_input, run_exported
from mm3d.modelcard import build_card, checkpoint_card, read_card
from mm3d.pointcloud.ops import farthest_point_sample, knn
from mm3d.pointcloud.ops.fps import _fps_torch, _fps_traced
from mm3d.pointcloud.ops.knn import _knn_traced
from mm3d.registry import TASKS
from mm3d.testing import PROJECT_ROOT, assert_close, realdata_dir

TOL = 1e-4
README = PROJECT_ROOT / "README.md"
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or
                               importlib.util.find_spec("onnxscript") is None,
                               reason="onnx export needs onnxscript and onnxruntime (pip install 'mm3d[export]')")


def _real() -> Path:
    root = realdata_dir()
    if root is None:
        pytest.skip("real-data samples not found (set MM3D_REALDATA or place ../shared/realdata)")
    return root


def _checkpoint(path: Path, task_name: str, overrides: list[str], *, seed: int = 0, head_gain: float = 1.0) -> Path:
    """One of our checkpoints as the trainer writes it: weights, config, step and card. The weights are
    random, BatchNorm statistics too (no layer is the identity); `head_gain` scales the last layer of
    a classifier's head, so that logits of order 1 show small changes of the features."""
    cfg = load_config(None, overrides, task=task_name)
    task = TASKS.get(task_name)
    torch.manual_seed(seed)
    model = task.build_model(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    if getattr(model, "num_classes", 0):
        last = [m for m in model.get_classifier().modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(head_gain)
    card = checkpoint_card(build_card(task, cfg, model=model, protocol={"protocol": "test"}), step=7, epoch=1)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 7, "epoch": 1, "model_card": card}, path)
    return path


def _export(ckpt: Path, out: Path, *flags: str) -> dict:
    """`mm3d export` through the CLI; returns its JSON line."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["export", "--checkpoint", str(ckpt), "--out", str(out), *flags])
    assert code == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def _eager(ckpt: Path):
    return model_from_checkpoint(str(ckpt))[2]


# ----------------------------------------------------------------------------------------------
# Checkpoints and real inputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pc_ckpt(tmp_path_factory) -> Path:
    """A tiny Point-MAE ModelNet40 classifier (class names from the real sample's shape list)."""
    root = _real() / "pointcloud" / "modelnet40_sample"
    return _checkpoint(tmp_path_factory.mktemp("pc") / "cls.pt", "pointmae_classify",
                       ["model.variant=pointmae_tiny_test", "model.num_classes=40", "data.npoints=256",
                        "data.fps_points=256", f"data.root={root}", "model.cls_dropout=0.0"], head_gain=100.0)


@pytest.fixture(scope="module")
def pc_clouds(pc_ckpt) -> torch.Tensor:
    """(3, 256, 3) real ModelNet40 shapes as `mm3d predict` prepares them."""
    root = _real() / "pointcloud" / "modelnet40_sample"
    names = ["airplane/airplane_0126.txt", "chair/chair_0391.txt", "lamp/lamp_0043.txt"]
    return torch.stack([mm3d.pointcloud.load_cloud(root / n, checkpoint=pc_ckpt) for n in names])


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory) -> Path:
    """A tiny VideoMAE Kinetics-400 classifier (class names from the real label map)."""
    label_map = _real() / "video" / "label_maps" / "label_map_k400.txt"
    return _checkpoint(tmp_path_factory.mktemp("video") / "cls.pt", "videomae_finetune",
                       ["model.variant=videomae_tiny_test", "model.num_classes=400", f"data.label_map={label_map}",
                        "data.sampling_rate=2"], head_gain=5000.0)  # the head starts at 0.001 x trunc_normal


@pytest.fixture(scope="module")
def video_clips(video_ckpt) -> torch.Tensor:
    """(3, 3, 4, 32, 32): the Kinetics mp4, the UCF101 avi and the rawframe folder, as `mm3d predict`
    prepares them (their evaluation view)."""
    root = _real() / "video"
    inputs = [root / "kinetics400" / "arm_wrestling" / "demo.mp4", root / "ucf101" / "ApplyEyeMakeup" / "test.avi",
              root / "rawframes" / "ApplyEyeMakeup_clip"]
    return torch.stack([mm3d.video.load_clip(p, checkpoint=video_ckpt) for p in inputs])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    """``exported(name)``: the file `name` (``pc.pt2``, ``video.onnx``, ...) of the classifier of its
    modality, written through `mm3d export --dynamic-batch` on first use; returns (path, the command's report)."""
    out, cache = tmp_path_factory.mktemp("exports"), {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in cache:
            ckpt = request.getfixturevalue("pc_ckpt" if name.startswith("pc") else "video_ckpt")
            cache[name] = out / name, _export(ckpt, out / name, "--dynamic-batch")
        return cache[name]

    return get


ONNX = [needs_ort]
PC_FILES = ["pc.pt2", pytest.param("pc.onnx", marks=ONNX)]
VIDEO_FILES = ["video.pt2", pytest.param("video.onnx", marks=ONNX)]


# ----------------------------------------------------------------------------------------------
# Exports match eager on real samples
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PC_FILES)
def test_point_mae_export_matches_eager_on_real_shapes_batch_1_and_3(exported, name, pc_ckpt, pc_clouds):
    path, report = exported(name)
    model = _eager(pc_ckpt)
    for batch in (pc_clouds[:1], pc_clouds):  # one file with an open batch axis
        with torch.no_grad():
            expected = model(batch).logits
        assert expected.std() > 0.3  # logits that a wrong grouping or weight would move by far more than TOL
        (got,) = run_exported(path, batch)
        assert got.shape == (batch.shape[0], 40)
        assert_close(torch.from_numpy(got), expected, atol=TOL, rtol=0, msg=name)
    assert report["max_abs_diff"] <= TOL
    assert report["outputs"] == {"logits": ["batch", 40]}


@pytest.mark.parametrize("name", VIDEO_FILES)
def test_videomae_export_matches_eager_on_real_clips_batch_1_and_3(exported, name, video_ckpt, video_clips):
    path, _ = exported(name)
    model = _eager(video_ckpt)
    for batch in (video_clips[:1], video_clips):
        with torch.no_grad():
            expected = model(batch).logits
        assert expected.std() > 0.3
        (got,) = run_exported(path, batch)
        assert got.shape == (batch.shape[0], 400)
        assert_close(torch.from_numpy(got), expected, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("name", PC_FILES)
def test_point_mae_grouping_is_in_the_graph(exported, name, pc_ckpt, pc_clouds):
    """The file takes raw points: reordering a cloud moves FPS's first centre (point 0), which changes
    the eager output; the file follows the reordered cloud exactly as eager does."""
    path, _ = exported(name)
    model = _eager(pc_ckpt)
    cloud = pc_clouds[1:2]
    reordered = cloud[:, torch.randperm(cloud.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        before, after = model(cloud).logits, model(reordered).logits
    assert (before - after).abs().max() > 1e-3, "the eager output should depend on the point order"
    (got,) = run_exported(path, reordered)
    assert_close(torch.from_numpy(got), after, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("name", PC_FILES + VIDEO_FILES)
def test_exported_files_carry_the_model_card(exported, name):
    path, _ = exported(name)
    info = read_card(path)
    card = info.card
    assert info.kind == path.suffix[1:]
    assert card["export"]["format"] == path.suffix[1:] and card["export"]["dynamic_batch"] is True
    assert card["export"]["max_abs_diff"] <= TOL and card["export"]["checked_with"]
    assert card["checkpoint"]["step"] == 7
    if name.startswith("pc"):
        assert card["task"] == "pointmae_classify"
        assert card["preprocessing"]["input"] == "points" and card["preprocessing"]["shape"] == [256, 3]
        assert card["preprocessing"]["grouping"] == {**card["preprocessing"]["grouping"], "groups": 16, "group_size": 8}
        assert card["classes"][0] == "airplane" and len(card["classes"]) == 40
        assert card["export"]["inputs"] == {"points": ["batch", 256, 3]}
    else:
        assert card["task"] == "videomae_finetune"
        pre = card["preprocessing"]
        assert (pre["shape"], pre["sampling_rate"], pre["mean"]) == ([3, 4, 32, 32], 2, [0.485, 0.456, 0.406])
        assert card["classes"][6] == "arm wrestling" and len(card["classes"]) == 400
    if path.suffix == ".onnx":
        assert info.basics["inputs"] == card["export"]["inputs"]
        assert info.basics["outputs"] == {"logits": ["batch", card["model"]["num_classes"]]}


@pytest.mark.parametrize("name", ["video.pt2", pytest.param("pc.onnx", marks=ONNX)])
def test_mm3d_info_reads_exports(exported, name, capsys):
    path, _ = exported(name)
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"({path.suffix[1:]})" in text.splitlines()[0] and "model card:" in text and "max_abs_diff" in text
    assert main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == path.suffix[1:] and data["card"]["export"]["file"] == path.name


def test_features_of_pretraining_models_export(tmp_path, pc_clouds):
    """A pretraining checkpoint (no head) exports its pooled feature and its tokens; --logits is refused."""
    ckpt = _checkpoint(tmp_path / "pre.pt", "pointmae_pretrain",
                       ["model.variant=pointmae_tiny_test", "data.npoints=256"])
    report = _export(ckpt, tmp_path / "pre.pt2")
    assert report["outputs"] == {"features": [1, 64], "tokens": [1, 16, 32]}
    model = _eager(ckpt)
    with torch.no_grad():
        tokens = model.forward_features(pc_clouds[:1])
        feature = model.forward_head(tokens)
    got_feature, got_tokens = run_exported(tmp_path / "pre.pt2", pc_clouds[:1])
    assert_close(torch.from_numpy(got_feature), feature, atol=TOL, rtol=0)
    assert_close(torch.from_numpy(got_tokens), tokens, atol=TOL, rtol=0)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.pt2"), "--logits"]) == 2


def test_export_refuses_bad_requests(tmp_path, pc_ckpt, capsys):
    assert main(["export", "--checkpoint", str(pc_ckpt), "--out", str(tmp_path / "m.onnx"), "--format", "pt2"]) == 2
    assert "does not end in .pt2" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(pc_ckpt), "--out", str(tmp_path / "m.bin")]) == 2
    assert "--format onnx|pt2" in capsys.readouterr().err
    seg = _checkpoint(tmp_path / "seg.pt", "pointmae_partseg", ["model.variant=pointmae_tiny_test", "data.npoints=256"])
    assert main(["export", "--checkpoint", str(seg), "--out", str(tmp_path / "seg.pt2")]) == 3
    assert "not available" in capsys.readouterr().err


@needs_ort
def test_videomae_encoder_features_onnx(tmp_path, video_clips):
    """The encoder of a VideoMAE pretraining checkpoint as ONNX: mean-pooled feature and tokens."""
    ckpt = _checkpoint(tmp_path / "pre.pt", "videomae_pretrain", ["model.variant=videomae_tiny_test"])
    report = _export(ckpt, tmp_path / "enc.onnx", "--features", "--dynamic-batch")
    assert report["outputs"] == {"features": ["batch", 48], "tokens": ["batch", 32, 48]}
    model = _eager(ckpt)
    with torch.no_grad():
        tokens = model.forward_features(video_clips)
    got_feature, got_tokens = run_exported(tmp_path / "enc.onnx", video_clips)
    assert_close(torch.from_numpy(got_tokens), tokens, atol=TOL, rtol=0)
    assert_close(torch.from_numpy(got_feature), tokens.mean(dim=1), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# The README's commands
# ----------------------------------------------------------------------------------------------


def readme_export_section() -> tuple[list[str], list[str]]:
    """The README's "Export" section: its `mm3d` command lines (continuations joined) and its python blocks."""
    text = README.read_text()
    section = re.search(r"^## Export\b.*?\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, "README.md has no '## Export' section"
    bash = " ".join(re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S)).replace("\\\n", " ")
    commands = [ln.split("#")[0].strip() for ln in bash.splitlines() if ln.strip().startswith("mm3d ")]
    return commands, re.findall(r"```python\n(.*?)```", section.group(1), flags=re.S)


@needs_ort
def test_readme_export_commands_run(tmp_path, monkeypatch, capsys, pc_ckpt, video_ckpt, pc_clouds):
    """Every `mm3d export` / `mm3d info` line and the python block of the README's "Export" section run
    (the demo checkpoints replaced by tiny ones); the python block gives the eager logits."""
    commands, python = readme_export_section()
    assert any(c.startswith("mm3d export") for c in commands) and any(c.startswith("mm3d info") for c in commands)
    real = _real()
    stand_ins = {"runs/pointmae_finetune_demo/checkpoints/best.pt": str(pc_ckpt),
                 "runs/videomae_finetune_demo/checkpoints/best.pt": str(video_ckpt),
                 "runs/videomae_pretrain_demo/checkpoints/last.pt": str(
                     _checkpoint(tmp_path / "pre.pt", "videomae_pretrain", ["model.variant=videomae_tiny_test"]))}
    monkeypatch.chdir(tmp_path)
    for command in commands:
        words = [stand_ins.get(w, w).replace("../shared/realdata", str(real)) for w in shlex.split(command)]
        assert main(words[1:]) == 0, (command, capsys.readouterr().err[-2000:])
    capsys.readouterr()
    assert python, "the Export section has no python block"
    for block in python:
        for old, new in stand_ins.items():
            block = block.replace(old, new)
        namespace: dict = {}
        exec(block.replace("../shared/realdata", str(real)), namespace)
    with torch.no_grad():
        expected = _eager(pc_ckpt)(pc_clouds[1:2]).logits  # chair_0391, as in the README block
    assert_close(torch.from_numpy(namespace["logits"]), expected, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# The traced FPS and KNN
# ----------------------------------------------------------------------------------------------


def _cloud(kind: str, batch: int, num: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(batch, num, 3, generator=g)
    if kind == "grid":  # integer coordinates: many exact ties
        return torch.randint(0, 3, (batch, num, 3), generator=g).float()
    if kind == "duplicates":
        pool = torch.randn(batch, max(1, num // 3), 3, generator=g)
        return pool[:, torch.randint(0, pool.shape[1], (num,), generator=g)]
    return torch.randn(batch, 1, 3, generator=g).expand(batch, num, 3).contiguous()  # identical


@pytest.mark.parametrize("kind", ["random", "grid", "duplicates", "identical"])
@pytest.mark.parametrize("batch,num,samples", [(1, 17, 17), (3, 64, 16), (2, 300, 32)])
def test_traced_fps_picks_the_same_points(kind, batch, num, samples):
    points = _cloud(kind, batch, num, seed=num)
    first = torch.randint(0, num, (batch,), generator=torch.Generator().manual_seed(1))
    expected = _fps_torch(points, samples, first)
    assert torch.equal(_fps_traced(points, samples, first), expected)
    assert torch.equal(_fps_traced(points.double(), samples, first), _fps_torch(points.double(), samples, first))


def test_traced_knn_finds_the_same_neighbours():
    g = torch.Generator().manual_seed(0)
    query, points = torch.randn(2, 20, 3, generator=g), torch.randn(2, 200, 3, generator=g)
    expected = knn(query, points, 8, backend="torch")
    got = _knn_traced(query, points, 8)
    assert torch.equal(got.idx, expected.idx)  # no ties among random points: the same order too
    assert_close(got.dist2, expected.dist2, atol=1e-6)
    grid = _cloud("grid", 2, 50, seed=3)  # ties: the same distances, rows ascending
    assert_close(_knn_traced(grid[:, :10], grid, 6).dist2, knn(grid[:, :10], grid, 6, backend="torch").dist2)


class _Grouping(torch.nn.Module):
    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centres = farthest_point_sample(points, 12)
        query = torch.gather(points, 1, centres[..., None].expand(-1, -1, 3))
        return centres, knn(query, points, 5).idx


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("onnx", marks=ONNX)])
def test_fps_and_knn_under_torch_export_follow_the_input(tmp_path, fmt):
    """FPS and KNN traced with an open batch axis: the saved file (run by torch.export.load, or by
    onnxruntime) picks what the eager ops pick, for clouds it was not traced with (ties included)."""
    shapes = {"points": {0: torch.export.Dim("batch", min=1)}}
    program = torch.export.export(_Grouping(), (_cloud("random", 2, 100, 0),), dynamic_shapes=shapes)
    path = tmp_path / f"g.{fmt}"
    if fmt == "pt2":
        torch.export.save(program, path)
    else:
        torch.onnx.export(program, dynamo=True, input_names=["points"], dynamic_shapes=shapes).save(str(path))
    for points in (_cloud("random", 1, 100, 5), _cloud("grid", 3, 100, 6)):
        centres, neighbours = (torch.from_numpy(a) for a in run_exported(path, points))
        assert torch.equal(centres, farthest_point_sample(points, 12, backend="torch"))
        query = torch.gather(points, 1, centres[..., None].expand(-1, -1, 3))
        eager = knn(query, points, 5, backend="torch")
        picked = torch.gather(points, 1, neighbours.flatten(1)[..., None].expand(-1, -1, 3)).view(*neighbours.shape, 3)
        assert_close(((picked - query[:, :, None]) ** 2).sum(-1), eager.dist2, atol=1e-6)  # the same distances


def test_example_inputs_follow_the_preprocessing():
    video = example_input({"input": "video", "shape": [3, 4, 8, 8]}, 2)
    points = example_input({"input": "points", "shape": [50, 3]}, 3)
    assert video.shape == (2, 3, 4, 8, 8) and points.shape == (3, 50, 3)
    assert_close(points.norm(dim=-1).amax(dim=1), torch.ones(3), atol=1e-6)
    assert np.isfinite(video.numpy()).all()
