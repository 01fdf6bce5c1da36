"""``mm3d sweep``: pretrain every combination of a grid over several seeds on the same data and
budget, probe and fine-tune each with the existing tasks, and tabulate the results.

A sweep file is a pretraining config (it may build on one with ``base:``) plus a ``sweep:``
section; the command-line options of ``mm3d sweep`` are the same keys and replace the file's::

    base: videomae_pretrain_demo.yaml
    train: {max_steps: 60}
    sweep:
      grid:                                   # dotted pretraining keys -> values (every combination)
        model.target.kind: [pixel, hog, teacher, ema]
        model.mask_type: [tube, motion]
      seeds: [0, 1, 2]                        # pretrain + probe once per seed
      probe: videomae_linprobe_demo.yaml      # a config of a probing task (relative to this file)
      probe_overrides: [train.max_steps=40]
      probe_metric: test/top1                 # split/metric of the probe's results.json
      finetune: videomae_finetune_demo.yaml   # fine-tuned once per combination, from seed 0's pretraining
      finetune_overrides: [train.max_steps=40]
      finetune_metric: test/top1
      before:                                 # pretraining runs made first, once; `{before.NAME}` is the
        pixel_teacher: [model.target.kind=pixel]   # path of their final checkpoint in any override
      when:                                   # overrides for the combinations where a grid key has a value
        model.target.kind=teacher: [model.target.checkpoint={before.pixel_teacher}]
      all_stages: [train.device=cpu]          # overrides for every stage (pretrain, probe, fine-tune)

``mm3d sweep FILE [--grid KEY=V1,V2 ...] [--seeds 0 1 2] [--probe CFG] [--finetune CFG]
[--probe-set K=V ...] [--finetune-set K=V ...] [--all-stages K=V ...] --out DIR [K=V ...]``; the
trailing ``K=V`` override the pretraining config (a plain pretraining config without a ``sweep:``
section works with the options alone).

Layout of ``DIR``: ``before/<name>/``, ``pretrain/<combination>/seed_<s>/``,
``probe/<combination>/seed_<s>/`` and ``finetune/<combination>/seed_<s>/`` are ordinary run
folders of the one trainer; ``sweep.json`` (every run: status, error, numbers; the table) and
``sweep.md`` (the table) are rewritten after every run. Before anything runs, every stage's config
of every combination is loaded (key and type errors), every checkpoint a config names must exist
or be made by the sweep, and every pretraining model is built once (a target that needs an input,
e.g. ``model.target.checkpoint`` of ``teacher``, says so then). A run that fails is recorded with
its error and the sweep goes on (its probe and fine-tune are skipped); the table lists it. Running
the sweep again into the same ``DIR`` reuses every finished run (its ``results.json``), continues
unfinished ones from their newest checkpoint (``train.resume=auto``) and retries failed ones; a
finished run whose config differs from the sweep's now is an error naming the keys.

Numbers per combination: the probe metric's mean ± sample std over the seeds that finished (n
shown), the fine-tune metric, the pretraining throughput (median of the trainer's logged
``samples_per_s`` windows after the first, which includes start-up; averaged over seeds) and the
final pretraining loss (the last logged step; averaged over seeds). Losses of different targets
measure different things and are not comparable across targets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import yaml

from mm3d.config import (ConfigError, RunConfig, config_from_dict, deep_merge, flatten_keys, load_config,
                         parse_overrides, read_config_file, to_dict)
from mm3d.errors import UserError
from mm3d.registry import COMMANDS, TASKS, load_modalities
from mm3d.results import jsonable
from mm3d.trainer import TrainingInterrupted, config_changes, run

log = logging.getLogger("mm3d.sweep")

Stage = Literal["before", "pretrain", "probe", "finetune"]
Status = Literal["done", "reused", "failed", "skipped", "pending"]
# keys the sweep sets in every run (the command line and the stage overrides may not)
SWEEP_KEYS = ("output_dir", "seed", "seeds", "overwrite", "train.resume")
PLACEHOLDER = re.compile(r"\{(before\.[A-Za-z0-9_\-]+|out)\}")


@dataclass
class SweepSpec:
    """The ``sweep:`` section (see the module docstring). `grid` keeps the file's key order."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    probe: str = ""
    probe_overrides: list[str] = field(default_factory=list)
    probe_metric: str = "test/top1"
    finetune: str = ""
    finetune_overrides: list[str] = field(default_factory=list)
    finetune_seeds: list[int] = field(default_factory=lambda: [0])
    finetune_metric: str = "test/top1"
    before: dict[str, list[str]] = field(default_factory=dict)
    when: dict[str, list[str]] = field(default_factory=dict)
    all_stages: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.grid:
            raise ConfigError("sweep.grid is empty: give at least one key and its values "
                              "(--grid model.target.kind=pixel,hog)")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.grid.{key} must be a non-empty list of values, got {values!r}")
            if len({_value_text(v) for v in values}) != len(values):
                raise ConfigError(f"sweep.grid.{key} repeats a value: {values}")
            if key in SWEEP_KEYS:
                raise ConfigError(f"sweep.grid.{key}: the sweep sets {key} itself")
        for name in ("seeds", "finetune_seeds"):
            seeds = getattr(self, name)
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
                raise ConfigError(f"sweep.{name} must be distinct integers, got {seeds!r}")
        if not self.seeds:
            raise ConfigError("sweep.seeds is empty")
        if self.finetune and not set(self.finetune_seeds) <= set(self.seeds):
            raise ConfigError(f"sweep.finetune_seeds={self.finetune_seeds} must be among sweep.seeds={self.seeds} "
                              f"(each fine-tunes that seed's pretraining)")
        for name in ("probe_metric", "finetune_metric"):
            if "/" not in getattr(self, name):
                raise ConfigError(f"sweep.{name}={getattr(self, name)!r} must be split/metric (e.g. test/top1)")
        for cond in self.when:
            key, sep, _ = cond.partition("=")
            if not sep or key not in self.grid:
                raise ConfigError(f"sweep.when: {cond!r} must be KEY=VALUE with KEY a grid key "
                                  f"({', '.join(self.grid)})")
        for name in self.before:
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ConfigError(f"sweep.before: {name!r} must be letters, digits, '_' or '-'")


