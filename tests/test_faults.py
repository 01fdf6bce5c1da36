"""The run lifecycle under faults (issue 11): a run folder holds one run, a changed config does not
resume silently, a resumed log equals an uninterrupted one, SIGTERM/Ctrl-C stop with a checkpoint
(one process and torchrun), a non-finite stop names a checkpoint that really computes a finite
loss, a kill at any stage of a save leaves a folder that resumes at the right step, and a full or
read-only disk ends in one line naming the path.

Runs are the toy task. The subprocess tests slow each training step down with ``model.step_sleep``
(a key that may differ on resume) so that a signal lands mid-run, and wait for a metrics line or a
log line before sending it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import mm3d.checkpoint
import mm3d.toy  # noqa: F401  (registers the toy task)
from mm3d.checkpoint import load_checkpoint
from mm3d.cli import main
from mm3d.config import load_config
from mm3d.errors import UserError
from mm3d.trainer import EXIT_INTERRUPTED, NonFiniteLossError, Trainer, TrainingInterrupted, run

BASE = ["task=toy_regression", "train.batch_size=8", "optim.lr=0.01", "train.log_every=1", "train.progress=off",
        "train.tensorboard=false"]


def toy_cfg(tmp_path, *extra, name="run"):
    return load_config(None, [*BASE, f"output_dir={tmp_path / name}", *extra])


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir) if r["split"] == "train"]


def cli(tmp_path, capsys, *args) -> tuple[int, str]:
    """`mm3d pretrain` in this process: (exit status, stderr)."""
    yaml = tmp_path / "toy.yaml"
    yaml.write_text("task: toy_regression\n")
    capsys.readouterr()
    code = main(["pretrain", str(yaml), *BASE[1:], *args])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("mm3d pretrain: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_consistent(ck_dir: Path) -> list[dict]:
    """No temporary files; the index lists exactly the step files; last.pt and best.pt are the
    newest and the best of them. Returns the index."""
    index = json.loads((ck_dir / "index.json").read_text())
    assert not [p.name for p in ck_dir.iterdir() if ".tmp" in p.name]
    assert {p.name for p in ck_dir.glob("step_*.pt")} == {e["file"] for e in index}
    newest = max(index, key=lambda e: e["step"])
    assert (ck_dir / "last.pt").samefile(ck_dir / newest["file"])
    scored = [e for e in index if e["metric"] is not None]
    if scored:
        assert (ck_dir / "best.pt").samefile(ck_dir / min(scored, key=lambda e: e["metric"])["file"])
    return index


# --------------------------------------------------------------------------------------------
# 1. A run folder belongs to one run
# --------------------------------------------------------------------------------------------


def test_a_second_run_into_a_used_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    run(toy_cfg(tmp_path, "train.max_steps=4", "train.save_every_steps=2"))
    before = {p: p.read_bytes() for p in (out / "config.yaml", out / "metrics.jsonl", out / "checkpoints" / "index.json")}

    code, err = cli(tmp_path, capsys, f"output_dir={out}", "seed=1", "train.max_steps=2")
    line = one_error_line(err)
    assert code == 2
    assert str(out) in line and "train.resume=auto" in line and "overwrite=true" in line and "name=" in line
    assert {p: p.read_bytes() for p in before} == before  # nothing of the first run was touched

    code, err = cli(tmp_path, capsys, f"output_dir={out}", "seed=1", "train.max_steps=2", "train.save_every_steps=2",
                    "overwrite=true")
    assert code == 0, err
    assert [r["step"] for r in records(out) if r["split"] == "train"] == [1, 2]  # the new run's log only
    index = assert_consistent(out / "checkpoints")
    assert [e["step"] for e in index] == [2]
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["step"] == 2 and last["config"]["seed"] == 1


def test_evaluate_into_a_used_eval_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    run(toy_cfg(tmp_path, "train.max_steps=2"))
    yaml = tmp_path / "toy.yaml"
    yaml.write_text("task: toy_regression\n")
    args = ["evaluate", str(yaml), f"output_dir={out}", f"checkpoint={out / 'checkpoints' / 'last.pt'}",
            "train.progress=off"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out / 'eval'} already holds an earlier run (results.json)" in err and "overwrite=true" in err
    assert main([*args, "overwrite=true"]) == 0


def test_resume_refuses_a_config_that_changes_the_run_unless_forced(tmp_path, caplog):
    out = tmp_path / "run"
    run(toy_cfg(tmp_path, "train.max_steps=3"))
    with pytest.raises(UserError) as e:
        Trainer(toy_cfg(tmp_path, "train.max_steps=3", "train.resume=auto", "optim.lr=0.02", "train.batch_size=4"))
    msg = str(e.value)
    assert "step_00000003.pt was written with another config" in msg and "train.resume_force=true" in msg
    assert "optim.lr: 0.01 → 0.02" in msg and "train.batch_size: 8 → 4" in msg
    # what does not change the computation may differ: length, logging, workers, a testing aid
    t = Trainer(toy_cfg(tmp_path, "train.resume=auto", "train.max_steps=4", "train.log_every=2",
                        "train.num_workers=0", "train.device=cpu", "model.step_sleep=0.001"))
    assert t.state.step == 3
    t.fit()
    # forced: resumed, and the change is in the log and in metrics.jsonl
    caplog.set_level("WARNING", logger="mm3d")
    run(toy_cfg(tmp_path, "train.resume=auto", "train.max_steps=5", "optim.lr=0.02", "train.resume_force=true"))
    assert "resume_force=true: resuming" in caplog.text and "optim.lr: 0.01 → 0.02" in caplog.text
    events = [r for r in records(out) if r["split"] == "event"]
    assert events == [{"step": 4, "epoch": 0, "split": "event", "event": "resume_force",
                       "checkpoint": str(out / "checkpoints" / "step_00000004.pt"),
                       "changed": {"optim.lr": [0.01, 0.02]}}]


# --------------------------------------------------------------------------------------------
# 2. The log of a resumed run
# --------------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def test_resumed_log_and_history_equal_an_uninterrupted_run(tmp_path):
    # 8 steps per epoch, a checkpoint (and a val record) at every epoch end; killed after step 11
    common = ["train.epochs=2", "train.max_steps=13", "train.save_every=1", "train.eval_every=1"]
    straight = run(toy_cfg(tmp_path, *common, name="straight"))
    t = Trainer(toy_cfg(tmp_path, *common, name="cut"))
    write = t.logger.write

    def write_then_die(rec):
        write(rec)
        if rec["split"] == "train" and rec["step"] == 11:
            raise _Killed

    t.logger.write = write_then_die
    with pytest.raises(_Killed):
        t.fit()
    assert max(r["step"] for r in records(tmp_path / "cut")) == 11
    resumed = run(toy_cfg(tmp_path, *common, "train.resume=auto", name="cut"))
    assert records(tmp_path / "cut") == records(tmp_path / "straight")
    strip = [{k: v for k, v in h.items() if k != "samples_per_s"} for h in straight["history"]]
    assert [{k: v for k, v in h.items() if k != "samples_per_s"} for h in resumed["history"]] == strip
    saved = json.loads((tmp_path / "cut" / "results.json").read_text())["history"]
    assert [h["step"] for h in saved] == list(range(1, 14))


# --------------------------------------------------------------------------------------------
# 3. SIGTERM and Ctrl-C
# --------------------------------------------------------------------------------------------


class _Proc:
    """A subprocess whose stderr is collected line by line in the background."""

    def __init__(self, cmd: list[str]) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.p.stderr), daemon=True)
        self._reader.start()

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def wait_until(self, ready, what: str, timeout: float = 120) -> None:
        end = time.time() + timeout
        while not ready():
            if self.p.poll() is not None:
                raise AssertionError(f"exited with {self.p.returncode} before {what}:\n{self.err[-3000:]}")
            if time.time() > end:
                self.p.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.err[-3000:]}")
            time.sleep(0.02)

    def wait_for_step(self, run_dir: Path, step: int) -> None:
        def ready():
            path = run_dir / "metrics.jsonl"
            return path.is_file() and any(f'"step": {step},' in line for line in path.read_text().splitlines())
        self.wait_until(ready, f"step {step}")

    def finish(self, timeout: float = 120) -> int:
        code = self.p.wait(timeout)
        self._reader.join(10)
        return code


def mm3d_cmd(tmp_path, *overrides) -> list[str]:
    yaml = tmp_path / "toy.yaml"
    yaml.write_text("task: toy_regression\n")
    return [sys.executable, "-m", "mm3d.cli", "pretrain", str(yaml), *BASE[1:], *overrides]


@pytest.mark.slow
def test_sigterm_stops_mm3d_after_the_step_with_a_checkpoint_and_resume_continues_exactly(tmp_path):
    common = ["train.epochs=3", "train.max_steps=20", "train.save_every_steps=7", "train.eval_every=1"]
    out = tmp_path / "cut"
    proc = _Proc(mm3d_cmd(tmp_path, *common, f"output_dir={out}", "model.step_sleep=0.15"))
    proc.wait_for_step(out, 3)
    proc.p.send_signal(signal.SIGTERM)
    assert proc.finish() == EXIT_INTERRUPTED == 75, proc.err[-3000:]
    stopped = [line for line in proc.lines if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 1 and "Traceback" not in proc.err, proc.err[-3000:]
    last_step = max(r["step"] for r in records(out) if r["split"] == "train")
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["step"] == last_step and 3 <= last_step < 20  # the step it was in, finished and saved
    assert f"at step {last_step}/20: saved {out / 'checkpoints' / f'step_{last_step:08d}.pt'}" in stopped[0]

    resumed = run(toy_cfg(tmp_path, *common, "train.resume=auto", name="cut"))  # no sleep: it may differ
    straight = run(toy_cfg(tmp_path, *common, name="straight"))
    assert records(out) == records(tmp_path / "straight")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


def test_ctrl_c_once_stops_after_the_step_with_a_checkpoint_and_resume_continues_exactly(tmp_path):
    common = ["train.epochs=3", "train.max_steps=20", "train.save_every_steps=7", "train.eval_every=1"]
    t = Trainer(toy_cfg(tmp_path, *common, name="cut"))
    steps = []

    def ctrl_c_during_step_10(opt, args, kwargs):
        steps.append(1)
        if len(steps) == 10:
            os.kill(os.getpid(), signal.SIGINT)

    t.optimizer.register_step_post_hook(ctrl_c_during_step_10)
    with pytest.raises(TrainingInterrupted) as e:
        t.fit()
    assert e.value.code == EXIT_INTERRUPTED
    assert str(e.value).startswith(f"stopped by SIGINT at step 10/20: saved {tmp_path / 'cut' / 'checkpoints'}")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is plain again
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 10
    assert max(r["step"] for r in records(tmp_path / "cut")) == 10

    resumed = run(toy_cfg(tmp_path, *common, "train.resume=auto", name="cut"))
    straight = run(toy_cfg(tmp_path, *common, name="straight"))
    assert records(tmp_path / "cut") == records(tmp_path / "straight")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _Proc(mm3d_cmd(tmp_path, f"output_dir={out}", "model.step_sleep=4", "train.max_steps=5"))
    proc.wait_until(lambda: "task toy_regression |" in proc.err, "the training loop")  # handlers are in place
    # the first step (a 4 s forward) ends about 4 s from now
    proc.p.send_signal(signal.SIGINT)
    proc.wait_until(lambda: "SIGINT: stopping after this optimizer step" in proc.err, "the first Ctrl-C")
    time.sleep(1.2)  # after the same-press window (1 s from when the process saw the first one)
    second = time.time()
    proc.p.send_signal(signal.SIGINT)
    assert proc.finish() == -signal.SIGINT, proc.err[-3000:]  # killed by the signal, as a shell shows 130
    assert time.time() - second < 2.0  # not after the step (about 2 s later), at once
    assert "aborting at once, without a checkpoint" in proc.err and "Traceback" not in proc.err
    assert not list(out.glob("checkpoints/*.pt"))


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the torchrun workers through /proc")
@pytest.mark.parametrize("how", ["sigterm_one_rank", "ctrl_c_torchrun"])
def test_sigterm_to_one_ddp_rank_stops_both_at_the_same_step_and_resume_continues_exactly(tmp_path, how):
    """SIGTERM to one rank (a preempted node), or SIGINT to torchrun (Ctrl-C: torchrun forwards it
    to its workers): both ranks stop at the same step with one checkpoint, and resume=auto continues
    as if never stopped."""
    common = ["model.dropout=0.0", "optim.lr=0.05", "optim.schedule=constant", "optim.warmup_steps=0",
              "train.eval_every=0", "train.save_every=0", "train.epochs=3", "train.max_steps=14"]
    out = tmp_path / "ddp"
    yaml = tmp_path / "toy.yaml"
    yaml.write_text("task: toy_regression\n")

    def torchrun(*overrides) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "mm3d.cli", "pretrain", str(yaml), *BASE[1:], *common, "train.batch_size=4",
                f"output_dir={out}", *overrides]

    proc = _Proc(torchrun("model.step_sleep=0.2"))
    proc.wait_for_step(out, 3)
    if how == "sigterm_one_rank":
        rank1 = [c for c in _children(proc.p.pid) if _rank_of(c) == 1]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGTERM)  # as if only that node were preempted
        proc.finish()  # torchrun itself reports its workers' status 75 as a failure
        assert "stopped by SIGTERM at step" in proc.err and re.search(r"exitcode\s*:\s*75", proc.err), \
            proc.err[-4000:]
    else:
        os.kill(proc.p.pid, signal.SIGINT)
        proc.finish()
        assert "stopped by SIGINT at step" in proc.err, proc.err[-4000:]
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    logged = max(r["step"] for r in records(out) if r["split"] == "train")
    assert ck["step"] == logged and 3 <= logged < 14
    assert ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2

    again = subprocess.run(torchrun("train.resume=auto"), env=dict(os.environ, OMP_NUM_THREADS="1"),
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-4000:]
    single = toy_cfg(tmp_path, *common, "train.batch_size=8", name="single")  # the same global batch
    run(single)
    assert [r["step"] for r in records(out) if r["split"] == "train"] == list(range(1, 15))
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(train_losses(tmp_path / "single")),
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 4. A non-finite loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison_at", [2, 1])
def test_nonfinite_stop_names_a_checkpoint_that_computes_a_finite_loss(tmp_path, poison_at):
    """An update that blows the weights up (lr=1e30 did) still logs a finite loss for its own step,
    so the checkpoint written right after it looks good; the next loss is inf."""
    t = Trainer(toy_cfg(tmp_path, "model.dropout=0.0", "train.max_steps=8", "train.save_every_steps=1",
                        "train.keep_last=1", "train.keep_best=0", "train.eval_every=0", "train.save_every=0"))
    steps = []

    def blow_up(opt, args, kwargs):
        steps.append(1)
        if len(steps) == poison_at:
            with torch.no_grad():
                for p in t.model.parameters():
                    p.mul_(1e30)

    t.optimizer.register_step_post_hook(blow_up)
    ck_dir = tmp_path / "run" / "checkpoints"
    with pytest.raises(NonFiniteLossError) as e:
        t.fit()
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "non-finite loss at step" in msg
    poisoned = f"{ck_dir / f'step_{poison_at:08d}.pt'} give a non-finite loss"
    if poison_at == 2:  # step 1 computed the finite loss of step 2: kept despite keep_last=1
        assert f"The newest checkpoint that computes a finite loss is {ck_dir / 'step_00000001.pt'} (" in msg
        assert poisoned in msg
        model = t.task.build_model(t.cfg)
        model.load_state_dict(load_checkpoint(ck_dir / "step_00000001.pt")["model"])
        batch = next(iter(t.loader("train")))
        assert torch.isfinite(model.eval()(batch).loss)
    else:
        assert f"No kept checkpoint computes a finite loss ({ck_dir / 'step_00000001.pt'})" in msg


def test_nonfinite_stop_is_one_line_through_the_cli(tmp_path, capsys):
    code, err = cli(tmp_path, capsys, f"output_dir={tmp_path / 'run'}", "model.nan_at_call=3",
                    "train.save_every_steps=2", "train.max_steps=6")
    line = one_error_line(err)
    assert code == 2 and "non-finite loss at step 3 (found at step 3)" in line
    assert f"computes a finite loss is {tmp_path / 'run' / 'checkpoints' / 'step_00000002.pt'}" in line


# --------------------------------------------------------------------------------------------
# 5. A kill during a save; a full or read-only disk
# --------------------------------------------------------------------------------------------

# Runs the toy task (2 steps an epoch, a checkpoint and a val metric per epoch, keep_last=1) in a
# forked child per stage and kills it (os._exit, no cleanup) at that stage of the save of step 6.
_KILL_SCRIPT = r"""
import os, sys
import torch
import mm3d.toy
from mm3d.checkpoint import CheckpointManager as M
from mm3d.config import load_config
from mm3d.trainer import run

