"""Qwen2.5-VL on Megatron-Core: vision tower (window attention), merger, GPTModel with mrope.

Built from the HF `config.json` (via `megatron_vr1.config.load_hf_arch`); nothing about the
architecture is restated in YAML.

Layout decisions (all shared with `checkpoints_conv/` through `padded_sizes`):
- The LM vocabulary is padded to a multiple of 128 (`VOCAB_PAD_MULTIPLE`); the padded rows are
  zero and their logits must be excluded (sliced off, or -inf in a vocab-parallel loss): the
  engine and HF see the unpadded vocabulary.
- The vision MLP intermediate size is padded with zero rows/columns to a multiple of 64
  (`VISION_FFN_PAD_MULTIPLE`): 3420 (7B) -> 3456, divisible by TP 1..64. A zero gate/up row
  gives silu(0) * 0 = 0 and its down column is zero, so the output is unchanged, and its
  gradients are exactly zero, so it stays zero through training. Padding depends only on the
  HF config, never on TP, so a distributed checkpoint loads at any TP/PP.
- The vision tower and merger live on the first pipeline stage, split over the same TP group
  as the LM (vision heads must be divisible by TP).
- Window attention: on the local (CPU) spec each layer gets a boolean block-diagonal mask
  (windows, or whole images for the full-attention layers); on the Transformer Engine spec the
  same cut is given as THD `PackedSeqParams` (cu_seqlens per window / per image).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_vr1 import platform

platform.setup()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.mlp import MLP, MLPSubmodules  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlock  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from checkpoints_conv.arch import (  # noqa: E402
    VISION_FFN_PAD_MULTIPLE, VOCAB_PAD_MULTIPLE, PaddedSizes, check_parallel_fits, padded_sizes,
)
from megatron_vr1.models.qwen25_vl.attention import SDPADotProductAttention  # noqa: E402
from megatron_vr1.models.qwen25_vl.windows import vision_windows  # noqa: E402

def te_available() -> bool:
    if not platform.on_cuda():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class ModelOptions:
    """How to build the model (not what it is: that comes from the HF config)."""

    tp: int = 1
    pp: int = 1
    params_dtype: torch.dtype = torch.float32
    sequence_parallel: bool = False
    use_te: Optional[bool] = None
    """None: Transformer Engine when importable on CUDA, local megatron-core layers otherwise."""
    fp8: Optional[str] = None
    """None, "hybrid" or "e4m3" (Transformer Engine only)."""
    fp8_recipe: str = "delayed"
    freeze_vision: bool = False
    """Freeze the vision tower and the merger (cold-start SFT default)."""
    recompute: bool = False
    """Recompute each transformer layer's activations in the backward pass (full, uniform, 1 layer)."""

    @classmethod
    def from_config(cls, cfg) -> "ModelOptions":
        """The options a recipe (megatron_vr1.config.Config) asks for: its parallel and model sections."""
        return cls(tp=cfg.parallel.tp, pp=cfg.parallel.pp, params_dtype=getattr(torch, cfg.model.params_dtype),
                   sequence_parallel=cfg.parallel.sequence_parallel, fp8=cfg.model.fp8,
                   fp8_recipe=cfg.model.fp8_recipe, freeze_vision=cfg.model.freeze_vision,
                   recompute=cfg.parallel.recompute)


def _common_config(opts: ModelOptions) -> dict:
    cuda = platform.on_cuda()
    return dict(
        tensor_model_parallel_size=opts.tp,
        pipeline_model_parallel_size=opts.pp,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=opts.params_dtype,
        pipeline_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16,
        fp16=opts.params_dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        # fusions need CUDA kernels; the CPU path runs the plain torch versions
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        use_cpu_initialization=not cuda,
        batch_p2p_comm=cuda,
        deallocate_pipeline_outputs=False,
        recompute_granularity="full" if opts.recompute else None,
        recompute_method="uniform" if opts.recompute else None,
        recompute_num_layers=1 if opts.recompute else None,
    )