@dataclass(frozen=True)
class Combination:
    """One point of the grid: `values` in grid order; `name` names its run folders."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        short = [k.rsplit(".", 1)[-1] for k, _ in self.values]  # the last part of each key, unless two share it
        parts = [f"{s if short.count(s) == 1 else k.replace('.', '_')}-{_value_text(v)}"
                 for (k, v), s in zip(self.values, short)]
        return re.sub(r"[^A-Za-z0-9._\-]", "_", ".".join(parts))

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={_value_text(v)}" for k, v in self.values]

    def matches(self, cond: str) -> bool:
        key, _, value = cond.partition("=")
        return any(k == key and _value_text(v) == value for k, v in self.values)


@dataclass
class Run:
    """One training run of the sweep. `needs`: the runs whose checkpoints it reads."""

    stage: Stage
    combination: Combination | None  # None: a `before` run
    seed: int
    run_dir: Path
    cfg: RunConfig
    label: str  # "pretrain kind-hog.mask_type-tube seed 1"
    needs: list["Run"] = field(default_factory=list)
    status: Status = "pending"
    error: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"


def _value_text(v: Any) -> str:
    """A grid value as it is written in an override (strings as they are; other values as YAML)."""
    if isinstance(v, str):
        return v
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def expand_grid(grid: dict[str, list[Any]]) -> list[Combination]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    return [Combination(tuple(zip(keys, vals))) for vals in itertools.product(*(grid[k] for k in keys))]


def parse_grid_option(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["model.target.kind=pixel,hog", ...]`` -> ``{"model.target.kind": ["pixel", "hog"]}``
    (each value read as a YAML scalar, as command-line overrides are)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw:
            raise ConfigError(f"--grid {item!r} is not of the form key.sub=value1,value2")
        if key in grid:
            raise ConfigError(f"--grid names {key} twice")
        grid[key.strip()] = [yaml.safe_load(v) if v else "" for v in raw.split(",")]
    return grid


# --------------------------------------------------------------------------------------------
# Reading the sweep
# --------------------------------------------------------------------------------------------


def read_sweep(path: str | Path, args: argparse.Namespace | None = None) -> tuple[dict[str, Any], dict[str, str], SweepSpec]:
    """The pretraining part of the sweep file (merged with its bases), where each key was written,
    and the ``sweep:`` section with the command-line options of `args` over it."""
    data, where = read_config_file(path)
    section = data.pop("sweep", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where.get('sweep', path)}: 'sweep' must be a mapping, got {type(section).__name__}")
    known = {f for f in SweepSpec.__dataclass_fields__}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"{where.get('sweep.' + unknown[0], path)}: unknown key sweep.{unknown[0]}; "
                          f"known: {', '.join(sorted(known))}")
    spec = SweepSpec(**section)
    here = Path(path).parent
    for name in ("probe", "finetune"):  # a stage config in the file is relative to the file
        value = getattr(spec, name)
        if value and not Path(value).is_absolute() and (here / value).is_file():
            setattr(spec, name, str(here / value))
    if args is not None:
        if args.grid:
            spec.grid = parse_grid_option(args.grid)
        for name in ("seeds", "probe", "finetune", "finetune_seeds", "probe_metric", "finetune_metric"):
            if getattr(args, name, None) is not None:
                setattr(spec, name, getattr(args, name))
        spec.probe_overrides = [*spec.probe_overrides, *args.probe_set]
        spec.finetune_overrides = [*spec.finetune_overrides, *args.finetune_set]
        spec.all_stages = [*spec.all_stages, *args.all_stages]
    for name in ("probe_overrides", "finetune_overrides", "all_stages"):
        if not isinstance(getattr(spec, name), list):
            raise ConfigError(f"sweep.{name} must be a list of key=value overrides")
    spec.validate()
    return data, where, spec


def _fill(overrides: Sequence[str], places: dict[str, str]) -> list[str]:
    """`overrides` with ``{before.NAME}`` / ``{out}`` replaced; an unknown name is an error."""
    out = []
    for o in overrides:
        def sub(m: re.Match) -> str:
            if m.group(1) not in places:
                raise ConfigError(f"{o!r} names {{{m.group(1)}}}, but the sweep has no such run "
                                  f"(sweep.before: {', '.join(k.split('.', 1)[1] for k in places if '.' in k) or 'none'})")
            return places[m.group(1)]
        out.append(PLACEHOLDER.sub(sub, o))
    return out


def _check_not_sweep_keys(overrides: Sequence[str], where: str) -> None:
    for key in flatten_keys(parse_overrides(list(overrides))):
        if key in SWEEP_KEYS:
            raise ConfigError(f"{where}: {key} is set by the sweep for every run; leave it out")


def _load_pretrain(data: dict[str, Any], where: dict[str, str], file: str, overrides: list[str]) -> RunConfig:
    """The pretraining config: the sweep file (without ``sweep:``) <- `overrides` (as load_config)."""
    cli = parse_overrides(overrides)
    merged = deep_merge(data, cli)
    name = merged.get("task")
    if not name or name not in TASKS:
        raise ConfigError(f"{file}: the sweep file must be a pretraining config with a known 'task' "
                          f"(got {name!r}); known: {', '.join(TASKS)}")
    return config_from_dict(TASKS.get(name).config_class, merged, file, where, cli)


def _run_keys(run_dir: Path, seed: int, name: str) -> list[str]:
    return [f"output_dir={run_dir}", f"seed={seed}", "seeds=[]", "overwrite=false", "train.resume=auto",
            f"name={name}"]


def plan(path: str | Path, out: str | Path, args: argparse.Namespace | None = None,
         overrides: Sequence[str] = ()) -> tuple[SweepSpec, list[Run]]:
    """Every run of the sweep, in the order they run, each with its loaded config. Raises a
    ConfigError naming the combination and stage when any config does not load."""
    data, where, spec = read_sweep(path, args)
    out = Path(out)
    _check_not_sweep_keys(overrides, "command line")
    _check_not_sweep_keys(spec.all_stages, "sweep.all_stages")
    _check_not_sweep_keys(spec.probe_overrides, "sweep.probe_overrides")
    _check_not_sweep_keys(spec.finetune_overrides, "sweep.finetune_overrides")
    for key in flatten_keys(parse_overrides(list(overrides))):
        if key in spec.grid:
            raise ConfigError(f"command line sets {key}, which the grid varies; drop one of them")
    places = {f"before.{n}": str(out / "before" / n / "checkpoints" / "last.pt") for n in spec.before}
    places["out"] = str(out)
    overrides, all_stages = _fill(overrides, places), _fill(spec.all_stages, places)
    file = str(path)
    runs: list[Run] = []
    errors: list[str] = []

    def load(label: str, fn) -> RunConfig | None:
        try:
            return fn()
        except (UserError, ValueError, KeyError) as e:
            errors.append(f"{label}: {e}")
            return None

    before: dict[str, Run] = {}
    for name, extra in spec.before.items():
        rd = out / "before" / name
        _check_not_sweep_keys(extra, f"sweep.before.{name}")
        cfg = load(f"before {name}", lambda: _load_pretrain(
            data, where, file, [*all_stages, *overrides, *_fill(extra, places), *_run_keys(rd, 0, f"before_{name}")]))
        if cfg is not None:
            before[name] = Run("before", None, 0, rd, cfg, f"before {name}")
    runs.extend(before.values())
    # seed-major: every combination's first seed (and its fine-tune) before any second seed, so a sweep
    # stopped midway already has every combination in its table
    for seed, combo in itertools.product(spec.seeds, expand_grid(spec.grid)):
        when = [o for cond, extra in spec.when.items() if combo.matches(cond) for o in extra]
        _check_not_sweep_keys(when, "sweep.when")
        needs = [before[n] for n in before if any(f"{{before.{n}}}" in o for o in when)]
        rd = out / "pretrain" / combo.name / f"seed_{seed}"
        label = f"pretrain {combo.name} seed {seed}"
        cfg = load(label, lambda: _load_pretrain(
            data, where, file, [*all_stages, *overrides, *combo.overrides, *_fill(when, places),
                                *_run_keys(rd, seed, f"pretrain_{combo.name}_s{seed}")]))
        if cfg is None:
            continue
        pre = Run("pretrain", combo, seed, rd, cfg, label, needs=needs)
        runs.append(pre)
        for stage, cfg_path, extra, seeds in (("probe", spec.probe, spec.probe_overrides, spec.seeds),
                                              ("finetune", spec.finetune, spec.finetune_overrides,
                                               spec.finetune_seeds)):
            if not cfg_path or seed not in seeds:
                continue
            srd = out / stage / combo.name / f"seed_{seed}"
            slabel = f"{stage} {combo.name} seed {seed}"
            scfg = load(slabel, lambda: load_config(cfg_path, [
                *all_stages, *_fill(extra, places), f"init={pre.checkpoint}",
                *_run_keys(srd, seed, f"{stage}_{combo.name}_s{seed}")]))
            if scfg is not None:
                runs.append(Run(stage, combo, seed, srd, scfg, slabel, needs=[pre]))
    if errors:
        raise ConfigError("the sweep's configs do not load; nothing was run:\n  " + "\n  ".join(errors))
    return spec, runs


# --------------------------------------------------------------------------------------------
# Checks before anything runs
# --------------------------------------------------------------------------------------------


def _path_keys(cfg: RunConfig) -> dict[str, str]:
    """The config's non-empty checkpoint inputs: ``init``, ``checkpoint`` and every ``*.checkpoint``."""
    flat = flatten_keys(to_dict(cfg))
    return {k: v for k, v in flat.items() if isinstance(v, str) and v
            and (k in ("init", "checkpoint") or k.endswith(".checkpoint"))}


