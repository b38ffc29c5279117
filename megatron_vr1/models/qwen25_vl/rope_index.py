"""3D (temporal, height, width) position ids for Qwen2.5-VL's multimodal RoPE.

Computed once per sample, before any packing or padding changes the layout. Images only
(Vision-R1 has no video); a video token in the input is an error.

Rules (as in the published model):
- text runs get `arange` positions, equal on the three axes, continuing from the running start;
- an image run of (t, H, W) patches -> (H/m)*(W/m) tokens (m = spatial merge) gets
  t-axis = start, h-axis = start + row, w-axis = start + column; the next run starts at
  start + max(H, W)/m;
- padding positions (attention_mask == 0) get 0;
- rope_delta = max position + 1 - number of real tokens (used to continue positions when
  generating).
"""

from __future__ import annotations

import torch


def get_rope_index(
    input_ids_BS: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask_BS: torch.Tensor | None = None,
    video_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (position_ids [3, B, S] long, rope_deltas [B, 1] long).

    Images are consumed in order across the batch: sample 0's images first.
    """
    B, S = input_ids_BS.shape
    pos_3BS = torch.zeros(3, B, S, dtype=torch.long)
    deltas = []
    grids = iter(image_grid_thw_N3.tolist()) if image_grid_thw_N3 is not None else iter(())
    m = spatial_merge_size
    for b in range(B):
        ids = input_ids_BS[b]
        keep = attention_mask_BS[b].bool() if attention_mask_BS is not None else torch.ones(S, dtype=torch.bool)
        ids = ids[keep].tolist()
        if video_token_id is not None and video_token_id in ids:
            raise ValueError("video inputs are not supported (Vision-R1 trains on images only)")
        chunks: list[torch.Tensor] = []
        start = 0
        i = 0
        n = len(ids)
        while i < n:
            if ids[i] == image_token_id:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError(
                        f"sample {b} has more image-token runs than image_grid_thw rows"
                    ) from None
                gh, gw = h // m, w // m
                n_tok = t * gh * gw
                run = ids[i:i + n_tok]
                if len(run) != n_tok or any(x != image_token_id for x in run):
                    raise ValueError(
                        f"sample {b}: image at token {i} needs {n_tok} image tokens for grid "
                        f"{(t, h, w)}, found a run of {sum(1 for x in run if x == image_token_id)}"
                    )
                tt = torch.arange(t).view(-1, 1, 1).expand(t, gh, gw).reshape(-1)
                hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).reshape(-1)
                ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).reshape(-1)
                chunks.append(torch.stack([tt, hh, ww]) + start)
                start += max(gh, gw)
                i += n_tok
            else:
                j = i
                while j < n and ids[j] != image_token_id:
                    j += 1
                chunks.append(torch.arange(start, start + (j - i)).view(1, -1).expand(3, -1))
                start += j - i
                i = j
        pos = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
        pos_3BS[:, b, keep] = pos
        deltas.append((pos.max().item() + 1 - n) if n else 0)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more rows than image-token runs in input_ids")
    return pos_3BS, torch.tensor(deltas, dtype=torch.long).view(B, 1)
