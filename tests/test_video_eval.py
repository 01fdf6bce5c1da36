"""Video evaluation: multi-view aggregation against hand-computed values, the report files, DDP evaluation
(2 CPU processes = 1 process) and `mm3d predict` on the real clips."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mm3d.cli import main as cli_main
from mm3d.config import load_config, to_dict
from mm3d.registry import TASKS
from mm3d.task import ModelOutput
from mm3d.testing import assert_close
from mm3d.video.finetune import collate_views
from mm3d.video.tokens import interpolate_pos_embed
from mm3d.video.synth import SynthVideoSpec, write_video_dataset

TASK = TASKS.get("videomae_finetune")


@dataclass
class _Out(ModelOutput):
    logits: torch.Tensor


class StubModel(torch.nn.Module):
    """Logits = log of the probabilities stored in the first voxel of each view's channels."""

    def forward(self, batch):
        probs = batch["video"][:, :, 0, 0, 0]  # (N, C)
        return _Out(loss=None, logits=probs.log())


def view_batch(per_video: list[list[list[float]]], labels: list[int], first_index: int = 0):
    """One collated batch: video v has len(per_video[v]) views with the given class probabilities."""
    samples = []
    for v, (views, label) in enumerate(zip(per_video, labels)):
        video = torch.tensor(views)[:, :, None, None, None].expand(-1, -1, 2, 2, 2).contiguous()  # (V, C, T, H, W)
        samples.append({"video": video, "label": torch.tensor(label), "index": torch.tensor(first_index + v)})
    return collate_views(samples)


def cfg3(*overrides: str):
    return load_config(None, ["task=videomae_finetune", "model.variant=videomae_tiny_test", "model.num_classes=3",
                              *overrides])


# ---------------------------------------------------------------------------- aggregation


def test_multi_view_softmax_average_against_hand_computed_values():
    # video 0 (label 0): views [.6 .3 .1] and [.1 .5 .4] -> mean [.35 .4 .25]: predicted 1 (wrong, though
    #   view 0 alone says 0), top-2 right
    # video 1 (label 1): views [.2 .2 .6] and [.2 .7 .1] -> mean [.2 .45 .35]: right
    # video 2 (label 2): views [.1 .1 .8] and [.3 .3 .4]  -> mean [.2 .2 .6]: right
    # video 3 (label 2): views [.5 .2 .3] and [.5 .1 .4] -> mean [.5 .15 .35]: predicted 0, top-2 right
    loader = [view_batch([[[.6, .3, .1], [.1, .5, .4]], [[.2, .2, .6], [.2, .7, .1]]], [0, 1], 0),
              view_batch([[[.1, .1, .8], [.3, .3, .4]], [[.5, .2, .3], [.5, .1, .4]]], [2, 2], 2)]
    cfg = cfg3("train.batch_size=1", "data.num_sample=1", "mixup.mixup=0", "mixup.cutmix=0")  # 1 view per forward
    res = TASK.evaluate(StubModel(), loader, cfg, torch.device("cpu"), "test")
    m = res.metrics
    assert m["num_samples"] == 4
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top5"] == pytest.approx(1.0)  # top-5 over 3 classes: all
    # per class: class 0: 0/1, class 1: 1/1, class 2: 1/2 -> mean (0 + 1 + .5) / 3
    assert m["mean_class_acc"] == pytest.approx(0.5)
    nll = -(math.log(.35) + math.log(.45) + math.log(.6) + math.log(.35)) / 4
    assert m["loss"] == pytest.approx(nll, rel=1e-5)
    art = res.artifacts["classification"]
    assert_close(art.probs, torch.tensor([[.35, .4, .25], [.2, .45, .35], [.2, .2, .6], [.5, .15, .35]]), atol=1e-6)
    assert art.index.tolist() == [0, 1, 2, 3] and art.labels.tolist() == [0, 1, 2, 2]
    assert art.confusion.tolist() == [[0, 1, 0], [0, 1, 0], [1, 0, 1]]

    # a sampler that pads repeats whole videos (all their views): the metrics do not change
    padded = loader + [view_batch([[[.6, .3, .1], [.1, .5, .4]]], [0], 0)]
    again = TASK.evaluate(StubModel(), padded, cfg, torch.device("cpu"), "test")
    assert again.metrics == pytest.approx(m, rel=1e-6)