def preflight(runs: list[Run], *, build: bool = True) -> None:
    """Raise one ConfigError listing every run whose inputs are missing (a checkpoint that neither
    exists nor is made by an earlier run of the sweep), whose finished run folder holds another
    config, or whose pretraining model does not build (e.g. a target without its input). Models
    whose inputs are made by the sweep are built later (:func:`check_built`)."""
    made = {str(r.checkpoint) for r in runs}
    errors = []
    for r in runs:
        for key, value in _path_keys(r.cfg).items():
            if value not in made and not Path(value).exists():
                errors.append(f"{r.label}: {key}={value} does not exist and no run of the sweep makes it")
        stored = _stored_config(r.run_dir)
        if stored is not None and (r.run_dir / "results.json").is_file():
            changes = config_changes(stored, r.cfg)
            if changes:
                what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
                errors.append(f"{r.label}: {r.run_dir} holds a finished run of another config ({what}): "
                              f"sweep into another --out, or delete that folder")
    if build:  # once per combination: the seed does not change what is built
        built: list[tuple[str, Combination | None]] = []
        for r in runs:
            if (r.stage in ("before", "pretrain") and (r.stage, r.combination) not in built
                    and not any(v in made for v in _path_keys(r.cfg).values())):
                built.append((r.stage, r.combination))
                msg = _build_error(r)
                if msg:
                    errors.append(msg)
    if errors:
        raise ConfigError("the sweep cannot run; nothing was run:\n  " + "\n  ".join(errors))