root, overrides = sys.argv[1], sys.argv[2:]

def newest(m):
    return max(e["step"] for e in m.entries)

def die():
    os._exit(137)

def during_write():
    real = torch.save
    def save(obj, f):
        if obj.get("step") == 6:  # half a zip archive in the temporary file
            out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            out.write(b"PK\x03\x04" + bytes(300))
            out.flush()
            die()
        real(obj, f)
    torch.save = save

def before(method, name=None):
    real = getattr(M, method)
    def wrapped(self, *a):
        if newest(self) == 6 and (name is None or a[0] == name):
            die()
        return real(self, *a)
    setattr(M, method, wrapped)

STAGES = {"write": during_write, "rename": lambda: before("_write_index"),
          "index": lambda: before("_link", "last.pt"), "last": lambda: before("_link", "best.pt"),
          "retire": lambda: before("_retire")}
for stage, kill in STAGES.items():
    pid = os.fork()
    if pid == 0:
        kill()
        run(load_config(None, [*overrides, f"output_dir={root}/{stage}"]))
        os._exit(3)  # not killed: a stage was not reached
    print(stage, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""

SAVE_RUN = [*BASE, "data.num_train=16", "train.epochs=4", "train.save_every=1", "train.eval_every=1",
            "train.keep_last=1", "train.keep_best=1"]


@pytest.mark.slow
def test_a_kill_at_any_stage_of_a_save_leaves_a_folder_that_resumes_at_the_right_step(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), *SAVE_RUN], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["write", "137", "rename", "137", "index", "137", "last", "137", "retire", "137"]
    left = {p.name for p in (tmp_path / "write" / "checkpoints").iterdir()}
    assert any(n.startswith(".step_00000006.pt.tmp-") for n in left)  # what a kill during the write leaves
    run(load_config(None, [*SAVE_RUN, f"output_dir={tmp_path / 'straight'}"]))
    for stage, step in [("write", 4), ("rename", 6), ("index", 6), ("last", 6), ("retire", 6)]:
        cfg = load_config(None, [*SAVE_RUN, f"output_dir={tmp_path / stage}", "train.resume=auto"])
        t = Trainer(cfg)
        assert t.state.step == step, stage
        assert_consistent(tmp_path / stage / "checkpoints")
        t.fit()
        assert records(tmp_path / stage) == records(tmp_path / "straight"), stage
        assert assert_consistent(tmp_path / stage / "checkpoints") == \
            assert_consistent(tmp_path / "straight" / "checkpoints"), stage


