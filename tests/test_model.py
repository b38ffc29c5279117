"""Model-level behaviour beyond parity: freezing, padding stays zero, clear errors, CPU shims."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_vr1.config import load_hf_arch


def _model(tiny_hf, tiny_mcore, **opts):
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    m = build_model(load_hf_arch(tiny_hf), ModelOptions(**opts))
    load_weights(m, tiny_mcore)
    return m


def test_freeze_vision(tiny_hf, tiny_mcore, single_rank):
    m = _model(tiny_hf, tiny_mcore, freeze_vision=True)
    assert not any(p.requires_grad for p in m.vision_model.parameters())
    assert all(p.requires_grad for p in m.language_model.parameters())


def test_padding_stays_zero_and_gets_no_gradient(tiny_hf, tiny_mcore, single_rank):
    """The vision MLP (171 -> 192) and vocab (400 -> 512) padding: exactly zero gradients."""
    from checkpoints_conv.verify import probes
    from megatron_vr1.models.qwen25_vl.io import make_inputs

    arch = load_hf_arch(tiny_hf)
    m = _model(tiny_hf, tiny_mcore)
    x = next(p for p in probes(tiny_hf) if p.name == "two_images").inputs
    logits = m(make_inputs(arch, x["input_ids"], x["attention_mask"], x["pixel_values"], x["image_grid_thw"]))
    logits[..., : arch.text.vocab_size].logsumexp(-1).sum().backward()
    fc1 = m.vision_model.decoder.layers[0].mlp.linear_fc1
    fc2 = m.vision_model.decoder.layers[0].mlp.linear_fc2
    real, padded = arch.vision.intermediate_size, fc2.weight.shape[1]
    assert padded == 192
    assert fc1.weight.grad[real:padded].abs().max() == 0 and fc1.weight.grad[padded + real:].abs().max() == 0
    assert fc1.bias.grad[real:padded].abs().max() == 0 and fc2.weight.grad[:, real:].abs().max() == 0
    assert fc1.weight.grad[:real].abs().max() > 0  # the real rows do learn
    emb = m.language_model.embedding.word_embeddings.weight
    assert emb.grad[arch.text.vocab_size:].abs().max() == 0


def test_image_token_mismatch_is_a_clear_error(tiny_hf, tiny_mcore, single_rank):
    from checkpoints_conv.verify import probes
    from megatron_vr1.models.qwen25_vl.io import make_inputs

    arch = load_hf_arch(tiny_hf)
    m = _model(tiny_hf, tiny_mcore)
    x = next(p for p in probes(tiny_hf) if p.name == "one_image").inputs
    ids = x["input_ids"].clone()
    ids[0, (ids[0] == arch.image_token_id).nonzero()[0]] = 5  # one image token lost (e.g. truncation)
    with pytest.raises(ValueError, match="needs 16 image tokens for grid"):
        m(make_inputs(arch, ids, None, x["pixel_values"], x["image_grid_thw"]))


def test_fp8_needs_transformer_engine(tiny_hf, single_rank):
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    with pytest.raises(ValueError, match="model.fp8='hybrid' needs Transformer Engine"):
        build_model(load_hf_arch(tiny_hf), ModelOptions(fp8="hybrid"))


def test_platform_shims_are_a_noop_with_cuda():
    """With CUDA present, setup() patches nothing (checked in a fresh process)."""
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "before = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type)\n"
        "from megatron_vr1 import platform; platform.setup()\n"
        "assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type) == before\n"
        "assert torch._C._is_torch_function_mode_enabled() is False\n"
        "assert platform.backend() == 'nccl'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cpu_shims_map_cuda_devices():
    code = (
        "from megatron_vr1 import platform; platform.setup(); import torch\n"
        "assert torch.zeros(2, device='cuda').device.type == 'cpu'\n"
        "assert torch.ones(2).cuda().device.type == 'cpu'\n"
        "assert torch.ones(2).to('cuda', torch.float64, non_blocking=True).dtype == torch.float64\n"
        "assert torch.ones(2).type() == 'torch.cuda.FloatTensor'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_image_features_once_per_step_give_the_same_numbers(tiny_hf, tiny_mcore, single_rank):
    """A frozen tower's features computed once (trainer.forward.with_image_features) and reused
    by the old-logprob, reference and update passes: the same logprobs, bit for bit, and the same
    gradients of the language model as running the tower inside every forward."""
    from checkpoints_conv.verify import probes
    from megatron_vr1.models.qwen25_vl.io import make_inputs
    from megatron_vr1.trainer.forward import sequence_logprobs, with_image_features

    arch = load_hf_arch(tiny_hf)
    m = _model(tiny_hf, tiny_mcore, freeze_vision=True)
    x = next(p for p in probes(tiny_hf) if p.name == "two_images").inputs
    inp = make_inputs(arch, x["input_ids"], x["attention_mask"], x["pixel_values"], x["image_grid_thw"])
    pre = with_image_features(m, inp)
    assert pre.image_features_TH is not None and inp.image_features_TH is None
    assert pre.image_features_TH.shape[0] == int((inp.input_ids_BS == arch.image_token_id).sum())
    assert torch.equal(sequence_logprobs(m, arch, pre), sequence_logprobs(m, arch, inp))
    grads = []
    for i in (inp, pre):
        m.zero_grad()
        m(i)[..., : arch.text.vocab_size].logsumexp(-1).sum().backward()
        grads.append(m.language_model.decoder.layers[0].mlp.linear_fc1.weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().max() > 0
    # the pixels are not needed any more; text-only inputs pass through unchanged
    text = make_inputs(arch, x["input_ids"][:, :4], None)
    assert with_image_features(m, text) is text


@pytest.mark.parametrize("sizes", [[(112, 112)] * 5, [(224, 224)] * 3, [(112, 112), (224, 112)]],
                         ids=["5x112", "3x224-windows", "mixed"])
def test_vision_tower_equal_segments_as_a_batch(tiny_hf, tiny_mcore, single_rank, sizes):
    """Images (or windows) of one size run as a batch of segments without a mask: the features
    and every vision gradient equal the one-masked-sequence path (float rounding only)."""
    from PIL import Image

    from megatron_vr1.hf_processor import load_processor

    m = _model(tiny_hf, tiny_mcore)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes]
    enc = load_processor(tiny_hf).image_processor(images=images, return_tensors="pt")
    tower = m.vision_model
    outs, grads = [], []
    for batched in (True, False):
        tower.batch_segments = batched
        tower.zero_grad()
        out = tower(enc["pixel_values"], enc["image_grid_thw"])
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in tower.parameters() if p.grad is not None])
    assert (outs[0] - outs[1]).abs().max() <= 1e-6
    assert len(grads[0]) == len(grads[1]) > 0
    assert max(float((a - b).abs().max()) for a, b in zip(*grads)) <= 1e-5


@pytest.mark.parametrize("case", ["causal-no-mask", "packed-mask", "full-no-mask", "padding-mask"])
def test_sdpa_core_attention_equals_megatron(single_rank, case):
    """The local spec's core attention (torch SDPA) gives megatron's DotProductAttention outputs and
    gradients (GQA 4 query heads / 2 groups), for every mask the model passes it: none with a
    causal layer (LM), a boolean block-diagonal causal mask (packed RL rows), none with a
    bidirectional layer (vision segments), causal + key padding."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vr1.models.qwen25_vl.attention import SDPADotProductAttention
    from megatron_vr1.models.qwen25_vl.model import causal_padding_mask

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            attention_dropout=0.0, hidden_dropout=0.0)
    mask_type = AttnMaskType.arbitrary if case == "full-no-mask" else AttnMaskType.causal
    ref = DotProductAttention(cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    ours = SDPADotProductAttention(cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    S, B, hn = 37, 3, 16
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(S, B, h, hn, generator=g) for h in (4, 2, 2))
    mask = None
    if case == "packed-mask":  # three samples per row, each causal and blind to the others
        seg = torch.tensor([0] * 11 + [1] * 15 + [2] * 11)
        mask = (torch.ones(S, S, dtype=torch.bool).triu(1) | (seg[:, None] != seg[None, :]))[None, None]
    elif case == "padding-mask":
        am = torch.ones(B, S, dtype=torch.long)
        am[1, 30:] = 0
        am[2, 20:] = 0
        mask = causal_padding_mask(am)
    outs, grads = [], []
    for mod in (ref, ours):
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        out = mod(q, k, v, mask)
        assert out.shape == (S, B, 4 * hn)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([q.grad, k.grad, v.grad])
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(*grads)) <= 1e-5
    # and the spec's layers use it
    from megatron_vr1.models.qwen25_vl.model import layer_spec, vision_layer_spec

    for spec in (layer_spec(False), vision_layer_spec(False)):
        assert spec.submodules.self_attention.submodules.core_attention is SDPADotProductAttention
