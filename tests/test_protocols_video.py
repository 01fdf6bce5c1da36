"""The VideoMAE benchmark configs as MCG-NJU/VideoMAE's MODEL_ZOO.md pairs them, and the video
``protocol=paper`` switch (the reported model is the last epoch's; nothing is selected)."""

from __future__ import annotations

import pytest
import yaml

from mm3d.config import ConfigError, flatten_keys, load_config, to_dict
from mm3d.registry import TASKS
from mm3d.results import run_protocol_label
from mm3d.testing import PROJECT_ROOT

CONFIG_ROOT = PROJECT_ROOT / "configs"
VIDEO = CONFIG_ROOT / "video"
ZOO_SOURCE = "VideoMAE MODEL_ZOO.md"

# MODEL_ZOO.md, one row per released pair: (dataset, backbone, pretraining epochs, mask ratio of the
# script folder `tubemasking_ratio_*`, published top-1) -> our (pretraining, fine-tuning) config files.
ZOO = [
    ("K400", "ViT-S", 1600, 0.9, 79.0, "videomae_pretrain_k400_vits.yaml", "videomae_finetune_k400_vits.yaml"),
    ("K400", "ViT-B", 800, 0.9, 80.0, "videomae_pretrain_k400_vitb_800ep.yaml",
     "videomae_finetune_k400_vitb_800ep.yaml"),
    ("K400", "ViT-B", 1600, 0.9, 81.5, "videomae_pretrain_k400_vitb.yaml", "videomae_finetune_k400_vitb.yaml"),
    ("SSv2", "ViT-S", 2400, 0.9, 66.8, "videomae_pretrain_ssv2_vits.yaml", "videomae_finetune_ssv2_vits.yaml"),
    ("SSv2", "ViT-B", 800, 0.9, 69.6, "videomae_pretrain_ssv2_vitb_800ep.yaml",
     "videomae_finetune_ssv2_vitb_800ep.yaml"),
    ("SSv2", "ViT-B", 2400, 0.9, 70.8, "videomae_pretrain_ssv2_vitb.yaml", "videomae_finetune_ssv2_vitb.yaml"),
    ("UCF101", "ViT-B", 3200, 0.75, 91.3, "videomae_pretrain_ucf101_vitb.yaml",
     "videomae_finetune_ucf101_vitb.yaml"),
]
VARIANT = {"ViT-S": "videomae_small", "ViT-B": "videomae_base"}

# The pretrain.sh scripts: clips per GPU, GPUs (--nnodes x 8), --lr (else the 1.5e-4 default),
# --sampling_rate. run_mae_pretraining.py scales --min_lr (default 1e-5) by total batch / 256 as well.
# scripts/ssv2/..._small_..._epoch_2400/pretrain.sh: its comment says 32 GPUs, its command --nnodes=8.
PRETRAIN_SCRIPTS = {
    "videomae_pretrain_k400_vits.yaml": (32, 32, 1.5e-4, 4),
    "videomae_pretrain_k400_vitb_800ep.yaml": (32, 64, 1.5e-4, 4),
    "videomae_pretrain_k400_vitb.yaml": (32, 64, 1.5e-4, 4),
    "videomae_pretrain_ssv2_vits.yaml": (32, 64, 1.5e-4, 2),
    "videomae_pretrain_ssv2_vitb_800ep.yaml": (32, 64, 1.5e-4, 2),
    "videomae_pretrain_ssv2_vitb.yaml": (32, 64, 1.5e-4, 2),
    "videomae_pretrain_ucf101_vitb.yaml": (24, 8, 3e-4, 4),
}
# The finetune.sh scripts: videos per GPU, GPUs, --num_sample, --lr, --epochs, --layer_decay (else
# 0.75), test clips x crops, and the --min_lr before scaling (default 1e-6; UCF101 passes 1e-5).
FINETUNE_SCRIPTS = {
    "videomae_finetune_k400_vits.yaml": (12, 32, 2, 5e-4, 150, 0.75, (5, 3), 1e-6),
    "videomae_finetune_k400_vitb_800ep.yaml": (8, 64, 1, 1e-3, 100, 0.75, (5, 3), 1e-6),
    "videomae_finetune_k400_vitb.yaml": (6, 64, 2, 5e-4, 75, 0.75, (5, 3), 1e-6),
    "videomae_finetune_ssv2_vits.yaml": (12, 32, 2, 1e-3, 40, 0.7, (2, 3), 1e-6),
    "videomae_finetune_ssv2_vitb_800ep.yaml": (8, 64, 1, 5e-4, 50, 0.75, (2, 3), 1e-6),
    "videomae_finetune_ssv2_vitb.yaml": (6, 64, 2, 5e-4, 30, 0.75, (2, 3), 1e-6),
    "videomae_finetune_ucf101_vitb.yaml": (16, 8, 2, 5e-4, 100, 0.7, (5, 3), 1e-5),
}


def video_config(name: str, *overrides: str):
    return load_config(VIDEO / name, list(overrides))