def build_configs(arch, opts: ModelOptions) -> tuple[TransformerConfig, TransformerConfig, TransformerConfig]:
    """(language model, vision tower, merger) TransformerConfigs from the HF architecture."""
    check_parallel_fits(arch, opts.tp, opts.pp)
    t, v = arch.text, arch.vision
    common = _common_config(opts)
    fp8 = dict(fp8=opts.fp8, fp8_recipe=opts.fp8_recipe) if opts.fp8 else {}
    lm = TransformerConfig(
        num_layers=t.num_layers,
        hidden_size=t.hidden_size,
        num_attention_heads=t.num_heads,
        num_query_groups=t.num_kv_heads,
        kv_channels=t.head_dim,
        ffn_hidden_size=t.ffn_hidden_size,
        layernorm_epsilon=t.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        mrope_section=list(t.mrope_section),
        **fp8,
        **common,
    )
    vcommon = dict(common, pipeline_model_parallel_size=1, sequence_parallel=False)
    vision = TransformerConfig(
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads,
        kv_channels=v.hidden_size // v.num_heads,
        ffn_hidden_size=padded_sizes(arch).vision_ffn,
        layernorm_epsilon=1e-6,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        **vcommon,
    )
    merged = v.hidden_size * v.spatial_merge_size**2
    proj = TransformerConfig(
        num_layers=1,
        hidden_size=v.out_hidden_size,
        num_attention_heads=v.num_heads,
        ffn_hidden_size=merged,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        **vcommon,
    )
    return lm, vision, proj


def layer_spec(use_te: bool, fp8: Optional[str] = None) -> ModuleSpec:
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    # local spec: megatron's DotProductAttention math through torch's fused SDPA (attention.py)
    spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    return spec


def vision_layer_spec(use_te: bool) -> ModuleSpec:
    """The LM layer spec with bidirectional attention: an explicit mask (local) or THD windows (TE)."""
    spec = copy.deepcopy(layer_spec(use_te))
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params or {}, attn_mask_type=AttnMaskType.padding if use_te else AttnMaskType.arbitrary)
    return spec


class PatchEmbed(nn.Module):
    """Conv3d patch embedding (kernel = stride = [temporal_patch, patch, patch], no bias)."""

    def __init__(self, v, dtype):
        super().__init__()
        self.in_channels, self.tp, self.p = v.in_channels, v.temporal_patch_size, v.patch_size
        k = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = nn.Conv3d(v.in_channels, v.hidden_size, kernel_size=k, stride=k, bias=False, dtype=dtype)

    def forward(self, pixel_values_PC: torch.Tensor) -> torch.Tensor:
        x = pixel_values_PC.view(-1, self.in_channels, self.tp, self.p, self.p).to(self.proj.weight.dtype)
        return self.proj(x).flatten(1)


