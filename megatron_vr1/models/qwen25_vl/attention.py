"""Core attention for the local (CPU) layer spec through torch's fused `scaled_dot_product_attention`.

megatron-core's local `DotProductAttention` materialises the scores [b * heads, sq, sk], fills the
masked ones with -10000, runs a separate softmax and a second batched matmul, and keeps the
probabilities for the backward pass. torch's SDPA computes the same attention in one fused,
blocked kernel on CPU (online softmax, no [sq, sk] probabilities kept), which for the tiny RL
step's packed rows (~300-token rows under a block-diagonal causal mask) is ~2x faster forward +
backward.

Same inputs, same meaning:
- `attention_mask`: boolean, True = masked out, broadcastable to [b, heads, sq, sk] (causal,
  padding, packed-row and vision-window masks alike); SDPA's boolean mask means the opposite
  (True = may attend), so it is inverted.
- No mask: causal when the module's mask type is causal (and sq > 1), else full (vision layers),
  as megatron's softmax decides (it ignores the per-call `attn_mask_type` too).
- Grouped-query attention: keys and values are repeated per query group, as megatron does.
Only a query that may attend to nothing differs: SDPA gives 0 there, megatron the mean of the
values. Such rows do not occur in our batches (every padding position sees itself) and are never
read.

Falls back to megatron's own path for what it does and SDPA does not: attention dropout while
training, query-key layer scaling (fp16), a softmax offset, sliding windows, packed-sequence
params. `tests/test_model.py` checks outputs and gradients against megatron's path.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    """`DotProductAttention` (local spec) whose math runs in `F.scaled_dot_product_attention`."""

    def _sdpa_ok(self, attention_bias, packed_seq_params) -> bool:
        c = self.config
        return (attention_bias is None and packed_seq_params is None and self.softmax_offset is None
                and not c.apply_query_key_layer_scaling and self.scale_mask_softmax.window_size is None
                and not (self.training and self.attention_dropout.p > 0))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if not self._sdpa_ok(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        sq = query.size(0)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if attention_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale)
        else:
            causal = self.attn_mask_type == AttnMaskType.causal and sq > 1  # as megatron's softmax decides
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.softmax_scale)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, query.size(1), self.hidden_size_per_partition)
