"""Qwen2.5-VL architecture read from an HF `config.json`, and the Megatron-side layout rules that
follow from it (padded sizes, which TP/PP fit).

Everything here is a function of the HF config only, never of TP/PP, so a distributed checkpoint
written by `checkpoints_conv` loads at any TP/PP; the model code (`megatron_vr1.models`) and the
trainer's config (`megatron_vr1.config.load_hf_arch`) use these same definitions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HFArch", "TextArch", "VisionArch", "load_hf_arch",
    "VOCAB_PAD_MULTIPLE", "VISION_FFN_PAD_MULTIPLE", "PaddedSizes", "round_up", "padded_sizes",
    "check_parallel_fits",
]

# --------------------------------------------------------------------------------------------
# Architecture from the HF checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextArch:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    max_position_embeddings: int


@dataclass(frozen=True)
class VisionArch:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class HFArch:
    """Qwen2.5-VL architecture as transformers 5.19 reads it from config.json."""

    path: Path
    text: TextArch
    vision: VisionArch
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int


# transformers 5.19 defaults (configuration_qwen2_5_vl.py), used for keys a config.json lacks so
# that we read exactly the model that `from_pretrained` builds.
_TEXT_DEFAULTS = dict(
    vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=None, max_position_embeddings=32768,
    rms_norm_eps=1e-5,
)  # fmt: skip
_VISION_DEFAULTS = dict(
    depth=32, hidden_size=3584, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
)  # fmt: skip


def _read_config_json(cfg_file: Path) -> dict:
    """The parsed config.json, or a ValueError naming the file as damaged (truncated download,
    an HTML error page saved under that name, a merge conflict...)."""
    try:
        raw = json.loads(cfg_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{cfg_file} is damaged (not valid JSON: {e}); re-download it (or copy it again) from "
            "the model's source, e.g. the config.json of Qwen/Qwen2.5-VL-7B-Instruct"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{cfg_file} is damaged (a JSON {type(raw).__name__}, not an object); re-download it "
            "from the model's source"
        )
    return raw


def load_hf_arch(hf_path: str | os.PathLike) -> HFArch:
    """Reads a Qwen2.5-VL config.json: transformers-5 style (text_config/vision_config) or the
    older flat style (text fields at the top level, rope_scaling, vision in_chans)."""
    path = Path(hf_path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"model.hf_path={path}: no config.json there; point model.hf_path at a Hugging Face "
            "Qwen2.5-VL checkpoint folder (e.g. a download of Qwen/Qwen2.5-VL-7B-Instruct), or "
            "build the tiny CPU model first with `megatron-vr1 tiny-model`"
        )
    raw = _read_config_json(cfg_file)
    if raw.get("model_type") != "qwen2_5_vl":
        raise ValueError(
            f"{cfg_file}: model_type is {raw.get('model_type')!r} "
            f"(architectures {raw.get('architectures')}), expected 'qwen2_5_vl'; megatron-vr1 "
            "trains Qwen2.5-VL checkpoints only: point model.hf_path at one"
        )
    # Like transformers: a text_config dict wins and the top-level text keys are then ignored.
    text = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
    t = {k: text.get(k, d) for k, d in _TEXT_DEFAULTS.items()}
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    hidden, heads = t["hidden_size"], t["num_attention_heads"]
    if hidden % heads:
        raise ValueError(
            f"{cfg_file}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})"
        )
    head_dim = hidden // heads  # HF's Qwen2.5-VL attention ignores any head_dim key
    mrope = tuple(rope.get("mrope_section", (16, 24, 24)))
    if sum(mrope) != head_dim // 2:
        raise ValueError(
            f"{cfg_file}: mrope_section {list(mrope)} sums to {sum(mrope)}, but it must sum to "
            f"head_dim/2 = {head_dim // 2} (hidden_size {hidden} / {heads} heads / 2)"
        )
    text_arch = TextArch(
        hidden_size=hidden,
        num_layers=t["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=t["num_key_value_heads"] or heads,
        head_dim=head_dim,
        ffn_hidden_size=t["intermediate_size"],
        vocab_size=t["vocab_size"],
        rms_norm_eps=float(t["rms_norm_eps"]),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1e6))),
        mrope_section=mrope,
        # pre-v5 saves put tie_word_embeddings in text_config; transformers 5 ORs the two
        tie_word_embeddings=bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
        max_position_embeddings=t["max_position_embeddings"],
    )
    vis = raw.get("vision_config") or {}
    v = {k: vis.get(k, d) for k, d in _VISION_DEFAULTS.items()}
    v["in_channels"] = vis.get("in_channels", vis.get("in_chans", 3))
    v["fullatt_block_indexes"] = tuple(v["fullatt_block_indexes"])
    v["rope_theta"] = float((vis.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return HFArch(
        path=path,
        text=text_arch,
        vision=VisionArch(**v),
        image_token_id=raw.get("image_token_id", 151655),
        video_token_id=raw.get("video_token_id", 151656),
        vision_start_token_id=raw.get("vision_start_token_id", 151652),
    )


# --------------------------------------------------------------------------------------------
# Megatron-side padding and parallel layout
# --------------------------------------------------------------------------------------------

VOCAB_PAD_MULTIPLE = 128
VISION_FFN_PAD_MULTIPLE = 64


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class PaddedSizes:
    vocab: int
    """LM vocabulary padded to a multiple of 128 (the extra rows are zero)."""
    vision_ffn: int
    """Vision MLP intermediate size padded to a multiple of 64 (3420 -> 3456): zero rows of
    gate/up and zero columns of down leave the output and the gradients unchanged."""


def padded_sizes(arch: HFArch) -> PaddedSizes:
    return PaddedSizes(
        vocab=round_up(arch.text.vocab_size, VOCAB_PAD_MULTIPLE),
        vision_ffn=round_up(arch.vision.intermediate_size, VISION_FFN_PAD_MULTIPLE),
    )


def check_parallel_fits(arch: HFArch, tp: int, pp: int) -> None:
    """Raise ValueError naming the fix when TP/PP do not fit this architecture."""
    t, v = arch.text, arch.vision
    dims = (t.num_heads, t.num_kv_heads, v.num_heads, t.ffn_hidden_size)
    divisors = [d for d in range(1, t.num_heads + 1) if all(x % d == 0 for x in dims)]
    if tp < 1 or any(x % tp for x in dims):
        raise ValueError(
            f"tp={tp} must divide the attention heads ({t.num_heads}), the KV heads ({t.num_kv_heads}), "
            f"the vision heads ({v.num_heads}) and the MLP size ({t.ffn_hidden_size}); use tp in {divisors}"
        )
    if pp < 1 or t.num_layers % pp:
        ok = [d for d in range(1, t.num_layers + 1) if t.num_layers % d == 0]
        raise ValueError(f"pp={pp} must divide the number of LM layers ({t.num_layers}); use pp in {ok}")
