"""Part segmentation under ``protocol=paper`` (Point-MAE ``segmentation/main.py``): points drawn
with replacement, the official double optimizer step reproduced exactly, the preset keys and their
command-line conflicts, and a short paper run whose per-epoch maxima come from its own log."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mm3d.config import ConfigError, load_config
from mm3d.engine import OptimizerStep
from mm3d.registry import TASKS
from mm3d.results import run_protocol_label
from mm3d.pointcloud.datasets import ShapeNetPart
from mm3d.pointcloud.partseg import PAPER_REPORT_MAX, PointPartSegConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pointcloud" / "pointmae_partseg_shapenetpart.yaml"
TINY = ["model.variant=pointmae_tiny_test", "data.npoints=64", "train.batch_size=4", "train.device=cpu",
        "train.tensorboard=false", "train.progress=off", "optim.lr=1e-3", "train.keep_last=1", "data.render_shapes=0",
        "head.label_dim=8", "head.propagation_dims=[32,32]", "head.head_dims=[32,16]"]


@pytest.fixture(scope="module")
def snp_root(tmp_path_factory) -> Path:
    """Synthetic ShapeNetPart: 11 categories with 2/1/1 train/val/test shapes of 512-768 points."""
    from mm3d.pointcloud.synth import synth_shapenetpart

    root = tmp_path_factory.mktemp("snp") / "snp"
    synth_shapenetpart(root, seed=0, scale="tiny")
    return root


def seg_cfg(root: Path, out: Path, *extra: str) -> PointPartSegConfig:
    return load_config(None, [f"data.root={root}", f"output_dir={out}", *TINY, *extra], task="pointmae_partseg")


# ---- sampling -----------------------------------------------------------------------------


def _rows(points: torch.Tensor) -> int:
    """Distinct points of an (N, 3) cloud (the synthetic clouds have no duplicate points)."""
    return len(torch.unique(points, dim=0))


def test_sample_replace_draws_uniform_indices_with_repeats(snp_root):
    npoints, seed = 256, 7
    ds = ShapeNetPart(snp_root, "test", npoints, seed=seed, sample_replace=True)
    plain = ShapeNetPart(snp_root, "test", npoints, seed=seed)
    assert ds.sample_replace and not plain.sample_replace
    repeats = 0
    for i in range(len(ds)):
        lo, hi = int(ds.offsets[i]), int(ds.offsets[i + 1])
        assert hi - lo > npoints  # every synthetic shape has more points than are drawn
        assert _rows(torch.from_numpy(ds.points[lo:hi, :3])) == hi - lo
        # the slow reference: npoints independent uniform draws from the per-item generator
        idx = torch.randint(hi - lo, (npoints,), generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) + lo
        item = ds[i]
        assert torch.equal(item["points"], torch.from_numpy(ds.points[idx.numpy(), :3]))
        assert torch.equal(item["seg"], torch.from_numpy(ds.seg[idx.numpy()].astype("int64")))
        assert torch.equal(ds[i]["points"], item["points"])  # seeded per item: the same draw every time
        repeats += npoints - _rows(item["points"])
        # the default keeps every point at most once when the shape has enough
        assert _rows(plain[i]["points"]) == npoints
    # ~npoints^2 / (2 n) ≈ 45 repeats per shape expected with replacement; none without
    assert repeats > 10 * len(ds)
    other = ShapeNetPart(snp_root, "test", npoints, seed=seed + 1, sample_replace=True)
    assert not torch.equal(other[0]["points"], ds[0]["points"])


def test_sample_replace_unseeded_follows_the_global_generator(snp_root):
    ds = ShapeNetPart(snp_root, "train", 128, sample_replace=True)
    torch.manual_seed(3)
    first, second = ds[0]["points"], ds[0]["points"]
    torch.manual_seed(3)
    assert torch.equal(ds[0]["points"], first) and not torch.equal(first, second)


def test_data_sample_replace_reaches_every_split(snp_root, tmp_path):
    task = TASKS.get("pointmae_partseg")
    for replace in (False, True):
        cfg = seg_cfg(snp_root, tmp_path, f"data.sample_replace={str(replace).lower()}")
        ds = task.build_datasets(cfg, ["train", "val", "test"])
        assert sorted(ds) == ["test", "train", "val"]
        assert all(d.base.sample_replace is replace for d in ds.values())


# ---- the double optimizer step --------------------------------------------------------------


def _official_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """segmentation/main.py's add_weight_decay: no decay for 1-D weights and biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _setup(steps: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU(),
                          nn.Linear(32, 4))
    data = [(torch.randn(8, 5) * 3, torch.randint(0, 4, (8,))) for _ in range(steps)]
    opt = torch.optim.AdamW(_official_groups(model, 0.05), lr=1e-2, weight_decay=0.05)
    return model, opt, data


CLIP = 0.05  # far below the gradient norms, so every step clips


