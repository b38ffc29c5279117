"""Deterministic tiny Qwen2.5-VL checkpoint builder (Hugging Face format, random init).

``build_tiny_model(out_dir)`` writes a complete HF checkpoint folder -- ``config.json``,
``model.safetensors`` (float32), ``generation_config.json``, tokenizer files, image-processor /
processor config and the chat template -- that loads with
``transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained`` and
``transformers.AutoProcessor.from_pretrained``. Nothing is downloaded: the weights come from
transformers' own ``Qwen2_5_VLForConditionalGeneration(config)`` under ``torch.manual_seed(seed)``
and the tokenizer is a byte-level BPE trained here, with the ``tokenizers`` library, on a built-in
corpus of the tiny synthetic task (coloured circles / squares / triangles, "How many red shapes are
there?", ``<think>...</think><answer>N</answer>``) plus generic math / multiple-choice words.

Why it exists: every part of the trainer (HF <-> Megatron conversion, tensor / pipeline parallel
sharding, vLLM rollouts, SFT + GRPO) needs a real Qwen2.5-VL-shaped checkpoint to test against,
and the 7B is far too big for CPU tests. This one has ~1M parameters and builds in a few seconds.

Sizes and why:

* text: hidden 128, 4 layers, 4 query heads / 2 KV heads (GQA, like the 7B's 28/4), head_dim 32,
  intermediate 256, mrope_section [4, 6, 6] (sum 16 = head_dim / 2, the 7B's [16, 24, 24] scaled).
  head_dim >= 32 (in both towers) so vLLM's CPU attention backends accept the model.
* vision: depth 2, hidden 64, 2 heads (head_dim 32), intermediate 171 -- deliberately odd, like the
  7B's 3420 is not divisible by every TP size, to exercise uneven tensor-parallel shapes -- window
  attention with window 112 and block 1 full attention (``fullatt_block_indexes=[1]``), patch 14,
  temporal patch 2, 2x2 spatial merge into out_hidden_size 128 (= the text hidden size).
* vocab: the model has 400 rows (like Qwen's padded 152064 > tokenizer size); the tokenizer has
  320 tokens (256 bytes + 46 merges learned on the task text + Qwen2.5-VL's 14 special tokens +
  the 4 think/answer tags as normal added tokens). The tiny task's CoT
  ``<think>I see a red square, a green circle. Red shapes: 1.</think><answer>1</answer>`` is 21
  tokens (a generic byte-level tokenizer needs 60+). ``BPE_VOCAB_SIZE`` is the knob.
* image processor: min_pixels 3136, max_pixels 200704, so a 112x112 image is 8x8 patches -> 16
  image tokens after the 2x2 merge (224x224 -> 64 tokens). The saved processor uses the PIL
  backend (``Qwen2VLImageProcessorPil``) so it works without torchvision.

* ``--tp-friendly`` (``tp_friendly=True``): the same model with the vision MLP at 172 instead of 171,
  so every size vLLM splits over tensor-parallel ranks divides by 2 (heads 4, KV heads 2, FFN 256,
  vision heads 2, vision MLP 172, merger 256): a rollout engine at TP 2 can hold it. The demo model
  stays at 171 (vLLM refuses it at TP 2; the trainer pads it to 192 and runs at any TP).

CLI: ``python -m megatron_vr1.tiny_model --out DIR [--seed N] [--tie-word-embeddings] [--tp-friendly] [--overwrite]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from megatron_vr1.hf_processor import Qwen2_5_VLImageOnlyProcessor

# ---------------------------------------------------------------------------------------------
# Exact model / processor values (the Megatron side imports these rather than repeating them).
# ---------------------------------------------------------------------------------------------

MODEL_VOCAB_SIZE = 400

TEXT_CONFIG = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,  # head_dim = 128 / 4 = 32
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
    "vocab_size": MODEL_VOCAB_SIZE,
    "initializer_range": 0.02,
    "use_sliding_window": False,
    "max_window_layers": 4,  # = num_hidden_layers, as in the released configs (unused: no sliding window)
    "attention_dropout": 0.0,
}
ROPE_THETA = 1000000.0
MROPE_SECTION = [4, 6, 6]  # sum = head_dim / 2 = 16

VISION_CONFIG = {
    "depth": 2,
    "hidden_size": 64,
    "num_heads": 2,  # head_dim = 64 / 2 = 32
    "intermediate_size": 171,  # odd on purpose (uneven TP shards, like the 7B's 3420)
    "out_hidden_size": 128,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "in_channels": 3,
    "hidden_act": "silu",
    "tokens_per_second": 2,
    "initializer_range": 0.02,
}

TP_FRIENDLY_VISION_INTERMEDIATE = 172
"""Vision MLP size of the `--tp-friendly` model: divisible by 2 (and 4), unlike the demo's 171."""

