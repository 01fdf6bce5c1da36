"""The published linear-SVM settings of the SVM probe (``probe.preset``: ReCon, Point-M2AE): the
estimator, C and feature each preset picks, the config errors around them, the paper protocol they
stand for, and an end-to-end run on tiny synthetic ModelNet data checked against scikit-learn."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from mm3d.config import ConfigError, load_config, save_config
from mm3d.registry import TASKS, variant_config
from mm3d.pointcloud.classification import ClsDataConfig, build_cls_datasets, eval_points
from mm3d.pointcloud.models import build_pretrain_model
from mm3d.metrics import confusion_matrix
from mm3d.pointcloud.probe import SVM_PRESETS, _eval_loader, extract_features, make_svm, pool_patch_tokens

BASE = ["task=pointmae_svm", "model.variant=pointmae_tiny_test", "train.device=cpu", "train.batch_size=8",
        "train.tensorboard=false", "train.progress=off", "data.root=unused"]

# (B=2, G=3, D=2) patch tokens and their poolings worked out by hand:
#   cloud 0: max (3, 4), mean (6/3, 3/3) = (2, 1);  cloud 1: max (0, 2), mean (-3/3, 0/3) = (-1, 0)
TOKENS = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [2.0, 1.0]],
                       [[0.0, 2.0], [-1.0, -1.0], [-2.0, -1.0]]])
MAX_MEAN_CAT = torch.tensor([[3.0, 4.0, 2.0, 1.0], [0.0, 2.0, -1.0, 0.0]])  # [max, mean]: 2D values
MAX_PLUS_MEAN = torch.tensor([[5.0, 5.0], [-1.0, 2.0]])  # max + mean: D values


def svm_cfg(*extra: str):
    return load_config(None, [*BASE, *extra])


class FixedTokens(nn.Module):
    """A stand-in encoder whose patch tokens are its input: (B, G, D) "points" -> the same tokens."""

    def forward_tokens(self, points: torch.Tensor) -> torch.Tensor:
        return points


# ----------------------------------------------------------------------------------------------
# Features and estimators
# ----------------------------------------------------------------------------------------------


def test_pool_patch_tokens_by_hand():
    assert torch.equal(pool_patch_tokens(TOKENS, "max_mean_cat"), MAX_MEAN_CAT)
    assert torch.equal(pool_patch_tokens(TOKENS, "max_plus_mean"), MAX_PLUS_MEAN)
    with pytest.raises(ValueError, match="pooling must be"):
        pool_patch_tokens(TOKENS, "cls")


@pytest.mark.parametrize("preset, expected", [("", MAX_MEAN_CAT), ("recon", MAX_PLUS_MEAN),
                                              ("pointm2ae", MAX_PLUS_MEAN)])
def test_each_preset_extracts_its_feature_layout(preset, expected):
    """The probe's feature extraction with the preset's pooling, on fixed tokens: shape and values."""
    pooling = SVM_PRESETS[preset].pooling if preset else "max_mean_cat"
    data = ClsDataConfig(dataset="modelnet40", npoints=3, fps_points=3)  # G=3 "points": taken as they are
    # two batches given out of order: the features come back ordered by sample index
    batches = [{"points": TOKENS[1:], "label": torch.tensor([7]), "index": torch.tensor([1])},
               {"points": TOKENS[:1], "label": torch.tensor([4]), "index": torch.tensor([0])}]
    feats, labels = extract_features(FixedTokens(), batches, data, torch.device("cpu"), pooling)
    assert feats.shape == expected.shape
    assert torch.equal(feats, expected) and labels.tolist() == [4, 7]


def test_default_pooling_is_the_pretrain_models_forward_head():
    """Without a preset the feature stays what it was: forward_head's [max, mean] of all patch tokens."""
    torch.manual_seed(0)
    model = build_pretrain_model(variant_config("pointmae_tiny_test")).eval()
    pts = torch.randn(3, 64, 3)
    with torch.no_grad():
        tokens = model.forward_tokens(pts)
        assert tokens.shape == (3, model.num_group, model.encoder.embed_dim)
        assert torch.equal(model.forward_features(pts), tokens)
        assert torch.equal(pool_patch_tokens(tokens, "max_mean_cat"), model.forward_head(tokens))


