"""Config loading: merge order, validation messages, round trip."""

from dataclasses import dataclass, field

import pytest
import yaml

import mm3d.toy  # noqa: F401  (registers the toy task)
from mm3d.config import ConfigError, config_from_dict, load_config, parse_overrides, save_config, to_dict


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_merge_order_defaults_yaml_cli(tmp_path):
    p = write(tmp_path, "task: toy_regression\nseed: 3\ntrain:\n  batch_size: 4\n  epochs: 7\n")
    cfg = load_config(p, ["train.epochs=9", "optim.betas=[0.8,0.9]", "model.hidden=5"])
    assert cfg.seed == 3  # YAML over default
    assert cfg.train.batch_size == 4
    assert cfg.train.epochs == 9  # CLI over YAML
    assert cfg.optim.betas == (0.8, 0.9)  # list -> tuple
    assert cfg.model.hidden == 5
    assert cfg.train.accum_steps == 1  # untouched default


def test_unknown_key_names_closest_and_line(tmp_path):
    p = write(tmp_path, "task: toy_regression\ntrain:\n  batch_size: 4\n  epohcs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.epohcs" in msg and "did you mean 'epochs'" in msg and f"{p}:4" in msg


def test_unknown_cli_key_is_attributed_to_command_line():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optim.lrr'.*did you mean 'lr'"):
        load_config(None, ["task=toy_regression", "optim.lrr=0.1"])


@pytest.mark.parametrize("override, fragment", [
    ("train.batch_size=abc", "expects an integer"),
    ("train.batch_size=1.5", "expects an integer"),
    ("train.ema=3", "expects true or false"),
    ("train.precision=fp8", "one of 'fp32', 'bf16', 'fp16'"),
    ("optim.betas=[0.9]", "list of 2 items"),
    ("train=5", "mapping for section TrainConfig"),
])
def test_wrong_types_fail_before_work(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, ["task=toy_regression", override])


def test_unknown_task_suggests():
    with pytest.raises(ConfigError, match="did you mean 'toy_regression'"):
        load_config(None, ["task=toy_regresion"])


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, "task: toy_regression\ntrain: [1, 2\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: invalid YAML"):
        load_config(p)


def test_float_strings_and_null():
    cfg = load_config(None, ["task=toy_regression", "optim.lr=1e-3", "optim.clip_grad=null"])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.clip_grad is None


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config(None, ["task=toy_regression", "seeds=[0,1]", "optim.betas=[0.9,0.95]"])
    save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    again = config_from_dict(type(cfg), data)
    assert again == cfg
    assert to_dict(again) == data


def test_parse_overrides_nested_and_bad():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1,2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["novalue"])


def test_variant_preset_then_overrides():
    from mm3d.registry import MODELS, register_variant

    @dataclass
    class ArchCfg:
        variant: str = ""
        width: int = 1
        depth: int = 1

    @dataclass
    class Holder:
        model: ArchCfg = field(default_factory=ArchCfg)

    if "unit_test_arch" not in MODELS:
        register_variant("unit_test_arch", "core", ArchCfg(variant="unit_test_arch", width=64, depth=3))
    cfg = config_from_dict(Holder, {"model": {"variant": "unit_test_arch", "depth": 5}})
    assert (cfg.model.width, cfg.model.depth) == (64, 5)
    with pytest.raises(ConfigError, match="unknown model variant 'unit_test_arc'.*did you mean 'unit_test_arch'"):
        config_from_dict(Holder, {"model": {"variant": "unit_test_arc"}})


def test_task_section_defaults_survive_partial_yaml():
    from mm3d.config import RunConfig, TrainConfig

    @dataclass
    class Preset(RunConfig):
        train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="top1", best_mode="max"))

    cfg = config_from_dict(Preset, {"train": {"epochs": 3}})
    assert (cfg.train.epochs, cfg.train.best_metric, cfg.train.best_mode) == (3, "top1", "max")


def test_base_chain_merges_and_names_the_file_of_each_key(tmp_path):
    write(tmp_path, "task: toy_regression\nseed: 3\ntrain:\n  batch_size: 4\n  epochs: 7\n", "root.yaml")
    (tmp_path / "sub").mkdir()
    write(tmp_path, "base: ../root.yaml\ntrain:\n  epochs: 9\n", "sub/mid.yaml")
    leaf = write(tmp_path, "base: mid.yaml\noptim:\n  lr: 0.5\ntrain:\n  epohcs: 1\n", "sub/leaf.yaml")
    cfg = load_config(write(tmp_path, "base: mid.yaml\noptim:\n  lr: 0.5\n", "sub/ok.yaml"), ["seed=5"])
    assert (cfg.seed, cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr) == (5, 4, 9, 0.5)
    with pytest.raises(ConfigError, match=rf"{leaf}:5: unknown key 'train.epohcs'"):
        load_config(leaf)
    with pytest.raises(ConfigError, match=r"root.yaml:4: key 'train.batch_size' expects an integer"):
        write(tmp_path, "task: toy_regression\nseed: 3\ntrain:\n  batch_size: x\n", "root.yaml")
        load_config(tmp_path / "sub" / "ok.yaml")


def test_base_errors_name_the_file(tmp_path):
    missing = write(tmp_path, "base: nowhere.yaml\ntask: toy_regression\n", "a.yaml")
    with pytest.raises(ConfigError, match=rf"{missing}:1: base config not found: .*nowhere.yaml"):
        load_config(missing)
    write(tmp_path, "base: c.yaml\n", "b.yaml")
    loop = write(tmp_path, "base: b.yaml\n", "c.yaml")
    with pytest.raises(ConfigError, match="'base' chain loops"):
        load_config(loop)


def test_union_error_keeps_the_inner_reason():
    @dataclass
    class Inner:
        size: int = 1

    @dataclass
    class Outer:
        part: Inner | str = "x"

    with pytest.raises(ConfigError, match=r"expects Inner or str, got .*unknown key 'part.sise'"):
        config_from_dict(Outer, {"part": {"sise": 2}})
