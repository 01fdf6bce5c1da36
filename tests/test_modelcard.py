"""Model cards: what the trainer stores in each checkpoint and in ``model_card.json``, what ``mm3d
convert`` records, and ``mm3d info`` on our checkpoints, converted ones and checkpoints without a card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm3d.checkpoint import load_checkpoint
from mm3d.cli import main
from mm3d.config import load_config, to_dict
from mm3d.modelcard import RUN_CARD_FILE, build_card, checkpoint_card, format_info, read_card
from mm3d.registry import TASKS
from mm3d.trainer import run

TINY = ["model.variant=pointmae_tiny_test", "data.npoints=64", "data.fps_points=80", "data.cache_points=128",
        "train.batch_size=8", "train.epochs=3", "train.device=cpu", "train.tensorboard=false",
        "train.progress=off", "train.best_metric=loss", "train.best_mode=min", "optim.lr=1e-3",
        "train.keep_last=3", "data.votes=0"]


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory) -> Path:
    """A Point-MAE pretraining checkpoint with its card (step 5), to fine-tune from."""
    cfg = load_config(None, ["model.variant=pointmae_tiny_test", "data.npoints=64", "name=pre_demo"],
                      task="pointmae_pretrain")
    task = TASKS.get("pointmae_pretrain")
    torch.manual_seed(0)
    model = task.build_model(cfg)
    path = tmp_path_factory.mktemp("pre") / "pre.pt"
    card = checkpoint_card(build_card(task, cfg, model=model), step=5, epoch=1)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 5, "model_card": card}, path)
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrain_ckpt) -> tuple[Path, dict, Path]:
    """A 3-epoch Point-MAE classification run on synthetic ModelNet40 (select on val); its run folder,
    results and data root."""
    from mm3d.pointcloud.synth import synth_modelnet40

    root = tmp_path_factory.mktemp("modelnet") / "mn"
    synth_modelnet40(root, seed=0, scale="tiny")
    out = tmp_path_factory.mktemp("run") / "cls"
    cfg = load_config(None, [f"data.root={root}", f"output_dir={out}", f"init={pretrain_ckpt}", "name=cls_demo",
                             *TINY], task="pointmae_classify")
    return out, run(cfg), root


def test_every_checkpoint_carries_the_card_known_when_it_was_written(finetuned, pretrain_ckpt):
    out, results, root = finetuned
    names = [n.strip() for n in (root / "modelnet40_shape_names.txt").read_text().splitlines() if n.strip()]
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert len(index) >= 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for entry in index:
        ck = load_checkpoint(out / "checkpoints" / entry["file"])
        card = ck["model_card"]
        assert card["task"] == "pointmae_classify" and card["modality"] == "pointcloud"
        assert card["model"] == {"class": "PointMAEClassifier", "variant": "pointmae_tiny_test",
                                 "parameters": sum(v.numel() for k, v in ck["model"].items()
                                                   if "running" not in k and "num_batches" not in k),
                                 "num_classes": 10}
        assert card["preprocessing"]["input"] == "points" and card["preprocessing"]["shape"] == [64, 3]
        assert card["classes"] == names and len(names) == 10
        assert card["training"]["config"] == "cls_demo" and card["training"]["protocol_name"] == "honest"
        assert card["training"]["protocol"] == results["protocol"]
        init = {"file": str(pretrain_ckpt), "task": "pointmae_pretrain", "step": 5,
                "source": {"kind": "trained", "init": "scratch"}}
        assert card["source"] == {"kind": "trained", "init": init}
        assert card["checkpoint"]["step"] == entry["step"] == ck["step"]
        # the selection split's evaluation of the same step: the metric the checkpoint was ranked by
        evals = [r for r in records if r.get("split") == "val" and r["step"] == entry["step"] and not r.get("final")]
        assert card["metrics"]["split"] == "val"
        assert card["metrics"]["values"]["loss"] == evals[-1]["loss"] == entry["metric"]


def test_run_card_holds_the_final_results_of_the_scored_checkpoint(finetuned, capsys):
    out, results, _ = finetuned
    run_card = json.loads((out / RUN_CARD_FILE).read_text())
    final = run_card["results"]
    scored = Path(results.get("checkpoint") or out / "checkpoints" / "last.pt")
    assert final["step"] == load_checkpoint(scored)["step"] and final["weights"] == "model"
    assert final["splits"]["test"]["top1"] == results["test"]["top1"]
    assert final["splits"]["val"] == results["val"] and final["selected_on"] == "val"
    # read_card adds the final results to the scored checkpoint only
    for entry in json.loads((out / "checkpoints" / "index.json").read_text()):
        card = read_card(out / "checkpoints" / entry["file"]).card
        assert ("results" in card) == (entry["step"] == final["step"])
    assert read_card(out / "checkpoints" / "best.pt").card["results"] == final
    # mm3d info: the basics, then the card
    assert main(["info", str(out / "checkpoints" / "best.pt")]) == 0
    text = capsys.readouterr().out
    assert "task        pointmae_classify (pointcloud)" in text and "variant     pointmae_tiny_test" in text
    assert "parameters  " in text and "protocol_name: honest" in text and "results:" in text
    assert main(["info", str(out / "checkpoints" / "best.pt"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "checkpoint" and data["basics"]["step"] == final["step"]
    assert data["card"]["results"]["splits"]["test"]["top1"] == results["test"]["top1"]


def test_converted_checkpoint_records_its_source_and_exports(tmp_path, capsys):
    """Ours -> Hugging Face folder -> `mm3d convert --from videomae-hf`: the output's card names the
    converter and the folder, states the preprocessing, and the converted file exports."""
    cfg = load_config(None, ["model.variant=videomae_tiny_test"], task="videomae_pretrain")
    torch.manual_seed(0)
    model = TASKS.get("videomae_pretrain").build_model(cfg)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, tmp_path / "ours.pt")
    assert main(["convert", "--from", "to-hf", str(tmp_path / "ours.pt"), str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from", "videomae-hf", str(tmp_path / "hf"), str(tmp_path / "conv.pt")]) == 0
    capsys.readouterr()
    card = load_checkpoint(tmp_path / "conv.pt")["model_card"]
    assert card["source"]["kind"] == "converted" and card["source"]["converter"] == "videomae-hf"
    assert card["source"]["file"] == str(tmp_path / "hf") and card["source"]["weights"] == "pretrain"
    assert card["training"] is None and card["task"] == "videomae_pretrain"
    assert card["preprocessing"]["shape"] == [3, 4, 32, 32] and card["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert card["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert main(["info", str(tmp_path / "conv.pt")]) == 0
    assert "converter: videomae-hf" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(tmp_path / "conv.pt"), "--out", str(tmp_path / "conv.pt2")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["outputs"] == {"features": [1, 48], "tokens": [1, 32, 48]} and report["max_abs_diff"] <= 1e-4
    assert read_card(tmp_path / "conv.pt2").card["source"]["converter"] == "videomae-hf"


def test_checkpoint_without_a_card_gets_one_from_its_config(tmp_path):
    """Checkpoints written before cards existed: the card is built from the stored config (and said so)."""
    cfg = load_config(None, ["model.variant=pointmae_tiny_test", "model.num_classes=15", "data.dataset=scanobjectnn",
                             "data.npoints=128", "data.fps_points=128"], task="pointmae_classify")
    model = TASKS.get("pointmae_classify").build_model(cfg)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 12, "epoch": 2}, tmp_path / "old.pt")
    info = read_card(tmp_path / "old.pt")
    assert any("built from its stored config" in n for n in info.notes)
    assert info.card["classes"][0] == "bag" and len(info.card["classes"]) == 15
    assert info.card["checkpoint"] == {"step": 12, "epoch": 2} and info.basics["step"] == 12
    assert info.card["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert "built from its stored config" in format_info(info)


def test_info_on_a_file_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "x.pt").write_text("hello")
    assert main(["info", str(tmp_path / "x.pt")]) == 2
    assert "x.pt" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.onnx")]) == 2
