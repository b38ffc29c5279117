"""The trainer core shared by GRPO (rl/) and cold-start SFT (sft/).

`TrainerSession` owns what both need: process groups, the policy (built from the HF config,
loaded from a Megatron checkpoint or resumed), megatron-core DDP and optimizer, an optional
frozen reference copy, learning-rate setting, checkpoints (save, prune) and the metrics sink.
`optimizer_step` is the one optimizer step over micro-batches, through megatron-core's
`get_forward_backward_func` (pipeline schedules included), with the loss scaling in one place:

    each micro-batch's loss_fn returns its share of the *global-batch* mean (its sum divided by
    the token / sequence count of the whole step over all data-parallel ranks). megatron-core
    divides a returned loss by the number of micro-batches, and DDP averages gradients over
    data-parallel ranks, so the share is multiplied by both before it is handed back: the
    gradients are then exactly those of one big batch.

SFT and RL differ only in their data and their loss_fn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_vr1 import platform

log = logging.getLogger("megatron_vr1.trainer")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if platform.on_cuda() else torch.device("cpu")


def to_device(inputs, dev: torch.device):
    """A copy of a dataclass of tensors (e.g. VLInputs) with every tensor field on `dev`."""
    return replace(inputs, **{f.name: getattr(inputs, f.name).to(dev) for f in fields(inputs)
                              if isinstance(getattr(inputs, f.name), torch.Tensor)})


def wrap_ddp(model):
    """megatron-core DDP with fp32 gradient buffers; the distributed optimizer on CUDA only (on
    CPU/gloo megatron-core's reduce-scatter path is not supported)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=platform.on_cuda())
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def build_optimizer(ddp_model, optim):
    """megatron-core Adam(W) from the config's `optim` section."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                          adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_eps=optim.eps,
                          clip_grad=optim.grad_clip, bf16=ddp_model.config.bf16,
                          params_dtype=ddp_model.config.params_dtype,
                          use_distributed_optimizer=platform.on_cuda())
    return get_megatron_optimizer(cfg, [ddp_model])


@dataclass
class StepOutput:
    sums: torch.Tensor
    """float64 [n_sums]: each loss_fn's first statistics tensor summed over micro-batches and
    data-parallel ranks (every rank gets the numbers, pipeline stages included)."""
    maxima: torch.Tensor
    """float64 [n_max]: the second statistics tensor, max over micro-batches and all ranks."""
    grad_norm: float


LossFn = Callable[[object, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""loss_fn(micro_batch, logits) -> (this micro-batch's share of the global mean, sums [n_sums],
maxima [n_max]); the statistics are detached."""


def optimizer_step(ddp_model, optimizer, micro_batches: Sequence, loss_fn: LossFn, seq_length: int,
                   n_sums: int, n_max: int = 0) -> StepOutput:
    """One optimizer step over this rank's `micro_batches` (each has `.inputs`, a VLInputs)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp_model.config.finalize_model_grads_func = finalize_model_grads
    scale = len(micro_batches) * ps.get_data_parallel_world_size()
    dev = device()

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        logits = model(to_device(mb.inputs, dev))

        def loss_func(output):
            share, sums, maxima = loss_fn(mb, output)
            return share * scale, {"sums": sums.detach().double(), "max": maxima.detach().double()}

        return logits, loss_func

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[ddp_model],
        num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=micro_batches[0].inputs.input_ids_BS.shape[0], forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise FloatingPointError("the optimizer step was skipped (non-finite gradients)")
    sums = torch.zeros(n_sums, dtype=torch.float64, device=dev)
    maxima = torch.full((n_max,), float("-inf"), dtype=torch.float64, device=dev)
    if ps.is_pipeline_last_stage():
        for d in out:
            sums += d["sums"].to(dev)
            if n_max:
                maxima = torch.maximum(maxima, d["max"].to(dev))
    if dist.is_initialized() and dist.get_world_size() > 1:
        # sum the shares over data-parallel ranks; only the last stage holds them: share over PP
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
        if n_max:
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
            if n_max:
                dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    return StepOutput(sums.cpu(), maxima.cpu(), float(grad_norm))


class TrainerSession:
    """Process groups, policy, DDP, optimizer, resume, saves and the metrics sink of one run.

    `TrainerSession.open(cfg, arch, resume=...)`: `resume` is a checkpoint folder found before
    anything was built (`checkpointing.latest_checkpoint`), or None to start from
    `cfg.model.mcore_path`. After a resume, `resumed_state` holds the loop state it saved."""

    def __init__(self, cfg, arch, run_dir: Path, model, ddp, optimizer, sink, resumed_state: Optional[dict],
                 ref=None):
        self.cfg, self.arch, self.run_dir = cfg, arch, run_dir
        self.policy = model
        """The policy module (unwrapped)."""
        self.ref = ref
        """The frozen reference policy (`with_ref`), else None."""
        self.ddp = ddp
        self.optimizer = optimizer
        self.sink = sink
        self.resumed_state = resumed_state

    @classmethod
    def open(cls, cfg, arch, *, resume: Optional[Path] = None, with_ref: bool = False,
             wandb_config: Optional[dict] = None) -> "TrainerSession":
        from megatron_vr1.checkpointing import load_checkpoint
        from megatron_vr1.models.qwen25_vl.io import load_weights
        from megatron_vr1.monitoring.sinks import make_sink

        platform.init_distributed(cfg.parallel, cfg.seed)
        rank = dist.get_rank()
        run_dir = Path(cfg.run_dir)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_resolved(run_dir)
        model = build_policy(cfg, arch)
        ref = _frozen(build_policy(cfg, arch), cfg.model.mcore_path) if with_ref else None
        ddp = wrap_ddp(model)
        optimizer = build_optimizer(ddp, cfg.optim)
        state = None
        if resume is not None:
            # a fresh megatron optimizer has no Adam moments until its first step; create them so
            # the saved ones have somewhere to go (else Adam restarts silently on resume)
            optimizer.sharded_state_dict(ddp.sharded_state_dict(), is_loading=True)
            state = load_checkpoint(resume, ddp, optimizer)
            log.info("resumed from %s", resume)
        else:
            load_weights(model, cfg.model.mcore_path)
        sink = make_sink(run_dir, wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
                         rank=rank, **({"wandb_config": wandb_config} if wandb_config is not None else {}))
        return cls(cfg, arch, run_dir, model, ddp, optimizer, sink, state, ref=ref)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, tag: str, state: dict, with_optimizer: bool = True, update_latest: bool = True) -> Path:
        """A checkpoint on all ranks together; then old periodic ones beyond checkpoint.keep_last go."""
        from megatron_vr1.checkpointing import prune_checkpoints, save_checkpoint

        path = save_checkpoint(self.run_dir, tag, self.ddp, self.optimizer if with_optimizer else None, state,
                               self.cfg.model.hf_path, update_latest=update_latest)
        if dist.get_rank() == 0:
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    def close(self) -> None:
        self.sink.flush()
        self.sink.close()


def _frozen(model, path):
    """`model` with the weights of `path`, in eval mode, without gradients (the KL reference)."""
    from megatron_vr1.models.qwen25_vl.io import load_weights

    load_weights(model, path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_policy(cfg, arch):
    """The policy on this rank (its TP/PP shard), on the GPU when there is one."""
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    model = build_model(arch, ModelOptions.from_config(cfg))
    if platform.on_cuda():
        model.cuda()
    return model
