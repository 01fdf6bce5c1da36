"""The `mm3d` command. This module is the one place that knows both modalities: it imports them
(:func:`mm3d.registry.load_modalities`) so their variants, tasks, converters and synthetic-data
kinds are registered, then dispatches every subcommand through the core registries.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

import mm3d.benchsuite  # noqa: F401  (registers `mm3d bench-suite`)
import mm3d.export  # noqa: F401  (registers `mm3d export`; mm3d.modelcard, `mm3d info`)
import mm3d.extract  # noqa: F401  (registers `mm3d extract`)
import mm3d.plan  # noqa: F401  (registers `mm3d plan`)
import mm3d.prepare  # noqa: F401  (registers `mm3d data prepare`)
import mm3d.sweep  # noqa: F401  (registers `mm3d sweep`)
import mm3d.toy  # noqa: F401  (the core's own toy task)
from mm3d.bench import run_bench
from mm3d.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from mm3d.config import load_config
from mm3d.datacheck import check_report, write_check_report
from mm3d.demo import run_demo
from mm3d.distributed import DistInfo, barrier, cleanup, init_distributed, resolve_device
from mm3d.errors import UserError
from mm3d.registry import COMMANDS, CONVERTERS, DATA_COMMANDS, MODELS, SYNTH, TASKS, load_modalities
from mm3d.results import jsonable
from mm3d.trainer import Trainer, TrainingInterrupted, run, setup_logging

log = logging.getLogger("mm3d")


def _setup() -> None:
    setup_logging()
    load_modalities()


def _load(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def _check_checkpoint_modality(key: str, path: str, cfg: Any) -> None:
    """Refuse ``key=path`` when the checkpoint's stored config is of a task of the other modality.

    Files this cannot read as one of our checkpoints (converted or foreign weights, Hugging Face
    folders, files that need pickle) are left to the task's own loader and its messages.
    """
    if not path or not Path(path).is_file():
        return
    try:
        stored = load_checkpoint(path, mmap=True).get("config")
    except CheckpointError:
        return
    task_name = stored.get("task") if isinstance(stored, dict) else None
    if not isinstance(task_name, str) or task_name not in TASKS:
        return
    theirs, ours = TASKS.get(task_name).modality, TASKS.get(cfg.task).modality
    if theirs != ours:
        raise CheckpointError(f"{key}={path} is a {task_name} checkpoint ({theirs}); this run is {cfg.task} "
                              f"({ours}): give a {ours} checkpoint")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_checkpoint_modality("init", cfg.init, cfg)
    stage = getattr(TASKS.get(cfg.task), "stage", "")
    if stage and stage != args.command:
        log.warning("config task %r is a %s task, started with `mm3d %s`", cfg.task, stage, args.command)
    results = run(cfg)
    summary = {k: v for k, v in results.items() if k not in ("history", "per_seed")}
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if not cfg.checkpoint:
        raise UserError("give the weights to score with checkpoint=PATH")
    _check_checkpoint_modality("checkpoint", cfg.checkpoint, cfg)
    cfg = replace(cfg, output_dir=str(cfg.run_dir / "eval"), init="", train=replace(cfg.train, resume=""))
    trainer = Trainer(cfg, TASKS.get(cfg.task), train=False)
    for note in trainer.task.load_trained(trainer.model, cfg.checkpoint, cfg):
        log.info("%s", note)
    results: dict[str, Any] = {"checkpoint": cfg.checkpoint, "protocol_name": cfg.protocol,
                               "protocol": trainer.task.run_info(cfg, trainer.datasets)}
    evals = {}
    for split in ("val", "test"):
        if split in trainer.datasets:
            res = trainer.evaluate(split, trainer.model, final=True)
            results[split] = res.metrics
            evals[split] = res
    info, device = init_distributed(cfg.train.device)
    if info.is_main:
        files = trainer.task.write_report(trainer.run_dir, trainer.model, cfg, evals, trainer.datasets, device)
        results["files"] = [str(f) for f in files]
        (trainer.run_dir / "results.json").write_text(json.dumps(jsonable(results), indent=1))
        print(json.dumps(jsonable(results), indent=1))
    return 0


def _stored_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides of a checkpoint's stored config, with ``--bin-columns N`` as ``data.bin_columns=N``."""
    extra = [] if getattr(args, "bin_columns", None) is None else [f"data.bin_columns={args.bin_columns}"]
    return [*args.overrides, *extra]