class _FailingFile(io.FileIO):
    """A file whose writes fail with `err` once 1000 bytes are written."""

    def __init__(self, path, mode, err):
        super().__init__(path, mode)
        self.err, self.n = err, 0

    def write(self, data):
        self.n += len(data)
        if self.n > 1000:
            raise OSError(self.err, os.strerror(self.err))
        return super().write(data)


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "No space left on device"),
                                        (errno.EACCES, "permission denied"),
                                        (errno.EROFS, "read-only file system")])
def test_a_failed_checkpoint_write_is_one_line_and_resume_takes_the_previous_checkpoint(tmp_path, capsys,
                                                                                        monkeypatch, err, words):
    def failing_open(path, mode="r", *a, **k):
        if "step_00000004" in str(path) and "w" in mode:
            return _FailingFile(path, mode, err)
        return open(path, mode, *a, **k)

    monkeypatch.setattr(mm3d.checkpoint, "open", failing_open, raising=False)
    out = tmp_path / "run"
    code, stderr = cli(tmp_path, capsys, f"output_dir={out}", "train.save_every_steps=2", "train.max_steps=6")
    line = one_error_line(stderr)
    assert code == 2 and "unexpected pos" not in stderr
    assert f"cannot write the checkpoint of step 4: {words}: {out / 'checkpoints' / 'step_00000004.pt'}" in line
    assert f"newest: {out / 'checkpoints' / 'step_00000002.pt'}" in line and "train.resume=auto" in line
    assert [e["step"] for e in assert_consistent(out / "checkpoints")] == [2]  # nothing half-written
    monkeypatch.undo()
    t = Trainer(toy_cfg(tmp_path, "train.save_every_steps=2", "train.max_steps=6", "train.resume=auto"))
    assert t.state.step == 2