def test_write_report_files(tmp_path):
    (tmp_path / "labels.txt").write_text("run\nwalk\njump\n")
    cfg = cfg3(f"data.label_map={tmp_path / 'labels.txt'}")
    loader = [view_batch([[[.6, .3, .1]], [[.25, .15, .6]], [[.1, .8, .1]]], [0, 1, 1], 0)]
    res = TASK.evaluate(StubModel(), loader, cfg, torch.device("cpu"), "val")

    class Rows:  # what the report reads from a dataset: its records' paths
        records = [type("R", (), {"path": f"clip{i}.mp4"})() for i in range(3)]

    files = TASK.write_report(tmp_path, StubModel(), cfg, {"val": res}, {"val": Rows()}, torch.device("cpu"))
    assert {f.relative_to(tmp_path).as_posix() for f in files} == {
        "val/predictions.json", "val/per_class.csv", "val/confusion.png", "results.md"}
    rows = json.loads((tmp_path / "val" / "predictions.json").read_text())
    assert [r["sample"] for r in rows] == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    topk = rows[1].pop("topk")
    assert rows[1] == {"sample": "clip1.mp4", "index": 1, "label": 1, "label_name": "walk", "correct": False}
    assert [c for c, _ in topk] == ["jump", "run", "walk"] and [p for _, p in topk] == pytest.approx([.6, .25, .15])
    assert [r["correct"] for r in rows] == [True, False, True]
    per_class = (tmp_path / "val" / "per_class.csv").read_text().splitlines()
    assert per_class == ["label,class,samples,correct,accuracy", "0,run,1,1,1.0000", "1,walk,2,1,0.5000",
                         "2,jump,0,0,"]
    md = (tmp_path / "results.md").read_text()
    assert "| val | 0.6667 |" in md and "honest: best on val" in md
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "val" / "confusion.png").convert("L"), dtype=np.float32)
    assert img.std() > 10  # not blank


# ------------------------------------------------------------------------------------- DDP


def _write_classifier(path: Path, cfg) -> None:
    torch.manual_seed(0)
    model = TASK.build_model(cfg)
    with torch.no_grad():  # a head that is not near-uniform, so that the metrics vary across videos
        model.head.weight.normal_(0, 1.0)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)