def cmd_visualize(args: argparse.Namespace) -> int:
    if not args.input and args.dataset_index is None:
        raise UserError("give --input FILE or --dataset-index I")
    if args.dataset_index is not None and args.dataset_index < 0:
        raise UserError(f"--dataset-index must be >= 0, got {args.dataset_index}")
    device = resolve_device(args.device, DistInfo())
    task, cfg, model = model_from_checkpoint(args.checkpoint, args.allow_pickle, _stored_overrides(args))
    torch.manual_seed(args.seed)
    files = task.visualize(model.to(device), cfg, inputs=args.input or [], dataset_index=args.dataset_index,
                           out_dir=Path(args.out), interactive=args.interactive, seed=args.seed, device=device)
    for f in files:
        print(f)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes of every input; an input that cannot be read gets one error line on stderr (the
    others are still classified) and the exit status is then 1."""
    if args.topk < 1:
        raise UserError(f"--topk must be >= 1, got {args.topk}")
    device = resolve_device(args.device, DistInfo())
    task, cfg, model = model_from_checkpoint(args.checkpoint, args.allow_pickle, _stored_overrides(args))
    rows = task.predict(model.to(device), cfg, args.inputs, topk=args.topk, label_map=args.label_map, device=device)
    failed = 0
    for row in rows:
        if row.get("error"):
            failed += 1
            msg = str(row["error"])
            print(f"mm3d predict: error: {msg if row['input'] in msg else row['input'] + ': ' + msg}",
                  file=sys.stderr)
        if args.json:
            print(json.dumps(row))
        elif not row.get("error"):
            print(row["input"])
            for name, p in row["topk"]:
                print(f"  {p:7.2%}  {name}")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    print(json.dumps(run_bench(_load(args))))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    fn = CONVERTERS.get(args.source)
    for line in fn(args.src, args.dst, allow_pickle=args.allow_pickle):
        print(line)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for name, v in MODELS.items():
        if args.modality and v.modality != args.modality:
            continue
        if args.verbose:
            print(f"{name:24s} {v.modality:10s} {v.description}\n    {asdict(v.config)}")
        else:
            print(f"{name:24s} {v.modality:10s} {v.description}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    for name, t in TASKS.items():
        print(f"{name:24s} {t.modality:10s} {t.description}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    fn = SYNTH.get(args.kind)
    summary = fn(Path(args.out), seed=args.seed, scale=args.scale)
    print(json.dumps({"kind": args.kind, "out": args.out, **(summary or {})}, default=str))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Open every sample of a config's splits directly (no replacement; the task's ``check_data``) and
    list every bad one (file, list line, reason) on stderr as met and in a JSON report, written to
    ``--report`` (default ``<run dir>/data_check.json``) and printed. Exit status 1 when any is bad."""
    cfg = _load(args)
    task = TASKS.get(cfg.task)
    try:
        checks = task.check_data(cfg, ["train", "val", "test"], limit=args.limit)
    except (ValueError, OSError) as e:  # a list, class list or folder that cannot be used at all
        raise UserError(str(e)) from e
    path = Path(args.report) if args.report else cfg.run_dir / "data_check.json"
    report = check_report(checks, config=args.config, task=cfg.task, report=str(path))
    write_check_report(report, path)
    print(json.dumps(report, indent=1))
    checked = sum(c.checked for c in checks.values())
    if report["errors"]:
        log.error("%d of %d checked samples are bad; every one is listed in %s", report["errors"], checked, path)
    else:
        log.info("all %d checked samples are readable; report: %s", checked, path)
    return 0 if report["ok"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.out), only=args.only, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm3d", description="Masked modeling for video and 3D point clouds.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help: str, fn) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("config", help="YAML config (configs/...)")
        sp.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        sp.set_defaults(fn=fn)
        return sp

    with_config("pretrain", "Pretrain a model (VideoMAE / Point-MAE) from a config.", cmd_train)
    with_config("finetune", "Fine-tune a model from a config (init=CKPT for pretrained weights; "
                "seeds=[0,1,2] for several seeds).", cmd_train)
    with_config("evaluate", "Evaluate checkpoint=PATH on the config's val/test splits.", cmd_evaluate)
    with_config("bench", "Time training steps and count FLOPs; prints one JSON line.", cmd_bench)

    def ckpt_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--checkpoint", required=True, help="one of our checkpoints (holds its config)")
        sp.add_argument("--device", default="auto")
        sp.add_argument("--allow-pickle", action="store_true", help="trust a checkpoint that needs pickle")
        sp.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="key=value",
                        help="override keys of the stored config (e.g. data.root=...)")

    sp = sub.add_parser("visualize", help="Render reconstructions of a pretrained model (or part segmentations).")
    ckpt_args(sp)
    sp.add_argument("--input", nargs="*", help="video or point-cloud file(s)")
    sp.add_argument("--dataset-index", type=int, help="use sample I of the checkpoint's dataset instead")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--seed", type=int, default=0, help="seed of the mask")
    sp.add_argument("--interactive", action="store_true", help="open a window (needs a display)")
    sp.add_argument("--bin-columns", type=int, metavar="N",
                    help="float32 values per point of raw .bin inputs (as data.bin_columns; default 4, with a "
                         "warning when the file's size fits other counts too)")
    sp.set_defaults(fn=cmd_visualize)

    sp = sub.add_parser("predict", help="Classify files with a fine-tuned checkpoint; prints the top-k.")
    ckpt_args(sp)
    sp.add_argument("inputs", nargs="+", help="video or point-cloud files")
    sp.add_argument("--label-map", help="class names, one per line")
    sp.add_argument("--topk", type=int, default=5)
    sp.add_argument("--json", action="store_true", help="one JSON object per input")
    sp.add_argument("--bin-columns", type=int, metavar="N",
                    help="float32 values per point of raw .bin inputs (as data.bin_columns; default 4, with a "
                         "warning when the file's size fits other counts too)")
    sp.set_defaults(fn=cmd_predict)

    sp = sub.add_parser("convert", help="Convert official / Hugging Face checkpoints (and ours to HF).")
    sp.add_argument("--from", dest="source", required=True,
                    help="converter name, e.g. pointmae-official, videomae-official, videomae-hf, to-hf")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.add_argument("--allow-pickle", action="store_true", help="trust a file that needs pickle")
    sp.set_defaults(fn=cmd_convert)

    sp = sub.add_parser("models", help="List the registered model variants.")
    sp.add_argument("--modality", choices=["video", "pointcloud"])
    sp.add_argument("-v", "--verbose", action="store_true", help="show every hyper-parameter")
    sp.set_defaults(fn=cmd_models)

    sp = sub.add_parser("tasks", help="List the registered tasks (the `task:` key of a config).")
    sp.set_defaults(fn=cmd_tasks)

    data = sub.add_parser("data", help="Dataset tools: synth, check.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    sp = dsub.add_parser("synth", help="Write a synthetic dataset in a real on-disk format.")
    sp.add_argument("kind", help="modelnet40 | shapenet55 | shapenetpart | scanobjectnn | video")
    sp.add_argument("--out", required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--scale", choices=["tiny", "small"], default="small")
    sp.set_defaults(fn=cmd_data_synth)
    sp = dsub.add_parser("check", help="Open every sample of a config's datasets and list every bad one "
                         "(exit status 1 when any is).")
    sp.add_argument("config")
    sp.add_argument("overrides", nargs="*", metavar="key.sub=value")
    sp.add_argument("--limit", type=int, default=0, help="check at most N samples per split (0: all)")
    sp.add_argument("--report", help="where to write the JSON report (default: <run dir>/data_check.json, "
                    "i.e. runs/<name>/ or output_dir)")
    sp.set_defaults(fn=cmd_data_check)
    for name, (help_text, add_args, fn) in DATA_COMMANDS.items():
        sp = dsub.add_parser(name, help=help_text, description=help_text)
        add_args(sp)
        sp.set_defaults(fn=fn)

    for name, (help_text, add_args, fn) in COMMANDS.items():  # registered by the modules imported above
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_args(sp)
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("demo", help="The main job: synthetic data -> pretrain -> fine-tune -> evaluate -> pictures.")
    sp.add_argument("--out", default="demo_out")
    sp.add_argument("--only", choices=["pointcloud", "video"], help="run one modality only")
    sp.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    sp.set_defaults(fn=cmd_demo)
    return p


def _shadowed_package() -> str | None:
    """Why ``import mm3d`` did not find the mm3d package, or None when it did.

    Run as ``python -m mm3d.cli`` from the folder that holds a checkout named ``mm3d/``, Python
    searches the current folder first and imports that checkout as a namespace package (it has no
    ``__init__.py``) instead of the package inside it; the modules still load through an editable
    install, but the package's own attributes (``__version__``) are missing.
    """
    pkg = sys.modules.get("mm3d")
    if pkg is not None and getattr(pkg, "__file__", None) is not None and hasattr(pkg, "__version__"):
        return None
    folder = ", ".join(str(p) for p in getattr(pkg, "__path__", [])) or "mm3d"
    return (f"`import mm3d` found the folder {folder} (a checkout named mm3d?) instead of the mm3d package, "
            f"because Python looks in the current folder first: run from another folder, or use the `mm3d` "
            f"command that `pip install -e {folder}` installs")


def main(argv: Sequence[str] | None = None) -> int:
    shadow = _shadowed_package()
    if shadow:
        words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        print(f"mm3d{' ' + words[0] if words else ''}: error: {shadow}", file=sys.stderr)
        return 2
    _setup()
    args = build_parser().parse_args(argv)
    try:
        code = int(args.fn(args) or 0)
        barrier()  # under torchrun: no rank tears down the process group while another still uses it
        cleanup()
        return code
    except TrainingInterrupted:
        # stopped by SIGTERM / Ctrl-C after its checkpoint (status 75): tear the process group down
        # now, not at interpreter exit, where gloo's threads could abort the process (status -6, seen
        # once in tests/test_faults.py) and hide the 75 from torchrun and the scheduler
        cleanup()
        raise
    except UserError as e:
        print(f"mm3d {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"mm3d {args.command}: not available: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