def _official_loop(clip_first: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The per-batch sequence of segmentation/main.py, line by line (`clip_first`: a wrong order)."""
    model, optimizer, data = _setup()
    model.zero_grad()
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if clip_first:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, norm_type=2)
        optimizer.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, norm_type=2)
        optimizer.step()
        model.zero_grad()
    return model, optimizer


def _ours(double_step: bool, precision: str = "fp32") -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
    model, optimizer, data = _setup()
    step = OptimizerStep(optimizer, device=torch.device("cpu"), precision=precision, clip_grad=CLIP,
                         params=model.parameters(), double_step=double_step)
    norms = []
    for x, y in data:
        step.backward(F.cross_entropy(model(x), y))
        norms.append(float(step.step()))
    return model, optimizer, norms


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_double_step_is_exactly_the_official_sequence():
    ref_model, ref_opt = _official_loop()
    model, opt, norms = _ours(double_step=True)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), f"{name}: largest difference {float((p - q).abs().max()):.3g}"
    for p, q in zip(model.parameters(), ref_model.parameters()):  # Adam moments and step counts too
        mine, theirs = opt.state[p], ref_opt.state[q]
        assert float(mine["step"]) == float(theirs["step"]) == 2 * len(norms)  # two updates per batch
        assert torch.equal(mine["exp_avg"], theirs["exp_avg"]) and torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])
    assert min(norms) > 10 * CLIP  # clipping acted on every step: the second step used a changed gradient
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step
    # the test tells the sequence apart from its neighbours
    assert not _same(_ours(double_step=False)[0], ref_model)  # one clipped step per batch
    assert not _same(_official_loop(clip_first=True)[0], ref_model)  # clipping before the first step


def test_double_step_refuses_fp16():
    model, opt, _ = _setup()
    with pytest.raises(ValueError, match="double_step.*fp16"):
        OptimizerStep(opt, device=torch.device("cpu"), precision="fp16", clip_grad=CLIP, double_step=True)
    assert _same(_ours(double_step=True, precision="bf16")[0], _official_loop()[0])  # bf16: autocast only


# ---- protocol=paper -------------------------------------------------------------------------


def test_paper_protocol_keys_over_the_yaml():
    honest = load_config(CONFIG, [])
    assert (honest.protocol, honest.train.select_on, honest.data.train_split, honest.data.sample_replace,
            honest.eval.report_max, honest.optim.double_step) == ("honest", "val", "auto", False, [], False)
    paper = load_config(CONFIG, ["protocol=paper"])
    assert paper.train.select_on == "test" and paper.train.eval_every == 1  # the YAML's select_on: val is replaced
    assert (paper.train.best_metric, paper.train.best_mode) == ("instance_miou", "max")
    assert paper.data.train_split == "trainval" and paper.data.sample_replace is True
    assert paper.eval.report_max == ["instance_miou", "class_miou", "accuracy"] == list(PAPER_REPORT_MAX)
    assert paper.optim.double_step is True
    assert (paper.optim.lr, paper.optim.clip_grad, paper.train.epochs) == (2e-4, 10.0, 300)  # the recipe is the file's
    assert TASKS.get("pointmae_partseg").train_split(paper) == "trainval"
    assert run_protocol_label(paper, "test") == "paper (Point-MAE segmentation/main.py): best on test"
    assert run_protocol_label(honest, "val") == "honest: best on val"
    assert (paper.published.metric, paper.published.value) == ("test/instance_miou_epoch_max", 86.1)
    # repeating a preset value on the command line is fine; contradicting one is an error naming it
    repeated = load_config(CONFIG, ["protocol=paper", "train.select_on=test", "data.sample_replace=true"])
    assert repeated.protocol == "paper" and repeated.train.select_on == "test"
    for override in ("train.select_on=val", "data.sample_replace=false", "optim.double_step=false",
                     "data.train_split=train", "eval.report_max=[instance_miou]"):
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"protocol=paper fixes .*{key}="):
            load_config(CONFIG, ["protocol=paper", override])
    with pytest.raises(ConfigError, match="double_step.*fp16"):
        load_config(CONFIG, ["protocol=paper", "train.precision=fp16"])


@pytest.fixture(scope="module")
def paper_run(snp_root, tmp_path_factory):
    from mm3d.trainer import run

    out = tmp_path_factory.mktemp("paper") / "run"
    published = ["published.value=86.1", "published.metric=test/instance_miou_epoch_max",
                 "published.source=Point-MAE README.md"]
    res = run(seg_cfg(snp_root, out, "protocol=paper", "train.epochs=3", *published))
    return out, res


@pytest.mark.slow
def test_paper_run_reports_the_maxima_over_its_epochs(paper_run):
    out, res = paper_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["selected_on"] == "test" and saved["protocol_name"] == "paper"
    assert saved["protocol"]["protocol"] == "paper (Point-MAE segmentation/main.py): best on test"
    assert saved["protocol"]["train_split"] == "trainval" and saved["protocol"]["sampling"] == "with replacement"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r for r in records if r.get("split") == "test" and not r.get("final")]
    assert [r["epoch"] for r in per_epoch] == [0, 1, 2]  # test after every epoch
    test = saved["test"]
    for name in PAPER_REPORT_MAX:  # each the max of its own column of the per-epoch log
        top = max(per_epoch, key=lambda r: r[name])
        assert test[f"{name}_epoch_max"] == top[name] == saved["epoch_max"][name]["value"]
        assert saved["epoch_max"][name]["epoch"] == top["epoch"]
    # the reported checkpoint is the epoch best on test by instance mIoU, rescored on the same (seeded) points
    assert test["instance_miou"] == pytest.approx(test["instance_miou_epoch_max"], abs=1e-6)
    assert test["class_miou"] <= test["class_miou_epoch_max"] + 1e-6
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| config"))
    assert "| instance_miou_epoch_max | class_miou_epoch_max | accuracy_epoch_max | instance_miou |" in header
    assert "maximum of each metric over the per-epoch evaluations of test" in md
    assert "paper (Point-MAE segmentation/main.py): best on test" in md
    assert f"| this run | {100 * test['instance_miou_epoch_max']:.2f} | paper |" in md  # beside the published 86.10
    assert "| published (Point-MAE README.md) | 86.10 | paper |" in md


@pytest.mark.slow
def test_paper_run_steps_the_optimizer_twice_per_batch(paper_run):
    out, _ = paper_run
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    steps = {float(s["step"]) for s in ck["optimizer"]["state"].values()}
    assert steps == {2.0 * ck["step"]}