@pytest.mark.slow
def test_ddp_evaluation_on_two_processes_matches_one(tmp_path):
    """`mm3d evaluate` under torchrun (2 CPU processes, gloo; 9 videos split 5 + 4) gives the metrics
    and predictions of one process."""
    root = tmp_path / "synth"
    write_video_dataset(root, SynthVideoSpec(size=32, min_frames=8, max_frames=12, per_class=(1, 1, 1)),
                        seed=1, rawframes=False)
    overrides = [f"data.root={root}", "data.train_list=train.txt", "data.val_list=val.txt", "data.test_list=test.txt",
                 "data.label_map=label_map.txt", "model.num_classes=9", "data.test_num_clips=2",
                 "data.test_num_crops=3", "data.sampling_rate=2", "train.batch_size=2", "train.device=cpu",
                 "train.tensorboard=false", "train.progress=off"]
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("task: videomae_finetune\nmodel:\n  variant: videomae_tiny_test\n")
    ckpt = tmp_path / "cls.pt"
    _write_classifier(ckpt, load_config(cfg_file, overrides))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "mm3d.cli", "evaluate", str(cfg_file), *overrides, f"checkpoint={ckpt}",
               f"output_dir={tmp_path / f'ddp{n}'}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[n] = tmp_path / f"ddp{n}" / "eval"
    one, two = (json.loads((outs[n] / "results.json").read_text()) for n in (1, 2))
    for split in ("val", "test"):
        assert one[split]["num_samples"] == two[split]["num_samples"] == 9
        for k, v in one[split].items():
            assert two[split][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (split, k)
        p1, p2 = (json.loads((outs[n] / split / "predictions.json").read_text()) for n in (1, 2))
        assert [r["sample"] for r in p1] == [r["sample"] for r in p2]
        for a, b in zip(p1, p2):
            assert [c for c, _ in a["topk"]] == [c for c, _ in b["topk"]]
            assert [s for _, s in a["topk"]] == pytest.approx([s for _, s in b["topk"]], abs=1e-5)


def test_evaluate_scores_weights_at_another_frame_count_and_refuses_another_head(tmp_path, caplog, capsys):
    """`mm3d evaluate` interpolates the position table of weights fine-tuned at 4 frames to score
    at 8 (naming the key), and fails, naming the head, on weights with another class count."""
    root = tmp_path / "synth"
    write_video_dataset(root, SynthVideoSpec(size=32, min_frames=10, max_frames=12, per_class=(0, 1, 0)),
                        seed=2, rawframes=False)
    overrides = [f"data.root={root}", "data.val_list=val.txt", "model.num_classes=9", "data.val_num_clips=1",
                 "data.sampling_rate=1", "train.batch_size=3", "train.device=cpu", "train.tensorboard=false",
                 "train.progress=off", "train.num_workers=0"]
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("task: videomae_finetune\nmodel:\n  variant: videomae_tiny_test\n")
    ckpt = tmp_path / "cls4.pt"
    _write_classifier(ckpt, load_config(cfg_file, overrides))  # the variant's 4 frames
    # A head that makes a known score at 8 frames: on the features of the 4-frame encoder with its
    # position table interpolated to the 8-frame grid, fit the head so that 6 of the 9 videos get their
    # label and 3 the next class. Scoring with any other table changes the features, and the score.
    cfg8 = load_config(cfg_file, [*overrides, "model.num_frames=8"])
    ck = torch.load(ckpt, weights_only=True)
    state = dict(ck["model"], **{"encoder.pos_embed": interpolate_pos_embed(ck["model"]["encoder.pos_embed"],
                                                                             (2, 4, 4), (4, 4, 4))})
    model = TASK.build_model(cfg8)
    model.load_state_dict(state)
    val = TASK.build_datasets(cfg8, ["val"])["val"]
    batch = collate_views([val[i] for i in range(len(val))])
    labels = batch["label"]
    with torch.no_grad():
        feats = model.eval().forward_head(model.forward_features(batch["video"]), pre_logits=True)  # (9, 48): one view per video
    wrong = torch.arange(9) >= 6
    target = torch.where(wrong, (labels + 1) % 9, labels)
    design = torch.cat([feats.double(), torch.ones(9, 1, dtype=torch.float64)], dim=1)  # (9, 49)
    solution = torch.linalg.lstsq(design, 8.0 * torch.nn.functional.one_hot(target, 9).double()).solution
    ck["model"]["head.weight"], ck["model"]["head.bias"] = solution[:-1].T.float(), solution[-1].float()
    torch.save(ck, ckpt)
    with caplog.at_level("INFO"):
        assert cli_main(["evaluate", str(cfg_file), *overrides, "model.num_frames=8", f"checkpoint={ckpt}",
                         f"output_dir={tmp_path / 'at8'}"]) == 0
    assert "encoder.pos_embed: interpolated" in caplog.text
    res = json.loads((tmp_path / "at8" / "eval" / "results.json").read_text())
    assert res["val"]["num_samples"] == 9 and 0.0 <= res["val"]["top1"] <= 1.0
    assert res["val"]["top1"] == pytest.approx(6 / 9)
    rows = {r["label"]: r for r in json.loads((tmp_path / "at8" / "eval" / "val" / "predictions.json").read_text())}
    names = [rows[c]["label_name"] for c in range(9)]  # one val video per class
    for label, want in zip(labels.tolist(), target.tolist()):
        assert rows[label]["topk"][0][0] == names[want] and rows[label]["correct"] == (want == label)
    other = tmp_path / "cls5.pt"
    _write_classifier(other, load_config(cfg_file, [*overrides[:2], "model.num_classes=5", *overrides[3:]]))
    assert cli_main(["evaluate", str(cfg_file), *overrides, f"checkpoint={other}",
                     f"output_dir={tmp_path / 'bad'}"]) != 0
    assert "head.weight: checkpoint (5, 48) vs model (9, 48)" in capsys.readouterr().err


# --------------------------------------------------------------------------------- predict


def _fit_two_clips(cfg, files: list[str], labels: list[int], steps: int = 40) -> torch.nn.Module:
    """A tiny classifier that tells the two real clips apart from their test views."""
    list_file = Path(cfg.data.test_list)
    list_file.write_text("".join(f"{f} {label}\n" for f, label in zip(files, labels)))
    ds = TASK.build_datasets(cfg, ["test"])["test"]
    batch = collate_views([ds[i] for i in range(len(files))])
    batch.pop("index")
    model = TASK.build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_predict_cli_on_real_clips(tmp_path, realdata):
    video = realdata / "video"
    label_map = video / "label_maps" / "label_map_k400.txt"
    names = label_map.read_text().splitlines()
    mp4 = str(video / "kinetics400" / "arm_wrestling" / "demo.mp4")
    avi = str(video / "ucf101" / "ApplyEyeMakeup" / "test.avi")
    frames = str(video / "rawframes" / "ApplyEyeMakeup_clip")
    cfg = load_config(None, ["task=videomae_finetune", "model.variant=videomae_tiny_test", "model.num_classes=400",
                             f"data.label_map={label_map}", "data.test_num_clips=2", "data.test_num_crops=3",
                             "data.sampling_rate=2", "mixup.mixup=0", "mixup.cutmix=0",
                             f"data.test_list={tmp_path / 'list.txt'}"])
    torch.manual_seed(0)
    model = _fit_two_clips(cfg, [mp4, avi], [names.index("arm wrestling"), names.index("applying cream")])
    ckpt = tmp_path / "tiny_k400.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, ckpt)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["predict", "--checkpoint", str(ckpt), "--label-map", str(label_map), "--topk", "3", "--json",
                       mp4, avi, frames, str(tmp_path / "missing.mp4")])
    assert rc == 1  # one input could not be read; the others are still classified
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["input"] for r in rows] == [mp4, avi, frames, str(tmp_path / "missing.mp4")]
    assert rows[0]["topk"][0][0] == "arm wrestling" and rows[1]["topk"][0][0] == "applying cream"
    for r in rows[:3]:
        assert r["views"] == 6 and len(r["topk"]) == 3 and all(name in names for name, _ in r["topk"])
        probs = [p for _, p in r["topk"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert rows[3]["topk"] == [] and "does not exist" in rows[3]["error"]

    # prediction and evaluation see the same views: the list's averaged probabilities equal predict's
    ds = TASK.build_datasets(cfg, ["test"])["test"]
    res = TASK.evaluate(model, [collate_views([ds[0], ds[1]])], cfg, torch.device("cpu"), "test")
    probs = res.artifacts["classification"].probs
    for i, row in enumerate(rows[:2]):
        for name, p in row["topk"]:
            assert probs[i, names.index(name)].item() == pytest.approx(p, abs=1e-5)
    assert res.metrics["top1"] == 1.0

    # a label map of the wrong length is refused with a clear message
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(["predict", "--checkpoint", str(ckpt), "--label-map", str(short), mp4])
    assert rc == 2 and "has 2 classes but the model's head has model.num_classes=400" in err.getvalue()
