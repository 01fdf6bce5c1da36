"""`mm3d sweep` on the toy task: the grid, the run folders, the table's numbers against each run's
results.json, failed runs, re-runs that reuse finished runs, and the checks made before anything runs."""

import json
import statistics
from pathlib import Path

import pytest
import yaml

import mm3d.sweep  # noqa: F401  (registers `mm3d sweep`)
import mm3d.toy  # noqa: F401
from mm3d.cli import main
from mm3d.config import ConfigError
from mm3d.sweep import Combination, expand_grid, parse_grid_option, plan, preflight, run_sweep

TRAIN = {"epochs": 1, "batch_size": 16, "device": "cpu", "log_every": 1, "eval_every": 0, "save_every": 0,
         "select_on": "last", "tensorboard": False, "progress": "off"}


def write_sweep(tmp_path: Path, sweep: dict, **top) -> Path:
    """A toy pretraining config with a `sweep:` section; the probe and fine-tune are toy runs too
    (init= the pretraining checkpoint), scored by their val loss."""
    probe = tmp_path / "probe.yaml"
    probe.write_text(yaml.safe_dump({"task": "toy_regression", "model": {"dropout": 0.0},
                                     "train": {**TRAIN, "eval_every": 1, "select_on": "val"}}))
    section = {"seeds": [0, 1], "probe": "probe.yaml", "probe_metric": "val/loss", "finetune": "probe.yaml",
               "finetune_metric": "val/loss", **sweep}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"task": "toy_regression", "train": TRAIN, **top, "sweep": section}))
    return path


def test_grid_expands_to_every_combination_in_order():
    grid = parse_grid_option(["model.target.kind=pixel,hog,teacher", "model.mask_type=tube,motion"])
    assert grid == {"model.target.kind": ["pixel", "hog", "teacher"], "model.mask_type": ["tube", "motion"]}
    combos = expand_grid(grid)
    assert [c.overrides for c in combos] == [[f"model.target.kind={k}", f"model.mask_type={m}"]
                                             for k in ("pixel", "hog", "teacher") for m in ("tube", "motion")]
    assert combos[3].name == "kind-hog.mask_type-motion"
    assert parse_grid_option(["optim.lr=0.5,0.01", "model.x=true"]) == {"optim.lr": [0.5, 0.01], "model.x": [True]}
    # keys that end alike keep their full names, so folders never collide
    same = Combination((("model.target.layer", 1), ("optim.layer", 2)))
    assert same.name == "model_target_layer-1.optim_layer-2"
    with pytest.raises(ConfigError, match="key.sub=value1,value2"):
        parse_grid_option(["model.mask_type"])


def test_plan_gives_each_run_its_config_and_folder(tmp_path):
    path = write_sweep(tmp_path, {"grid": {"model.dropout": [0.0, 0.3], "optim.lr": [0.01]},
                                  "before": {"base": ["model.dropout=0.05"]},
                                  "when": {"model.dropout=0.3": ["init={before.base}"]}})
    spec, runs = plan(path, tmp_path / "out")
    labels = [r.label for r in runs]
    assert labels == ["before base",
                      "pretrain dropout-0.0.lr-0.01 seed 0", "probe dropout-0.0.lr-0.01 seed 0",
                      "finetune dropout-0.0.lr-0.01 seed 0",
                      "pretrain dropout-0.3.lr-0.01 seed 0", "probe dropout-0.3.lr-0.01 seed 0",
                      "finetune dropout-0.3.lr-0.01 seed 0",  # every combination's first seed first
                      "pretrain dropout-0.0.lr-0.01 seed 1", "probe dropout-0.0.lr-0.01 seed 1",
                      "pretrain dropout-0.3.lr-0.01 seed 1", "probe dropout-0.3.lr-0.01 seed 1"]
    by = {r.label: r for r in runs}
    pre = by["pretrain dropout-0.3.lr-0.01 seed 1"]
    assert (pre.cfg.model.dropout, pre.cfg.optim.lr, pre.cfg.seed) == (0.3, 0.01, 1)
    assert pre.run_dir == tmp_path / "out" / "pretrain" / "dropout-0.3.lr-0.01" / "seed_1"
    assert pre.cfg.init == str(tmp_path / "out" / "before" / "base" / "checkpoints" / "last.pt")  # `when`
    assert pre.needs == [by["before base"]] and by["before base"].cfg.model.dropout == 0.05
    assert by["pretrain dropout-0.0.lr-0.01 seed 1"].cfg.init == ""  # `when` does not match it
    probe = by["probe dropout-0.3.lr-0.01 seed 1"]
    assert probe.cfg.init == str(pre.checkpoint) and probe.needs == [pre] and probe.cfg.seed == 1
    assert probe.cfg.model.dropout == 0.0  # the grid varies the pretraining only
    assert probe.cfg.train.resume == "auto" and not probe.cfg.overwrite


