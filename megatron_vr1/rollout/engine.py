"""The rollout engine interface and its records.

An engine generates a group of completions per prompt with per-token logprobs (images
included), takes new weights from the trainer (`update_weights`, fed by `resync.hf_buckets`), and
can release / reclaim its memory around training (`sleep` / `wake_up`; a no-op where the backend
has no such mode, e.g. vLLM on CPU). `VLLMEngine` (rollout/vllm_engine.py) implements it.

Weight updates are transactional from the caller's point of view: `update_weights` marks the
engine *dirty* before the first bucket and clean after the last one and the cache resets; an
engine left dirty by a failed update refuses to generate (`EngineWeightsInconsistent`) until a
complete update succeeds, so it never serves a mix of old and new weights silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional, Protocol

import torch

Bucket = list[tuple[str, torch.Tensor]]


class EngineWeightsInconsistent(RuntimeError):
    """The engine holds a partial weight update (a resync failed midway)."""


@dataclass
class RolloutPrompt:
    """One prompt: its chat-templated text (one `<|image_pad|>` per image; the engine expands it)
    and the images it refers to, in order."""

    text: str
    images: list[Any] = field(default_factory=list)
    """PIL images."""


@dataclass
class SamplingSettings:
    n: int = 1
    """Completions per prompt (the GRPO group size)."""
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None


@dataclass
class Rollout:
    """One completion of one prompt, as the engine produced it."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    """Prompt token ids with the image pads expanded (what the trainer feeds the policy)."""
    response_ids: list[int]
    response_logprobs: list[float]
    """The engine's logprob of each response token (the behaviour policy)."""
    finish_reason: Literal["stop", "length"]
    response_text: str
    images: list[Any]
    seconds: float
    """Wall time of the generate call that produced it."""


@dataclass
class UpdateStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    max_bucket_bytes: int = 0
    seconds: float = 0.0


class RolloutEngine(Protocol):
    def generate(self, prompts: list[RolloutPrompt], sampling: SamplingSettings) -> list[list[Rollout]]:
        """`sampling.n` rollouts per prompt, grouped by prompt."""

    def prompt_logprobs(self, prompts: list[RolloutPrompt], continuations: list[list[int]]) -> list[list[float]]:
        """Logprobs the engine assigns to given continuation tokens of each prompt (teacher forcing)."""

    def update_weights(self, buckets: Iterable[Bucket]) -> UpdateStats:
        """Load HF-named tensors (canonical names), bucket by bucket, then reset the engine's caches."""

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...

    def shutdown(self) -> None: ...


@dataclass
class Mismatch:
    """Trainer vs engine logprobs on the same sampled tokens."""

    mean_abs: float
    max_abs: float
    mult_prob_error: float
    """mean over tokens of exp(|logp_trainer - logp_engine|); NeMo-RL gates at 1.05."""
    tokens: int


def logprob_mismatch(trainer_logp_T: torch.Tensor, engine_logp_T: torch.Tensor, mask_T: torch.Tensor) -> Mismatch:
    """Per-token mismatch over the masked (response) tokens; inputs are flat or same-shaped."""
    m = mask_T.bool()
    d = (trainer_logp_T.double() - engine_logp_T.double())[m].abs()
    if d.numel() == 0:
        return Mismatch(0.0, 0.0, 1.0, 0)
    return Mismatch(float(d.mean()), float(d.max()), float(torch.exp(d).mean()), int(d.numel()))
