"""The GRPO loss for `trainer.core.optimizer_step`, and one policy update with it.

Each micro-batch's loss is its share of the global-batch mean (`grpo.policy_loss` with the token
/ sequence counts of the whole optimizer step over all data-parallel ranks); the trainer core
scales it for megatron-core's micro-batch averaging and DDP's data-parallel averaging.

On-policy shortcut: a micro-batch whose `old_logp_BT` is None is scored by the policy that the
update starts from (the first mini-batch of a single-epoch update), so its old logprobs are the
update's own logprobs, detached: ratio exactly 1, and no separate forward pass for them.

Entropy: the per-token entropy of softmax(logits) (temperature 1) is always logged. With
`LossSettings.entropy_coef > 0` it is also optimised (the loss subtracts entropy_coef x its
aggregate) and is then computed with a gradient, from the vocabulary-parallel logits without
gathering them; with entropy_coef == 0 it is computed under no_grad and the loss is unchanged.

Trainer-vs-engine mismatch (the engine's sampling logprobs against the old logprobs) is measured
inside the update, so it is the same whether the old logprobs came from a separate pass or from
the update itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_vr1.models.qwen25_vl.model import VLInputs
from megatron_vr1.rl.grpo import aggregate, policy_loss
from megatron_vr1.trainer.logprobs import (tp_group, vocab_parallel_entropy, vocab_parallel_entropy_with_grad,
                                           vocab_parallel_logprobs)


@dataclass
class PolicyMicroBatch:
    """One micro-batch of scored rollouts. S tokens per row (padded); T = S - 1 target positions."""

    inputs: VLInputs
    loss_mask_BT: torch.Tensor
    """1 where the target token is a response token."""
    old_logp_BT: Optional[torch.Tensor]
    """The behaviour policy's logprobs per the trainer; None: on-policy (taken from the update's own pass)."""
    adv_B: torch.Tensor
    ref_logp_BT: Optional[torch.Tensor] = None
    engine_logp_BT: Optional[torch.Tensor] = None
    unpack_NT: Optional[torch.Tensor] = None
    """Packed rows (rl/batch.py): for rollout n's target position t, the flat index into the rows'
    [R * (S-1)] target positions; the per-rollout tensors above are [N, T]. None: one rollout per row."""
    step: int = 0
    """The optimizer step (mini-batch) of the rollout batch this micro-batch belongs to."""

    def unpack(self, x_RT: torch.Tensor) -> torch.Tensor:
        """Per-row-position numbers [R, S-1] -> per-rollout [N, T] (identity without packing)."""
        if self.unpack_NT is None:
            return x_RT
        return x_RT.reshape(-1)[self.unpack_NT.to(x_RT.device)]


@dataclass
class LossSettings:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_beta: float = 0.0
    agg: str = "token-mean"
    tis_cap: Optional[float] = None
    temperature: float = 1.0
    kl_estimator: str = "k3"
    """Per-token KL estimator: k1, k2 or k3 (see grpo.kl_per_token)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight; 0 logs the entropy without optimising it."""


@dataclass
class UpdateMetrics:
    loss: float
    pg_loss: float
    kl: float
    clip_frac: float
    ratio_mean: float
    grad_norm: float
    entropy: float
    mismatch_abs_sum: float = 0.0
    """Sum over response tokens of |old logp - engine logp| (with mismatch_exp_sum, mismatch_tokens and
    mismatch_max: the trainer-vs-engine agreement of this update's micro-batches)."""
    mismatch_exp_sum: float = 0.0
    mismatch_tokens: float = 0.0
    mismatch_max: float = 0.0
    extra: dict = field(default_factory=dict)


N_SUMS, N_MAX = 9, 1


def grpo_loss_fn(arch, loss: LossSettings, global_tokens: float, global_seqs: float):
    """loss_fn(micro_batch, logits) for `trainer.core.optimizer_step`."""
    group = tp_group()  # logits stay split over the vocabulary (parallel_output models)

    def loss_fn(mb: PolicyMicroBatch, output: torch.Tensor):
        dev = output.device
        on = (lambda t: None if t is None else t.to(dev))  # the batch lives on the host until here
        targets = mb.inputs.input_ids_BS[:, 1:].to(dev)
        mask_BT, ref_BT, eng_BT = on(mb.loss_mask_BT), on(mb.ref_logp_BT), on(mb.engine_logp_BT)
        logp = mb.unpack(vocab_parallel_logprobs(output[:, :-1], targets, vocab_size=arch.text.vocab_size,
                                                 temperature=loss.temperature, group=group))
        old = logp.detach() if mb.old_logp_BT is None else on(mb.old_logp_BT)
        ent_BT = None
        if loss.entropy_coef > 0:  # optimised: entropy with its graph
            ent_BT = mb.unpack(vocab_parallel_entropy_with_grad(output[:, :-1], arch.text.vocab_size, group))
        t = policy_loss(logp, old, on(mb.adv_B), mask_BT, clip_low=loss.clip_low,
                        clip_high=loss.clip_high, kl_beta=loss.kl_beta, ref_logp_BT=ref_BT,
                        engine_logp_BT=eng_BT, tis_cap=loss.tis_cap, agg=loss.agg,
                        global_tokens=global_tokens, global_seqs=global_seqs,
                        kl_estimator=loss.kl_estimator, entropy_BT=ent_BT, entropy_coef=loss.entropy_coef)
        with torch.no_grad():
            if t.entropy is not None:
                ent = t.entropy
            else:  # logged, not optimised
                ent = aggregate(mb.unpack(vocab_parallel_entropy(output[:, :-1], arch.text.vocab_size, group)),
                                mask_BT, loss.agg, global_tokens, global_seqs)
            m = mask_BT.bool()
            if eng_BT is not None:
                d = (old.double() - eng_BT.double())[m].abs()
            else:
                d = torch.zeros(0, dtype=torch.float64, device=dev)
            sums = torch.stack([t.loss.detach(), t.pg_loss, t.kl, t.clip_frac, t.ratio_mean, ent.to(t.kl.dtype)]).double()
            n = torch.tensor(float(d.numel()), dtype=torch.float64, device=dev)
            sums = torch.cat([sums, torch.stack([d.sum(), torch.exp(d).sum(), n])])
            maxima = (d.max() if d.numel() else torch.zeros((), dtype=torch.float64, device=dev)).reshape(1)
        return t.loss, sums, maxima

    return loss_fn


def policy_update(ddp_model, optimizer, micro_batches: list[PolicyMicroBatch], arch, loss: LossSettings,
                  global_tokens: float, global_seqs: float, seq_length: int) -> UpdateMetrics:
    """One optimizer step over `micro_batches` (this rank's share of the global batch).

    `global_tokens` / `global_seqs`: response tokens / sequences of the whole step over all
    data-parallel ranks."""
    from megatron_vr1.trainer.core import optimizer_step

    out = optimizer_step(ddp_model, optimizer, micro_batches, grpo_loss_fn(arch, loss, global_tokens, global_seqs),
                         seq_length, n_sums=N_SUMS, n_max=N_MAX)
    loss_, pg, kl, clip, ratio, ent, mm_abs, mm_exp, mm_n = out.sums.tolist()
    return UpdateMetrics(loss_, pg, kl, clip, ratio, out.grad_norm, ent, mismatch_abs_sum=mm_abs,
                         mismatch_exp_sum=mm_exp, mismatch_tokens=mm_n, mismatch_max=float(out.maxima[0]))
