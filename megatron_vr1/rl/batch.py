"""Rollouts -> scored micro-batches for the policy update (dataclasses, not dicts).

Layout (what `collate` builds):
- The step's rollouts are split into `n_steps` mini-batches (one optimizer step each), whole
  prompt groups in order, so every data-parallel rank steps in lockstep.
- Padding-free packing (`pack=True`, the local layer spec): within a mini-batch the rollouts are
  packed first-fit-decreasing into rows of `row_len` tokens. The packed unit is a prompt group:
  with `share_prompts` the G rollouts of one prompt carry ONE copy of the prompt (all but its last
  token), then per rollout its last prompt token and its response:
      [p_0 .. p_{m-1}] [p_m r1_0 r1_1 ..] [p_m r2_0 ..] ...
  A response sees the shared prompt and earlier tokens of its own part (causal within the unit,
  parts blind to each other); repeating p_m per rollout puts the logits that score each response's
  first token in that rollout's own part. Each token keeps the 3D mRoPE position it has in its own
  rollout, so a rollout's logprobs are the ones it gets alone, and its gradient is the same sum.
  The prompt's tokens and images (the vision tower) are computed once per group instead of G
  times: for the tiny recipe (prompts ~70 tokens, answers ~25, G = 8) that is ~2.5x fewer tokens.
  A unit holds at most `max_tokens` tokens (a larger group is split, each part with its own copy);
  `row_len` is the longest unit. Without `share_prompts` every rollout is its own unit (rows of
  the step's longest rollout). `pack=False` (Transformer Engine's fused attention honours only the
  causal mask): one rollout per row, right-padded.
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
            micro_batch_size: int = 1, max_tokens: int = 0, pack: bool = True, share_prompts: bool = True,
            same_shape: bool = False) -> tuple[list[PolicyMicroBatch], int]:
    """Micro-batches (each tagged with its optimizer step, `.step`) and the row length S.
    `old_logp_BT` starts as the engine's logprobs and is replaced by the trainer's own before
    the update."""
    from megatron_vr1.data.sft_dataset import pack_lengths

    if not scored:
        raise ValueError("no rollouts to train on")
    longest = max(len(s.rollout.prompt_ids) + len(s.rollout.response_ids) for s in scored)
    if max_tokens and max_tokens < longest:
        raise ValueError(f"parallel.max_tokens_per_microbatch ({max_tokens}) is below the longest rollout "
                         f"({longest} tokens); raise it to at least {longest} (or 0: micro_batch_size rows)")
    chunks = minibatches(scored, n_steps)
    units = [_units(c, arch, share=pack and share_prompts, cap=max_tokens) for c in chunks]
    row_len = max(_unit_length(u) for us in units for u in us)
    out: list[PolicyMicroBatch] = []
    for step, us in enumerate(units):
        lengths = [_unit_length(u) for u in us]
        rows = pack_lengths(lengths, row_len) if pack else [[i] for i in range(len(us))]
        per_mb = max(1, max_tokens // row_len) if max_tokens else micro_batch_size
        for i in range(0, len(rows), per_mb):
            group = rows[i:i + per_mb]
            if same_shape:
                group = group + [[]] * (per_mb - len(group))
            L = row_len if same_shape else max(sum(lengths[k] for k in r) for r in group)
            mb = _micro_batch([[us[k] for k in r] for r in group], L, processor, arch, pad_id)
            mb.step = step
            out.append(mb)
    return out, row_len


def _unit_length(unit: list[ScoredRollout]) -> int:
    """Tokens of a unit in a row: the shared prompt minus its last token, then per rollout that last
    prompt token and the response."""
    return len(unit[0].rollout.prompt_ids) - 1 + sum(1 + len(s.rollout.response_ids) for s in unit)


def _units(chunk: list[ScoredRollout], arch, share: bool, cap: int) -> list[list[ScoredRollout]]:
    """`chunk` as units: consecutive rollouts of one prompt (same prompt ids and images) that share
    one copy of the prompt, at most `cap` tokens each (0: no cap); one rollout per unit unless
    `share`. A prompt ending in an image/video placeholder is not shared (the placeholder would be
    repeated)."""
    out: list[list[ScoredRollout]] = []
    media = {arch.image_token_id, arch.video_token_id}
    for s in chunk:
        if share and out:
            u, r = out[-1], s.rollout
            first = u[0].rollout
            if (r.prompt_index == first.prompt_index and r.prompt_ids == first.prompt_ids
                    and len(r.images) == len(first.images) and r.prompt_ids[-1] not in media
                    and (not cap or _unit_length(u + [s]) <= cap)):
                u.append(s)
                continue
        out.append([s])
    return out


def _micro_batch(rows: list[list[list[ScoredRollout]]], L: int, processor, arch, pad_id: int) -> PolicyMicroBatch:
    """One micro-batch of R packed rows of L tokens; a row is a list of units (see the module docstring)."""
    units = [u for r in rows for u in r]
    samples = [s for u in units for s in u]
    R, N = len(rows), len(samples)
    n_tok = [len(s.rollout.prompt_ids) + len(s.rollout.response_ids) for s in samples]
    Smax = max(n_tok, default=2)
    T = Smax - 1
    # each rollout's own 3D positions, from its own tokens (padded per-sample batch); a unit's
    # images are processed once and its rollouts share them
    ids_NS = torch.full((N, Smax), pad_id, dtype=torch.long)
    am_NS = torch.zeros(N, Smax, dtype=torch.long)
    pix, unit_grids, grids = [], [], []
    k = 0
    for u in units:
        pv, g = pixel_inputs(processor, u[0].rollout.images)
        if pv is not None:
            pix.append(pv)
            unit_grids.append(g)
        for s in u:
            r = s.rollout
            ids_NS[k, :n_tok[k]] = torch.tensor(r.prompt_ids + r.response_ids)
            am_NS[k, :n_tok[k]] = 1
            if g is not None:
                grids.append(g)
            k += 1
    pos_3NS, _ = get_rope_index(ids_NS, torch.cat(grids) if grids else None,
                                image_token_id=arch.image_token_id,
                                spatial_merge_size=arch.vision.spatial_merge_size,
                                attention_mask_BS=am_NS, video_token_id=arch.video_token_id)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros(3, R, L, dtype=torch.long)
    unit_id = torch.full((R, L), -1, dtype=torch.long)  # attention stays within a unit ...
    part = torch.zeros(R, L, dtype=torch.long)          # ... 0: its shared prompt, j: its j-th rollout
    unpack = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T)
    engine_lp = torch.zeros(N, T)
    k = u_id = 0
    for r, row in enumerate(rows):
        o = 0
        for u in row:
            m = len(u[0].rollout.prompt_ids) - 1  # the shared prompt tokens
            ids[r, o:o + m] = ids_NS[k, :m]
            pos[:, r, o:o + m] = pos_3NS[:, k, :m]
            unit_id[r, o:o + m] = u_id
            p = o + m
            for j, s in enumerate(u):
                n, n_p = n_tok[k], m + 1
                ids[r, p:p + n - m] = ids_NS[k, m:n]  # the last prompt token, then the response
                pos[:, r, p:p + n - m] = pos_3NS[:, k, m:n]
                unit_id[r, p:p + n - m] = u_id
                part[r, p:p + n - m] = j + 1
                base = r * (L - 1)  # target position t of rollout k -> flat index into [R, L-1]
                unpack[k, :m] = base + o + torch.arange(m)
                unpack[k, m:n - 1] = base + p + torch.arange(n - 1 - m)
                if s.trained:
                    mask[k, n_p - 1:n - 1] = 1
                engine_lp[k, n_p - 1:n - 1] = torch.tensor(s.rollout.response_logprobs, dtype=torch.float32)
                p += n - m
                k += 1
            o = p
            u_id += 1
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    key_part = part[:, None, :]
    attn = (causal[None] | (unit_id[:, :, None] != unit_id[:, None, :])
            | ((key_part != 0) & (key_part != part[:, :, None])))
    inputs = VLInputs(input_ids_BS=ids, position_ids_3BS=pos, attention_mask=attn[:, None],
                      pixel_values_PC=torch.cat(pix) if pix else None,
                      image_grid_thw_N3=torch.cat(unit_grids) if unit_grids else None)
    return PolicyMicroBatch(inputs=inputs, loss_mask_BT=mask, old_logp_BT=engine_lp.clone(),
                            adv_B=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
                            engine_logp_BT=engine_lp, unpack_NT=unpack)
