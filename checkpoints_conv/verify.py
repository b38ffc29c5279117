"""Logits parity: the Megatron model on a converted checkpoint vs transformers on the HF folder.

Probes: a text-only prompt, one image, two images of different sizes in one sample, and an image
large enough that window attention cuts it into several windows. The Megatron side runs through
megatron-core's pipeline schedule (forward only), so the same code checks TP, PP and TP x PP;
the caller initialises the process groups (one process: TP=1, PP=1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DEFAULT_TOLERANCE = 1e-4


@dataclass
class Probe:
    name: str
    inputs: dict
    """Processor outputs for one sample (input_ids [1, S], attention_mask, pixel_values, image_grid_thw, ...)."""


def _image(w: int, h: int, seed: int):
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (w, h), tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g)))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(torch.randint(0, w - 8, (1,), generator=g)), int(torch.randint(0, h - 8, (1,), generator=g))
        x1, y1 = x0 + int(torch.randint(4, 40, (1,), generator=g)), y0 + int(torch.randint(4, 40, (1,), generator=g))
        color = tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g))
        (d.ellipse if torch.rand(1, generator=g) < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=color)
    return img


def probes(hf_dir: str | Path) -> list[Probe]:
    from megatron_vr1.hf_processor import load_processor

    proc = load_processor(hf_dir)

    def chat(images, text):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                          add_generation_prompt=True)
        prompt += "<think>I see a red square. Red shapes: 1.</think><answer>1</answer>"
        out = proc(text=[prompt], images=images or None, return_tensors="pt")
        return dict(out)

    return [
        Probe("text", chat([], "What is 2 + 3? Answer with a number.")),
        Probe("one_image", chat([_image(112, 112, 1)], "How many red shapes are there?")),
        Probe("two_images", chat([_image(112, 112, 2), _image(168, 112, 3)], "Which image has more shapes?")),
        Probe("windows", chat([_image(224, 224, 4)], "How many shapes are there?")),
    ]


def hf_logits(hf_model, probe: Probe) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(**probe.inputs).logits.float()


def mcore_logits(model, arch, probe: Probe) -> Optional[torch.Tensor]:
    """Full-vocab logits [1, S, vocab] on the last pipeline stage (None on other stages)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vr1.models.qwen25_vl.io import make_inputs

    p = probe.inputs
    inp = make_inputs(arch, p["input_ids"], p.get("attention_mask"), p.get("pixel_values"), p.get("image_grid_thw"))
    S = inp.input_ids_BS.shape[1]

    def forward_step(data_iterator, model_):
        out = model_(next(data_iterator))
        return out, lambda output, non_loss_data=False: output

    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([inp]), model=[model], num_microbatches=1,
            seq_length=S, micro_batch_size=1, forward_only=True, collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return outs[0][..., : arch.text.vocab_size].float()


def compare(hf_dir: str | Path, mcore_dir: str | Path, tp: int = 1, pp: int = 1) -> dict[str, float]:
    """Max |logit diff| per probe; needs model-parallel state initialised with (tp, pp).

    Every rank returns the same numbers (the last stage broadcasts them)."""
    import torch.distributed as dist
    from transformers import Qwen2_5_VLForConditionalGeneration

    from checkpoints_conv.arch import load_hf_arch
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    arch = load_hf_arch(hf_dir)
    model = build_model(arch, ModelOptions(tp=tp, pp=pp), parallel_output=False)
    load_weights(model, mcore_dir)
    model.eval()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    diffs = {}
    for probe in probes(hf_dir):
        ours = mcore_logits(model, arch, probe)
        d = torch.tensor([-1.0])
        if ours is not None:
            d[0] = (ours - hf_logits(hf, probe)).abs().max()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(d, op=dist.ReduceOp.MAX)
        diffs[probe.name] = float(d[0])
    assert all(math.isfinite(v) and v >= 0 for v in diffs.values()), diffs
    return diffs
