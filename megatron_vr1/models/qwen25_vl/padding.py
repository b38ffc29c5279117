"""Megatron-side padded sizes and parallel-layout checks of Qwen2.5-VL; a function of the HF config only, never of TP,
so a distributed checkpoint loads at any TP/PP (shared by the model and `checkpoints_conv`)."""

from __future__ import annotations

from dataclasses import dataclass

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


def padded_sizes(arch) -> PaddedSizes:
    return PaddedSizes(
        vocab=round_up(arch.text.vocab_size, VOCAB_PAD_MULTIPLE),
        vision_ffn=round_up(arch.vision.intermediate_size, VISION_FFN_PAD_MULTIPLE),
    )


def check_parallel_fits(arch, tp: int, pp: int) -> None:
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