class VisionBlock(TransformerBlock):
    """TransformerBlock whose layers each get their own attention cut (window or full)."""

    def forward(self, hidden_states, attention_masks, rotary_pos_emb, packed_seq_params=None):  # noqa: D102
        """`attention_masks[i]`: a boolean mask for layer i, or an int n: the patches form equal
        segments of n (images or windows of one size), run as a batch of segments without a mask."""
        for i, layer in enumerate(self.layers):
            mask = attention_masks[i] if attention_masks is not None else None
            psp = packed_seq_params[i] if packed_seq_params is not None else None
            if isinstance(mask, int):
                P, _, h = hidden_states.shape
                seg = hidden_states.reshape(P // mask, mask, h).transpose(0, 1).contiguous()  # [n, segments, h]
                rot = rotary_pos_emb.reshape(P // mask, mask, 1, -1).transpose(0, 1)
                seg, _ = layer(seg, attention_mask=None, rotary_pos_emb=rot)
                hidden_states = seg.transpose(0, 1).reshape(P, 1, h)
                continue
            hidden_states, _ = layer(hidden_states, attention_mask=mask, rotary_pos_emb=rotary_pos_emb,
                                     packed_seq_params=psp)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states


class VisionTower(MegatronModule):
    """Patch embed -> 2D rotary -> blocks (window / full attention) -> merger. Output [tokens, lm_hidden]."""

    def __init__(self, arch, vision_cfg: TransformerConfig, proj_cfg: TransformerConfig, use_te: bool):
        super().__init__(config=vision_cfg)
        v = arch.vision
        self.arch_v = v
        self.use_te = use_te
        self.batch_segments = True
        """Local spec: run equal-length attention segments as a batch (False: always one masked sequence)."""
        self.patch_embed = PatchEmbed(v, vision_cfg.params_dtype)
        head_dim = v.hidden_size // v.num_heads
        spatial = head_dim // 2
        inv = 1.0 / (v.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))
        self.register_buffer("inv_freq", inv, persistent=False)
        # final_layernorm is the merger's ln_q (applied per patch before the 2x2 merge)
        self.decoder = VisionBlock(config=vision_cfg, spec=vision_layer_spec(use_te), post_layer_norm=True,
                                   pre_process=True, post_process=True)
        self.projection = MLP(
            config=proj_cfg,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            input_size=proj_cfg.ffn_hidden_size,
        )

    def forward(self, pixel_values_PC: torch.Tensor, grid_thw_N3: torch.Tensor) -> torch.Tensor:
        v = self.arch_v
        m2 = v.spatial_merge_size**2
        win = vision_windows(grid_thw_N3, v.spatial_merge_size, v.window_size, v.patch_size)
        x = self.patch_embed(pixel_values_PC)  # [P, hidden]
        P = x.shape[0]
        # reorder patches window by window (merge units stay contiguous)
        x = x.view(P // m2, m2, -1)[win.unit_order].reshape(P, -1)
        hw = win.hw_pos_P2[win.patch_order].float()
        freqs = torch.cat([hw[:, :1] * self.inv_freq, hw[:, 1:] * self.inv_freq], dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [P, 1, 1, head_dim]
        full = set(v.fullatt_block_indexes)
        if self.use_te:
            def psp(cu):
                cu = cu.to(torch.int32).to(x.device)
                mx = int((cu[1:] - cu[:-1]).max())
                return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                       max_seqlen_q=mx, max_seqlen_kv=mx)
            cuts = [psp(win.cu_images if i in full else win.cu_windows) for i in range(v.depth)]
            masks = None
            hidden = x[:, None, :]  # THD: [T, 1, h]
        else:
            # local spec: a layer whose attention segments (images / windows) all have one length
            # runs them as a batch without a mask (attention work of the segments alone); other
            # layers get a block-diagonal mask over all patches
            def cut(cu):
                n = _equal_segments(cu)
                return n if n is not None and self.batch_segments else _block_mask(cu, P, x.device)
            m_full, m_win = cut(win.cu_images), cut(win.cu_windows)
            masks = [m_full if i in full else m_win for i in range(v.depth)]
            cuts = None
            hidden = x[:, None, :]  # [s, b=1, h]
        hidden = self.decoder(hidden, masks, freqs, cuts)  # [P, 1, h], ln_q applied
        merged = hidden.reshape(P // m2, -1)
        out, bias = self.projection(merged)
        if bias is not None:
            out = out + bias
        return out[win.unit_order_inverse]


def _equal_segments(cu: torch.Tensor) -> Optional[int]:
    """The common length of the segments [cu[i], cu[i+1]) when they all have one (and there are
    several), else None."""
    lengths = (cu[1:] - cu[:-1]).unique()
    return int(lengths[0]) if len(cu) > 2 and lengths.numel() == 1 else None


def _block_mask(cu: torch.Tensor, n: int, device) -> torch.Tensor:
    """Boolean [1, 1, n, n] mask, True = masked out, attending only within [cu[i], cu[i+1])."""
    seg = torch.zeros(n, dtype=torch.long, device=device)
    cu = cu.tolist()
    for i in range(len(cu) - 1):
        seg[cu[i]:cu[i + 1]] = i
    return (seg[:, None] != seg[None, :])[None, None]


@dataclass
class VLInputs:
    """One model call. Shapes: B batch, S tokens, P patches, N images."""

    input_ids_BS: torch.Tensor
    position_ids_3BS: torch.Tensor
    attention_mask: torch.Tensor
    """Boolean [B, 1, S, S], True = masked out (causal + padding)."""
    pixel_values_PC: Optional[torch.Tensor] = None
    image_grid_thw_N3: Optional[torch.Tensor] = None
    image_features_TH: Optional[torch.Tensor] = None
    """The merger's output for these images, computed earlier (a frozen vision tower: once per RL
    step for all passes); None: computed from pixel_values_PC in the forward."""


class Qwen25VLModel(MegatronModule):
    """The policy: vision tower + merger on the first stage, a GPTModel with mrope across stages."""

    def __init__(self, arch, opts: ModelOptions, pre_process: bool = True, post_process: bool = True,
                 parallel_output: bool = True):
        lm_cfg, vision_cfg, proj_cfg = build_configs(arch, opts)
        super().__init__(config=lm_cfg)
        self.model_type = ModelType.encoder_or_decoder
        use_te = te_available() if opts.use_te is None else opts.use_te
        if opts.fp8 and not use_te:
            raise ValueError(f"model.fp8={opts.fp8!r} needs Transformer Engine on a GPU; set model.fp8=null")
        self.arch = arch
        # TE's fused attention applies the causal mask only and ignores an explicit one: right
        # padding is still exact, but block-diagonal masks of packed rows are not honoured
        self.causal_mask_only = use_te
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size = arch.text.vocab_size
        self.image_token_id = arch.image_token_id
        self.share_embeddings_and_output_weights = bool(arch.text.tie_word_embeddings)
        self.vision_model = VisionTower(arch, vision_cfg, proj_cfg, use_te) if pre_process else None
        self.language_model = GPTModel(
            config=lm_cfg,
            transformer_layer_spec=layer_spec(use_te, opts.fp8),
            vocab_size=padded_sizes(arch).vocab,
            max_sequence_length=arch.text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type="mrope",
            rotary_base=int(arch.text.rope_theta),
        )
        if opts.freeze_vision and self.vision_model is not None:
            for p in self.vision_model.parameters():
                p.requires_grad_(False)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def embed(self, inp: VLInputs) -> torch.Tensor:
        """Token embeddings with image features placed at the image-pad tokens; [S, B, h]."""
        emb_SBH = self.language_model.embedding(input_ids=inp.input_ids_BS, position_ids=None)
        is_img_BS = inp.input_ids_BS == self.image_token_id
        n_tok = int(is_img_BS.sum())
        if inp.pixel_values_PC is None:
            if n_tok:
                raise ValueError(f"input has {n_tok} image tokens but no pixel_values")
            return emb_SBH
        if inp.image_features_TH is not None:
            feats = inp.image_features_TH.to(emb_SBH.dtype)
        else:
            feats = self.vision_model(inp.pixel_values_PC, inp.image_grid_thw_N3).to(emb_SBH.dtype)
        if feats.shape[0] != n_tok:
            raise ValueError(
                f"image features ({feats.shape[0]}) and image tokens ({n_tok}) do not match: each image "
                f"needs t*h*w/{self.arch.vision.spatial_merge_size ** 2} <|image_pad|> tokens"
            )
        emb_BSH = emb_SBH.transpose(0, 1).masked_scatter(is_img_BS[..., None], feats)
        return emb_BSH.transpose(0, 1).contiguous()

    def forward(self, inp: VLInputs, labels: Optional[torch.Tensor] = None):
        """Logits [B, S, vocab(/TP when parallel_output)] on the last stage, hidden states elsewhere."""
        decoder_input = self.embed(inp) if self.pre_process else None
        return self.language_model(
            input_ids=None,
            position_ids=inp.position_ids_3BS,
            attention_mask=inp.attention_mask,
            decoder_input=decoder_input,
            labels=labels,
        )


def causal_padding_mask(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S] (True = masked) from a [B, S] 0/1 padding mask: causal, and no key padding."""
    B, S = attention_mask_BS.shape
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    pad_keys = ~attention_mask_BS.bool()[:, None, None, :]
    return causal[None, None] | pad_keys


def build_model(arch, opts: ModelOptions, parallel_output: bool = True) -> Qwen25VLModel:
    """The model chunk for this pipeline rank (model-parallel state must be initialized)."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    return Qwen25VLModel(arch, opts, pre_process=pp_rank == 0, post_process=pp_rank == pp_size - 1,
                         parallel_output=parallel_output)


__all__ = [
    "ModelOptions", "Qwen25VLModel", "VLInputs", "build_model", "build_configs", "causal_padding_mask",
    "check_parallel_fits", "padded_sizes", "PaddedSizes", "VOCAB_PAD_MULTIPLE", "VISION_FFN_PAD_MULTIPLE",
]
