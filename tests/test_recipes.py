"""The shipped recipes: every one loads, validates against its architecture, and inherits from its
base as documented; the architecture files are the published Qwen2.5-VL sizes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_vr1.config import load_config, load_hf_arch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BIG = sorted(CONFIGS.glob("qwen25vl_*.yaml"))


def _arch_dir(recipe: Path) -> Path:
    size = re.match(r"qwen25vl_(\d+b)_", recipe.name).group(1)
    return CONFIGS / "arch" / f"qwen2.5-vl-{size}"


# Parameter counts of the hub checkpoints (Qwen2.5-VL-7B/32B/72B-Instruct), 3 significant digits.
@pytest.mark.parametrize("size,params_b", [("7b", 8.29), ("32b", 33.5), ("72b", 73.4)])
def test_architecture_files_are_the_published_sizes(size, params_b):
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    path = CONFIGS / "arch" / f"qwen2.5-vl-{size}"
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(path))
    n = sum(p.numel() for p in model.parameters())
    assert float(f"{n / 1e9:.3g}") == params_b
    arch = load_hf_arch(path)
    assert arch.text.head_dim == 128 and arch.vision.out_hidden_size == arch.text.hidden_size


@pytest.mark.parametrize("recipe", BIG, ids=lambda p: p.name)
def test_big_recipes_validate_against_their_architecture(recipe):
    arch_dir = _arch_dir(recipe)
    cfg = load_config(recipe, [f"model.hf_path={arch_dir}"])
    cfg.validate_against(load_hf_arch(arch_dir))
    assert cfg.model.params_dtype == "bfloat16" and cfg.parallel.recompute
    assert cfg.run_dir.parts[-2:] in {(f"qwen25vl_{_arch_dir(recipe).name.split('-')[-1]}", k)
                                      for k in ("sft", "ptst", "long", "zero")}


@pytest.mark.parametrize("recipe", BIG, ids=lambda p: p.name)
def test_big_recipes_fit_80gb_gpus(recipe):
    """`megatron-vr1 plan`'s estimate for each recipe on its default cluster (8 nodes of 8 x 80 GiB)."""
    from megatron_vr1.plan import detect_mode, estimate, layout_from

    arch_dir = _arch_dir(recipe)
    cfg = load_config(recipe, [f"model.hf_path={arch_dir}"])
    plan = estimate(cfg, load_hf_arch(arch_dir), layout_from(cfg), detect_mode(cfg))
    assert plan.fits, (recipe.name, plan.problems)
    assert max(plan.train_peak, plan.rollout_peak) <= 0.95 * plan.gpu_bytes


def test_ptst_recipe_keeps_the_reference_values():
    cfg = load_config(CONFIGS / "qwen25vl_7b_ptst.yaml")
    stages = [(s.max_response_length, s.group_size, s.steps, s.enabled) for s in cfg.ptst.stages]
    assert stages == [(4096, 16, 100, True), (8192, 8, 100, True), (16384, 4, 100, False)]
    assert (cfg.optim.lr, cfg.grpo.kl_beta, cfg.grpo.clip_low, cfg.grpo.clip_high) == (1e-6, 1e-2, 0.2, 0.2)
    assert (cfg.rollout.prompts_per_step, cfg.grpo.minibatch_prompts, cfg.grpo.reward) == (512, 128, "hfrrf")
    assert cfg.data.system_prompt is None


def test_baselines_inherit_and_override():
    ptst = load_config(CONFIGS / "qwen25vl_7b_ptst.yaml")
    long = load_config(CONFIGS / "qwen25vl_7b_long.yaml")
    zero = load_config(CONFIGS / "qwen25vl_7b_zero.yaml")
    assert [(s.max_response_length, s.group_size, s.steps) for s in long.ptst.stages] == [(16384, 4, 300)]
    assert long.optim == ptst.optim and long.parallel == ptst.parallel and long.model == ptst.model
    assert zero.grpo.reward == "format_and_result" and zero.ptst == ptst.ptst
    from megatron_vr1.config import R1_ZERO_SYSTEM_PROMPT

    assert zero.data.system_prompt == R1_ZERO_SYSTEM_PROMPT  # the named prompt `r1-zero`, resolved
    assert "<think> </think> and <answer> </answer>" in zero.data.system_prompt
    assert zero.model.mcore_path == CONFIGS.parent / "checkpoints" / "qwen2.5-vl-7b"
    big = load_config(CONFIGS / "qwen25vl_72b_ptst.yaml")
    assert (big.parallel.tp, big.parallel.pp) == (8, 4) and big.grpo == ptst.grpo


def test_base_errors_name_the_fix(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nmodel: {hf_path: x}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match=r"cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: ../c.yaml\n")
    with pytest.raises(ValueError, match="same folder"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml not found"):
        load_config(tmp_path / "d.yaml")
