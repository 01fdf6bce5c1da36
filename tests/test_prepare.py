"""`mm3d data prepare`: parallel == serial, restart after a kill, changed inputs, failed items, both forms."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import wids

import mm3d.toy  # noqa: F401
from mm3d.cli import main
from mm3d.prepare import REPORT, STATE, PrepareError, SplitJob, parse_size, prepare_split
from mm3d.registry import PREPARERS, PrepareItem
from mm3d.shards import MANIFEST, ShardSamples, read_manifest, safe_key

BAD_LINES = {7: "1.0 abc", 23: "2.0"}  # not numbers; no x values


def write_list(path, n=60, dim=9):
    rng = np.random.default_rng(0)
    lines = [BAD_LINES.get(i) or " ".join(f"{v:.5f}" for v in rng.normal(size=dim)) for i in range(n)]
    path.write_text("# y x1 ... x8\n" + "\n".join(lines) + "\n")
    return path


def prepare(out, lst, *extra):
    return main(["data", "prepare", "--kind", "toy_regression", "--list", str(lst), "--out", str(out),
                 "--shard-size", "30720", "--no-progress", *extra])


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_parse_size():
    assert parse_size("1GiB") == 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("200MB") == 200 * 10**6 and parse_size("1.5G") == 3 * 2**29 and parse_size("4096") == 4096
    for bad in ("1 parsec", "GB", "-1GB"):
        with pytest.raises(PrepareError, match="--shard-size"):
            parse_size(bad)


def test_parallel_equals_serial_and_failed_items_are_reported(tmp_path):
    lst = write_list(tmp_path / "list.txt")
    assert prepare(tmp_path / "serial", lst, "--workers", "1") == 0
    assert prepare(tmp_path / "parallel", lst, "--workers", "2") == 0
    serial = shard_bytes(tmp_path / "serial")
    assert len(serial) >= 3 and serial == shard_bytes(tmp_path / "parallel")
    assert (tmp_path / "serial" / MANIFEST).read_text() == (tmp_path / "parallel" / MANIFEST).read_text()
    report = json.loads((tmp_path / "serial" / REPORT).read_text())
    assert report["counts"] == {"items": 60, "written": 58, "skipped": 2, "shards": len(serial), "resumed_at_item": 0}
    assert [(s["line"], s["reason"]) for s in report["skipped"]] == [
        ("list.txt:9", "not a row of numbers: '1.0 abc'"), ("list.txt:25", "a row needs y and at least one x, got '2.0'")]
    meta = read_manifest(tmp_path / "serial" / MANIFEST)["mm3d"]
    assert meta["num_samples"] == 58 and meta["modality"] == "core" and meta["kind"] == "toy_regression"
    assert [s["line"] for s in meta["skipped"]] == ["list.txt:9", "list.txt:25"]
    assert meta["source"]["list"] == str(lst.resolve())
    # the samples: the list's rows in order, bad rows left out
    ds = ShardSamples(tmp_path / "serial")
    rows = lst.read_text().splitlines()[1:]
    good = [i for i in range(60) if i not in BAD_LINES]
    for j in (0, 7, 57):
        i = good[j]
        x = np.load(io.BytesIO(ds[j]["npy"]))
        assert ds[j]["__key__"] == safe_key(i, "list")
        np.testing.assert_array_equal(x, np.array(rows[i].split()[1:], dtype=np.float32))
    # read with wids alone
    w = wids.ShardListDataset(str(tmp_path / "serial" / MANIFEST), transformations=[],
                              cache_dir=str(tmp_path / "cache"))
    assert len(w) == 58 and w[57]["__key__"] == safe_key(59, "list")


KILLER = textwrap.dedent("""
    import os, signal, sys
    import mm3d.toy
    from mm3d.cli import main
    from mm3d.registry import PREPARERS

    prep, convert = PREPARERS.get("toy_regression"), PREPARERS.get("toy_regression").convert
    def dying(item, settings):
        if item.key.startswith("{stop:06d}_"):
            os.kill(os.getpid(), signal.SIGKILL)
        return convert(item, settings)
    prep.convert = dying
    sys.exit(main(sys.argv[1:]))