@pytest.mark.parametrize("row", ZOO, ids=[f"{r[0]}-{r[1]}-{r[2]}ep" for r in ZOO])
def test_each_zoo_pair_is_a_finetune_config_naming_its_pretraining(row):
    dataset, backbone, epochs, mask_ratio, top1, pretrain_file, finetune_file = row
    ft = video_config(finetune_file)
    pub = ft.published
    assert (pub.value, pub.metric, pub.source) == (top1, "test/top1", ZOO_SOURCE), finetune_file
    assert pub.pretrain == f"video/{pretrain_file}" and pub.pretrain_epochs == epochs, finetune_file
    # the pairing goes through the file named by published.pretrain, under configs/
    pt = load_config(CONFIG_ROOT / pub.pretrain)
    assert pt.task == "videomae_pretrain" and ft.task == "videomae_finetune"
    assert pt.train.epochs == epochs, pub.pretrain
    assert (pt.model.mask_type, pt.model.mask_ratio) == ("tube", mask_ratio), pub.pretrain
    assert pt.model.variant == ft.model.variant == VARIANT[backbone], (pub.pretrain, finetune_file)
    assert ft.model.num_classes == {"K400": 400, "SSv2": 174, "UCF101": 101}[dataset]


@pytest.mark.parametrize("name", sorted(PRETRAIN_SCRIPTS))
def test_pretraining_configs_hold_their_scripts(name):
    per_gpu, gpus, lr, rate = PRETRAIN_SCRIPTS[name]
    c = video_config(name)
    assert (c.train.batch_size, c.optim.blr, c.data.sampling_rate) == (per_gpu, lr, rate)
    assert c.optim.min_lr == pytest.approx(1e-5 * per_gpu * gpus / 256)
    # utils.cosine_scheduler warms up from 0: the scripts' (scaled) --warmup_lr is never used
    o = c.optim
    assert (o.warmup_lr, o.warmup_epochs, o.betas, o.weight_decay) == (0.0, 40, (0.9, 0.95), 0.05)
    assert (c.model.decoder_depth, c.model.norm_pix_loss, c.model.drop_path, c.data.flip) == (4, True, 0.0, False)
    assert c.optim.clip_grad is None and c.train.select_on == "last"


@pytest.mark.parametrize("name", sorted(FINETUNE_SCRIPTS))
def test_finetune_configs_hold_their_scripts(name):
    per_gpu, gpus, num_sample, lr, epochs, layer_decay, views, min_lr = FINETUNE_SCRIPTS[name]
    c = video_config(name)
    assert (c.train.batch_size, c.data.num_sample, c.optim.blr, c.train.epochs) == (per_gpu, num_sample, lr, epochs)
    assert (c.optim.layer_decay, (c.data.test_num_clips, c.data.test_num_crops)) == (layer_decay, views)
    assert c.optim.min_lr == pytest.approx(min_lr * per_gpu * gpus / 256)
    assert (c.optim.warmup_lr, c.optim.warmup_epochs) == (0.0, 5)


@pytest.mark.parametrize("name, base, differs", [
    ("videomae_pretrain_k400_vitb_800ep.yaml", "videomae_pretrain_k400_vitb.yaml", {"train.epochs"}),
    ("videomae_pretrain_ssv2_vitb_800ep.yaml", "videomae_pretrain_ssv2_vitb.yaml", {"train.epochs"}),
    ("videomae_pretrain_ssv2_vits.yaml", "videomae_pretrain_ssv2_vitb.yaml", {"model.variant"}),
    ("videomae_pretrain_ucf101_vitb.yaml", "videomae_pretrain_k400_vitb.yaml",
     {"model.mask_ratio", "optim.blr", "optim.min_lr", "train.epochs", "train.batch_size", "train.save_every"}),
    # the 800-epoch fine-tuning scripts differ from the headline ones in these flags only
    ("videomae_finetune_k400_vitb_800ep.yaml", "videomae_finetune_k400_vitb.yaml",
     {"data.num_sample", "optim.blr", "optim.min_lr", "train.epochs", "train.batch_size"}),
    ("videomae_finetune_ssv2_vitb_800ep.yaml", "videomae_finetune_ssv2_vitb.yaml",
     {"data.num_sample", "optim.min_lr", "train.epochs", "train.batch_size"}),
])
def test_new_configs_build_on_an_existing_file_and_state_only_what_differs(name, base, differs):
    raw = yaml.safe_load((VIDEO / name).read_text())
    assert raw["base"] == base
    # a variant brings its widths: compare with the base at the same variant
    same_variant = [f"model.variant={raw['model']['variant']}"] if "model.variant" in differs else []
    child, parent = flatten_keys(to_dict(video_config(name))), flatten_keys(to_dict(video_config(base, *same_variant)))
    changed = {k for k in child if child[k] != parent.get(k) and k != "name" and not k.startswith("published.")}
    assert changed == differs - {"model.variant"}
    stated = set(flatten_keys({k: v for k, v in raw.items() if k not in ("base", "name", "published")}))
    assert stated == differs  # nothing repeated from the base


