"""Loading Megatron weights into a `Qwen25VLModel` at any TP/PP, and building model inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_vr1.models.qwen25_vl.model import Qwen25VLModel, VLInputs, causal_padding_mask
from megatron_vr1.models.qwen25_vl.rope_index import get_rope_index


def model_checkpoint_dir(path: str | Path) -> Path:
    """The torch_dist folder inside a converted checkpoint (`<dir>/model`) or the folder itself."""
    path = Path(path)
    return path / "model" if (path / "model" / "metadata.json").exists() else path


def load_weights(model: Qwen25VLModel, ckpt: str | Path) -> None:
    """Load this rank's shards of the weights from a megatron-core distributed checkpoint.

    Transformer Engine `_extra_state` objects (FP8 scaling state) are not part of a converted
    checkpoint; they are left as initialised.
    """
    ckpt_dir = model_checkpoint_dir(ckpt)
    sharded = {k: v for k, v in model.sharded_state_dict().items()
               if not (isinstance(v, ShardedObject) and k.endswith("_extra_state"))}
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    state = {k: v for k, v in state.items() if k in sharded}  # a trainer checkpoint's common state rides along
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"loading {ckpt_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def make_inputs(arch, input_ids_BS: torch.Tensor, attention_mask_BS: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None) -> VLInputs:
    """Model inputs from processor outputs (3D positions computed once, here)."""
    if attention_mask_BS is None:
        attention_mask_BS = torch.ones_like(input_ids_BS)
    pos, _ = get_rope_index(input_ids_BS, image_grid_thw, image_token_id=arch.image_token_id,
                            spatial_merge_size=arch.vision.spatial_merge_size,
                            attention_mask_BS=attention_mask_BS, video_token_id=arch.video_token_id)
    return VLInputs(
        input_ids_BS=input_ids_BS,
        position_ids_3BS=pos,
        attention_mask=causal_padding_mask(attention_mask_BS),
        pixel_values_PC=pixel_values,
        image_grid_thw_N3=image_grid_thw,
    )
