"""Rule-based GRPO rewards: Vision-R1's HFRRF and Vision-R1-Zero's format + result.

`hard_format_result_reward` (HFRRF, Vision-R1): 1.0 iff the whole response is
`<think>...</think><answer>...</answer>` and the extracted answer equals the ground truth,
else 0.0. `format_and_result_reward` (Vision-R1-Zero): format and result weighed 1:1,
reward = 0.5 * format_ok + 0.5 * correct, so it takes the values 0, 0.5 and 1.

Deviations from the paper (and its code):
- Format: besides the full match of `<think>.*?</think>\\s*<answer>.*?</answer>` (DOTALL, on
  the stripped response), each of the four tags must occur exactly once. The regex alone
  accepts `<think>a</think><think>b</think><answer>1</answer>` and
  `<think>a</think><answer>1</answer><answer>2</answer>` (the lazy groups swallow the extra
  tags); we reject both. This also makes the match linear in the response length. An empty
  `<think></think>` is accepted, as the regex does.
- Answer: the last `<answer>` block, with "Final Answer:", `$...$`/`\\(...\\)` and one
  `\\boxed{}` stripped (see `answer.extract_answer`).
- Equivalence: HF math-verify (LaTeX parser only, never `eval`) instead of MathRuler's
  `grade_answer`; integer truths need a numerically exact plain numeral ("12.0" passes,
  "24/2" fails), option letters are compared for multiple choice, unit suffixes are dropped
  ("5 cm" == "5"). A symbolic check that exceeds its time limit, or an answer over
  `answer.MAX_SYMBOLIC_CHARS` characters that is not literally equal, scores as wrong.
- `correct` is judged even when the format is wrong (for the accuracy metric, and for the
  result half of format_and_result, which does not require the format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_vr1.rewards.answer import SymbolicChecker, answers_match, default_checker, extract_answer

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
"""Vision-R1's format; applied with fullmatch to the stripped response."""
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclass(frozen=True)
class RewardResult:
    reward: float
    """The scalar GRPO reward."""
    format_ok: bool
    """The response is exactly one think block followed by one answer block."""
    correct: bool
    """The extracted answer matches the ground truth (regardless of the format)."""
    answer: str | None
    """The extracted answer; None when there is no `<answer>...</answer>`."""


def check_format(response: str) -> bool:
    """Whether the stripped response is `<think>...</think>` `<answer>...</answer>`, one of each."""
    text = response.strip()
    return all(text.count(tag) == 1 for tag in _TAGS) and FORMAT_RE.fullmatch(text) is not None


def _judge(response: str, truth: str, checker: SymbolicChecker | None) -> tuple[bool, bool, str | None]:
    answer = extract_answer(response)
    correct = answer is not None and answers_match(answer, truth, checker=checker)
    return check_format(response), correct, answer


def hard_format_result_reward(response: str, truth: str, checker: SymbolicChecker | None = None) -> RewardResult:
    """HFRRF: 1.0 iff the format is right AND the answer matches `truth`, else 0.0."""
    format_ok, correct, answer = _judge(response, truth, checker)
    return RewardResult(float(format_ok and correct), format_ok, correct, answer)


def format_and_result_reward(
    response: str, truth: str, format_weight: float = 0.5, checker: SymbolicChecker | None = None
) -> RewardResult:
    """Vision-R1-Zero: format_weight * format_ok + (1 - format_weight) * correct, in [0, 1]."""
    if not 0 <= format_weight <= 1:
        raise ValueError(f"format_weight ({format_weight}) must be in [0, 1]; 0.5 weighs format and result 1:1")
    format_ok, correct, answer = _judge(response, truth, checker)
    return RewardResult(format_weight * format_ok + (1 - format_weight) * correct, format_ok, correct, answer)


REWARDS = {"hfrrf": hard_format_result_reward, "format_and_result": format_and_result_reward}
"""Reward functions by their `grpo.reward` name."""


def score_batch(
    responses: list[str], truths: list[str], reward: str = "hfrrf", checker: SymbolicChecker | None = None, **kwargs
) -> list[RewardResult]:
    """Score response i against truths[i] with one checker (default: the process-wide one).

    `kwargs` go to the reward function (e.g. `format_weight` for "format_and_result").
    """
    if reward not in REWARDS:
        raise ValueError(f"reward {reward!r} is unknown; choose one of {sorted(REWARDS)} (grpo.reward)")
    if len(responses) != len(truths):
        raise ValueError(f"{len(responses)} responses but {len(truths)} truths; pass one truth per response")
    fn, checker = REWARDS[reward], checker or default_checker()
    return [fn(response, truth, checker=checker, **kwargs) for response, truth in zip(responses, truths)]
