"""The shipped point-cloud benchmark configs: the few-shot and ScanObjectNN families each build on
one shared recipe (``base:``) and still load to exactly the official settings they held as
self-contained files."""

from pathlib import Path

import pytest
import yaml

from mm3d.config import deep_merge, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pointcloud"

# Every key the four few-shot files set before they shared base_pointmae_fewshot.yaml (the official
# cfgs/fewshot.yaml of Pang-Yatian/Point-MAE), and what differed between them.
FEWSHOT = {
    "task": "pointmae_classify", "init": "", "seeds": list(range(10)),
    "model": {"variant": "pointmae_small", "drop_path": 0.1, "num_group": 64, "group_size": 32},
    "data": {"dataset": "modelnet40_fewshot", "root": "", "fewshot_root": "", "fold": -1, "npoints": 1024,
             "fps_points": 1200, "cache_points": 8192, "augmentation": "scale_translate", "votes": 0},
    "optim": {"name": "adamw", "lr": 5.0e-4, "weight_decay": 0.05, "warmup_epochs": 10, "warmup_lr": 1.0e-6,
              "min_lr": 1.0e-6, "schedule": "cosine", "clip_grad": 10.0},
    "train": {"epochs": 150, "batch_size": 32, "drop_last": True, "num_workers": 4, "select_on": "last",
              "best_metric": "top1", "best_mode": "max", "eval_every": 10, "save_every": 10, "keep_last": 1,
              "log_every": 10},
}
def published(value: float, metric: str, source: str) -> dict:
    """The `published:` section of a benchmark file (Point-MAE's number, pretrained 300 epochs)."""
    return {"value": value, "metric": metric, "source": source, "pretrain": "pointcloud/pointmae_pretrain_shapenet55.yaml",
            "pretrain_epochs": 300}


FEWSHOT_PUBLISHED = {(5, 10): (96.3, 2.5), (5, 20): (97.8, 1.8), (10, 10): (92.6, 4.1), (10, 20): (95.0, 3.0)}
FEWSHOT_FILES = {
    f"pointmae_fewshot_{way}way_{shot}shot.yaml": {
        "name": f"pointmae_fewshot_{way}way_{shot}shot", "model": {"num_classes": way},
        "data": {"way": way, "shot": shot},
        "published": published(mean, "test/top1",
                               f"Point-MAE README ({way}-way {shot}-shot, mean of 10 folds; std {std})")}
    for (way, shot), (mean, std) in FEWSHOT_PUBLISHED.items()
}

# The same for the three ScanObjectNN files (cfgs/finetune_scan_{objbg,objonly,hardest}.yaml).
SCANOBJECTNN = {
    "task": "pointmae_classify", "init": "",
    "model": {"variant": "pointmae_small", "num_classes": 15, "drop_path": 0.1, "num_group": 128,
              "group_size": 32},
    "data": {"dataset": "scanobjectnn", "root": "", "npoints": 2048, "fps_points": 2048,
             "augmentation": "scale_translate", "votes": 10, "vote_splits": ["test"], "val_fraction": 0.1,
             "val_seed": 0},
    "optim": {"name": "adamw", "lr": 5.0e-4, "weight_decay": 0.05, "warmup_epochs": 10, "warmup_lr": 1.0e-6,
              "min_lr": 1.0e-6, "schedule": "cosine", "clip_grad": 10.0},
    "train": {"epochs": 300, "batch_size": 32, "num_workers": 8, "select_on": "val", "best_metric": "top1",
              "best_mode": "max", "eval_every": 1, "save_every": 1, "keep_last": 1, "log_every": 20},
}
SCANOBJECTNN_FILES = {
    f"pointmae_finetune_scanobjectnn_{short}.yaml": {
        "name": f"pointmae_finetune_scanobjectnn_{short}", "data": {"scan_variant": variant},
        "published": published(value, "test/top1", f"Point-MAE README (ScanObjectNN {variant})")}
    for short, variant, value in (("objbg", "OBJ_BG", 90.02), ("objonly", "OBJ_ONLY", 88.29),
                                  ("hardest", "PB_T50_RS", 85.18))
}

CASES = [(name, FEWSHOT, diff, "base_pointmae_fewshot.yaml") for name, diff in FEWSHOT_FILES.items()] + \
        [(name, SCANOBJECTNN, diff, "base_pointmae_finetune_scanobjectnn.yaml")
         for name, diff in SCANOBJECTNN_FILES.items()]


@pytest.mark.parametrize("name, recipe, diff, base", CASES, ids=[c[0] for c in CASES])
def test_benchmark_config_builds_on_its_base_and_loads_as_before(name, recipe, diff, base, tmp_path):
    # the file states only its base and what differs from the family's recipe
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert raw == {"base": base, **diff}
    # and loads to exactly what the self-contained file held (the same keys over the same defaults)
    before = tmp_path / name
    before.write_text(yaml.safe_dump(deep_merge(recipe, diff)))
    assert to_dict(load_config(CONFIGS / name)) == to_dict(load_config(before))


def test_benchmark_configs_hold_the_official_recipes():
    cfg = load_config(CONFIGS / "pointmae_fewshot_10way_20shot.yaml")
    assert (cfg.data.way, cfg.data.shot, cfg.model.num_classes, cfg.seeds) == (10, 20, 10, list(range(10)))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.batch_size, cfg.train.epochs) == (5e-4, 0.05, 32, 150)
    assert (cfg.optim.warmup_epochs, cfg.optim.clip_grad, cfg.model.drop_path) == (10, 10.0, 0.1)
    assert (cfg.data.npoints, cfg.data.fps_points, cfg.model.num_group, cfg.model.group_size) == (1024, 1200, 64, 32)
    cfg = load_config(CONFIGS / "pointmae_finetune_scanobjectnn_hardest.yaml")
    assert (cfg.data.scan_variant, cfg.model.num_classes, cfg.data.votes) == ("PB_T50_RS", 15, 10)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.batch_size, cfg.train.epochs) == (5e-4, 0.05, 32, 300)
    assert (cfg.data.npoints, cfg.model.num_group, cfg.model.group_size) == (2048, 128, 32)