MIN_PIXELS = 56 * 56  # 3136
MAX_PIXELS = 256 * 28 * 28  # 200704

# Qwen2.5-VL's special tokens, in Qwen's id order (they follow the BPE vocabulary, as in Qwen).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Reasoning-format tags: ordinary (non-special) added tokens, one id each, kept by decode.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Size of the byte-level BPE (256 byte symbols + merges) before the added tokens.
BPE_VOCAB_SIZE = 302  # + 14 special + 4 tags = 320 tokens

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL chat-template semantics, written here (not copied from a hub file).
CHAT_TEMPLATE = (
    # No whitespace control ("{%-"): the only newlines are the ones the format needs.
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# Tokenizer corpus
# ---------------------------------------------------------------------------------------------

_COLORS = ["red", "blue", "green"]
_SHAPES = ["circle", "square", "triangle"]
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

_GENERIC_TEXT = [
    DEFAULT_SYSTEM_PROMPT,
    "system user assistant",
    "Final Answer: 12",
    "Final Answer: A",
    "Answer the question. Choose the correct option.",
    "Choices: A. 1 B. 2 C. 3 D. 4 E. 5",
    "(A) (B) (C) (D) (E)",
    "What is the value of x? What is the area of the triangle? What is the perimeter?",
    "Find the length of the side. Find the angle. Find the sum and the difference.",
    "The answer is 0 1 2 3 4 5 6 7 8 9 10 100 3.14 1/2 -1 x + y = z, x - y, 2 * 3, 6 / 2, x^2",
    "Let me think step by step. First, second, then, so, therefore, because, wait.",
    "The total number of shapes is the sum of the counts. Count each one.",
    "Based on the image, the figure shows a number, a line, a point, a circle and a square.",
    "plus minus times divided equals equal greater less than ratio percent degrees",
    "Question: Hint: Please answer the question and provide the final answer at the end.",
    "The image shows an angle of 90 degrees; the radius is 5 cm, so the area is 25 pi.",
    "Yes, no. True, false! 'quote' \"double\" [list] {set} <tag> # @ $ % & _ | ~ ` ;",
]


def _task_text() -> list[str]:
    """The tiny task's own text: questions and CoT answers (tags removed: they are added tokens)."""
    lines: list[str] = []
    for color in _COLORS:
        lines.append(f"How many {color} shapes are there?")
        lines.append(f"How many {color} shapes are in the image?")
    for shape in _SHAPES:
        lines.append(f"How many {_PLURAL[shape]} are there?")
    lines.append("How many shapes are there?")
    # CoT bodies "I see a red square, a green circle. Red shapes: 1." for a spread of scenes.
    scenes: list[list[tuple[str, str]]] = []
    items = [(c, s) for c in _COLORS for s in _SHAPES]
    for i in range(len(items)):
        for k in range(1, 6):
            scenes.append([items[(i + j * 4) % len(items)] for j in range(k)])
    for scene in scenes:
        seen = ", ".join(f"a {c} {s}" for c, s in scene)
        for color in _COLORS:
            count = sum(1 for c, _ in scene if c == color)
            lines.append(f"I see {seen}. {color.capitalize()} shapes: {count}.")
            lines.append(str(count))
    lines.append("I see no shapes. Red shapes: 0.")
    return lines


def tokenizer_corpus() -> list[str]:
    """Deterministic training corpus for the tiny BPE (task text weighted over generic text)."""
    return _task_text() * 4 + _GENERIC_TEXT + [" ".join(_NUM_WORDS)]


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def _build_tokenizer():
    """Train the byte-level BPE and wrap it as transformers' Qwen2Tokenizer (fast, tokenizers-backed)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Same normalizer / pre-tokenizer as transformers' Qwen2Tokenizer rebuilds on load, so the
    # merges learned here are exactly the ones applied after a save / load round trip.
    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]
    vocab = model_json["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]

    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,  # set below, after the special tokens got their ids in Qwen's order
        pad_token=None,
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def _token_ids(tok) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + TAG_TOKENS}
    base = len(tok.backend_tokenizer.get_vocab(with_added_tokens=False))
    expected = {t: base + i for i, t in enumerate(SPECIAL_TOKENS + TAG_TOKENS)}
    if ids != expected:
        raise RuntimeError(f"unexpected added-token ids {ids} (expected {expected})")
    return ids


def _build_config(ids: dict[str, int], tie_word_embeddings: bool, tp_friendly: bool = False):
    from transformers import Qwen2_5_VLConfig

    text = dict(TEXT_CONFIG)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": list(MROPE_SECTION)}
    text["bos_token_id"] = ids["<|endoftext|>"]
    text["eos_token_id"] = ids["<|im_end|>"]
    # pad_token_id stays None in the model config, as in the released Qwen2.5-VL checkpoints:
    # setting it would make it the embedding's padding_idx (zero row, no gradient).
    text["pad_token_id"] = None
    text["tie_word_embeddings"] = tie_word_embeddings
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(VISION_CONFIG, **({"intermediate_size": TP_FRIENDLY_VISION_INTERMEDIATE}
                                             if tp_friendly else {})),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        dtype="float32",
    )


def _build_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=VISION_CONFIG["patch_size"],
        temporal_patch_size=VISION_CONFIG["temporal_patch_size"],
        merge_size=VISION_CONFIG["spatial_merge_size"],
    )


def _save_processor(folder: Path, tok) -> None:
    """Write tokenizer, image-processor, processor and chat-template files as a Qwen2.5-VL folder.

    ``Qwen2_5_VLProcessor`` cannot be instantiated without torchvision (see
    ``Qwen2_5_VLImageOnlyProcessor``), so the image-only subclass does the saving and the class
    name is then set to ``Qwen2_5_VLProcessor`` -- the files are the same either way, and a
    machine with torchvision (vLLM, GPU nodes) loads the folder with ``AutoProcessor``.
    """
    image_processor = _build_image_processor()
    processor = Qwen2_5_VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    # The legacy per-component file too (read by older transformers / vLLM and by AutoVideoProcessor's fallback).
    image_processor.save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = folder / name
        data = json.loads(path.read_text(encoding="utf-8"))
        data["processor_class"] = "Qwen2_5_VLProcessor"
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_checkpoint(folder: Path, seed: int, tie_word_embeddings: bool, tp_friendly: bool = False) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    tok = _build_tokenizer()
    if len(tok) >= MODEL_VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, must be < {MODEL_VOCAB_SIZE}")
    ids = _token_ids(tok)
    config = _build_config(ids, tie_word_embeddings, tp_friendly)

    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG state
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(folder, safe_serialization=True)
    _save_processor(folder, tok)


def _apply_umask_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and safetensors a 0600 file): give them ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def build_tiny_model(out_dir, seed: int = 0, tie_word_embeddings: bool = False, overwrite: bool = False,
                     tp_friendly: bool = False) -> Path:
    """Write the tiny Qwen2.5-VL checkpoint to ``out_dir`` and return its path (``tp_friendly``: the
    vision MLP at 172, so a TP=2 rollout engine can split it).

    The folder is built in a temporary sibling and renamed into place, so ``out_dir`` is never
    left half-written. An existing non-empty ``out_dir`` is refused unless ``overwrite=True``.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output directory {out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_checkpoint(tmp, seed=seed, tie_word_embeddings=tie_word_embeddings, tp_friendly=tp_friendly)
        _apply_umask_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-vr1 tiny-model",
        description="Build a deterministic tiny random-init Qwen2.5-VL checkpoint (HF format) for tests and CPU demos.",
    )
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default 0)")
    parser.add_argument("--tie-word-embeddings", action="store_true", help="tie lm_head to the input embedding")
    parser.add_argument("--tp-friendly", action="store_true",
                        help="vision MLP 172 instead of 171: every size vLLM splits divides by 2 (rollout TP 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        path = build_tiny_model(
            args.out, seed=args.seed, tie_word_embeddings=args.tie_word_embeddings, overwrite=args.overwrite,
            tp_friendly=args.tp_friendly,
        )
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