def _stored_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text())


def _build_error(r: Run) -> str:
    """"" when the run's model builds on the CPU, else what the builder said."""
    try:
        with torch.random.fork_rng():
            TASKS.get(r.cfg.task).build_model(r.cfg)
    except (UserError, ValueError, KeyError, FileNotFoundError) as e:
        return f"{r.label}: {e}"
    return ""


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def execute(run_: Run) -> None:
    """Run (or reuse) one run and set its status, results and error."""
    failed = [n for n in run_.needs if n.status not in ("done", "reused")]
    if failed:
        run_.status, run_.error = "skipped", f"needs {failed[0].label}, which {failed[0].status}"
        return
    results_path = run_.run_dir / "results.json"
    if results_path.is_file():
        run_.status, run_.results = "reused", json.loads(results_path.read_text())
        log.info("sweep: %s finished earlier: reusing %s", run_.label, results_path)
        return
    log.info("sweep: %s -> %s", run_.label, run_.run_dir)
    t0 = time.time()
    try:
        run_.results = run(run_.cfg)
        run_.status, run_.error = "done", ""
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as e:  # a failing run is recorded and listed, never dropped
        run_.status, run_.error = "failed", f"{type(e).__name__}: {e}"
        run_.run_dir.mkdir(parents=True, exist_ok=True)
        (run_.run_dir / "sweep_error.txt").write_text(traceback.format_exc())
        log.error("sweep: %s failed: %s (traceback in %s)", run_.label, run_.error, run_.run_dir / "sweep_error.txt")
    run_.seconds = round(time.time() - t0, 1)


