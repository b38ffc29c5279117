"""Megatron vs transformers on the same weights (fp32, CPU): logits <= 1e-4 at every layout."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed

TOL = 1e-4
PROBES = {"text", "one_image", "two_images", "windows"}


def test_logits_parity_tp1(tiny_hf, tiny_mcore, single_rank):
    from checkpoints_conv.verify import compare

    diffs = compare(tiny_hf, tiny_mcore)
    assert set(diffs) == PROBES
    assert max(diffs.values()) <= TOL, diffs


def test_vision_tower_parity_and_windows_matter(tiny_hf, tiny_mcore, single_rank):
    """Image features match HF to ~1e-7, and window attention really windows: the same tower with
    every layer on full attention differs by far more than our error."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from checkpoints_conv.verify import probes
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    arch = load_hf_arch(tiny_hf)
    model = build_model(arch, ModelOptions(), parallel_output=False).eval()
    load_weights(model, tiny_mcore)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    probe = next(p for p in probes(tiny_hf) if p.name == "windows")
    x = probe.inputs
    assert x["image_grid_thw"].tolist() == [[1, 16, 16]]  # 8x8 merge units -> 4 windows of 4x4
    with torch.no_grad():
        ref = hf.model.visual(x["pixel_values"], grid_thw=x["image_grid_thw"]).pooler_output
        ours = model.vision_model(x["pixel_values"], x["image_grid_thw"])
        keep = hf.model.visual.fullatt_block_indexes
        hf.model.visual.fullatt_block_indexes = list(range(arch.vision.depth))
        all_full = hf.model.visual(x["pixel_values"], grid_thw=x["image_grid_thw"]).pooler_output
        hf.model.visual.fullatt_block_indexes = keep
    err = (ours - ref).abs().max().item()
    window_effect = (all_full - ref).abs().max().item()
    assert err <= 1e-6, err
    assert window_effect > 100 * err, (window_effect, err)


def test_rope_index_matches_transformers(tiny_hf):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from checkpoints_conv.verify import probes
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.models.qwen25_vl.rope_index import get_rope_index

    arch = load_hf_arch(tiny_hf)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf, dtype=torch.float32)
    for p in probes(tiny_hf):
        x = p.inputs
        if "image_grid_thw" not in x:
            continue
        # a left-padded batch of two copies: padding must not shift positions
        ids = torch.cat([x["input_ids"], torch.cat([torch.zeros(1, 3, dtype=torch.long), x["input_ids"][:, :-3]], 1)])
        am = torch.cat([torch.ones_like(x["input_ids"]), torch.cat([torch.zeros(1, 3), torch.ones(1, ids.shape[1] - 3)], 1).long()])
        grid = torch.cat([x["image_grid_thw"], x["image_grid_thw"]])
        types = (ids == arch.image_token_id).int()
        ref, ref_d = hf.model.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=am)
        ours, d = get_rope_index(ids, grid, image_token_id=arch.image_token_id,
                                 spatial_merge_size=arch.vision.spatial_merge_size, attention_mask_BS=am)
        assert torch.equal(ours, ref), p.name
        assert torch.equal(d.view(-1), ref_d.view(-1)), p.name


@pytest.mark.slow
def test_logits_parity_tp2_pp2_tp2xpp2(tiny_hf, tiny_mcore):
    res = run_distributed("logits_parity", 4, hf_dir=str(tiny_hf), mcore_dir=str(tiny_mcore),
                          layouts=[[2, 1], [1, 2], [2, 2]])
    for layout, diffs in res[0].items():
        assert set(diffs) == PROBES
        assert max(diffs.values()) <= TOL, (layout, diffs)
    assert res[0] == res[3]  # every rank reports the same numbers


@pytest.mark.slow
def test_logits_parity_tied_embeddings(tiny_hf_tied, tiny_mcore_tied):
    """Tied embeddings: the output layer on the last stage is the first stage's embedding."""
    res = run_distributed("logits_parity", 4, hf_dir=str(tiny_hf_tied), mcore_dir=str(tiny_mcore_tied),
                          layouts=[[1, 2], [2, 2]])
    for layout, diffs in res[0].items():
        assert max(diffs.values()) <= TOL, (layout, diffs)
