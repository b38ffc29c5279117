"""Tests for megatron_vr1.tiny_model: the deterministic tiny Qwen2.5-VL HF checkpoint builder."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from megatron_vr1 import tiny_model as tm
from megatron_vr1.hf_processor import load_processor

COT = "<think>I see a red square, a green circle. Red shapes: 1.</think><answer>1</answer>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tm.build_tiny_model(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def model(ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def processor(ckpt):
    return load_processor(ckpt)


def _shapes_image(size=112):
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse([6, 6, 22, 22], fill=(220, 30, 30))
    draw.rectangle([34, 34, 52, 52], fill=(30, 60, 220))
    draw.polygon([(70, 100), (86, 72), (102, 100)], fill=(30, 170, 60))
    return img


def _keys(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_files_config_and_token_ids(ckpt):
    from transformers import AutoConfig, AutoTokenizer

    for name in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    ]:
        assert (ckpt / name).is_file(), name
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"

    cfg = AutoConfig.from_pretrained(ckpt)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (128, 4, 4, 2)
    assert (t.intermediate_size, t.vocab_size, t.max_position_embeddings, t.hidden_act) == (256, 400, 4096, "silu")
    assert t.rms_norm_eps == 1e-6
    assert t.rope_parameters["rope_theta"] == 1e6 and t.rope_parameters["mrope_section"] == [4, 6, 6]
    assert sum(t.rope_parameters["mrope_section"]) == t.hidden_size // t.num_attention_heads // 2
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (2, 64, 2, 171, 128)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size) == (14, 2, 2, 112)
    assert list(v.fullatt_block_indexes) == [1] and v.tokens_per_second == 2 and v.hidden_act == "silu"
    assert cfg.tie_word_embeddings is False

    tok = AutoTokenizer.from_pretrained(ckpt)
    assert 300 <= len(tok) < 400
    ids = tok.convert_tokens_to_ids
    assert cfg.image_token_id == ids("<|image_pad|>")
    assert cfg.video_token_id == ids("<|video_pad|>")
    assert cfg.vision_start_token_id == ids("<|vision_start|>")
    assert cfg.vision_end_token_id == ids("<|vision_end|>")
    assert t.eos_token_id == ids("<|im_end|>") == tok.eos_token_id
    assert t.bos_token_id == ids("<|endoftext|>") == tok.pad_token_id
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids("<|im_end|>"), ids("<|endoftext|>")]
    assert gen["pad_token_id"] == ids("<|endoftext|>")
    # Qwen's order: the 14 special tokens follow the BPE vocabulary, then the 4 tag tokens.
    added = [ids(x) for x in tm.SPECIAL_TOKENS + tm.TAG_TOKENS]
    assert added == list(range(added[0], added[0] + len(added))) and added[-1] == len(tok) - 1


def test_cot_tokenizes_short_and_roundtrips(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(COT, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 45
    assert tok.decode(ids) == COT
    assert tok.decode(ids, skip_special_tokens=True) == COT  # tags are normal tokens: kept
    for tag in tm.TAG_TOKENS:
        assert tok(tag, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(tag)]
        assert tag not in tok.all_special_tokens
    for text in ["How many red shapes are there?", "Final Answer: C", "What is the value of x? 3.14"]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_forward_text(ckpt, model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    enc = tok(["How many red shapes are there?"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 400)
    assert torch.isfinite(logits).all()
    assert model.dtype == torch.float32
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight


def test_processor_and_forward_with_image(ckpt, model, processor):
    from transformers import Qwen2_5_VLProcessor

    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert json.loads((ckpt / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "How many red shapes are there?"}],
        }
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many red shapes are there?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    enc = processor(text=[text], images=[_shapes_image(112)], return_tensors="pt")
    image_id = model.config.image_token_id
    assert int((enc["input_ids"] == image_id).sum()) == 16
    assert tuple(enc["pixel_values"].shape) == (64, 1176)
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 400)
    assert torch.isfinite(logits).all()

    enc224 = processor(text=[text], images=[_shapes_image(224)], return_tensors="pt")
    assert int((enc224["input_ids"] == image_id).sum()) == 64
    assert enc224["image_grid_thw"].tolist() == [[1, 16, 16]]


def test_deterministic_per_seed(tmp_path, ckpt):
    again = tm.build_tiny_model(tmp_path / "again", seed=0)
    for name in ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"]:
        assert (again / name).read_bytes() == (ckpt / name).read_bytes(), name
    other = tm.build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    a, b = _tensors(ckpt), _tensors(other)
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_tied_word_embeddings(tmp_path, ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert "lm_head.weight" in _keys(ckpt)
    tied = tm.build_tiny_model(tmp_path / "tied", seed=0, tie_word_embeddings=True)
    assert "lm_head.weight" not in _keys(tied)
    assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(tied)
    assert m.config.tie_word_embeddings is True
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight


def test_refuses_non_empty_out_dir_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    tm.build_tiny_model(out)  # an existing empty folder is fine
    (out / "stray.txt").write_text("x")
    with pytest.raises(ValueError, match="overwrite"):
        tm.build_tiny_model(out)
    assert (out / "stray.txt").exists()
    with pytest.raises(SystemExit):
        tm.main(["--out", str(out)])
    assert tm.main(["--out", str(out), "--seed", "0", "--overwrite"]) == 0
    assert not (out / "stray.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_tp_friendly_differs_only_in_the_vision_mlp(tmp_path, ckpt):
    """`--tp-friendly`: the vision MLP is 172 (divisible by 2) instead of 171, everything else as the
    demo model; the rollout layout check accepts it at TP 2 and refuses the demo model."""
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.rollout.layout import check_rollout_tp, valid_rollout_tps

    assert tm.main(["--out", str(tmp_path / "tp"), "--tp-friendly"]) == 0
    a = json.loads((ckpt / "config.json").read_text())
    b = json.loads((tmp_path / "tp" / "config.json").read_text())
    assert a["vision_config"].pop("intermediate_size") == 171
    assert b["vision_config"].pop("intermediate_size") == 172
    assert a == b
    ta, tb = _tensors(ckpt), _tensors(tmp_path / "tp")
    assert set(ta) == set(tb)
    gate = next(k for k in tb if "blocks.0.mlp.gate_proj.weight" in k)
    assert tb[gate].shape == (172, 64) and ta[gate].shape == (171, 64)
    check_rollout_tp(load_hf_arch(tmp_path / "tp"), 2)
    assert valid_rollout_tps(load_hf_arch(tmp_path / "tp"), 8) == [1, 2]
    assert valid_rollout_tps(load_hf_arch(ckpt), 8) == [1]
    with pytest.raises(ValueError, match=r"vision MLP size .*\(171\).*\{1\}"):
        check_rollout_tp(load_hf_arch(ckpt), 2)
