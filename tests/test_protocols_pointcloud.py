"""Point-cloud classification protocols: the official per-item point shuffling and ModelNet pool,
repeated voting runs, and `protocol=paper` (selection, voting statistic, few-shot head and maxima).

Tiny model variant and synthetic ModelNet data (the real on-disk layout), CPU only."""

import json
import math
from pathlib import Path

import pytest
import yaml
import torch

from mm3d.config import ConfigError, load_config
from mm3d.registry import TASKS
from mm3d.trainer import Trainer
from mm3d.pointcloud import fewshot
from mm3d.pointcloud.classification import VoteRuns, build_cls_datasets
from mm3d.pointcloud.models import build_classifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pointcloud"
BASE = ["model.variant=pointmae_tiny_test", "train.batch_size=8", "train.device=cpu", "train.tensorboard=false",
        "train.progress=off", "optim.lr=1e-3", "train.keep_last=1", "data.augmentation=none"]


def cfg_of(root, out, *extra, path=None):
    return load_config(path, [f"data.root={root}", f"output_dir={out}", *BASE, *extra], task="pointmae_classify")


def training_inputs(cfg) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Run `cfg` and return (epoch, sample index (B,), points (B, N, 3)) of every training step."""
    trainer = Trainer(cfg)
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def record(module, args):
        if module.training:
            seen.append((trainer.state.epoch, args[0]["index"].clone(), args[0]["points"].clone()))

    trainer.model.register_forward_pre_hook(record)
    trainer.fit()
    return seen


def by_sample(steps, epoch: int) -> dict[int, torch.Tensor]:
    return {int(i): pts[k] for e, idx, pts in steps if e == epoch for k, i in enumerate(idx)}


def rows(points: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in points.tolist()}


# ----------------------------------------------------------------------------------------------
# Accidental difference 1: points are served in a fresh order every time (ScanObjectNN, ModelNet-8k)
# ----------------------------------------------------------------------------------------------

ALL_POINTS = ["data.npoints=128", "data.fps_points=128", "data.cache_points=128", "train.select_on=last",
              "train.eval_every=0", "data.votes=0"]  # the 8k protocol in small: every cached point, shuffled


def test_points_are_shuffled_per_item_every_epoch_reproducibly(mn_root, tmp_path):
    a = training_inputs(cfg_of(mn_root, tmp_path / "a", *ALL_POINTS, "train.epochs=2"))
    first, second = by_sample(a, 0), by_sample(a, 1)
    common = sorted(set(first) & set(second))
    assert len(common) >= 20
    for i in common:  # the same points, in another order
        assert rows(first[i]) == rows(second[i])
        assert not torch.equal(first[i], second[i])
    starts = {tuple(first[i][0].tolist()) for i in common}
    assert len(starts) == len(common)  # every item starts (where FPS starts) at its own point
    again = training_inputs(cfg_of(mn_root, tmp_path / "b", *ALL_POINTS, "train.epochs=2"))
    assert len(again) == len(a)
    assert all(torch.equal(x[2], y[2]) and torch.equal(x[1], y[1]) for x, y in zip(a, again))
    other = training_inputs(cfg_of(mn_root, tmp_path / "c", *ALL_POINTS, "train.epochs=1", "seed=1"))
    assert not torch.equal(other[0][2], a[0][2])


def test_shuffled_points_continue_exactly_after_resume(mn_root, tmp_path):
    full = training_inputs(cfg_of(mn_root, tmp_path / "full", *ALL_POINTS, "train.epochs=2"))
    out = tmp_path / "resumed"
    training_inputs(cfg_of(mn_root, out, *ALL_POINTS, "train.epochs=1"))
    resumed = training_inputs(cfg_of(mn_root, out, *ALL_POINTS, "train.epochs=2", "train.resume=auto"))
    later = [s for s in full if s[0] == 1]
    assert len(resumed) == len(later) > 0
    assert all(torch.equal(x[2], y[2]) for x, y in zip(later, resumed))


def test_scanobjectnn_training_items_carry_every_stored_point(tmp_path):
    from mm3d.pointcloud.synth import synth_scanobjectnn

    root = tmp_path / "so"
    synth_scanobjectnn(root, seed=0, scale="tiny")
    cfg = load_config(None, [f"data.root={root}", f"output_dir={tmp_path / 'run'}", *BASE, "data.dataset=scanobjectnn",
                             "data.npoints=128", "data.fps_points=128"], task="pointmae_classify")
    ds = build_cls_datasets(cfg, ["train", "test"])
    stored = ds["train"].base.points.shape[1]
    assert ds["train"][0]["points"].shape[0] == stored and ds["test"][0]["points"].shape[0] == 128
    transform = TASKS.get("pointmae_classify").batch_transform(cfg, torch.device("cpu"))
    batch = {"points": torch.stack([ds["train"][i]["points"] for i in range(4)])}
    torch.manual_seed(0)
    one = transform(batch)["points"]
    two = transform(batch)["points"]
    assert one.shape == (4, 128, 3) and not torch.equal(one, two)


# ----------------------------------------------------------------------------------------------
# Accidental difference 2: the ModelNet-1k pool is FPS 1200 of the *shuffled* 8192-point cache
# ----------------------------------------------------------------------------------------------


def test_modelnet_1k_training_pool_changes_between_epochs(mn_root, tmp_path):
    extra = ["data.npoints=64", "data.fps_points=80", "data.cache_points=128", "train.select_on=last",
             "train.eval_every=0", "data.votes=0", "train.epochs=3"]
    steps = training_inputs(cfg_of(mn_root, tmp_path / "run", *extra))
    train = build_cls_datasets(cfg_of(mn_root, tmp_path / "x", *extra), ["train"])["train"]
    assert train[0]["points"].shape[0] == 128  # training items carry the whole cache
    outside = 0
    for epoch in range(3):
        for i, pts in by_sample(steps, epoch).items():
            cache = train[i]["points"]
            assert rows(pts) <= rows(cache)  # drawn from the item's own cache ...
            outside += len(rows(pts) - rows(cache[:80]))  # ... not always from its first 80 points
    assert outside > 0
    # an item's inputs over the epochs come from more than one 80-point pool
    i = next(iter(by_sample(steps, 0)))
    union = set().union(*(rows(by_sample(steps, e)[i]) for e in range(3) if i in by_sample(steps, e)))
    assert len(union) > 80


def test_pool_is_farthest_point_sample_of_the_shuffled_cloud():
    from mm3d.pointcloud.ops import farthest_point_sample
    from mm3d.pointcloud.transforms import training_batch_transform

    torch.manual_seed(0)
    cloud = torch.randn(2, 200, 3)
    transform = training_batch_transform("none", torch.device("cpu"), shuffle=True, fps_pool=50,
                                         scale_low=1.0, scale_high=1.0, translate_range=0.0)
    state = torch.get_rng_state()
    pool = transform({"points": cloud})["points"]
    assert pool.shape == (2, 50, 3)
    torch.set_rng_state(state)  # replay the draw: the shuffled order, then FPS from its first point
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    order = torch.rand(2, 200, generator=gen).argsort(dim=1)
    shuffled = torch.gather(cloud, 1, order.unsqueeze(-1).expand(-1, -1, 3))
    idx = farthest_point_sample(shuffled, 50, start="first")
    assert torch.equal(pool, torch.gather(shuffled, 1, idx.unsqueeze(-1).expand(-1, -1, 3)))


# ----------------------------------------------------------------------------------------------
# Voting runs
# ----------------------------------------------------------------------------------------------


def test_vote_runs_statistics_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2])
    preds = torch.tensor([[0, 0, 1, 1, 2],    # run 0: 5/5
                          [0, 1, 1, 0, 2],    # run 1: 3/5
                          [1, 1, 1, 1, 1]])   # run 2: 2/5
    runs = VoteRuns(3, num_classes=4)
    runs.update(preds[:, :3], labels[:3], torch.arange(3))
    runs.update(preds[:, 3:], labels[3:], torch.arange(3, 5))
    m = runs.compute()
    top1 = torch.tensor([1.0, 0.6, 0.4], dtype=torch.float64)
    assert m["vote_runs"] == 3 and m["vote_top1"] == pytest.approx(float(top1.mean()))
    assert m["vote_top1_std"] == pytest.approx(float(top1.std()))
    assert m["vote_top1_max"] == pytest.approx(1.0) and m["vote_top1_min"] == pytest.approx(0.4)
    # mean class accuracy over the 3 classes present (class 3 has no samples): run 1 = (0.5 + 0.5 + 1) / 3
    mca = torch.tensor([1.0, 2.0 / 3.0, 1.0 / 3.0])
    assert m["vote_mean_class_acc"] == pytest.approx(float(mca.mean()))
    assert m["vote_mean_class_acc_max"] == pytest.approx(1.0)


def test_final_evaluation_repeats_the_voting_test(mn_root, tmp_path):
    extra = ["data.npoints=64", "data.fps_points=80", "data.cache_points=128", "data.votes=2"]
    task = TASKS.get("pointmae_classify")
    torch.manual_seed(0)
    cfg = cfg_of(mn_root, tmp_path, *extra, "eval.vote_runs=4", "train.epochs=1")
    model = build_classifier(cfg.model, 10)
    trainer = Trainer(cfg, task, train=False)
    loader = trainer.loader("test")
    per_epoch = task.evaluate(model, loader, cfg, torch.device("cpu"), "test").metrics
    assert "vote_top1" not in per_epoch  # per-epoch evaluations do not vote unless ranked on a vote metric
    final = task.final_evaluate(model, loader, cfg, torch.device("cpu"), "test").metrics
    assert final["vote_runs"] == 4
    assert final["vote_top1_min"] <= final["vote_top1"] <= final["vote_top1_max"]
    assert final["top1"] == per_epoch["top1"]
    one = task.final_evaluate(model, loader, cfg_of(mn_root, tmp_path, *extra), torch.device("cpu"), "test").metrics
    assert {"vote_top1", "vote_top5"} <= set(one) and "vote_top1_max" not in one
    ranked = cfg_of(mn_root, tmp_path, *extra, "train.best_metric=vote_top1")
    assert "vote_top1" in task.evaluate(model, loader, ranked, torch.device("cpu"), "test").metrics


# ----------------------------------------------------------------------------------------------
# protocol=paper
# ----------------------------------------------------------------------------------------------


def test_paper_protocol_of_each_classification_benchmark(tmp_path):
    mn = load_config(CONFIGS / "pointmae_finetune_modelnet40.yaml", ["protocol=paper"])
    assert mn.train.select_on == "test" and mn.data.votes == 10 and mn.eval.vote_runs == 300
    assert mn.data.vote_splits == ["test"] and mn.train.eval_every == 1
    honest = load_config(CONFIGS / "pointmae_finetune_modelnet40.yaml")
    assert honest.protocol == "honest" and honest.train.select_on == "val" and honest.eval.vote_runs == 1
    for name in ("hardest", "objbg", "objonly"):
        so = load_config(CONFIGS / f"pointmae_finetune_scanobjectnn_{name}.yaml", ["protocol=paper"])
        assert so.train.select_on == "test" and so.data.votes == 0  # the official code cannot vote at 2048
    fs = load_config(CONFIGS / "pointmae_fewshot_5way_10shot.yaml", ["protocol=paper"])
    assert fs.model.num_classes == 40 and fs.train.eval_every == 1 and fs.train.select_on == "test"
    assert fs.eval.report_max == ["top1"] and fs.data.votes == 0
    assert load_config(CONFIGS / "pointmae_fewshot_5way_10shot.yaml").model.num_classes == 5
    # the command line may repeat the preset, not contradict it
    load_config(CONFIGS / "pointmae_finetune_modelnet40.yaml", ["protocol=paper", "train.select_on=test"])
    with pytest.raises(ConfigError, match=r"train\.select_on='val'.*paper protocol sets 'test'"):
        load_config(CONFIGS / "pointmae_finetune_modelnet40.yaml", ["protocol=paper", "train.select_on=val"])
    with pytest.raises(ConfigError, match="eval.vote_runs"):
        load_config(CONFIGS / "pointmae_finetune_modelnet40.yaml", ["protocol=paper", "eval.vote_runs=5"])


def test_paper_few_shot_run_reports_the_best_epoch_with_a_40_way_head(mn_root, tmp_path):
    fs = tmp_path / "folds"
    fewshot.write_fewshot_folds(mn_root, fs, ways=[5], shots=[2], folds=1, test_per_class=2)
    out = tmp_path / "run"
    cfg = cfg_of(mn_root, out, "data.dataset=modelnet40_fewshot", f"data.fewshot_root={fs}", "data.way=5",
                 "data.shot=2", "data.fold=0", "data.npoints=64", "data.fps_points=80", "data.cache_points=128",
                 "train.epochs=3", "train.batch_size=4", "optim.lr=3e-3", "protocol=paper",
                 "published.value=96.3", "published.metric=test/top1", "published.source=Point-MAE README")
    assert cfg.model.num_classes == 40
    res = Trainer(cfg).fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r["top1"] for r in records if r.get("split") == "test" and not r.get("final")]
    assert len(per_epoch) == 3  # evaluated every epoch
    assert res["test"]["top1_epoch_max"] == max(per_epoch)
    assert res["test"]["top1"] == pytest.approx(max(per_epoch))  # the selected checkpoint is the best epoch
    assert res["epoch_max"]["top1"]["epoch"] == per_epoch.index(max(per_epoch))
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol_name"] == "paper" and saved["published"]["value"] == 96.3
    assert saved["protocol"]["protocol"] == "paper (Point-MAE tools/runner_finetune.py): best on test"
    md = (out / "results.md").read_text()
    assert "paper (Point-MAE tools/runner_finetune.py): best on test" in md and "top1_epoch_max" in md
    assert "## Published" in md and "| published (Point-MAE README) | 96.30 | paper |" in md
    head = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)["model"]
    assert next(v for k, v in head.items() if k.startswith("head.") and k.endswith("weight") and v.ndim == 2
                and v.shape[0] != 32).shape[0] == 40


# ----------------------------------------------------------------------------------------------
# Every shipped config's published number points at a pretraining config that runs as long
# ----------------------------------------------------------------------------------------------

# run configs (a sweep file adds a `sweep:` section for `mm3d sweep`, which reads it: not a run config)
ALL_CONFIGS = sorted(p for p in (CONFIGS.parent).rglob("*.yaml")
                     if not p.name.startswith("base_") and "sweep" not in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.name for p in ALL_CONFIGS])
def test_published_numbers_name_a_pretraining_config_of_that_length(path):
    cfg = load_config(path)
    pub = cfg.published
    if pub.value is None:
        return
    assert 0 < pub.value <= 100 and pub.source
    split, _, metric = pub.metric.partition("/")
    assert split in ("val", "test") and metric
    # the paper's number is measured under the paper's protocol: the config must define one
    assert load_config(path, ["protocol=paper"]).protocol == "paper"
    if pub.pretrain:
        pretrain = load_config(CONFIGS.parent / pub.pretrain)
        assert pretrain.train.epochs == pub.pretrain_epochs, pub.pretrain
        assert pretrain.model.variant == cfg.model.variant  # the same encoder size


# ----------------------------------------------------------------------------------------------
# Point-MAE's per-epoch learning rate
# ----------------------------------------------------------------------------------------------


def test_epoch_schedule_is_timms_cosine_stepped_after_each_epoch():
    """optim.schedule_unit=epoch gives, epoch by epoch, the rate Point-MAE's loop trains with:
    timm's CosineLRScheduler(t_in_epochs=True) built as tools/builder.py builds it, initialised, and
    stepped with scheduler.step(epoch) at the end of every epoch."""
    from timm.scheduler import CosineLRScheduler

    from mm3d.trainer import epoch_schedule

    epochs, warmup, base, low = 30, 4, 5e-4, 1e-6
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=low, warmup_lr_init=low, warmup_t=warmup,
                              cycle_limit=1, t_in_epochs=True)
    official = []
    for epoch in range(epochs + 1):  # Point-MAE runs max_epoch + 1 epochs
        official.append(opt.param_groups[0]["lr"])
        sched.step(epoch)
    ours = [epoch_schedule(e, epochs, warmup, low, base, low) for e in range(epochs + 1)]
    assert ours == pytest.approx(official, rel=1e-12, abs=0)
    assert ours[0] == ours[1] == low and ours[-1] < ours[warmup + 1]


def test_paper_runs_set_the_rate_once_per_epoch(mn_root, tmp_path):
    cfg = cfg_of(mn_root, tmp_path, "data.npoints=64", "data.fps_points=80", "data.cache_points=128",
                 "train.epochs=3", "protocol=paper", "optim.warmup_epochs=1",
                 "optim.warmup_lr=1e-5", "train.log_every=1", path=None)
    assert cfg.optim.schedule_unit == "epoch"
    trainer = Trainer(cfg)
    per_step = [trainer._apply_schedule(s) for s in range(3 * trainer.steps_per_epoch)]
    by_epoch = [per_step[e * trainer.steps_per_epoch:(e + 1) * trainer.steps_per_epoch] for e in range(3)]
    assert all(len(set(rates)) == 1 for rates in by_epoch)  # one rate per epoch
    assert by_epoch[0][0] == by_epoch[1][0] == pytest.approx(1e-5)  # epochs 0 and 1 at the warm-up start
    assert by_epoch[2][0] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi / 3)))
    with pytest.raises(ConfigError, match="warmup_epochs"):
        cfg_of(mn_root, tmp_path, "optim.schedule_unit=epoch", "optim.warmup_steps=5")
