"""The ONE name/layout map between HF Qwen2.5-VL tensors and Megatron-Core tensors.

Used by conversion on disk (both directions), by the vLLM weight resync and by export.

Every Megatron tensor (one layer of a stacked `decoder.layers.*` key, or a global tensor) is the
concatenation, along one axis, of *segments*; a segment is a contiguous slice of one HF tensor
along that axis, or zero padding. That single description drives both directions exactly:
HF -> Megatron writes each segment at its destination offset; Megatron -> HF reads each segment
back to its source offset (padding is dropped). No tensor is ever transformed in any other way,
so the round trip is bit-identical by construction.

Transforms (the table below names one per tensor):
  copy        the HF tensor as is
  pad_vocab   rows padded with zeros to the padded vocabulary (multiple of 128)
  qkv_groups  LM q/k/v -> per query group g: [q heads of g; k_g; v_g]  (GQA)
  qkv_heads   vision fused [q|k|v] -> per head h: [q_h; k_h; v_h]
  gate_up     [gate; up] (megatron-core's fused SwiGLU fc1)
  gate_up_pad [gate; 0; up; 0], each half padded to the padded vision MLP size
  pad_cols    columns padded with zeros (vision fc2 input dim)
Megatron keys are those of `Qwen25VLModel.sharded_state_dict()` (TE-style names, layers stacked on
a leading axis; the local spec maps its layernorm names to these).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from checkpoints_conv.arch import padded_sizes

LM = "language_model"
VISION = "vision_model"

# (megatron suffix under decoder.layers., HF names under the layer, transform)
LM_LAYER = (
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv_groups"),
    ("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv_groups"),
    ("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), "copy"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), "copy"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)  # fmt: skip
VISION_LAYER = (
    ("self_attention.linear_qkv.weight", ("attn.qkv.weight",), "qkv_heads"),
    ("self_attention.linear_qkv.bias", ("attn.qkv.bias",), "qkv_heads"),
    ("self_attention.linear_qkv.layer_norm_weight", ("norm1.weight",), "copy"),
    ("self_attention.linear_proj.weight", ("attn.proj.weight",), "copy"),
    ("self_attention.linear_proj.bias", ("attn.proj.bias",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up_pad"),
    ("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), "gate_up_pad"),
    ("mlp.linear_fc1.layer_norm_weight", ("norm2.weight",), "copy"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "pad_cols"),
    ("mlp.linear_fc2.bias", ("mlp.down_proj.bias",), "copy"),
)  # fmt: skip
# (megatron key, HF name (canonical scheme), transform); lm_head only when embeddings are untied
GLOBAL = (
    (f"{LM}.embedding.word_embeddings.weight", "model.language_model.embed_tokens.weight", "pad_vocab"),
    (f"{LM}.decoder.final_layernorm.weight", "model.language_model.norm.weight", "copy"),
    (f"{LM}.output_layer.weight", "lm_head.weight", "pad_vocab"),
    (f"{VISION}.patch_embed.proj.weight", "model.visual.patch_embed.proj.weight", "copy"),
    (f"{VISION}.decoder.final_layernorm.weight", "model.visual.merger.ln_q.weight", "copy"),
    (f"{VISION}.projection.linear_fc1.weight", "model.visual.merger.mlp.0.weight", "copy"),
    (f"{VISION}.projection.linear_fc1.bias", "model.visual.merger.mlp.0.bias", "copy"),
    (f"{VISION}.projection.linear_fc2.weight", "model.visual.merger.mlp.2.weight", "copy"),
    (f"{VISION}.projection.linear_fc2.bias", "model.visual.merger.mlp.2.bias", "copy"),
)  # fmt: skip

HF_LM_LAYER = "model.language_model.layers.{i}."
HF_VISION_LAYER = "model.visual.blocks.{i}."


@dataclass(frozen=True)
class Segment:
    hf: Optional[str]
    """HF tensor name (canonical scheme), or None for zero padding."""
    src: int
    """Offset along `axis` in the HF tensor."""
    dst: int
    """Offset along `axis` in the Megatron tensor."""
    length: int


@dataclass(frozen=True)
class TensorPlan:
    """One Megatron tensor (one layer of a stacked key) as segments of HF tensors."""

    key: str
    """Megatron dist-checkpoint key."""
    layer: Optional[int]
    """Index on the leading (stacked layers) axis, None for unstacked keys."""
    num_layers: Optional[int]
    shape: tuple[int, ...]
    """Shape of this layer's tensor (without the stacked axis)."""
    axis: int
    segments: tuple[Segment, ...]

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.shape if self.layer is None else (self.num_layers, *self.shape)

    @property
    def hf_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.hf for s in self.segments if s.hf is not None))