def test_sweep_runs_every_combination_and_tabulates_mean_and_std(tmp_path):
    path = write_sweep(tmp_path, {"grid": {"model.dropout": [0.0, 0.3]}})
    out = tmp_path / "out"
    summary = run_sweep(path, out)
    assert {r["status"] for r in summary["runs"]} == {"done"} and len(summary["runs"]) == 10
    for combo in ("dropout-0.0", "dropout-0.3"):
        for stage, seeds in (("pretrain", (0, 1)), ("probe", (0, 1)), ("finetune", (0,))):
            for s in seeds:
                assert (out / stage / combo / f"seed_{s}" / "results.json").is_file()
        assert not (out / "finetune" / combo / "seed_1").exists()  # fine-tuned once (seed 0)
    saved = json.loads((out / "sweep.json").read_text())
    for row in saved["table"]:
        folder = out / "probe" / row["combination"]
        vals = [json.loads((folder / f"seed_{s}" / "results.json").read_text())["val"]["loss"] for s in (0, 1)]
        assert vals[0] != vals[1]  # the seeds differ, so the std is not trivially 0
        assert row["probe_n"] == 2
        assert row["probe_mean"] == pytest.approx(statistics.fmean(vals), rel=1e-12)
        assert row["probe_std"] == pytest.approx(statistics.stdev(vals), rel=1e-12)
        ft = json.loads((out / "finetune" / row["combination"] / "seed_0" / "results.json").read_text())
        assert row["finetune_mean"] == pytest.approx(ft["val"]["loss"], rel=1e-12)
        pre = [json.loads((out / "pretrain" / row["combination"] / f"seed_{s}" / "results.json").read_text())
               for s in (0, 1)]
        assert row["final_loss"] == pytest.approx(statistics.fmean(p["history"][-1]["loss"] for p in pre))
        rates = [statistics.median([h["samples_per_s"] for h in p["history"]][1:]) for p in pre]
        assert row["samples_per_s"] == pytest.approx(statistics.fmean(rates))
        md = (out / "sweep.md").read_text()
        assert f"{row['probe_mean']:.4f} ± {row['probe_std']:.4f} (n=2)" in md
    assert "not comparable across targets" in md


