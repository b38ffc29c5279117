"""Rule-based rewards for GRPO: answer extraction, answer equivalence, HFRRF."""

from megatron_vr1.rewards.answer import SymbolicChecker, answers_match, default_checker, extract_answer
from megatron_vr1.rewards.hfrrf import (
    FORMAT_RE,
    REWARDS,
    RewardResult,
    check_format,
    format_and_result_reward,
    hard_format_result_reward,
    score_batch,
)

__all__ = [
    "FORMAT_RE",
    "REWARDS",
    "RewardResult",
    "SymbolicChecker",
    "answers_match",
    "check_format",
    "default_checker",
    "extract_answer",
    "format_and_result_reward",
    "hard_format_result_reward",
    "score_batch",
]