def _concat(axis_len_of, names, axis=0):
    segs, off = [], 0
    for n in names:
        length = axis_len_of(n)
        segs.append(Segment(n, 0, off, length))
        off += length
    return segs, off


def _segments(transform: str, hf: tuple[str, ...], shapes: dict[str, tuple[int, ...]], arch):
    """(axis, segments, megatron shape) for one tensor."""
    pad = padded_sizes(arch)
    shp = shapes[hf[0]]
    if transform == "copy":
        return 0, [Segment(hf[0], 0, 0, shp[0])], shp
    if transform == "pad_vocab":
        rows = shp[0]
        segs = [Segment(hf[0], 0, 0, rows)]
        if pad.vocab > rows:
            segs.append(Segment(None, 0, rows, pad.vocab - rows))
        return 0, segs, (pad.vocab, *shp[1:])
    if transform == "qkv_groups":
        t = arch.text
        d, G = t.head_dim, t.num_kv_heads
        n = t.num_heads // G
        q, k, v = hf
        segs, off = [], 0
        for g in range(G):
            for name, src, length in ((q, g * n * d, n * d), (k, g * d, d), (v, g * d, d)):
                segs.append(Segment(name, src, off, length))
                off += length
        return 0, segs, (off, *shp[1:])
    if transform == "qkv_heads":
        H = arch.vision.num_heads
        d = arch.vision.hidden_size // H
        segs, off = [], 0
        for h in range(H):
            for part in range(3):
                segs.append(Segment(hf[0], part * H * d + h * d, off, d))
                off += d
        return 0, segs, (off, *shp[1:])
    if transform == "gate_up":
        segs, off = _concat(lambda n: shapes[n][0], hf)
        return 0, segs, (off, *shp[1:])
    if transform == "gate_up_pad":
        ffn, ffn_p = shp[0], pad.vision_ffn
        segs, off = [], 0
        for name in hf:
            segs.append(Segment(name, 0, off, ffn))
            if ffn_p > ffn:
                segs.append(Segment(None, 0, off + ffn, ffn_p - ffn))
            off += ffn_p
        return 0, segs, (off, *shp[1:])
    if transform == "pad_cols":
        cols, cols_p = shp[1], pad.vision_ffn
        segs = [Segment(hf[0], 0, 0, cols)]
        if cols_p > cols:
            segs.append(Segment(None, 0, cols, cols_p - cols))
        return 1, segs, (shp[0], cols_p)
    raise AssertionError(f"unknown transform {transform}")


def plan(arch, hf_shapes: dict[str, tuple[int, ...]]) -> Iterator[TensorPlan]:
    """All Megatron tensors of the model, in a streaming-friendly order (layer by layer).

    `hf_shapes` maps canonical HF names to shapes (from a safetensors header, or from the
    expected shapes for export)."""
    for key, hf, tr in GLOBAL:
        if hf == "lm_head.weight" and arch.text.tie_word_embeddings:
            continue
        axis, segs, shape = _segments(tr, (hf,), hf_shapes, arch)
        yield TensorPlan(key, None, None, tuple(shape), axis, tuple(segs))
    for prefix, table, hf_prefix, L in (
        (f"{LM}.decoder.layers.", LM_LAYER, HF_LM_LAYER, arch.text.num_layers),
        (f"{VISION}.decoder.layers.", VISION_LAYER, HF_VISION_LAYER, arch.vision.depth),
    ):
        for i in range(L):
            for suffix, hfs, tr in table:
                names = tuple(hf_prefix.format(i=i) + n for n in hfs)
                axis, segs, shape = _segments(tr, names, hf_shapes, arch)
                yield TensorPlan(prefix + suffix, i, L, tuple(shape), axis, tuple(segs))