def test_failing_combination_is_listed_and_rerun_reuses_finished_runs(tmp_path):
    # nan_at_call=2: the second training forward gives a NaN loss, so that pretraining stops with an error
    path = write_sweep(tmp_path, {"grid": {"model.nan_at_call": [-1, 2]}, "seeds": [0]})
    out = tmp_path / "out"
    code = main(["sweep", str(path), "--out", str(out)])
    assert code == 1  # a run failed
    saved = json.loads((out / "sweep.json").read_text())
    status = {r["label"]: (r["status"], r["error"]) for r in saved["runs"]}
    assert status["pretrain nan_at_call--1 seed 0"][0] == "done"
    assert status["pretrain nan_at_call-2 seed 0"][0] == "failed"
    assert "NonFiniteLossError" in status["pretrain nan_at_call-2 seed 0"][1]
    assert status["probe nan_at_call-2 seed 0"][0] == "skipped"
    assert "needs pretrain nan_at_call-2 seed 0" in status["probe nan_at_call-2 seed 0"][1]
    bad = next(r for r in saved["table"] if r["model.nan_at_call"] == 2)
    assert bad["probe_n"] == 0 and any("NonFiniteLossError" in p for p in bad["problems"])
    md = (out / "sweep.md").read_text()
    assert "| 2 | – (n=0) |" in md and "pretrain seed 0: failed (NonFiniteLossError" in md
    assert (out / "pretrain" / "nan_at_call-2" / "seed_0" / "sweep_error.txt").is_file()

    good = out / "probe" / "nan_at_call--1" / "seed_0" / "results.json"
    before = good.read_text()
    unfinished = out / "finetune" / "nan_at_call--1" / "seed_0" / "results.json"
    unfinished.unlink()  # as if the sweep had been stopped after that run's last checkpoint
    code = main(["sweep", str(path), "--out", str(out)])
    again = {r["label"]: r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert again["pretrain nan_at_call--1 seed 0"] == "reused" and again["probe nan_at_call--1 seed 0"] == "reused"
    assert again["finetune nan_at_call--1 seed 0"] == "done" and unfinished.is_file()  # continued (resume=auto)
    assert again["pretrain nan_at_call-2 seed 0"] == "failed"  # retried, fails again
    assert good.read_text() == before

    (out / "probe" / "nan_at_call--1" / "seed_0" / "results.json").unlink()
    assert main(["sweep", str(path), "--out", str(out), "--report-only"]) == 1  # runs nothing; one failed earlier
    report = {r["label"]: r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert report["probe nan_at_call--1 seed 0"] == "pending" and report["finetune nan_at_call--1 seed 0"] == "reused"
    assert report["pretrain nan_at_call-2 seed 0"] == "failed"
    assert "pretrain seed 0: failed (mm3d.trainer.NonFiniteLossError" in (out / "sweep.md").read_text()
    assert not (out / "probe" / "nan_at_call--1" / "seed_0" / "results.json").exists()
    assert "1 runs not run yet" in (out / "sweep.md").read_text()


def test_finished_run_of_another_config_is_refused_before_anything_runs(tmp_path):
    path = write_sweep(tmp_path, {"grid": {"model.dropout": [0.0]}, "seeds": [0], "finetune": ""})
    out = tmp_path / "out"
    run_sweep(path, out)
    changed = write_sweep(tmp_path, {"grid": {"model.dropout": [0.0]}, "seeds": [0], "finetune": ""},
                          optim={"lr": 0.5})
    with pytest.raises(ConfigError, match=r"holds a finished run of another config \(optim.lr"):
        run_sweep(changed, out)


def test_missing_inputs_are_named_before_anything_runs(tmp_path):
    path = write_sweep(tmp_path, {"grid": {"model.dropout": [0.0, 0.3]},
                                  "when": {"model.dropout=0.3": [f"init={tmp_path / 'nowhere.pt'}"]}})
    with pytest.raises(ConfigError, match=r"pretrain dropout-0.3 seed 0: init=.*nowhere.pt does not exist"):
        run_sweep(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"names \{before.teacher\}, but the sweep has no such run"):
        plan(write_sweep(tmp_path, {"grid": {"model.dropout": [0.0]}, "all_stages": ["init={before.teacher}"]}),
             tmp_path / "out")
    with pytest.raises(ConfigError, match="sweep sets seed itself|seed is set by the sweep"):
        plan(path, tmp_path / "out", overrides=["seed=3"])
    with pytest.raises(ConfigError, match="unknown key sweep.grids"):
        plan(write_sweep(tmp_path, {"grids": {}}), tmp_path / "out")


def test_a_target_without_its_input_is_named_before_anything_runs(tmp_path):
    """The teacher target needs model.target.checkpoint: building each combination's model once says so."""
    path = tmp_path / "pc.yaml"
    path.write_text(yaml.safe_dump({"task": "pointmae_pretrain", "model": {"variant": "pointmae_tiny_test"},
                                    "data": {"root": str(tmp_path)}, "train": TRAIN,
                                    "sweep": {"grid": {"model.target.kind": ["points", "teacher"]}}}))
    _, runs = plan(path, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"pretrain kind-teacher seed 0: .*model.target.checkpoint") as e:
        preflight(runs)
    assert "kind-points" not in str(e.value)


@pytest.mark.parametrize("config, teacher", [("configs/video/videomae_sweep_demo.yaml", "pixel_teacher"),
                                             ("configs/pointcloud/pointmae_sweep_demo.yaml", "points_teacher")])
def test_shipped_demo_sweeps_plan_and_pass_the_checks(tmp_path, config, teacher):
    spec, runs = plan(config, tmp_path / "out")
    preflight(runs)  # every config loads, every model without a made input builds
    assert len(spec.grid["model.target.kind"]) == 4 and len(spec.grid["model.mask_type"]) == 2
    assert spec.seeds == [0, 1, 2] and spec.finetune_seeds == [0]
    assert [r.stage for r in runs].count("pretrain") == 24 and [r.stage for r in runs].count("probe") == 24
    assert [r.stage for r in runs].count("finetune") == 8 and runs[0].label == f"before {teacher}"
    made = str(tmp_path / "out" / "before" / teacher / "checkpoints" / "last.pt")
    for r in runs:
        if r.stage == "pretrain":
            assert (r.cfg.model.target.checkpoint == made) == (r.cfg.model.target.kind == "teacher")
