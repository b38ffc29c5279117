"""Config rules: strict loading, overrides, cross-field checks, HF architecture, CLI skeleton."""

import json
import subprocess
import sys
import typing
from dataclasses import is_dataclass
from pathlib import Path

import pytest

from megatron_vr1 import cli
from megatron_vr1.config import Config, ModelConfig, field_docs, load_config, load_hf_arch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"

# Qwen2.5-VL-7B-Instruct, as transformers 5.19 saves it (text_config / vision_config).
QWEN7B_V5 = {
    "model_type": "qwen2_5_vl",
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"mrope_section": [16, 24, 24], "rope_theta": 1000000.0, "rope_type": "default"},
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "num_heads": 16,
        "intermediate_size": 3420,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "in_channels": 3,
    },
}

# The same model in the original hub file's flat style (transformers 4.4x).
QWEN7B_FLAT = {
    "model_type": "qwen2_5_vl",
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "num_heads": 16,
        "intermediate_size": 3420,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "in_chans": 3,
    },
}


def write_yaml(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def write_hf(folder: Path, cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ---- loading -------------------------------------------------------------------------------


def test_tiny_recipe_loads():
    cfg = load_config(TINY)
    assert cfg.model.hf_path == REPO / "runs" / "tiny" / "hf"
    assert cfg.model.params_dtype == "float32"
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.optim.warmup_ratio == pytest.approx(0.1)
    assert [s.max_response_length for s in cfg.ptst.stages] == [32, 48, 64]
    assert cfg.rollout.prompts_per_step % cfg.grpo.minibatch_prompts == 0
    assert cfg.run_dir == REPO / "runs" / "tiny" / "rl"


def test_defaults_follow_reference():
    cfg = Config(model=ModelConfig(hf_path="x"))
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.lr_schedule) == (
        1e-6, (0.9, 0.999), 1e-2, "constant")  # fmt: skip
    assert (cfg.grpo.clip_low, cfg.grpo.clip_high, cfg.grpo.kl_beta, cfg.grpo.kl_estimator) == (0.2, 0.2, 1e-2, "k3")
    assert (cfg.rollout.prompts_per_step, cfg.grpo.minibatch_prompts) == (512, 128)
    assert [(s.max_response_length, s.group_size, s.steps, s.enabled) for s in cfg.ptst.stages] == [
        (4096, 16, 100, True), (8192, 8, 100, True), (16384, 4, 100, False)]  # fmt: skip
    assert (cfg.data.min_pixels, cfg.data.max_pixels) == (3136, 1003520)
    assert isinstance(cfg.model.hf_path, Path)


def test_every_field_has_a_docstring():
    def walk(cls):
        docs = field_docs(cls)
        for name, tp in typing.get_type_hints(cls).items():
            assert docs.get(name), f"{cls.__name__}.{name} has no docstring"
            for sub in (tp, *typing.get_args(tp)):
                if is_dataclass(sub):
                    walk(sub)

    walk(Config)


def test_unknown_key_names_key_section_and_close_match(tmp_path):
    path = write_yaml(tmp_path, "model: {hf_path: hf}\noptim:\n  lrr: 1.0e-5\n")
    with pytest.raises(ValueError, match=r"unknown key 'optim.lrr' in section 'optim'; did you mean 'lr'"):
        load_config(path)
    path = write_yaml(tmp_path, "model: {hf_path: hf}\nrolout: {}\n")
    with pytest.raises(ValueError, match=r"unknown key 'rolout' in the top level; did you mean 'rollout'"):
        load_config(path)
    with pytest.raises(ValueError, match=r"'grpo.kl_bta' \(from a command-line override\).*'kl_beta'"):
        load_config(TINY, ["grpo.kl_bta=0"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=fast", r"optim.lr must be a number, got 'fast' \(str\)"),
        ("parallel.tp=2.5", r"parallel.tp must be an integer, got 2.5 \(float\)"),
        ("model.freeze_vision=1", r"model.freeze_vision must be true or false, got 1 \(int\)"),
        ("grpo.advantage=gpro", r"grpo.advantage must be one of 'grpo', 'drgrpo', got 'gpro'; did you mean 'grpo'"),
        ("optim.betas=[0.9]", r"optim.betas must be a list of 2 values, got \[0.9\]"),
        ("model=3", r"model must be a mapping of keys, got 3"),
        ("ptst.stages[0].group_size=many", r"ptst.stages\[0\].group_size must be an integer, got 'many'"),
    ],
)
def test_type_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, [override])


