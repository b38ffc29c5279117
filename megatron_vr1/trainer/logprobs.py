"""Per-token logprobs and entropy from vocabulary-parallel logits, without gathering them.

With tensor parallelism each rank's output layer holds a slice of the (padded) vocabulary, so the
last stage's logits are [B, T, V/tp] per rank. Gathering them costs B*T*V floats per rank (at
16K tokens x 152K vocabulary that is ~10 GB in fp32) for a result of B*T numbers. Instead each
rank works on its slice and the TP group all-reduces three [B, T] tensors: the max logit, the sum
of exponentials and the target's logit. At TP=1 the same code runs with no communication and equals
`grpo.token_logprobs` on the full logits.

Padded vocabulary columns (ids >= the tokenizer's vocab_size, see checkpoints_conv/arch.py)
are excluded: they are set to -inf before the softmax, so they get probability 0 and zero gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _local_logits(logits_BTv: torch.Tensor, vocab_size: Optional[int], temperature: float, group):
    """fp32 logits/temperature of this rank's slice with padded columns at -inf, and its first id."""
    rank = dist.get_rank(group) if _group_size(group) > 1 else 0
    width = logits_BTv.shape[-1]
    start = rank * width
    logits = logits_BTv.float() / temperature
    if vocab_size is not None and start + width > vocab_size:
        logits = logits.clone()
        logits[..., max(vocab_size - start, 0):] = float("-inf")
    return logits, start


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_BTv, targets_BT, vocab_size, temperature, group):
        logits, start = _local_logits(logits_BTv, vocab_size, temperature, group)
        width = logits.shape[-1]
        mx = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
        exp = torch.exp(logits - mx[..., None])
        sum_exp = _all_reduce(exp.sum(dim=-1), dist.ReduceOp.SUM, group)
        local_t = targets_BT - start
        mine = (local_t >= 0) & (local_t < width)
        idx = torch.where(mine, local_t, torch.zeros_like(local_t))
        tgt = torch.gather(logits, -1, idx[..., None]).squeeze(-1)
        tgt = _all_reduce(torch.where(mine, tgt, torch.zeros_like(tgt)), dist.ReduceOp.SUM, group)
        logp = tgt - mx - torch.log(sum_exp)
        exp.div_(sum_exp[..., None])  # softmax of this slice, kept for backward
        ctx.save_for_backward(exp, idx, mine)
        ctx.temperature = temperature
        ctx.in_dtype = logits_BTv.dtype
        return logp

    @staticmethod
    def backward(ctx, grad_BT):
        # d logp / d logit_j = ([j == target] - p_j) / temperature, for this rank's columns j
        probs, idx, mine = ctx.saved_tensors
        grad = probs.neg()
        grad.scatter_add_(-1, idx[..., None], mine[..., None].to(grad.dtype))
        grad.mul_((grad_BT / ctx.temperature)[..., None])
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_logprobs(logits_BTv: torch.Tensor, targets_BT: torch.Tensor, vocab_size: Optional[int] = None,
                            temperature: float = 1.0, group=None) -> torch.Tensor:
    """log softmax(logits / temperature)[target] over the whole vocabulary, shape [B, T], fp32.

    logits_BTv: this rank's vocabulary slice (rank r holds ids [r*v, (r+1)*v)) of the TP `group`;
    targets_BT: global token ids; ids >= vocab_size are padding and excluded. Differentiable."""
    return _VocabParallelLogprob.apply(logits_BTv, targets_BT, vocab_size, temperature, group)


def _entropy_parts(logits_BTv: torch.Tensor, vocab_size: Optional[int], group):
    """(shifted logits z - max, sum of exponentials, entropy H = logsumexp(z) - sum_j p_j z_j), each
    sum all-reduced over the TP group."""
    logits, _ = _local_logits(logits_BTv, vocab_size, 1.0, group)
    mx = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
    shifted = logits - mx[..., None]
    exp = torch.exp(shifted)
    sum_exp = _all_reduce(exp.sum(dim=-1), dist.ReduceOp.SUM, group)
    # padded columns: exp = 0 and shifted = -inf; 0 * -inf is nan, so zero them explicitly
    weighted = torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(dim=-1)
    weighted = _all_reduce(weighted, dist.ReduceOp.SUM, group)
    return shifted, sum_exp, torch.log(sum_exp) - weighted / sum_exp


@torch.no_grad()
def vocab_parallel_entropy(logits_BTv: torch.Tensor, vocab_size: Optional[int] = None, group=None) -> torch.Tensor:
    """Entropy of softmax(logits) over the whole vocabulary, shape [B, T] (logged, not optimised)."""
    return _entropy_parts(logits_BTv, vocab_size, group)[2]


class _VocabParallelEntropyWithGrad(torch.autograd.Function):
    """Entropy of softmax(logits) over the whole vocabulary from this rank's slice, [B, T] fp32,
    with the gradient dH/dz_j = -p_j (log p_j + H) on this rank's columns (padding columns: 0)."""

    @staticmethod
    def forward(ctx, logits_BTv, vocab_size, group):
        shifted, sum_exp, ent = _entropy_parts(logits_BTv, vocab_size, group)
        # log p_j = shifted_j - log(sum_exp); reuse `shifted` as log p to hold one [B, T, v] tensor
        logp = shifted.sub_(torch.log(sum_exp)[..., None])
        ctx.save_for_backward(logp, ent)
        ctx.in_dtype = logits_BTv.dtype
        return ent

    @staticmethod
    def backward(ctx, grad_BT):
        logp, ent = ctx.saved_tensors
        p = torch.exp(logp)
        term = torch.where(p > 0, p * (logp + ent[..., None]), torch.zeros_like(p))
        return (term.neg_() * grad_BT[..., None]).to(ctx.in_dtype), None, None


def vocab_parallel_entropy_with_grad(logits_BTv: torch.Tensor, vocab_size: Optional[int] = None,
                                     group=None) -> torch.Tensor:
    """`vocab_parallel_entropy` with a gradient to this rank's logits slice (for the entropy bonus)."""
    return _VocabParallelEntropyWithGrad.apply(logits_BTv, vocab_size, group)


def tp_group():
    """The tensor-parallel group of megatron-core's parallel state (None when not initialised)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
