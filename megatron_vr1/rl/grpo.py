"""GRPO math as pure functions (no torch.distributed, no megatron-core).

Shapes are in the names: B sequences (prompts x group size G), T response tokens, P prompts.

Deviations from the Vision-R1 paper (arXiv 2503.06749), which publishes GRPO with the HFRRF reward,
clip 0.2 and a k3 KL (beta 1e-2) but no loss-aggregation or std details:
- advantage std is the unbiased sample std of the group (as in torch.std, verl and EasyR1), with
  eps = 1e-6 added to the std; Dr.GRPO (no std division) is `scale="none"`;
- the KL term is the k3 estimator pi_ref/pi - log(pi_ref/pi) - 1 per token, added to the loss;
- the loss is averaged over all response tokens of the *global* batch (`token-mean`): each
  micro-batch divides its token sum by the global token count, so gradient accumulation over
  micro-batches and data-parallel ranks reproduces one big batch exactly;
  `seq-mean-token-mean` (mean per sequence, then over sequences) is an option;
- clipping has separate low/high epsilons (clip-higher when high > low);
- optional truncated importance sampling (TIS) corrects for the rollout engine's logprobs
  differing from the trainer's old logprobs: per-token weight min(exp(old - engine), cap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch


def group_advantages(rewards_B: torch.Tensor, group_size: int, scale: Literal["std", "none"] = "std",
                     eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps), or r - mean_group for Dr.GRPO. Groups are contiguous:
    rows [g*G, (g+1)*G) are the G samples of prompt g. A group with equal rewards gets 0."""
    if rewards_B.numel() % group_size:
        raise ValueError(f"{rewards_B.numel()} rewards are not a whole number of groups of {group_size}")
    r_PG = rewards_B.double().view(-1, group_size)
    adv_PG = r_PG - r_PG.mean(dim=1, keepdim=True)
    if scale == "std":
        std_P1 = r_PG.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r_PG[:, :1])
        adv_PG = adv_PG / (std_P1 + eps)
    elif scale != "none":
        raise ValueError(f"scale={scale!r}; use 'std' (GRPO) or 'none' (Dr.GRPO)")
    return adv_PG.view(-1).to(rewards_B.dtype if rewards_B.is_floating_point() else torch.float32)


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp_BT - logp_BT
    return torch.exp(d) - d - 1.0


@dataclass
class PolicyLossTerms:
    loss: torch.Tensor
    """Scalar: this micro-batch's share of the global-batch loss."""
    pg_loss: torch.Tensor
    kl: torch.Tensor
    clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    tokens: torch.Tensor


def aggregate(x_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, global_tokens: float,
              global_seqs: float) -> torch.Tensor:
    """This micro-batch's contribution to the global mean (sum over micro-batches = global mean)."""
    m = mask_BT.to(x_BT.dtype)
    if mode == "token-mean":
        return (x_BT * m).sum() / global_tokens
    if mode == "seq-mean-token-mean":
        per_seq = (x_BT * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return per_seq.sum() / global_seqs
    raise ValueError(f"loss aggregation {mode!r}; use 'token-mean' or 'seq-mean-token-mean'")


def policy_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_B: torch.Tensor, mask_BT: torch.Tensor,
                *, clip_low: float, clip_high: float, kl_beta: float = 0.0,
                ref_logp_BT: Optional[torch.Tensor] = None, engine_logp_BT: Optional[torch.Tensor] = None,
                tis_cap: Optional[float] = None, agg: str = "token-mean",
                global_tokens: Optional[float] = None, global_seqs: Optional[float] = None) -> PolicyLossTerms:
    """Clipped surrogate + beta * k3 KL, aggregated over the global batch.

    ratio = exp(logp - old_logp); per token: -min(ratio * A, clip(ratio, 1-low, 1+high) * A).
    With `tis_cap`, each token's term is multiplied by min(exp(old_logp - engine_logp), cap)
    (no gradient through the weight).
    """
    mask = mask_BT.to(logp_BT.dtype)
    gt = float(global_tokens) if global_tokens is not None else float(mask.sum().clamp(min=1))
    gs = float(global_seqs) if global_seqs is not None else float(mask_BT.shape[0])
    ratio = torch.exp(logp_BT - old_logp_BT)
    adv = adv_B.to(logp_BT.dtype)[:, None]
    surr = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    pg_tok = -torch.minimum(surr, clipped)
    if tis_cap is not None:
        if engine_logp_BT is None:
            raise ValueError("tis_cap needs the engine's logprobs")
        pg_tok = pg_tok * torch.exp(old_logp_BT - engine_logp_BT).clamp(max=tis_cap).detach()
    pg = aggregate(pg_tok, mask, agg, gt, gs)
    kl = torch.zeros((), dtype=logp_BT.dtype)
    if ref_logp_BT is not None:
        kl = aggregate(kl_k3(logp_BT, ref_logp_BT), mask, agg, gt, gs)
    loss = pg + kl_beta * kl
    with torch.no_grad():
        clip_frac = aggregate((clipped < surr).to(logp_BT.dtype), mask, agg, gt, gs)  # clipping is active
        ratio_mean = aggregate(ratio, mask, agg, gt, gs)
    return PolicyLossTerms(loss, pg.detach(), kl.detach(), clip_frac, ratio_mean, mask.sum())


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, vocab_size: Optional[int] = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target]; logits beyond `vocab_size` (padding) are excluded."""
    if vocab_size is not None:
        logits_BTV = logits_BTV[..., :vocab_size]
    logits = logits_BTV.float() / temperature
    return torch.gather(torch.log_softmax(logits, dim=-1), -1, targets_BT[..., None]).squeeze(-1)


def entropy(logits_BTV: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token entropy of softmax(logits) (logged, not optimised)."""
    if vocab_size is not None:
        logits_BTV = logits_BTV[..., :vocab_size]
    logp = torch.log_softmax(logits_BTV.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
