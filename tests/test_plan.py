"""`megatron-vr1 plan`: the per-GPU memory estimate on the 7B/32B/72B shapes, with numbers
checked by hand (the formulas are in megatron_vr1/plan.py's docstring)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vr1.config import load_config, load_hf_arch
from megatron_vr1.plan import estimate, layout_from, param_counts

REPO = Path(__file__).resolve().parent.parent
ARCH = REPO / "configs" / "arch"
GiB = 2**30


def _recipe(size: str, *overrides: str):
    cfg = load_config(REPO / "configs" / f"qwen25vl_{size}_ptst.yaml",
                      [f"model.hf_path={ARCH / f'qwen2.5-vl-{size}'}", *overrides])
    return cfg, load_hf_arch(cfg.model.hf_path)


def _row(plan, name: str) -> float:
    return next(v for n, v, _ in plan.rows if n == name)


def test_parameter_counts_match_the_hub():
    # the hub's safetensors totals of Qwen2.5-VL-{7B,32B,72B}-Instruct
    assert param_counts(load_hf_arch(ARCH / "qwen2.5-vl-7b")).total == 8_292_166_656
    assert param_counts(load_hf_arch(ARCH / "qwen2.5-vl-32b")).total == 33_452_718_336
    assert param_counts(load_hf_arch(ARCH / "qwen2.5-vl-72b")).total == 73_410_777_344


def test_7b_weights_grads_optimizer_by_hand():
    cfg, arch = _recipe("7b", "parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false")
    plan = estimate(cfg, arch, layout_from(cfg), "rl")
    assert _row(plan, "weights") == 2 * 8_292_166_656  # bf16, one GPU holds it all
    cfg, arch = _recipe("7b", "parallel.tp=4", "parallel.pp=1", "slurm.nodes=8", "rollout.gpu_memory_utilization=0.5",
                        "model.freeze_vision=false")  # 64 GPUs -> DP 16
    plan = estimate(cfg, arch, layout_from(cfg), "rl")
    norms = 28 * 2 * 3584 + 3584  # RMSNorm weights are replicated over TP, the rest is split
    per_gpu = (8_292_166_656 - norms) / 4 + norms
    assert _row(plan, "weights") == pytest.approx(2 * per_gpu, rel=1e-12)
    assert _row(plan, "weights") / GiB == pytest.approx(3.861, abs=1e-3)  # ~= 2 bytes x 8.29B / 4
    assert _row(plan, "reference model") == _row(plan, "weights")  # kl_beta > 0: the cold-start model
    assert _row(plan, "gradients") == pytest.approx(4 * per_gpu, rel=1e-12)  # fp32 main grads, vision trained
    assert _row(plan, "optimizer") == pytest.approx(12 * per_gpu / 16, rel=1e-12)  # master + m + v over DP 16
    # vLLM: 0.5 x 80 GiB; its weights at engine TP 4; KV 2 x 28 layers x 1 KV head x 128 x 2 bytes per token
    assert _row(plan, "rollout engine") == 40 * GiB
    assert _row(plan, "  engine weights") == pytest.approx(2 * 8_292_166_656 / 4)
    kv = 40 * GiB - 2 * 8_292_166_656 / 4 - 2 * GiB
    assert plan.kv_tokens == int(kv // (2 * 28 * 1 * 128 * 2))
    assert plan.fits


def test_activations_by_hand():
    # 7B, TP 1, no SP, no recompute, frozen vision, one 2048-token sequence
    cfg, arch = _recipe("7b", "parallel.tp=1", "parallel.sequence_parallel=false", "parallel.recompute=false",
                        "model.freeze_vision=true", "data.max_prompt_length=1024",
                        "ptst.stages=[{max_response_length: 1024, group_size: 16}]")
    plan = estimate(cfg, arch, layout_from(cfg), "rl")
    per_layer = 2 * 2048 * (4 * 3584 + 2 * 3584 + 2 * 512 + 3 * 18944)  # 325,058,560 bytes
    logits = 2 * 4 * 2048 * 152064  # fp32 logits and their gradient
    assert _row(plan, "activations") == per_layer * 28 + logits == 11_593_056_256
    # full recompute keeps one hidden state per layer plus one layer's worth
    cfg, arch = _recipe("7b", "parallel.tp=1", "parallel.sequence_parallel=false", "parallel.recompute=true",
                        "model.freeze_vision=true", "data.max_prompt_length=1024",
                        "ptst.stages=[{max_response_length: 1024, group_size: 16}]")
    plan = estimate(cfg, arch, layout_from(cfg), "rl")
    assert _row(plan, "activations") == 28 * 2 * 2048 * 3584 + per_layer + logits


def test_72b_pipeline_first_stage_and_sizes():
    cfg, arch = _recipe("72b", "parallel.tp=8", "parallel.pp=2", "slurm.nodes=8",
                        "rollout.gpu_memory_utilization=0.35")  # DP 4
    plan = estimate(cfg, arch, layout_from(cfg), "rl")
    pc = param_counts(arch)
    first = 40 * (pc.layer_split / 8 + pc.layer_norms) + pc.embedding / 8 + pc.vision / 8
    assert _row(plan, "weights") == pytest.approx(2 * first, rel=1e-12)  # the first stage is the bigger one
    assert plan.fits and plan.rollout_peak / GiB == pytest.approx(78.5, abs=0.1)
    cfg, arch = _recipe("32b")
    assert estimate(cfg, arch, layout_from(cfg), "rl").fits


def _plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "plan", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_plan_command_fits_or_names_the_fix():
    r = _plan_cli(REPO / "configs/qwen25vl_7b_ptst.yaml", f"model.hf_path={ARCH / 'qwen2.5-vl-7b'}")
    assert r.returncode == 0 and "fits: peak" in r.stdout and "engine KV cache" in r.stdout, r.stdout + r.stderr
    r = _plan_cli(REPO / "configs/qwen25vl_7b_sft.yaml", f"model.hf_path={ARCH / 'qwen2.5-vl-7b'}")
    assert r.returncode == 0 and r.stdout.startswith("SFT") and "rollout engine" not in r.stdout
    # 72B at TP 2 cannot fit on 80 GB GPUs: exit 2 and name a layout that does
    r = _plan_cli(REPO / "configs/qwen25vl_72b_ptst.yaml", f"model.hf_path={ARCH / 'qwen2.5-vl-72b'}",
                  "parallel.tp=2", "parallel.pp=1", "slurm.nodes=8", "rollout.gpu_memory_utilization=0.4")
    assert r.returncode == 2 and "DOES NOT FIT" in r.stderr and "parallel.tp=8" in r.stderr, r.stderr
    # 7B at TP 1 without recompute: raising TP or turning recompute on is named
    r = _plan_cli(REPO / "configs/qwen25vl_7b_ptst.yaml", f"model.hf_path={ARCH / 'qwen2.5-vl-7b'}", "parallel.tp=1",
                  "parallel.sequence_parallel=false", "parallel.recompute=false", "rollout.gpu_memory_utilization=0.6")
    assert r.returncode == 2 and "raise parallel.tp to" in r.stderr, r.stdout + r.stderr


def test_submit_refuses_a_layout_that_does_not_fit(capsys):
    """`slurm submit` runs the plan first on GPU partitions: 72B PTST at PP 2 needs 82.5 GiB while
    rolling out, so nothing is rendered or submitted and the error names the fix;
    --no-plan-check goes ahead (here: --dry-run prints the scripts)."""
    from megatron_vr1 import cli

    args = ["slurm", "submit", str(REPO / "configs/qwen25vl_72b_ptst.yaml"),
            f"model.hf_path={REPO / 'configs/arch/qwen2.5-vl-72b'}", "parallel.pp=2", "--dry-run"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit 80 GiB GPUs (rollout needs 82.5 GiB per GPU" in err and "raise parallel.pp to 4" in err
    assert cli.main([*args, "--no-plan-check"]) == 0
    assert "#SBATCH" in capsys.readouterr().out


def test_rollout_tp_layout_memory_and_refusal(capsys, tiny_hf):
    """The engine's share per GPU follows rollout.tensor_parallel_size (each GPU one shard of a replica);
    a rollout TP vLLM cannot split the model at is refused by `plan` and `slurm submit` before any
    estimate, naming the size and the TPs that work; the three recipes pass."""
    from megatron_vr1 import cli
    from megatron_vr1.rollout.layout import check_rollout_tp, valid_rollout_tps

    cfg, arch = _recipe("7b", "parallel.tp=2", "rollout.tensor_parallel_size=4")
    lay = layout_from(cfg)
    assert lay.rollout_tp == 4 and layout_from(_recipe("7b", "parallel.tp=2")[0]).rollout_tp == 2
    plan = estimate(cfg, arch, lay, "rl")
    assert _row(plan, "  engine weights") == pytest.approx(2 * param_counts(arch).total / 4)
    for size in ("7b", "32b", "72b"):  # the recipes' own layouts
        cfg, arch = _recipe(size)
        check_rollout_tp(arch, layout_from(cfg).rollout_tp)
    assert valid_rollout_tps(load_hf_arch(ARCH / "qwen2.5-vl-7b"), 8) == [1, 2, 4]  # 28 heads
    assert valid_rollout_tps(load_hf_arch(ARCH / "qwen2.5-vl-72b"), 8) == [1, 2, 4, 8]  # vision MLP 3456
    r = _plan_cli(REPO / "configs/qwen25vl_7b_ptst.yaml", f"model.hf_path={ARCH / 'qwen2.5-vl-7b'}", "--rollout-tp", "8")
    assert r.returncode == 2 and "attention heads (28)" in r.stderr and "{1,2,4}" in r.stderr, r.stderr
    assert "GiB" not in r.stdout  # refused before any estimate
    # the demo tiny model (vision MLP 171) at rollout TP 2: config, plan and slurm submit refuse it
    tiny = [f"model.hf_path={tiny_hf}", "parallel.tp=2"]
    r = _plan_cli(REPO / "configs/tiny_cpu.yaml", *tiny)
    assert r.returncode == 2 and "vision MLP size" in r.stderr and "(171)" in r.stderr, r.stderr
    assert cli.main(["slurm", "submit", str(REPO / "configs/tiny_cpu.yaml"), *tiny, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "vision MLP size" in err and "(171)" in err and "--tp-friendly" in err, err
    assert cli.main(["slurm", "submit", str(REPO / "configs/tiny_cpu.yaml"), *tiny,
                     "rollout.tensor_parallel_size=1", "--dry-run"]) == 0
    assert "#SBATCH" in capsys.readouterr().out