@pytest.mark.parametrize("preset, data, estimator, c", [
    ("recon", ["data.dataset=modelnet40"], "LinearSVC", 0.075),
    ("pointm2ae", ["data.dataset=modelnet40"], "SVC", 0.012),
    ("pointm2ae", ["data.dataset=scanobjectnn", "data.scan_variant=OBJ_BG", "data.npoints=2048",
                   "data.fps_points=2048", "model.num_group=128"], "SVC", 0.042),
])
def test_each_preset_picks_its_estimator_and_c(preset, data, estimator, c):
    from sklearn.svm import SVC, LinearSVC

    cfg = svm_cfg(f"probe.preset={preset}", "probe.cs=null", *data)
    assert cfg.svm_cs() == [c]
    spec = SVM_PRESETS[preset]
    assert spec.pooling == "max_plus_mean"
    svm = make_svm(spec.kind, c, max_iter=cfg.probe.max_iter)
    assert type(svm) is {"LinearSVC": LinearSVC, "SVC": SVC}[estimator]
    params = svm.get_params()
    assert params["C"] == c
    if estimator == "SVC":  # Point-M2AE: SVC(C=..., kernel='linear'), libsvm's defaults otherwise
        assert params["kernel"] == "linear" and params["max_iter"] == -1
    else:  # ReCon: LinearSVC(C=0.075): squared hinge, one-vs-rest
        assert params["loss"] == "squared_hinge" and params["multi_class"] == "ovr"
    info = TASKS.get("pointmae_svm").run_info(cfg, {})
    assert info["preset"] == preset and info["cs"] == [c] and info["selected_on"] == "last"
    assert info["feature"] == "max + mean of the patch tokens (32 values)"  # pointmae_tiny_test: D = 32
    assert info["protocol"].startswith(f"custom ({spec.title}): C={c} fixed")  # a preset outside protocol=paper


def test_standardize_puts_a_scaler_before_the_svm():
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_svm("svc_linear", 0.5, standardize=True)
    assert isinstance(pipe, Pipeline) and isinstance(pipe.steps[0][1], StandardScaler)
    with pytest.raises(ValueError, match="SVM kind must be"):
        make_svm("rbf", 1.0)


# ----------------------------------------------------------------------------------------------
# Config errors and the paper protocol
# ----------------------------------------------------------------------------------------------


def test_preset_forbids_candidate_cs_and_standardize():
    with pytest.raises(ConfigError, match=r"probe\.cs=\[0\.1, 1\.0\] is not used: probe\.preset=pointm2ae fixes C "
                                          r"\(0\.012 on modelnet40\); set probe\.cs=null"):
        svm_cfg("probe.preset=pointm2ae", "probe.cs=[0.1,1.0]")
    with pytest.raises(ConfigError, match="probe.cs=.* is not used: probe.preset=recon fixes C"):
        svm_cfg("probe.preset=recon")  # the default candidates are candidates too
    with pytest.raises(ConfigError, match="probe.standardize=true: probe.preset=recon fixes C"):
        svm_cfg("probe.preset=recon", "probe.cs=null", "probe.standardize=true")
    with pytest.raises(ConfigError, match="probe.cs is null: give candidate C values"):
        svm_cfg("probe.cs=null")
    with pytest.raises(ConfigError, match="expects one of '', 'recon', 'pointm2ae'"):
        svm_cfg("probe.preset=pointbert", "probe.cs=null")


