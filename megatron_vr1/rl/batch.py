"""Rollouts -> padded, scored micro-batches for the policy update (dataclasses, not dicts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_vr1.models.qwen25_vl.io import make_inputs
from megatron_vr1.rl.update import PolicyMicroBatch
from megatron_vr1.rollout.engine import Rollout


@dataclass
class ScoredRollout:
    rollout: Rollout
    reward: float
    correct: bool
    format_ok: bool
    advantage: float = 0.0


def pixel_inputs(processor, images):
    """(pixel_values, image_grid_thw) of a rollout's images with the trainer's image processor
    (the same torchvision-backed processor vLLM uses: the PIL one resizes differently)."""
    if not images:
        return None, None
    out = processor.image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def collate(scored: list[ScoredRollout], processor, arch, micro_batch_size: int, pad_id: int,
            seq_length: int | None = None) -> tuple[list[PolicyMicroBatch], int]:
    """Micro-batches of `micro_batch_size` rows, all padded to one length S (pipeline stages
    exchange fixed shapes). Returns (micro-batches, S). `old_logp` starts as the engine's
    logprobs and is replaced by the trainer's own before the update."""
    S = seq_length or max(len(s.rollout.prompt_ids) + len(s.rollout.response_ids) for s in scored)
    mbs = []
    for i in range(0, len(scored), micro_batch_size):
        chunk = scored[i:i + micro_batch_size]
        B = len(chunk)
        ids = torch.full((B, S), pad_id, dtype=torch.long)
        am = torch.zeros(B, S, dtype=torch.long)
        mask = torch.zeros(B, S - 1)
        engine_lp = torch.zeros(B, S - 1)
        pix, grids = [], []
        for b, s in enumerate(chunk):
            r = s.rollout
            n_p, n_r = len(r.prompt_ids), len(r.response_ids)
            if n_p + n_r > S:
                raise ValueError(f"rollout of {n_p + n_r} tokens does not fit seq_length {S}")
            ids[b, :n_p + n_r] = torch.tensor(r.prompt_ids + r.response_ids)
            am[b, :n_p + n_r] = 1
            mask[b, n_p - 1:n_p + n_r - 1] = 1
            engine_lp[b, n_p - 1:n_p + n_r - 1] = torch.tensor(r.response_logprobs)
            pv, g = pixel_inputs(processor, r.images)
            if pv is not None:
                pix.append(pv)
                grids.append(g)
        inputs = make_inputs(arch, ids, am, torch.cat(pix) if pix else None, torch.cat(grids) if grids else None)
        mbs.append(PolicyMicroBatch(inputs=inputs, loss_mask_BT=mask, old_logp_BT=engine_lp.clone(),
                                    adv_B=torch.tensor([s.advantage for s in chunk], dtype=torch.float32),
                                    engine_logp_BT=engine_lp))
    return mbs, S