def expected_hf_shapes(arch) -> dict[str, tuple[int, ...]]:
    """HF tensor shapes implied by the architecture (used to validate inputs and for export)."""
    t, v = arch.text, arch.vision
    d = t.head_dim
    vd = v.hidden_size // v.num_heads
    merged = v.hidden_size * v.spatial_merge_size**2
    s = {
        "model.language_model.embed_tokens.weight": (t.vocab_size, t.hidden_size),
        "model.language_model.norm.weight": (t.hidden_size,),
        "lm_head.weight": (t.vocab_size, t.hidden_size),
        "model.visual.patch_embed.proj.weight": (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        "model.visual.merger.ln_q.weight": (v.hidden_size,),
        "model.visual.merger.mlp.0.weight": (merged, merged),
        "model.visual.merger.mlp.0.bias": (merged,),
        "model.visual.merger.mlp.2.weight": (v.out_hidden_size, merged),
        "model.visual.merger.mlp.2.bias": (v.out_hidden_size,),
    }  # fmt: skip
    lm = {
        "self_attn.q_proj.weight": (t.num_heads * d, t.hidden_size), "self_attn.q_proj.bias": (t.num_heads * d,),
        "self_attn.k_proj.weight": (t.num_kv_heads * d, t.hidden_size), "self_attn.k_proj.bias": (t.num_kv_heads * d,),
        "self_attn.v_proj.weight": (t.num_kv_heads * d, t.hidden_size), "self_attn.v_proj.bias": (t.num_kv_heads * d,),
        "self_attn.o_proj.weight": (t.hidden_size, t.num_heads * d),
        "mlp.gate_proj.weight": (t.ffn_hidden_size, t.hidden_size), "mlp.up_proj.weight": (t.ffn_hidden_size, t.hidden_size),
        "mlp.down_proj.weight": (t.hidden_size, t.ffn_hidden_size),
        "input_layernorm.weight": (t.hidden_size,), "post_attention_layernorm.weight": (t.hidden_size,),
    }  # fmt: skip
    vis = {
        "attn.qkv.weight": (3 * v.hidden_size, v.hidden_size), "attn.qkv.bias": (3 * v.hidden_size,),
        "attn.proj.weight": (v.hidden_size, v.hidden_size), "attn.proj.bias": (v.hidden_size,),
        "mlp.gate_proj.weight": (v.intermediate_size, v.hidden_size), "mlp.gate_proj.bias": (v.intermediate_size,),
        "mlp.up_proj.weight": (v.intermediate_size, v.hidden_size), "mlp.up_proj.bias": (v.intermediate_size,),
        "mlp.down_proj.weight": (v.hidden_size, v.intermediate_size), "mlp.down_proj.bias": (v.hidden_size,),
        "norm1.weight": (v.hidden_size,), "norm2.weight": (v.hidden_size,),
    }  # fmt: skip
    assert vd * v.num_heads == v.hidden_size
    for i in range(t.num_layers):
        s.update({HF_LM_LAYER.format(i=i) + k: val for k, val in lm.items()})
    for i in range(v.depth):
        s.update({HF_VISION_LAYER.format(i=i) + k: val for k, val in vis.items()})
    if t.tie_word_embeddings:
        del s["lm_head.weight"]
    return s


def canonical_hf_name(name: str) -> str:
    """Map either HF key scheme to the canonical one (transformers >= 4.52 in-memory names):
    `model.language_model.*` / `model.visual.*` / `lm_head.*`; older files use `model.*` /
    `visual.*` / `lm_head.*`."""
    if name.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return name
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def group_of(p: TensorPlan) -> tuple:
    """Plans that share a group are produced together: one layer of the LM or the vision tower,
    or one global tensor. Every HF tensor comes from exactly one group."""
    return (p.key.split(".decoder.layers.")[0], p.layer) if p.layer is not None else ("global", p.key)


def unpack(plans: list[TensorPlan], megatron: dict[str, torch.Tensor], hf_shapes: dict[str, tuple[int, ...]],
           check_padding: bool = True) -> dict[str, torch.Tensor]:
    """HF tensors (canonical names) from full Megatron tensors of one group (`megatron[key]` is one
    layer's tensor, without the stacked axis). The inverse of `plan`; padding must be zero."""
    out: dict[str, torch.Tensor] = {}
    for p in plans:
        mt = megatron[p.key]
        for seg in p.segments:
            piece = mt.narrow(p.axis, seg.dst, seg.length)
            if seg.hf is None:
                if check_padding and torch.count_nonzero(piece):
                    raise ValueError(f"{p.key} (layer {p.layer}): the padding rows/columns are not zero, so "
                                     f"dropping them would change the model; this checkpoint was not trained by "
                                     f"megatron-vr1's model or is corrupt")
                continue
            if seg.hf not in out:
                out[seg.hf] = torch.empty(hf_shapes[seg.hf], dtype=mt.dtype)
            out[seg.hf].narrow(p.axis, seg.src, seg.length).copy_(piece)
    return out