""")


def test_restart_after_a_kill_gives_the_same_shards(tmp_path):
    lst = write_list(tmp_path / "list.txt", n=80)
    assert prepare(tmp_path / "straight", lst, "--workers", "1") == 0
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(stop=50))
    args = ["data", "prepare", "--kind", "toy_regression", "--list", str(lst), "--out", str(tmp_path / "run"),
            "--shard-size", "30720", "--no-progress", "--workers", "1"]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((tmp_path / "run" / STATE).read_text())
    assert not state["complete"] and len(state["shards"]) >= 2
    done = state["shards"][-1]["items"][1]
    assert 0 < done <= 50
    assert list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / MANIFEST).exists()
    # restart (in parallel this time): finished shards verified and kept, the .tmp discarded
    assert prepare(tmp_path / "run", lst, "--workers", "2") == 0
    assert shard_bytes(tmp_path / "run") == shard_bytes(tmp_path / "straight")
    report = json.loads((tmp_path / "run" / REPORT).read_text())
    assert report["counts"]["resumed_at_item"] == done and report["counts"]["skipped"] == 2
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert (tmp_path / "run" / MANIFEST).read_text() == (tmp_path / "straight" / MANIFEST).read_text()


def test_restart_rewrites_a_damaged_finished_shard(tmp_path):
    lst = write_list(tmp_path / "list.txt")
    assert prepare(tmp_path / "run", lst, "--workers", "1") == 0
    want = shard_bytes(tmp_path / "run")
    second = tmp_path / "run" / "shard-000001.tar"
    second.write_bytes(second.read_bytes()[:-1] + b"\1")  # same size, other checksum
    assert prepare(tmp_path / "run", lst, "--workers", "1") == 0
    assert shard_bytes(tmp_path / "run") == want
    assert json.loads((tmp_path / "run" / REPORT).read_text())["counts"]["resumed_at_item"] > 0


def test_changed_inputs_on_restart_are_an_error_unless_overwrite(tmp_path, capsys):
    lst = write_list(tmp_path / "list.txt")
    assert prepare(tmp_path / "run", lst) == 0
    write_list(lst, n=61)
    assert prepare(tmp_path / "run", lst) == 2
    assert "the item list has 61 items, the stopped run had 60" in capsys.readouterr().err
    assert prepare(tmp_path / "run", lst, "--shard-size", "40000") == 2
    err = capsys.readouterr().err
    assert "max_bytes 30720 -> 40000" in err and "item list has 61 items, the stopped run had 60" in err
    assert prepare(tmp_path / "run", lst, "--overwrite") == 0
    assert read_manifest(tmp_path / "run" / MANIFEST)["mm3d"]["num_samples"] == 59
    # shards not written by a prepare run are never overwritten silently
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shard-000000.tar").write_bytes(b"")
    assert prepare(tmp_path / "other", lst) == 2
    assert f"no {STATE}" in capsys.readouterr().err


def test_nothing_converted_is_an_error(tmp_path):
    job = SplitJob("toy_regression", PREPARERS.get("toy_regression"),
                   [PrepareItem(f"{i:06d}", "in.txt", f"in.txt:{i + 1}", {"fail": "corrupt"}) for i in range(3)],
                   {"dtype": "float32"}, tmp_path / "out")
    with pytest.raises(PrepareError, match="none of the 3 items could be converted.*in.txt: corrupt"):
        prepare_split(job, max_bytes=30720, workers=1, progress=False)
    assert len(json.loads((tmp_path / "out" / REPORT).read_text())["skipped"]) == 3


def test_a_worker_that_dies_is_an_error_naming_where(tmp_path):
    items = [PrepareItem(f"{i:06d}", f"in{i}.txt", f"list.txt:{i + 1}", {"x": [float(i)] * 4, "y": 0.0})
             for i in range(12)]
    items[7] = PrepareItem("000007", "in7.txt", "list.txt:8", {"crash": True})
    job = SplitJob("toy_regression", PREPARERS.get("toy_regression"), items, {"dtype": "float32"}, tmp_path / "out")
    # multiprocessing.Pool would wait for the lost item forever; this must fail, and fast
    with pytest.raises(PrepareError, match=r"a worker process died .* \(the first: in\d+\.txt\).* run the same "
                                           r"command again"):
        prepare_split(job, max_bytes=30720, workers=2, progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()
    assert not json.loads((tmp_path / "out" / STATE).read_text())["complete"]


def test_config_form_prepares_every_split_and_trains(tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text("task: toy_regression\ndata:\n  num_train: 40\n")
    out = tmp_path / "prep"
    assert main(["data", "prepare", str(cfg), "data.num_val=8", "--out", str(out), "--no-progress",
                 "--workers", "1"]) == 0
    assert json.loads((out / "dataset.json").read_text()) == {"splits": {"train": "train", "val": "val"}}
    assert read_manifest(out / "train" / MANIFEST)["mm3d"]["num_samples"] == 40
    val = read_manifest(out / "val" / MANIFEST)["mm3d"]
    assert val["num_samples"] == 8 and val["split"] == "val" and val["source"]["overrides"] == ["data.num_val=8"]
    ds = mm3d.toy.ToyShardDataset(str(out), "val")
    ref = mm3d.toy.ToyDataset(8, 8, 0.05, seed=1)
    torch.testing.assert_close(ds[5]["x"], ref[5]["x"], rtol=0, atol=0)
    run_dir = tmp_path / "run"
    assert main(["finetune", str(cfg), "data.format=shards", f"data.shards={out}", f"output_dir={run_dir}",
                 "train.max_steps=2", "train.batch_size=8", "train.progress=off", "train.tensorboard=false"]) == 0
    assert (run_dir / "checkpoints" / "last.pt").is_file()


class _ToyWithArgs(mm3d.toy.ToyPreparer):
    """A preparer whose config form also reads the command line (as the video preparer's --short-side)."""

    tasks = ()

    def from_config(self, cfg, split, args):
        items, settings = super().from_config(cfg, split) or (None, None)
        return None if items is None else (items, {**settings, "prefix_seen": args.prefix})


def test_config_form_passes_the_command_line_to_a_preparer_that_takes_it(tmp_path):
    if "toy_with_args" not in PREPARERS:
        PREPARERS.add("toy_with_args", _ToyWithArgs())
    cfg = tmp_path / "toy.yaml"
    cfg.write_text("task: toy_regression\ndata:\n  num_train: 10\n  num_val: 0\n")
    assert main(["data", "prepare", str(cfg), "--kind", "toy_with_args", "--prefix", "part", "--out",
                 str(tmp_path / "p"), "--no-progress", "--workers", "1"]) == 0
    meta = read_manifest(tmp_path / "p" / "train" / MANIFEST)["mm3d"]
    assert meta["settings"]["prefix_seen"] == "part" and meta["kind"] == "toy_with_args"
    assert (tmp_path / "p" / "train" / "part-000000.tar").is_file() and not (tmp_path / "p" / "val").exists()


def test_list_found_under_root_is_recorded_there(tmp_path, monkeypatch):
    (tmp_path / "root").mkdir()
    write_list(tmp_path / "root" / "rows.txt", n=5)
    monkeypatch.chdir(tmp_path)
    args = ["data", "prepare", "--kind", "toy_regression", "--list", "rows.txt", "--root", "root",
            "--no-progress", "--workers", "1"]
    assert main([*args, "--out", "a"]) == 0
    assert read_manifest(tmp_path / "a" / MANIFEST)["mm3d"]["source"]["list"] == str(tmp_path / "root" / "rows.txt")
    write_list(tmp_path / "rows.txt", n=5)  # a list at the given path wins
    assert main([*args, "--out", "b"]) == 0
    assert read_manifest(tmp_path / "b" / MANIFEST)["mm3d"]["source"]["list"] == str(tmp_path / "rows.txt")