@pytest.fixture
def read_only_later(tmp_path):
    """A folder, and a function that makes it read-only: chmod for a user; as root (whom modes do not
    stop) a tmpfs remounted read-only, where mounting is allowed."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        def make_read_only():
            for p in [folder, *folder.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
        yield folder, make_read_only, "permission denied"
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root and cannot mount a tmpfs to make a read-only folder")
    try:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True), \
            "read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_run_folder_is_one_line_naming_the_path(tmp_path, capsys, read_only_later):
    folder, make_read_only, words = read_only_later
    out = folder / "run"
    code, err = cli(tmp_path, capsys, f"output_dir={out}", "train.max_steps=2")
    assert code == 0, err
    make_read_only()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    code, err = cli(tmp_path, capsys, f"output_dir={out}", "train.max_steps=4", "train.resume=auto")
    line = one_error_line(err)
    assert code == 2 and f"{words}: {out}" in line, line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_a_really_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, capsys):
    """A 100 KB tmpfs holds two toy checkpoints (40 KB each), not three."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and a tmpfs mount (the injected ENOSPC test above runs everywhere)")
    try:
        out = disk / "run"
        code, err = cli(tmp_path, capsys, f"output_dir={out}", "train.save_every_steps=1", "train.max_steps=8")
        line = one_error_line(err)
        assert code == 2 and "unexpected pos" not in err
        assert "No space left on device: " in line and str(out) in line
        index = assert_consistent(out / "checkpoints")
        for e in index:  # every indexed checkpoint is complete
            assert load_checkpoint(out / "checkpoints" / e["file"])["step"] == e["step"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_resuming_an_earlier_checkpoint_of_the_run_sets_the_later_ones_aside(tmp_path):
    common = ["train.max_steps=6", "train.save_every_steps=2", "train.keep_last=3", "train.eval_every=0"]
    run(toy_cfg(tmp_path, *common, name="straight"))
    run(toy_cfg(tmp_path, *common))
    ck_dir = tmp_path / "run" / "checkpoints"
    t = Trainer(toy_cfg(tmp_path, *common, f"train.resume={ck_dir / 'step_00000002.pt'}"))
    assert t.state.step == 2 and t.ckpt.latest().name == "step_00000002.pt"
    assert sorted(p.name for p in (ck_dir / "superseded").iterdir()) == ["step_00000004.pt", "step_00000006.pt"]
    assert [e["step"] for e in assert_consistent(ck_dir)] == [2]
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]
    t.fit()
    assert records(tmp_path / "run") == records(tmp_path / "straight")
