"""Multi-node for real on one machine: two `torchrun --nnodes=2` launchers (one process each, c10d
rendezvous on 127.0.0.1) train the toy task through the `mm3d` CLI on gloo. One node's worker is
killed with SIGKILL after the checkpoint of step 2; torchrun (`--max-restarts=1`) restarts the
workers of both nodes, which continue from that checkpoint. Every loss equals the uninterrupted
2-process single-node run's."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import mm3d.toy  # noqa: F401
from mm3d.checkpoint import load_checkpoint
from mm3d.config import load_config
from mm3d.distributed import elastic_restart_count
from mm3d.trainer import elastic_restart

COMMON = ["model.dropout=0.0", "optim.lr=0.05", "optim.schedule=constant", "optim.warmup_steps=0",
          "train.log_every=1", "train.progress=off", "train.tensorboard=false", "train.eval_every=0",
          "train.save_every=0", "train.epochs=1", "train.batch_size=4", "train.max_steps=6",
          "train.save_every_steps=2", "train.device=cpu"]
# torchrun's agent shares its rendezvous TCPStore with the workers by default, and a restarted worker
# may then read its peers' addresses of the attempt before (pytorch/pytorch#135712): gloo connects to
# a dead port. The workaround the torch developers give: a store of the workers' own per attempt.
ENV = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mm3d_args(cfg, out, *overrides):
    return ["-m", "mm3d.cli", "finetune", str(cfg), f"output_dir={out}", *COMMON, *overrides]


def train_losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in rows if r["split"] == "train"], dtype=torch.float64)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_two_nodes_equal_one_node_and_survive_a_killed_node(tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text("task: toy_regression\n")
    # the reference: 2 processes on one node, never interrupted
    single = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             *mm3d_args(cfg, tmp_path / "one_node")], env=ENV, capture_output=True, text=True,
                            timeout=240)
    assert single.returncode == 0, single.stderr[-4000:]

    # two launchers, one per "node"; the toy sleeps 0.3 s per step so that the kill lands mid-run.
    # No train.resume: a run that torchrun restarts continues from its own newest checkpoint.
    port, out = free_port(), tmp_path / "two_nodes"
    nodes, logs = [], []
    for rank in (0, 1):
        logs.append((tmp_path / f"node{rank}.log").open("w"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               f"--rdzv-id=mm3d-{port}", "--rdzv-conf", f"is_host={int(rank == 0)}", "--max-restarts=1",
               *mm3d_args(cfg, out, "model.step_sleep=0.3")]
        nodes.append(subprocess.Popen(cmd, env=ENV, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        step2, t0 = out / "checkpoints" / "step_00000002.pt", time.time()
        while not step2.is_file():
            assert time.time() - t0 < 180 and all(n.poll() is None for n in nodes), "no checkpoint of step 2"
            time.sleep(0.05)
        workers = children(nodes[1].pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)  # node 1 loses its process
        codes = [n.wait(timeout=240) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
        for f in logs:
            f.close()
    text = "".join((tmp_path / f"node{r}.log").read_text() for r in (0, 1))  # rank 0 may be on either
    assert codes == [0, 0], text[-6000:]
    assert "torchrun restart 1: continuing this run" in text
    resumed = [line for line in text.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and ("at step 2 " in resumed[0] or "at step 4 " in resumed[0]), resumed

    a, b = train_losses(out), train_losses(tmp_path / "one_node")
    assert len(a) == len(b) == 6
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ck_a, ck_b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (out, tmp_path / "one_node"))
    assert ck_a["step"] == 6 and ck_a["world_size"] == 2
    for k, v in ck_b["model"].items():
        torch.testing.assert_close(ck_a["model"][k], v, rtol=1e-6, atol=1e-7)


def test_a_torchrun_restart_resumes_its_own_run(monkeypatch, tmp_path):

    cfg = load_config(None, ["task=toy_regression", f"output_dir={tmp_path}", "overwrite=true"])
    assert elastic_restart_count() == 0 and elastic_restart(cfg, 0) is cfg  # a first attempt
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = elastic_restart(cfg, elastic_restart_count())
    assert again.train.resume == "auto" and not again.overwrite  # the first attempt cleared the folder already
    named = load_config(None, ["task=toy_regression", f"output_dir={tmp_path}", "train.resume=/x/step_00000002.pt"])
    assert elastic_restart(named, 1) is named  # a checkpoint named by the user stays the one resumed