def test_missing_required_key(tmp_path):
    with pytest.raises(ValueError, match=r"model.hf_path is missing"):
        load_config(write_yaml(tmp_path, "seed: 1\n"))


def test_overrides(tmp_path):
    cfg = load_config(
        TINY,
        [
            "optim.lr=1e-5",  # YAML 1.1 alone would read this as a string
            "ptst.stages[0].steps=5",
            "ptst.stages[2].enabled=true",
            "ptst.stages[1].lr=3e-4",
            "optim.betas=[0.8, 0.99]",
            "data.system_prompt=think first",
        ],
    )
    assert cfg.optim.lr == 1e-5
    assert cfg.ptst.stages[0].steps == 5 and cfg.ptst.stages[1].steps == 30
    assert cfg.ptst.stages[2].enabled and cfg.ptst.stages[1].lr == 3e-4
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.data.system_prompt == "think first"

    cfg = load_config(TINY, ["ptst.stages=[{max_response_length: 32, group_size: 4, steps: 3}]"])
    assert len(cfg.ptst.stages) == 1 and cfg.ptst.stages[0].steps == 3 and cfg.ptst.stages[0].enabled

    # a list index into a default list the YAML never wrote
    cfg = load_config(write_yaml(tmp_path, "model: {hf_path: hf}\n"), ["ptst.stages[2].enabled=true"])
    assert cfg.ptst.stages[2].enabled

    for bad, message in [
        ("optim.lr", r"must look like key=value"),
        ("ptst.stages[7].steps=1", r"ptst.stages has 3 entries, no index 7"),
        ("optim.lr.x=1", r"optim.lr is not a section"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(TINY, [bad])


def test_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = write_yaml(tmp_path / "recipes", "model: {hf_path: ../models/hf}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(path)
    assert cfg.model.hf_path == tmp_path / "models" / "hf"  # relative to the YAML's folder
    assert cfg.run_dir == tmp_path / "elsewhere" / "runs" / "recipe"
    cfg = load_config(path, ["model.hf_path=hf2", "sft.data_path=/abs/sft.jsonl"])
    assert cfg.model.hf_path == tmp_path / "elsewhere" / "hf2"  # relative to the current directory
    assert cfg.sft.data_path == Path("/abs/sft.jsonl")


@pytest.mark.parametrize(
    "override, message",
    [
        ("ptst.stages=[]", r"ptst.stages is empty"),
        ("ptst.stages[1].group_size=1", r"ptst.stages\[1\].group_size \(1\) must be >= 2"),
        ("ptst.stages=[{max_response_length: 8, group_size: 2, enabled: false}]", r"none is enabled"),
        ("grpo.clip_low=0", r"grpo.clip_low \(0.0\) must be > 0"),
        ("grpo.clip_high=-0.1", r"grpo.clip_high \(-0.1\) must be > 0"),
        ("rollout.prompts_per_step=20", r"rollout.prompts_per_step \(20\) must be a multiple of grpo.minibatch_prompts \(16\)"),
        ("parallel.micro_batch_size=3", r"ptst.stages\[0\].group_size \(8\).*16\*8=128.*parallel.micro_batch_size \(3\)"),
        ("parallel.sequence_parallel=true", r"parallel.sequence_parallel \(True\) needs parallel.tp > 1"),
        ("model.fp8=e5m2", r"model.fp8 must be one of 'hybrid', 'e4m3'"),
        ("data.max_pixels=1000", r"data.max_pixels \(1000\) must be >= data.min_pixels \(3136\)"),
    ],
)
def test_field_and_cross_field_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, [override])


def test_round_trip(tmp_path):
    cfg = load_config(TINY, ["ptst.stages[2].enabled=true", "data.system_prompt=\"a: 'b'\\n# c\"", "optim.lr=1e-5"])
    out = cfg.save_resolved(tmp_path / "run")
    assert out == tmp_path / "run" / "config.yaml"
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left
    assert load_config(out) == cfg
    assert cfg.data.system_prompt == "a: 'b'\n# c"
    assert "  lr: 1.0e-05  # Peak learning rate" in out.read_text()


# ---- architecture --------------------------------------------------------------------------


@pytest.mark.parametrize("style", [QWEN7B_V5, QWEN7B_FLAT], ids=["transformers5", "flat"])
def test_load_hf_arch_qwen7b(tmp_path, style):
    arch = load_hf_arch(write_hf(tmp_path / "hf", style))
    t, v = arch.text, arch.vision
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim) == (3584, 28, 28, 4, 128)
    assert (t.ffn_hidden_size, t.vocab_size, t.max_position_embeddings) == (18944, 152064, 128000)
    assert (t.rms_norm_eps, t.rope_theta, t.mrope_section, t.tie_word_embeddings) == (1e-6, 1e6, (16, 24, 24), False)
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (32, 1280, 16, 3420, 3584)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size, v.in_channels) == (14, 2, 2, 112, 3)
    assert v.fullatt_block_indexes == (7, 15, 23, 31)
    assert (arch.image_token_id, arch.video_token_id, arch.vision_start_token_id) == (151655, 151656, 151652)


