"""The GRPO policy update on Megatron-Core: DDP-wrapped model, megatron-core optimizer, and the
`forward_step` / loss contract for `get_forward_backward_func()` over micro-batches and pipeline
stages.

Loss scaling: each micro-batch returns its share of the global-batch mean (`grpo.policy_loss` with
the global token / sequence counts of the whole optimizer step, over all data-parallel ranks).
megatron-core divides a 2-tuple loss by the number of micro-batches and DDP averages gradients
over data-parallel ranks, so the loss handed back is multiplied by both: the gradients are then
exactly those of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_vr1.models.qwen25_vl.model import VLInputs
from megatron_vr1.rl.grpo import aggregate, policy_loss
from megatron_vr1.rl.logprobs import tp_group, vocab_parallel_entropy, vocab_parallel_logprobs


@dataclass
class PolicyMicroBatch:
    """One micro-batch of scored rollouts. S tokens per row (padded); T = S - 1 target positions."""

    inputs: VLInputs
    loss_mask_BT: torch.Tensor
    """1 where the target token is a response token."""
    old_logp_BT: torch.Tensor
    adv_B: torch.Tensor
    ref_logp_BT: Optional[torch.Tensor] = None
    engine_logp_BT: Optional[torch.Tensor] = None


@dataclass
class LossSettings:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_beta: float = 0.0
    agg: str = "token-mean"
    tis_cap: Optional[float] = None
    temperature: float = 1.0


@dataclass
class UpdateMetrics:
    loss: float
    pg_loss: float
    kl: float
    clip_frac: float
    ratio_mean: float
    grad_norm: float
    entropy: float
    extra: dict = field(default_factory=dict)


def wrap_ddp(model, lm_config):
    """megatron-core DDP (gradient buffers; distributed optimizer off on CPU, see DESIGN.md)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_vr1 import platform

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=platform.on_cuda())
    return DistributedDataParallel(config=lm_config, ddp_config=ddp_cfg, module=model)


def build_optimizer(ddp_model, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8,
                    grad_clip: float = 1.0):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_vr1 import platform

    cfg = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                          adam_beta2=betas[1], adam_eps=eps, clip_grad=grad_clip,
                          bf16=ddp_model.config.bf16, params_dtype=ddp_model.config.params_dtype,
                          use_distributed_optimizer=platform.on_cuda())
    return get_megatron_optimizer(cfg, [ddp_model])


def policy_update(ddp_model, optimizer, micro_batches: list[PolicyMicroBatch], arch, loss: LossSettings,
                  global_tokens: float, global_seqs: float, seq_length: int) -> UpdateMetrics:
    """One optimizer step over `micro_batches` (this rank's share of the global batch).

    `global_tokens` / `global_seqs`: response tokens / sequences of the whole step over all
    data-parallel ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = ddp_model.config
    cfg.finalize_model_grads_func = finalize_model_grads
    n_mb = len(micro_batches)
    scale = n_mb * ps.get_data_parallel_world_size()
    group = tp_group()  # logits stay split over the vocabulary (parallel_output models)

    def forward_step(data_iterator, model):
        mb: PolicyMicroBatch = next(data_iterator)
        logits = model(mb.inputs)

        def loss_func(output):
            targets = mb.inputs.input_ids_BS[:, 1:]
            logp = vocab_parallel_logprobs(output[:, :-1], targets, vocab_size=arch.text.vocab_size,
                                           temperature=loss.temperature, group=group)
            t = policy_loss(logp, mb.old_logp_BT, mb.adv_B, mb.loss_mask_BT, clip_low=loss.clip_low,
                            clip_high=loss.clip_high, kl_beta=loss.kl_beta, ref_logp_BT=mb.ref_logp_BT,
                            engine_logp_BT=mb.engine_logp_BT, tis_cap=loss.tis_cap, agg=loss.agg,
                            global_tokens=global_tokens, global_seqs=global_seqs)
            with torch.no_grad():  # logged, not optimised (entropy bonus 0, as in REFERENCE.md)
                ent = aggregate(vocab_parallel_entropy(output[:, :-1], arch.text.vocab_size, group),
                                mb.loss_mask_BT, loss.agg,
                                global_tokens, global_seqs)
            stats = torch.stack([t.loss.detach(), t.pg_loss, t.kl, t.clip_frac, t.ratio_mean, ent.to(t.kl.dtype)])
            return t.loss * scale, {"terms": stats}

        return logits, loss_func

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[ddp_model],
        num_microbatches=n_mb, seq_length=seq_length, micro_batch_size=micro_batches[0].inputs.input_ids_BS.shape[0],
        forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise FloatingPointError("the optimizer step was skipped (non-finite gradients)")
    terms = torch.zeros(6, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        for d in out:
            terms += d["terms"].double()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # sum the shares over data-parallel ranks; broadcast the last stage's numbers to all stages
        torch.distributed.all_reduce(terms, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(terms, group=ps.get_pipeline_model_parallel_group())
    loss_, pg, kl, clip, ratio, ent = terms.tolist()
    return UpdateMetrics(loss_, pg, kl, clip, ratio, float(grad_norm), ent)
