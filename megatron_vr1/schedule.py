"""Learning-rate schedule shared by SFT and RL: linear warmup, then constant or cosine
(`optim.lr_schedule`, `optim.warmup_ratio`)."""

from __future__ import annotations

import math


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """ceil(warmup_ratio * total), as Hugging Face's Trainer counts it."""
    return math.ceil(warmup_ratio * total)


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str) -> float:
    """Learning rate of optimizer step `step` (1-based) of `total`: peak*step/warmup while
    step <= warmup, then `peak` (constant) or peak*(1+cos(pi*k/(total-warmup)))/2 with
    k = step-1-warmup (cosine: the first step after warmup is at the peak, the last above 0)."""
    if step <= warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    if schedule != "cosine":
        raise ValueError(f"optim.lr_schedule {schedule!r}: use 'constant' or 'cosine'")
    progress = (step - 1 - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