def test_load_hf_arch_tied_embeddings_inside_text_config(tmp_path):
    cfg = json.loads(json.dumps(QWEN7B_V5))
    del cfg["tie_word_embeddings"]
    cfg["text_config"]["tie_word_embeddings"] = True  # pre-v5 saves put it there
    assert load_hf_arch(write_hf(tmp_path / "hf", cfg)).text.tie_word_embeddings


def test_load_hf_arch_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.hf_path=.*nohf: no config.json.*tiny-model"):
        load_hf_arch(tmp_path / "nohf")
    llama = write_hf(tmp_path / "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match=r"model_type is 'llama'.*expected 'qwen2_5_vl'"):
        load_hf_arch(llama)


def test_validate_against_arch(tmp_path):
    hf = write_hf(tmp_path / "hf", QWEN7B_V5)
    recipe = write_yaml(tmp_path, f"model: {{hf_path: {hf}}}\n")
    arch = load_hf_arch(hf)
    load_config(recipe, ["parallel.tp=4", "parallel.pp=2"]).validate_against(arch)
    with pytest.raises(ValueError, match=r"parallel.tp \(3\) must divide the number of attention heads \(28\) "
                                         r"of model.hf_path=.*; use tp in \{1,2,4\}"):  # fmt: skip
        load_config(recipe, ["parallel.tp=3"]).validate_against(arch)
    with pytest.raises(ValueError, match=r"parallel.tp \(7\) must divide the number of KV heads \(4\)"):
        load_config(recipe, ["parallel.tp=7"]).validate_against(arch)
    with pytest.raises(ValueError, match=r"parallel.pp \(3\) must divide the number of layers \(28\).*\{1,2,4,7,14,28\}"):
        load_config(recipe, ["parallel.pp=3"]).validate_against(arch)
    with pytest.raises(ValueError, match=r"ptst.stages\[2\].max_response_length \(130000\) \+ data.max_prompt_length"):
        load_config(recipe, ["ptst.stages[2].enabled=true", "ptst.stages[2].max_response_length=130000"]).validate_against(arch)
    # SFT and data generation do not use the PTST stages: not checked for them
    load_config(recipe, ["ptst.stages[2].enabled=true", "ptst.stages[2].max_response_length=130000"]).validate_against(
        arch, rl=False)
    assert load_config(recipe).parallel.dp(16) == 16
    with pytest.raises(ValueError, match=r"parallel.tp\*parallel.pp \(4\*1=4\) must divide the world size \(6\)"):
        load_config(recipe, ["parallel.tp=4"]).parallel.dp(6)


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_config_dry_run_prints_yaml(capsys):
    assert cli.main(["config", str(TINY), "--dry-run", "optim.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# megatron-vr1 resolved config")
    assert "  lr: 0.0003  # Peak learning rate" in out
    import yaml

    assert yaml.safe_load(out)["rollout"]["prompts_per_step"] == 32


def test_cli_config_checks_arch_when_present(tmp_path, capsys):
    hf = write_hf(tmp_path / "hf", QWEN7B_V5)
    recipe = write_yaml(tmp_path, f"model: {{hf_path: {hf}}}\nparallel: {{tp: 3}}\n")
    assert cli.main(["config", str(recipe)]) == 2
    assert "error: parallel.tp (3) must divide" in capsys.readouterr().err


def test_cli_user_error_exits_2_without_traceback(capsys):
    assert cli.main(["config", str(TINY), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'optim.lrr'") and "Traceback" not in err
    assert cli.main(["config", "no/such.yaml"]) == 2
    assert "error: config file no/such.yaml not found" in capsys.readouterr().err


def test_cli_missing_command_module_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "later", ("megatron_vr1.not_written_yet", "a later command"))
    assert cli.main(["later", "x"]) == 2
    assert "`megatron-vr1 later` is not available" in capsys.readouterr().err


def test_cli_help_is_fast_and_imports_no_torch():
    code = (
        "import sys\nfrom megatron_vr1.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "convert" in res.stdout and "tiny-model" in res.stdout
    assert res.stdout.strip().endswith("NO-TORCH")


def test_cli_command_module_contract(tmp_path, capsys, monkeypatch):
    """A module with nested subcommands gets args.cfg/args.arch; --dry-run never reaches run()."""
    import types

    seen = {}
    nested = types.ModuleType("fake_nested")

    def add_arguments(parser):
        sub = parser.add_subparsers(dest="action", required=True)
        cli.add_config_arguments(sub.add_parser("go"))
        sub.add_parser("plain").add_argument("--n", type=int, default=1)

    def run(args):
        seen.update(vars(args))
        return 0

    nested.add_arguments, nested.run = add_arguments, run
    flat = types.ModuleType("fake_flat")
    flat.main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, "fake_nested", nested)
    monkeypatch.setitem(sys.modules, "fake_flat", flat)
    monkeypatch.setitem(cli.COMMANDS, "nested", ("fake_nested", "a command with subcommands"))
    monkeypatch.setitem(cli.COMMANDS, "flat", ("fake_flat", "a command with main(argv)"))

    hf = write_hf(tmp_path / "hf", QWEN7B_V5)
    recipe = write_yaml(tmp_path, f"model: {{hf_path: {hf}}}\n")
    assert cli.main(["nested", "go", str(recipe), "--dry-run", "parallel.tp=2"]) == 0
    assert not seen and "  tp: 2  #" in capsys.readouterr().out
    assert cli.main(["nested", "go", str(recipe), "parallel.tp=2"]) == 0
    assert seen["cfg"].parallel.tp == 2 and seen["arch"].text.num_heads == 28
    assert cli.main(["nested", "go", str(recipe), "parallel.tp=3"]) == 2
    assert "error: parallel.tp (3) must divide" in capsys.readouterr().err
    seen.clear()
    assert cli.main(["nested", "plain", "--n", "4"]) == 0 and seen == {"action": "plain", "n": 4}
    assert cli.main(["flat", "a", "--b"]) == 3 and seen["argv"] == ["a", "--b"]
