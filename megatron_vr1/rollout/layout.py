"""The rollout engine's layout: which tensor parallelism the vLLM engine runs at, and whether the
model can be split that way, checked before anything loads.

The rollout TP `t` is `rollout.tensor_parallel_size`, or `parallel.tp` when that is null. The
world's ranks form `world / t` engine replicas of `t` consecutive global ranks each (see
`rollout/replicas.py`). vLLM splits these sizes of Qwen2.5-VL across its TP ranks and asserts, deep
inside model construction, that each divides (read from vLLM 0.32's qwen2 / qwen2_5_vl modules):

- language model: attention heads, the FFN size (gate/up column split, down row split); KV heads
  either divide by `t` or, with fewer KV heads than ranks, `t` divides by them (vLLM replicates),
- vision tower: attention heads, the MLP size as the HF config states it (vLLM reads the unpadded
  size: the trainer pads the 7B's 3420 to 3456, vLLM does not), and the merger's input width
  (vision hidden size x spatial_merge_size^2).
The vocabulary is padded by vLLM itself, so it sets no condition.
"""

from __future__ import annotations

from dataclasses import dataclass


def rollout_tp(cfg) -> int:
    """The rollout engine's tensor parallelism: rollout.tensor_parallel_size, else parallel.tp."""
    return int(cfg.rollout.tensor_parallel_size or cfg.parallel.tp)


@dataclass(frozen=True)
class SplitSize:
    what: str
    """Which size, in words (as the error names it)."""
    size: int
    replicate_ok: bool = False
    """True for KV heads: `t` may also be a multiple of the size (vLLM replicates the heads)."""

    def accepts(self, tp: int) -> bool:
        return self.size % tp == 0 or (self.replicate_ok and tp % self.size == 0)


def split_sizes(arch) -> list[SplitSize]:
    """The sizes vLLM splits over its tensor-parallel ranks, for `arch` (an HFArch)."""
    t, v = arch.text, arch.vision
    return [
        SplitSize("attention heads", t.num_heads),
        SplitSize("KV heads", t.num_kv_heads, replicate_ok=True),
        SplitSize("FFN size (intermediate_size)", t.ffn_hidden_size),
        SplitSize("vision attention heads (vision_config.num_heads)", v.num_heads),
        SplitSize("vision MLP size (vision_config.intermediate_size, as in the HF config)", v.intermediate_size),
        SplitSize("vision merger width (vision hidden x spatial_merge_size^2)",
                  v.hidden_size * v.spatial_merge_size ** 2),
    ]


def valid_rollout_tps(arch, limit: int = 64) -> list[int]:
    """Every rollout TP up to `limit` that vLLM can split `arch` at."""
    sizes = split_sizes(arch)
    return [tp for tp in range(1, limit + 1) if all(s.accepts(tp) for s in sizes)]


def check_rollout_tp(arch, tp: int, key: str = "rollout.tensor_parallel_size") -> None:
    """Raises ValueError when vLLM cannot split `arch` at tensor parallelism `tp`, naming the first
    size that does not divide and the TPs that work."""
    if tp < 1:
        raise ValueError(f"{key} ({tp}) must be >= 1")
    for s in split_sizes(arch):
        if not s.accepts(tp):
            ok = valid_rollout_tps(arch, max(8, tp))
            kv = " (or be a multiple of it)" if s.replicate_ok else ""
            tiny = " (the tiny model: `megatron-vr1 tiny-model --tp-friendly`)" if arch.text.hidden_size <= 256 else ""
            raise ValueError(
                f"the rollout engine's tensor parallelism ({key} = {tp}) must divide the {s.what} "
                f"({s.size}){kv} of model.hf_path={arch.path}: vLLM splits it over its TP ranks; "
                f"use a rollout TP in {{{','.join(map(str, ok))}}} (rollout.tensor_parallel_size; null follows "
                f"parallel.tp) or a model whose sizes divide by {tp}{tiny}"
            )


def check_world(world: int, tp: int) -> int:
    """Number of engine replicas of `world` ranks at rollout TP `tp`; ValueError when `tp` does not divide it."""
    if world % tp:
        raise ValueError(f"the rollout engine's tensor parallelism ({tp}) must divide the number of ranks "
                         f"({world}): each engine replica spans {tp} consecutive ranks")
    return world // tp
