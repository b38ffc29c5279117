"""GRPO math as pure functions (no torch.distributed, no megatron-core).

Shapes are in the names: B sequences (prompts x group size G), T response tokens, P prompts.

Deviations from the Vision-R1 paper (arXiv 2503.06749), which publishes GRPO with the HFRRF reward,
clip 0.2 and a k3 KL (beta 1e-2) but no loss-aggregation or std details:
- advantage std is the unbiased sample std of the group (as in torch.std, verl and EasyR1), with
  eps = 1e-6 added to the std; Dr.GRPO (no std division) is `scale="none"`;
- the KL term is a per-token estimator of KL(pi || pi_ref), added to the loss (`kl_per_token`).
  With r = pi_ref / pi: k1 = -log r, k2 = (log r)^2 / 2, k3 = r - log r - 1 (Schulman's
  estimators); the default is k3, as in the paper;
- the loss is averaged over all response tokens of the *global* batch (`token-mean`): each
  micro-batch divides its token sum by the global token count, so gradient accumulation over
  micro-batches and data-parallel ranks reproduces one big batch exactly;
  `seq-mean-token-mean` (mean per sequence, then over sequences) is an option;
- clipping has separate low/high epsilons (clip-higher when high > low);
- optional truncated importance sampling (TIS) corrects for the rollout engine's logprobs
  differing from the trainer's old logprobs: per-token weight min(exp(old - engine), cap).

Options beyond the paper, all off by default (the defaults reproduce plain GRPO with a k3 KL):
- entropy bonus: the loss subtracts `entropy_coef` x the aggregated token entropy (default 0);
- dynamic sampling (DAPO, arXiv 2503.14476): `informative_groups` flags the groups whose rewards
  are not all equal; the others have zero advantage and can be dropped and refilled;
- soft overlong punishment (DAPO): `overlong_penalty` is a reward term that falls linearly from 0
  to -penalty over the last `buffer` tokens before the length cap (buffer 0: off);
- truncated-response masking (DAPO's overlong filtering): `truncation_mask` is 0 for responses cut
  at the length cap, to zero their loss mask.
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


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's logprobs (tokens drawn from pi).

    k1 = logp - ref (unbiased, can be negative); k2 = (logp - ref)^2 / 2 (>= 0, biased, low variance);
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0)."""
    if estimator == "k3":
        return kl_k3(logp_BT, ref_logp_BT)
    if estimator == "k1":
        return logp_BT - ref_logp_BT
    if estimator == "k2":
        return 0.5 * (logp_BT - ref_logp_BT) ** 2
    raise ValueError(f"kl_estimator={estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")


@dataclass
class PolicyLossTerms:
    loss: torch.Tensor
    """Scalar: this micro-batch's share of the global-batch loss."""
    pg_loss: torch.Tensor
    kl: torch.Tensor
    clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    tokens: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    """Aggregated token entropy (detached) when `entropy_BT` was given, else None."""


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
                global_tokens: Optional[float] = None, global_seqs: Optional[float] = None,
                kl_estimator: str = "k3", entropy_BT: Optional[torch.Tensor] = None,
                entropy_coef: float = 0.0) -> PolicyLossTerms:
    """Clipped surrogate + beta * KL - entropy_coef * entropy, aggregated over the global batch.

    ratio = exp(logp - old_logp); per token: -min(ratio * A, clip(ratio, 1-low, 1+high) * A).
    With `tis_cap`, each token's term is multiplied by min(exp(old_logp - engine_logp), cap)
    (no gradient through the weight). The KL term uses `kl_estimator` (see `kl_per_token`).
    `entropy_BT` (per-token entropy, with its graph when `entropy_coef` != 0) is aggregated like
    the other terms; with entropy_coef == 0 it is only reported and the loss is exactly pg + beta * kl.
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
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")
    kl = torch.zeros((), dtype=logp_BT.dtype)
    if ref_logp_BT is not None:
        kl = aggregate(kl_per_token(logp_BT, ref_logp_BT, kl_estimator), mask, agg, gt, gs)
    loss = pg + kl_beta * kl
    ent = None
    if entropy_coef != 0.0:
        if entropy_BT is None:
            raise ValueError(f"entropy_coef={entropy_coef} needs entropy_BT (per-token entropy with its graph)")
        ent = aggregate(entropy_BT.to(logp_BT.dtype), mask, agg, gt, gs)
        loss = loss - entropy_coef * ent
    elif entropy_BT is not None:
        with torch.no_grad():
            ent = aggregate(entropy_BT.to(logp_BT.dtype), mask, agg, gt, gs)
    with torch.no_grad():
        clip_frac = aggregate((clipped < surr).to(logp_BT.dtype), mask, agg, gt, gs)  # clipping is active
        ratio_mean = aggregate(ratio, mask, agg, gt, gs)
    return PolicyLossTerms(loss, pg.detach(), kl.detach(), clip_frac, ratio_mean, mask.sum(),
                           None if ent is None else ent.detach())


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, vocab_size: Optional[int] = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target]; logits beyond `vocab_size` (padding) are excluded."""
    if vocab_size is not None:
        logits_BTV = logits_BTV[..., :vocab_size]
    logits = logits_BTV.float() / temperature
    return torch.gather(torch.log_softmax(logits, dim=-1), -1, targets_BT[..., None]).squeeze(-1)


def entropy(logits_BTV: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token entropy of softmax(logits) (differentiable)."""
    if vocab_size is not None:
        logits_BTV = logits_BTV[..., :vocab_size]
    logp = torch.log_softmax(logits_BTV.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def informative_groups(rewards_B: torch.Tensor, group_size: int, tol: float = 1e-12) -> torch.Tensor:
    """Dynamic sampling (DAPO): BoolTensor[P], True where group g's rewards are not all equal
    (max - min > tol). Groups with equal rewards have zero advantage, hence no policy gradient.
    A group of one sample is never informative."""
    if group_size < 1 or rewards_B.numel() % group_size:
        raise ValueError(f"{rewards_B.numel()} rewards are not a whole number of groups of {group_size}")
    r_PG = rewards_B.detach().double().reshape(-1, group_size)
    return (r_PG.max(dim=1).values - r_PG.min(dim=1).values) > tol


def overlong_penalty(lengths_B, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """Soft overlong punishment (DAPO), a reward term per response, float32 Tensor[B]:
    0 for length <= max_len - buffer, then -penalty * (length - (max_len - buffer)) / buffer,
    reaching -penalty at length == max_len and clamped there beyond. buffer == 0: all zeros (off)."""
    if buffer < 0 or buffer >= max_len:
        raise ValueError(f"overlong buffer={buffer} with max_len={max_len}; need 0 <= buffer < max_len")
    if penalty < 0:
        raise ValueError(f"overlong penalty={penalty}; need penalty >= 0")
    lengths = torch.as_tensor(lengths_B).double()
    if buffer == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    over = (lengths - (max_len - buffer)) / buffer
    return (-penalty * over.clamp(min=0.0, max=1.0)).to(torch.float32)


def truncation_mask(finish_reasons: list[str]) -> torch.Tensor:
    """FloatTensor[B]: 0.0 for a response cut at the length cap (finish reason "length"), else 1.0;
    multiply a row's loss mask by it to give truncated responses no loss."""
    return torch.tensor([0.0 if r == "length" else 1.0 for r in finish_reasons], dtype=torch.float32)