def metric(results: dict[str, Any], name: str) -> float:
    """``split/metric`` of a run's results.json; KeyError naming what the run has otherwise."""
    split, _, key = name.partition("/")
    value = results.get(split, {}).get(key) if isinstance(results.get(split), dict) else None
    if not isinstance(value, (int, float)):
        have = {s: sorted(v) for s, v in results.items() if s in ("val", "test") and isinstance(v, dict)}
        raise KeyError(f"{name} is not in the run's results (it has {have})")
    return float(value)


def pretrain_numbers(results: dict[str, Any]) -> dict[str, float | None]:
    """Throughput (median ``samples_per_s`` of the logged windows after the first, which holds
    start-up; the only one when there is one) and the last logged loss of a pretraining run."""
    hist = [h for h in results.get("history", []) if h.get("split", "train") == "train"]
    rates = [h["samples_per_s"] for h in hist if isinstance(h.get("samples_per_s"), (int, float))]
    losses = [h["loss"] for h in hist if isinstance(h.get("loss"), (int, float))]
    return {"samples_per_s": statistics.median(rates[1:] or rates) if rates else None,
            "final_loss": losses[-1] if losses else None, "steps": hist[-1]["step"] if hist else None}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table_rows(spec: SweepSpec, runs: list[Run]) -> list[dict[str, Any]]:
    """One row per combination: the grid values, the probe metric's per-seed values, mean, std and
    n, the fine-tune metric, throughput, final loss and every failed or skipped run with its error."""
    rows = []
    for combo in expand_grid(spec.grid):
        mine = [r for r in runs if r.combination == combo]
        row: dict[str, Any] = {"combination": combo.name, **{k: v for k, v in combo.values}, "problems": [],
                               "pending": sum(r.status == "pending" for r in mine)}
        probe: dict[int, float] = {}
        for r in mine:
            if r.status in ("failed", "skipped"):
                row["problems"].append(f"{r.stage} seed {r.seed}: {r.status}" + (f" ({r.error})" if r.error else ""))
                continue
            try:
                if r.stage == "probe":
                    probe[r.seed] = metric(r.results, spec.probe_metric)
                elif r.stage == "finetune":
                    row.setdefault("finetune", {})[r.seed] = metric(r.results, spec.finetune_metric)
            except KeyError as e:
                row["problems"].append(f"{r.stage} seed {r.seed}: {e.args[0]}")
        pre = [pretrain_numbers(r.results) for r in mine if r.stage == "pretrain" and r.status in ("done", "reused")]
        mean, std = _mean_std(list(probe.values()))
        row.update({"probe": probe, "probe_mean": mean, "probe_std": std, "probe_n": len(probe),
                    "finetune_mean": _mean_std(list(row.get("finetune", {}).values()))[0],
                    "samples_per_s": _mean_std([p["samples_per_s"] for p in pre if p["samples_per_s"] is not None])[0],
                    "final_loss": _mean_std([p["final_loss"] for p in pre if p["final_loss"] is not None])[0],
                    "pretrain_steps": next((p["steps"] for p in pre), None)})
        rows.append(row)
    return rows


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table_markdown(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    keys = list(spec.grid)
    head = [*keys, f"probe {spec.probe_metric} (mean ± std, n)", f"fine-tune {spec.finetune_metric}",
            "pretrain samples/s", "pretrain final loss", "failed / skipped / not run yet"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        probe = (f"{_num(r['probe_mean'])} ± {_num(r['probe_std'])} (n={r['probe_n']})" if r["probe_n"]
                 else f"– (n=0)")
        lines.append("| " + " | ".join([*(_cell(_value_text(r[k])) for k in keys), probe, _num(r["finetune_mean"]),
                                        _num(r["samples_per_s"], ".1f"), _num(r["final_loss"]),
                                        _cell("; ".join([*r["problems"], *([f"{r['pending']} runs not run yet"]
                                                                           if r["pending"] else [])])) or "–"]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, spec: SweepSpec, runs: list[Run], command: str) -> dict[str, Any]:
    """``DIR/sweep.json`` and ``DIR/sweep.md`` from the runs as they stand."""
    rows = table_rows(spec, runs)
    summary = {"command": command, "grid": spec.grid, "seeds": spec.seeds, "finetune_seeds": spec.finetune_seeds,
               "probe": spec.probe, "probe_metric": spec.probe_metric, "finetune": spec.finetune,
               "finetune_metric": spec.finetune_metric,
               "runs": [{"stage": r.stage, "label": r.label, "combination": dict(r.combination.values) if r.combination
                         else None, "seed": r.seed, "run_dir": str(r.run_dir), "status": r.status, "error": r.error,
                         "seconds": r.seconds,
                         **({"pretrain": pretrain_numbers(r.results)} if r.stage in ("before", "pretrain") and r.results
                            else {})} for r in runs],
               "table": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(jsonable(summary), indent=1, default=str))
    done = sum(r.status in ("done", "reused") for r in runs)
    md = [f"# Sweep: {' x '.join(spec.grid)}", "", f"`{command}`", "",
          f"Seeds {spec.seeds} (pretrain + probe); fine-tune seeds {spec.finetune_seeds}. Probe: `{spec.probe or '–'}`; "
          f"fine-tune: `{spec.finetune or '–'}`. {done} of {len(runs)} runs finished.", "",
          table_markdown(spec, rows),
          "Probe: mean ± sample standard deviation over the seeds that finished (n). Throughput: median of the "
          "trainer's logged samples/s windows after the first, averaged over seeds. Final loss: the last logged "
          "pretraining step, averaged over seeds; losses of different targets measure different things and are "
          "not comparable across targets.", ""]
    (out / "sweep.md").write_text("\n".join(md))
    return summary


def run_sweep(path: str | Path, out: str | Path, args: argparse.Namespace | None = None,
              overrides: Sequence[str] = (), command: str = "", *, report_only: bool = False) -> dict[str, Any]:
    """Plan, check, run (or reuse) every run, and write ``sweep.json`` / ``sweep.md``; returns the summary.

    `report_only`: run nothing; tabulate the runs that finished (``results.json``) and those that failed
    (``sweep_error.txt``), the others as not run yet."""
    load_modalities()
    out = Path(out)
    spec, runs = plan(path, out, args, overrides)
    if report_only:
        for r in runs:
            if (r.run_dir / "results.json").is_file():
                r.status, r.results = "reused", json.loads((r.run_dir / "results.json").read_text())
            elif (r.run_dir / "sweep_error.txt").is_file():  # the last line of its traceback: the error
                lines = [ln for ln in (r.run_dir / "sweep_error.txt").read_text().splitlines() if ln.strip()]
                r.status, r.error = "failed", lines[-1] if lines else "failed"
        summary = write_summary(out, spec, runs, command or f"mm3d sweep {path} --out {out}")
        print(table_markdown(spec, summary["table"]))
        return summary
    preflight(runs)
    command = command or f"mm3d sweep {path} --out {out}"
    log.info("sweep: %d combinations x %d seeds: %d runs into %s", len(expand_grid(spec.grid)), len(spec.seeds),
             len(runs), out)
    for r in runs:
        execute(r)
        write_summary(out, spec, runs, command)
    summary = write_summary(out, spec, runs, command)
    print(table_markdown(spec, summary["table"]))
    return summary


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pretraining config with an optional sweep: section (configs/*/..._sweep_demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of the pretraining config")
    p.add_argument("--out", required=True, help="the sweep's folder (run again into it to continue)")
    p.add_argument("--grid", action="extend", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="pretraining keys and their values (replaces sweep.grid), e.g. model.target.kind=pixel,hog")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds of pretraining + probe (sweep.seeds)")
    p.add_argument("--finetune-seeds", dest="finetune_seeds", nargs="+", type=int,
                   help="seeds that are also fine-tuned (sweep.finetune_seeds, default 0)")
    p.add_argument("--probe", help="config of the probe task (sweep.probe)")
    p.add_argument("--finetune", help="config of the fine-tune task (sweep.finetune)")
    p.add_argument("--probe-metric", dest="probe_metric", help="split/metric of the probe (default test/top1)")
    p.add_argument("--finetune-metric", dest="finetune_metric", help="split/metric of the fine-tune (default test/top1)")
    p.add_argument("--probe-set", dest="probe_set", action="extend", nargs="+", default=[], metavar="K=V", help="probe config overrides")
    p.add_argument("--finetune-set", dest="finetune_set", action="extend", nargs="+", default=[], metavar="K=V",
                   help="fine-tune config overrides")
    p.add_argument("--report-only", dest="report_only", action="store_true",
                   help="run nothing: write the table of the runs that finished so far")
    p.add_argument("--all-stages", dest="all_stages", action="extend", nargs="+", default=[], metavar="K=V",
                   help="overrides for every stage (e.g. train.device=cpu)")


def cmd_sweep(args: argparse.Namespace) -> int:
    summary = run_sweep(args.config, args.out, args, args.overrides, command="mm3d " + shlex.join(sys.argv[1:]),
                        report_only=args.report_only)
    return 1 if any(r["status"] in ("failed", "skipped") for r in summary["runs"]) else 0


COMMANDS.add("sweep", ("Pretrain every combination of a grid (target x mask ...) over seeds, probe and fine-tune "
                       "each, and write one table (DIR/sweep.md, sweep.json); run again to continue.",
                       add_arguments, cmd_sweep))
