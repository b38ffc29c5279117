"""Rollouts -> scored micro-batches for the policy update (dataclasses, not dicts).

Layout (what `collate` builds):
- The step's rollouts are split into `n_steps` mini-batches (one optimizer step each), whole
  prompt groups in order, so every data-parallel rank steps in lockstep.
- Padding-free packing (`pack=True`, the local layer spec): within a mini-batch the rollouts
  (prompt + response) are packed first-fit-decreasing into rows of `row_len` tokens (the longest
  rollout of the step). A row is several rollouts back to back; attention is block-diagonal
  causal (a token sees only earlier tokens of its own rollout) and each rollout keeps its own 3D
  mRoPE positions, computed from its own tokens, so a packed rollout's logprobs are the ones it
  would get alone. `pack=False` (Transformer Engine's fused attention honours only the causal
  mask): one rollout per row, right-padded.
- Micro-batches: consecutive rows, as many as fit `max_tokens` (rows x row length), or
  `micro_batch_size` rows when `max_tokens` is 0. A micro-batch's rows are cut to its longest
  row unless `same_shape` (pipeline parallelism exchanges fixed shapes: every micro-batch then has
  the same rows x `row_len`, short ones filled with empty rows).
- Per-rollout tensors (loss mask, advantages, old / reference / engine logprobs) keep the
  per-sample layout [N, T] (N rollouts, T = longest rollout of the micro-batch - 1 target
  positions); `PolicyMicroBatch.unpack` gathers the packed [R, L-1] logprobs into it, so the GRPO
  loss is the same function of the same numbers whatever the packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_vr1.models.qwen25_vl.model import VLInputs
from megatron_vr1.models.qwen25_vl.rope_index import get_rope_index
from megatron_vr1.rl.update import PolicyMicroBatch
from megatron_vr1.rollout.engine import Rollout


@dataclass
class ScoredRollout:
    rollout: Rollout
    reward: float
    correct: bool
    format_ok: bool
    advantage: float = 0.0
    trained: bool = True
    """False: the rollout gets no loss (e.g. a truncated response with grpo.mask_truncated)."""


def pixel_inputs(processor, images):
    """(pixel_values, image_grid_thw) of a rollout's images with the trainer's image processor
    (the same torchvision-backed processor vLLM uses: the PIL one resizes differently)."""
    if not images:
        return None, None
    out = processor.image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def minibatches(scored: Sequence[ScoredRollout], n_steps: int) -> list[list[ScoredRollout]]:
    """`scored` in `n_steps` contiguous chunks of whole prompt groups (as equal as they come)."""
    prompts: list[int] = []
    for s in scored:
        if not prompts or prompts[-1] != s.rollout.prompt_index:
            prompts.append(s.rollout.prompt_index)
    n_steps = max(1, min(n_steps, len(prompts)))
    bounds = [round(i * len(prompts) / n_steps) for i in range(n_steps + 1)]
    chunk_of = {}
    for c in range(n_steps):
        for p in prompts[bounds[c]:bounds[c + 1]]:
            chunk_of[p] = c
    out: list[list[ScoredRollout]] = [[] for _ in range(n_steps)]
    for s in scored:
        out[chunk_of[s.rollout.prompt_index]].append(s)
    return out


def collate(scored: list[ScoredRollout], processor, arch, pad_id: int, *, n_steps: int = 1,
            micro_batch_size: int = 1, max_tokens: int = 0, pack: bool = True,
            same_shape: bool = False) -> tuple[list[PolicyMicroBatch], int]:
    """Micro-batches (each tagged with its optimizer step, `.step`) and the row length S.
    `old_logp_BT` starts as the engine's logprobs and is replaced by the trainer's own before
    the update."""
    from megatron_vr1.data.sft_dataset import pack_lengths

    if not scored:
        raise ValueError("no rollouts to train on")
    row_len = max(len(s.rollout.prompt_ids) + len(s.rollout.response_ids) for s in scored)
    if max_tokens and max_tokens < row_len:
        raise ValueError(f"parallel.max_tokens_per_microbatch ({max_tokens}) is below the longest rollout "
                         f"({row_len} tokens); raise it to at least {row_len} (or 0: micro_batch_size rows)")
    out: list[PolicyMicroBatch] = []
    for step, chunk in enumerate(minibatches(scored, n_steps)):
        lengths = [len(s.rollout.prompt_ids) + len(s.rollout.response_ids) for s in chunk]
        rows = pack_lengths(lengths, row_len) if pack else [[i] for i in range(len(chunk))]
        per_mb = max(1, max_tokens // row_len) if max_tokens else micro_batch_size
        for i in range(0, len(rows), per_mb):
            group = rows[i:i + per_mb]
            if same_shape:
                group = group + [[]] * (per_mb - len(group))
            L = row_len if same_shape else max(sum(lengths[k] for k in r) for r in group)
            mb = _micro_batch([[chunk[k] for k in r] for r in group], L, processor, arch, pad_id)
            mb.step = step
            out.append(mb)
    return out, row_len


def _micro_batch(rows: list[list[ScoredRollout]], L: int, processor, arch, pad_id: int) -> PolicyMicroBatch:
    """One micro-batch of R packed rows of L tokens (see the module docstring)."""
    samples = [s for r in rows for s in r]
    R, N = len(rows), len(samples)
    n_tok = [len(s.rollout.prompt_ids) + len(s.rollout.response_ids) for s in samples]
    Smax = max(n_tok, default=2)
    T = Smax - 1
    # each rollout's own 3D positions, from its own tokens (padded per-sample batch)
    ids_NS = torch.full((N, Smax), pad_id, dtype=torch.long)
    am_NS = torch.zeros(N, Smax, dtype=torch.long)
    pix, grids = [], []
    for k, s in enumerate(samples):
        r = s.rollout
        ids_NS[k, :n_tok[k]] = torch.tensor(r.prompt_ids + r.response_ids)
        am_NS[k, :n_tok[k]] = 1
        pv, g = pixel_inputs(processor, r.images)
        pix.append(pv)
        grids.append(g)
    grid_all = [g for g in grids if g is not None]
    pos_3NS, _ = get_rope_index(ids_NS, torch.cat(grid_all) if grid_all else None,
                                image_token_id=arch.image_token_id,
                                spatial_merge_size=arch.vision.spatial_merge_size,
                                attention_mask_BS=am_NS, video_token_id=arch.video_token_id)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros(3, R, L, dtype=torch.long)
    seg = torch.full((R, L), -1, dtype=torch.long)
    unpack = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T)
    engine_lp = torch.zeros(N, T)
    k = 0
    for r, row in enumerate(rows):
        o = 0
        for s in row:
            n, n_p, n_r = n_tok[k], len(s.rollout.prompt_ids), len(s.rollout.response_ids)
            ids[r, o:o + n] = ids_NS[k, :n]
            pos[:, r, o:o + n] = pos_3NS[:, k, :n]
            seg[r, o:o + n] = k
            unpack[k, :n - 1] = r * (L - 1) + o + torch.arange(n - 1)  # target position t of rollout k
            if s.trained:
                mask[k, n_p - 1:n - 1] = 1
            engine_lp[k, n_p - 1:n - 1] = torch.tensor(s.rollout.response_logprobs, dtype=torch.float32)
            o += n
            k += 1
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    attn = causal[None] | (seg[:, :, None] != seg[:, None, :])
    pv = [p for p in pix if p is not None]
    inputs = VLInputs(input_ids_BS=ids, position_ids_3BS=pos, attention_mask=attn[:, None],
                      pixel_values_PC=torch.cat(pv) if pv else None,
                      image_grid_thw_N3=torch.cat(grid_all) if grid_all else None)
    return PolicyMicroBatch(inputs=inputs, loss_mask_BT=mask, old_logp_BT=engine_lp.clone(),
                            adv_B=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
                            engine_logp_BT=engine_lp, unpack_NT=unpack)