def test_every_published_video_number_is_a_zoo_row_and_no_number_is_invented():
    published = {}
    for path in sorted(VIDEO.glob("videomae_finetune_*.yaml")):
        c = load_config(path)
        if c.published.value is not None:
            published[path.name] = c.published.value
            assert (CONFIG_ROOT / c.published.pretrain).is_file(), path.name
    assert published == {row[6]: row[4] for row in ZOO}
    # MODEL_ZOO.md lists no HMDB51 run and no ViT-S UCF101 run
    for name in ("hmdb51_vitb", "hmdb51_vits", "ucf101_vits"):
        pub = video_config(f"videomae_finetune_{name}.yaml").published
        assert (pub.value, pub.pretrain, pub.pretrain_epochs) == (None, "", None), name


def test_benchmark_file_names_are_kept():
    # file names are an interface (README, scripts): the pairing added files, renamed none
    for size in ("vits", "vitb"):
        for dataset in ("k400", "ssv2", "ucf101", "hmdb51"):
            assert (VIDEO / f"videomae_finetune_{dataset}_{size}.yaml").is_file()
    for name in ("k400_vitb", "k400_vits", "ssv2_vitb"):
        assert (VIDEO / f"videomae_pretrain_{name}.yaml").is_file()


# ------------------------------------------------------------------------------------ protocols


def run_info(cfg):
    """The task's run facts for a run holding train, val and test lists (no data is read)."""
    return TASKS.get(cfg.task).run_info(cfg, {"train": None, "val": None, "test": None})


def test_paper_protocol_reports_the_last_epoch_and_says_so():
    cfg = video_config("videomae_finetune_k400_vitb.yaml", "protocol=paper")
    assert cfg.train.select_on == "last"
    assert cfg.eval.allow_missing is True  # the official test drops unreadable videos from the number
    info = run_info(cfg)
    assert info["selected_on"] == "last"
    assert info["protocol"] == "paper (VideoMAE run_class_finetuning.py, MODEL_ZOO.md): last checkpoint"
    assert info["test_views"] == "5 clips x 3 crops = 15 views per video"
    ssv2 = video_config("videomae_finetune_ssv2_vits.yaml", "protocol=paper")
    assert ssv2.train.select_on == "last"
    assert run_info(ssv2)["test_views"] == "2 clips x 3 crops = 6 views per video"
    # the recipe itself is the file's
    honest = video_config("videomae_finetune_k400_vitb.yaml")
    changed = {k for k, v in flatten_keys(to_dict(cfg)).items() if flatten_keys(to_dict(honest))[k] != v}
    assert changed == {"protocol", "train.select_on", "eval.allow_missing"}


def test_honest_default_selects_on_val():
    for name in ("videomae_finetune_k400_vitb.yaml", "videomae_finetune_ssv2_vitb_800ep.yaml",
                 "videomae_finetune_ucf101_vitb.yaml"):
        cfg = video_config(name)
        assert (cfg.protocol, cfg.train.select_on, cfg.eval.allow_missing) == ("honest", "val", False), name
        info = run_info(cfg)
        assert (info["selected_on"], info["protocol"]) == ("val", "honest: best on val"), name


def test_a_command_line_contradicting_the_paper_protocol_is_an_error():
    with pytest.raises(ConfigError, match=r"train\.select_on='val' \(the paper protocol sets 'last'\)"):
        video_config("videomae_finetune_k400_vitb.yaml", "protocol=paper", "train.select_on=val")
    with pytest.raises(ConfigError, match=r"eval\.allow_missing=False"):
        video_config("videomae_finetune_ssv2_vitb.yaml", "protocol=paper", "eval.allow_missing=false")
    # repeating what the protocol sets is no contradiction
    cfg = video_config("videomae_finetune_k400_vitb.yaml", "protocol=paper", "train.select_on=last")
    assert cfg.train.select_on == "last"
    # without protocol=paper the same override is the user's own choice (the label says so)
    cfg = video_config("videomae_finetune_k400_vitb.yaml", "train.select_on=test")
    assert run_info(cfg)["protocol"].startswith("custom: best on test")


def test_linear_probe_has_no_paper_procedure():
    with pytest.raises(ConfigError, match="no procedure for task 'videomae_linprobe'"):
        video_config("videomae_linprobe_demo.yaml", "protocol=paper")
    assert video_config("videomae_linprobe_demo.yaml").train.select_on == "val"


def test_pretraining_paper_protocol_keeps_the_last_epoch():
    cfg = video_config("videomae_pretrain_demo.yaml", "protocol=paper", "train.select_on=last")
    assert cfg.train.select_on == "last"
    assert run_protocol_label(cfg, "last") == "paper (VideoMAE run_mae_pretraining.py, MODEL_ZOO.md): last checkpoint"
    # a pretraining run that holds a val list would otherwise report its epoch of least val loss
    cfg = load_config(None, ["task=videomae_pretrain", "protocol=paper"])
    assert cfg.train.select_on == "last"
    assert load_config(None, ["task=videomae_pretrain"]).train.select_on == "val"
    with pytest.raises(ConfigError, match=r"train\.select_on='val'"):
        video_config("videomae_pretrain_k400_vitb.yaml", "protocol=paper", "train.select_on=val")
