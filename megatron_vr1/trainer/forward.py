"""The Megatron contract: `forward_step(data_iterator, model) -> (output, loss_func)` for
megatron-core's `get_forward_backward_func()`, and per-token logprobs of given sequences.

Logits stay split over the vocabulary across TP ranks (`parallel_output=True` models, see
trainer/logprobs.py); padded vocabulary entries are excluded before the softmax.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_vr1.models.qwen25_vl.model import VLInputs
from megatron_vr1.trainer.logprobs import tp_group, vocab_parallel_logprobs


def sequence_logprobs(model, arch, inp: VLInputs, temperature: float = 1.0,
                      broadcast: bool = True) -> Optional[torch.Tensor]:
    """logp[b, t] = log p(token t+1 | tokens <= t), shape [B, S-1], forward only.

    On the last pipeline stage always; on every rank when `broadcast` (from the last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vr1.trainer.core import device, to_device

    dev = device()
    inp = to_device(inp, dev)
    B, S = inp.input_ids_BS.shape
    targets = inp.input_ids_BS[:, 1:]
    group = tp_group()

    def forward_step(data_iterator, model_):
        logits = model_(next(data_iterator))

        def collect(output, non_loss_data=False):
            return vocab_parallel_logprobs(output[:, :-1], targets, vocab_size=arch.text.vocab_size,
                                           temperature=temperature, group=group)

        return logits, collect

    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([inp]), model=[model], num_microbatches=1,
            seq_length=S, micro_batch_size=B, forward_only=True, collect_non_loss_data=True,
        )
    last = ps.is_pipeline_last_stage()
    out = outs[0] if last else None
    if broadcast and dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        buf = out if last else torch.empty(B, S - 1, device=dev)
        src = dist.get_global_rank(ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size() - 1)
        dist.broadcast(buf, src=src, group=ps.get_pipeline_model_parallel_group())
        out = buf
    return out.cpu() if out is not None else None  # [B, T] per-token numbers live with the batch, on the host


def with_image_features(model, inp: VLInputs) -> VLInputs:
    """`inp` with its image features computed now (no gradient), for a frozen vision tower: every
    later pass over the same micro-batch (old logprobs, reference, update) reuses them instead of
    running the tower again. Ranks without the tower (later pipeline stages) and text-only inputs
    get `inp` back unchanged."""
    from dataclasses import replace

    from megatron_vr1.trainer.core import device

    tower = getattr(model, "vision_model", None)
    if tower is None or inp.pixel_values_PC is None or inp.image_features_TH is not None:
        return inp
    dev = device()
    with torch.no_grad():
        feats = tower(inp.pixel_values_PC.to(dev), inp.image_grid_thw_N3.to(dev))
    return replace(inp, image_features_TH=feats)
