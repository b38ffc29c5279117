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