@pytest.mark.parametrize("preset, data, key", [
    ("recon", ["data.dataset=scanobjectnn"], "scanobjectnn/OBJ_BG"),  # ReCon's SVM: ModelNet40 only
    ("pointm2ae", ["data.dataset=modelnet10"], "modelnet10"),
    ("pointm2ae", ["data.dataset=scanobjectnn", "data.scan_variant=PB_T50_RS"], "scanobjectnn/PB_T50_RS"),
])
def test_a_dataset_without_a_published_c_is_an_error(preset, data, key):
    extra = ["data.npoints=1024", "data.fps_points=1024"]
    title = SVM_PRESETS[preset].title
    with pytest.raises(ConfigError, match=rf"probe\.preset={preset} \({title}\) has no published C for {key}"):
        svm_cfg(f"probe.preset={preset}", "probe.cs=null", *data, *extra)
    with pytest.raises(ConfigError, match=rf"probe\.preset={preset} \({title}\) has no published C for {key}"):
        svm_cfg("protocol=paper", f"probe.preset={preset}", *data, *extra)


def test_paper_protocol_without_a_preset_is_an_error():
    with pytest.raises(ConfigError, match="Point-MAE publishes no linear-SVM number.*probe.preset=recon.*"
                                          "probe.preset=pointm2ae"):
        svm_cfg("protocol=paper")


def test_paper_protocol_runs_the_presets_procedure(tmp_path):
    """Over a file holding the honest recipe (candidate Cs, standardized, 512 points), protocol=paper
    with a preset sets its C alone, raw features and its point count; the label names the preset."""
    honest = svm_cfg("probe.cs=[0.01,0.1]", "probe.standardize=true", "data.npoints=512", "data.fps_points=600")
    path = tmp_path / "svm.yaml"
    save_config(honest, path)
    paper = load_config(path, ["protocol=paper", "probe.preset=pointm2ae"])
    assert paper.probe.cs is None and not paper.probe.standardize and paper.svm_cs() == [0.012]
    assert paper.data.npoints == 1024 and paper.data.fps_points == 1024
    info = TASKS.get("pointmae_svm").run_info(paper, {})
    assert info["protocol"] == "paper (Point-M2AE linear SVM): C=0.012 fixed"
    assert info["svm"] == "SVC(kernel='linear'), C=0.012 fixed"
    recon = load_config(path, ["protocol=paper", "probe.preset=recon"])
    assert recon.svm_cs() == [0.075]
    assert TASKS.get("pointmae_svm").run_info(recon, {})["protocol"] == "paper (ReCon linear SVM): C=0.075 fixed"
    scan = load_config(path, ["protocol=paper", "probe.preset=pointm2ae", "data.dataset=scanobjectnn",
                              "model.num_group=128"])
    assert scan.svm_cs() == [0.042] and scan.data.npoints == 2048 and scan.data.fps_points == 2048
    with pytest.raises(ConfigError, match=r"probe\.cs=\[0\.1\] \(the paper protocol sets None\)"):
        load_config(path, ["protocol=paper", "probe.preset=pointm2ae", "probe.cs=[0.1]"])
    with pytest.raises(ConfigError, match=r"data\.npoints=512 \(the paper protocol sets 1024\)"):
        load_config(path, ["protocol=paper", "probe.preset=pointm2ae", "data.npoints=512"])


def test_labels_without_a_preset():
    task = TASKS.get("pointmae_svm")
    assert task.run_info(svm_cfg(), {})["protocol"] == "honest: C chosen on val carved from train"
    on_test = task.run_info(svm_cfg("train.select_on=test"), {})
    assert on_test["protocol"].startswith("custom: C chosen on test") and on_test["preset"] == "none"
    assert on_test["feature"] == "[max, mean] of the patch tokens (64 values)" and on_test["svm"] == "LinearSVC"
    assert task.run_info(svm_cfg("probe.cs=[0.5]"), {})["protocol"] == "honest: fixed C=0.5"


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


