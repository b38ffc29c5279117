"""Loading the processor of a Qwen2.5-VL checkpoint folder, with or without torchvision."""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without its video processor, for environments without torchvision.

    transformers 5.19 cannot construct ``Qwen2_5_VLProcessor`` at all when torchvision is missing:
    every video processor is torchvision-only, ``AutoProcessor`` always loads one, and even
    ``Qwen2_5_VLProcessor(video_processor=None)`` crashes in the argument class check. This
    subclass drops ``video_processor`` from ``__init__`` (ProcessorMixin derives the
    sub-processor list from that signature), so it loads only the tokenizer and the PIL image
    processor; images, text and the chat template behave exactly as in the parent class.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def load_processor(path, min_pixels: int | None = None, max_pixels: int | None = None, **kwargs):
    """Load the processor of a Qwen2.5-VL checkpoint folder, with or without torchvision.

    With torchvision: ``AutoProcessor.from_pretrained`` (the full ``Qwen2_5_VLProcessor``). Without:
    ``Qwen2_5_VLImageOnlyProcessor`` (a ``Qwen2_5_VLProcessor`` subclass; no video input).
    `min_pixels` / `max_pixels` (the recipe's data section) replace the checkpoint's image size
    bounds; the rollout engine must be given the same (VLLMEngine's arguments of the same names).
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    kwargs.update(pixel_bounds(min_pixels, max_pixels))
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path, **kwargs)
    return Qwen2_5_VLImageOnlyProcessor.from_pretrained(path, **kwargs)


def pixel_bounds(min_pixels: int | None, max_pixels: int | None) -> dict:
    """The image-size keyword arguments both the HF processor and vLLM's mm_processor_kwargs take."""
    return {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
