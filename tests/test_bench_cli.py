"""`mm3d bench` and the CLI plumbing (help, errors, data check, models) on the toy task."""

import json

import pytest
import torch
import torch.nn.functional as F

import mm3d.toy  # noqa: F401
from mm3d.bench import flop_counter, run_bench
from mm3d.cli import build_parser, main
from mm3d.config import load_config


def test_flop_counter_counts_cpu_sdpa():
    b, h, l, d = 2, 3, 16, 8
    q = torch.randn(b, h, l, d, requires_grad=True)
    with flop_counter() as fc:
        out = F.scaled_dot_product_attention(q, q, q)
    fwd = fc.get_total_flops()
    assert fwd == 4 * b * h * l * l * d  # QK^T and AV: 2 matmuls x 2 flops per MAC (= 4 L^2 D per layer)
    with flop_counter() as fc:
        out.sum().backward()
    assert fc.get_total_flops() >= 2 * fwd


def test_bench_toy_reports_fields(tmp_path):
    cfg = load_config(None, ["task=toy_regression", "train.batch_size=8", "bench.warmup=1", "bench.steps=3",
                             "bench.data_loader=true", "bench.loader_batches=2", f"output_dir={tmp_path}"])
    r = run_bench(cfg)
    for key in ("samples_per_s", "ms_per_step", "train_gflops_per_sample", "achieved_gflops_per_s",
                "peak_mem_mb", "loader_samples_per_s"):
        assert key in r
    assert r["batch_size"] == 8 and r["ms_per_step"] > 0
    assert r["fwd_flops_per_sample"] == 2 * (8 * 32 + 32 * 1)  # Linear(8,32) + Linear(32,1)


def test_bench_measures_the_matmul_peak_and_profiles_on_request(tmp_path):
    from mm3d.bench import matmul_peak_gflops

    cpu = torch.device("cpu")
    peak = matmul_peak_gflops(cpu, seconds=0.2)
    # a 2048^3 matmul: far above a naive loop (< 1 GFLOP/s), below 100 TFLOP/s on any CPU
    assert 1 < peak < 1e5
    cfg = load_config(None, ["task=toy_regression", "train.batch_size=8", "bench.warmup=1", "bench.steps=2",
                             "bench.profile=2", f"output_dir={tmp_path}"])
    r = run_bench(cfg)
    assert r["matmul_peak_gflops_per_s"] > 1
    # (rounded to 3 decimals in the JSON line)
    assert r["peak_fraction"] == pytest.approx(r["achieved_gflops_per_s"] / r["matmul_peak_gflops_per_s"], abs=6e-4)
    rows = r["profile"]["ours"]
    assert rows and {"op", "self_ms_per_step", "share", "calls_per_step"} <= set(rows[0])
    assert any("addmm" in row["op"] or "mm" in row["op"] for row in rows)  # the toy model's Linear layers
    assert all(a["self_ms_per_step"] >= b["self_ms_per_step"] for a, b in zip(rows, rows[1:]))
    kinds = r["profile"]["ours_by_kind"]
    assert set(kinds) == {"gemm", "attention", "other"}
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(k["ms_per_step"] for k in kinds.values()) == pytest.approx(r["ms_per_step"], rel=1e-3, abs=0.02)  # (2 decimals each)
    # the toy's FLOPs are all GEMMs: their rate is the step's FLOPs over the GEMMs' part of the step
    gemm = kinds["gemm"]
    assert gemm["flops"] == pytest.approx(r["train_flops_per_sample"] * r["batch_size"], rel=1e-3)
    seconds = gemm["share"] * r["ms_per_step"] / 1e3
    assert gemm["gflops_per_s"] == pytest.approx(gemm["flops"] / 1e9 / seconds, rel=2e-2, abs=0.01)  # (2 decimals)
    assert kinds["attention"]["share"] == 0 and "flops" not in kinds["attention"]


def test_op_kinds_name_gemms_attention_and_the_rest_as_profiler_and_flop_counter_spell_them():
    from mm3d.bench import op_kind

    assert [op_kind(n) for n in ("aten::mm", "aten.addmm", "aten.bmm.default", "aten::convolution_backward",
                                 "aten::mkldnn_convolution")] == ["gemm"] * 5
    assert [op_kind(n) for n in ("aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                                 "aten._scaled_dot_product_efficient_attention.default",
                                 "aten::_flash_attention_backward")] == ["attention"] * 3
    assert [op_kind(n) for n in ("aten::gelu", "aten::copy_", "aten::mm_backward_helper", "aten::_fused_adamw_")] \
        == ["other"] * 4


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
    assert "synth" in capsys.readouterr().out


def test_cli_config_error_exit_code(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: toy_regression\ntrain:\n  batchsize: 3\n")
    assert main(["pretrain", str(cfg)]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err


def test_cli_models_tasks_and_data_check(tmp_path, capsys):
    assert main(["tasks"]) == 0
    assert "toy_regression" in capsys.readouterr().out
    assert main(["models"]) == 0
    capsys.readouterr()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: toy_regression\n")
    assert main(["data", "check", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["samples"] == 64 and report["train"]["errors"] == 0


def test_cli_finetune_then_evaluate(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: toy_regression\noutput_dir: {tmp_path / 'run'}\ntrain:\n  max_steps: 2\n"
                   "  progress: 'off'\n")
    assert main(["finetune", str(cfg)]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert main(["evaluate", str(cfg), f"checkpoint={ckpt}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] == str(ckpt) and "loss" in out["val"]
    assert (tmp_path / "run" / "eval" / "results.json").is_file()