def test_pointm2ae_preset_end_to_end_matches_sklearn(mn_root, tiny_pointmae_pretrain_ckpt, tmp_path):
    """`mm3d evaluate` with protocol=paper probe.preset=pointm2ae on synthetic ModelNet40: the result
    is SVC(C=0.012, kernel='linear') fitted on max + mean of the patch tokens, computed here
    independently from the checkpoint (forward_features' [max, mean] halves added)."""
    from sklearn.svm import SVC, LinearSVC

    from mm3d.cli import main

    cfg = load_config(None, [*BASE, f"data.root={mn_root}", f"output_dir={tmp_path / 'run'}", "data.cache_points=1024",
                             "data.fps_points=1024",  # the paper protocol sets it too (the same value: no conflict)
                             "data.votes=0", "data.augmentation=none", "protocol=paper", "probe.preset=pointm2ae"])
    assert cfg.data.npoints == 1024 and cfg.probe.cs is None
    cfg_path = tmp_path / "svm.yaml"
    save_config(cfg, cfg_path)
    assert main(["evaluate", str(cfg_path), f"checkpoint={tiny_pointmae_pretrain_ckpt}"]) == 0
    out = tmp_path / "run" / "eval"
    test = json.loads((out / "results.json").read_text())["test"]
    assert test["C"] == 0.012 and test["feature_dim"] == 32 and "select_top1" not in test
    assert test["num_samples"] == 20 and test["train_samples"] == 40
    md = (out / "results.md").read_text()
    assert "paper (Point-M2AE linear SVM): C=0.012 fixed" in md and "SVC(kernel='linear'), C=0.012 fixed" in md
    assert "## Preset pointm2ae (Point-M2AE linear SVM)" in md and "tools/runner_test_svm.py" in md

    # the same numbers by hand: encoder features of every shape, pooled, then scikit-learn's SVC
    model = build_pretrain_model(cfg.model).eval()
    model.load_state_dict(torch.load(tiny_pointmae_pretrain_ckpt, weights_only=True)["model"])
    data = build_cls_datasets(cfg, ["train", "test"], carve_val=False)

    def features(ds):  # -> [max, mean] (S, 2D), max + mean (S, D), labels (S,)
        pts = torch.stack([ds[i]["points"] for i in range(len(ds))])
        labels = np.array([int(ds[i]["label"]) for i in range(len(ds))])
        with torch.no_grad():  # batches of train.batch_size, as the run
            f = torch.cat([model.forward_head(model.forward_features(eval_points(p, cfg.data))) for p in pts.split(8)])
        d = f.shape[1] // 2
        return f.numpy(), (f[:, :d] + f[:, d:]).numpy(), labels

    (train_cat, train_x, train_y), (test_cat, test_x, test_y) = features(data["train"]), features(data["test"])
    pred = SVC(C=0.012, kernel="linear").fit(train_x, train_y).predict(test_x)
    assert test["top1"] == pytest.approx(float((pred == test_y).mean()), abs=1e-12)
    rows = [r.split(",") for r in (out / "test" / "per_class.csv").read_text().splitlines()[1:]]
    assert [int(r[3]) for r in rows] == [int(((pred == test_y) & (test_y == k)).sum()) for k in range(len(rows))]
    # the run's predictions themselves (its confusion matrix), by the task's evaluate as the run calls it
    res = TASKS.get("pointmae_svm").evaluate(model, _eval_loader(data["test"], cfg), cfg, torch.device("cpu"), "test")
    expected = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(test_y), 10)
    assert torch.equal(res.artifacts["classification"].confusion, expected)
    # which the other estimator, or the other feature, would not give on this data
    other_svm = LinearSVC(C=0.012, dual="auto", max_iter=20000).fit(train_x, train_y).predict(test_x)
    other_feature = SVC(C=0.012, kernel="linear").fit(train_cat, train_y).predict(test_cat)
    assert not np.array_equal(other_svm, pred) and not np.array_equal(other_feature, pred)
