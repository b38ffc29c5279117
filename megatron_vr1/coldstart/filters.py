"""Filters of the cold-start CoT (pure functions): answer check, consistency rules, rewriting.

`judge_cot(raw, truth, ...)` normalises the reasoner's output to `<think>...</think><answer>...</answer>`
and returns a `Verdict`: kept with the final (rewritten) CoT, or dropped with the first reason that
applies, in this order:

- `truncated`: the response was cut at max_tokens;
- `bad_format`: not exactly one think block followed by one answer block (HFRRF's format check:
  the cold start must teach the format the RL reward asks for);
- `no_answer`: the answer block is empty;
- `wrong_answer`: the answer does not match the ground truth (the reward's own checker:
  `rewards.answers_match`);
- `think_contradicts_answer`: the last conclusion stated inside the reasoning ("the answer is X",
  "\\boxed{X}", "Final answer: X") does not match the ground truth either;
- `repetitive`: one sentence occurs more than `max_repeats` times (a decoding loop);
- `refers_to_description`: after the rewrites (`rewrite_phrases`, e.g. "according to the
  description" -> "according to the image") a forbidden word is still there ("the description
  does not say...": the CoT cannot pretend it saw the image).

Normalisation accepts R1-style outputs: a reasoning that ends in `</think>` without an opening tag
(the chat template opened it), and an answer after `</think>` given as `\\boxed{X}` or
"Final answer: X" instead of an answer block.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from megatron_vr1.rewards import answers_match, check_format, extract_answer
from megatron_vr1.rewards.answer import last_boxed

_BOXED = "\\boxed"
_CONCLUSION_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*[*$\s]*([^\n]+?)[\s*$]*(?:[.\n]|$)", re.IGNORECASE
)
_FINAL_RE = re.compile(r"final\s+answer\s*(?:is|:)?\s*[*\s]*([^\n]+)", re.IGNORECASE)
_SENTENCE_RE = re.compile(r"[^.!?\n]+")


@dataclass
class Verdict:
    keep: bool
    reason: str
    """"kept" or the drop reason."""
    response: str
    """The normalised CoT (rewritten when kept)."""
    predicted: Optional[str] = None
    """The extracted answer, if any."""




def to_think_answer(raw: str) -> str:
    """R1-style output -> `<think>...</think><answer>...</answer>` when it can be done unambiguously."""
    text = raw.strip()
    if "</think>" in text and "<think>" not in text:
        text = "<think>" + text
    if "<answer>" not in text and text.count("</think>") == 1:
        head, tail = text.split("</think>", 1)
        answer = last_boxed(tail)
        if answer is None:
            m = _FINAL_RE.search(tail)
            answer = m.group(1).strip().rstrip(".") if m else None
        if answer:
            text = f"{head}</think><answer>{answer}</answer>"
    return text


def rewrite(text: str, pairs: list[tuple[str, str]]) -> str:
    """Replace each `from` phrase (case-insensitive, whole words, longest first); the
    replacement takes the capital of a capitalised original ("Based on the description" ->
    "Based on the image")."""
    if not pairs:
        return text
    table = {a.lower(): b for a, b in pairs}
    alternatives = sorted(table, key=len, reverse=True)
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(a) for a in alternatives) + r")\b", re.IGNORECASE)

    def sub(m: re.Match) -> str:
        new = table[m.group(0).lower()]
        return new[:1].upper() + new[1:] if m.group(0)[:1].isupper() else new

    return pattern.sub(sub, text)


def conclusion(think: str) -> Optional[str]:
    """The last answer stated inside a reasoning (a \\boxed{} or "the answer is X"), if any."""
    boxed_at, box = think.rfind(_BOXED), last_boxed(think)
    matches = list(_CONCLUSION_RE.finditer(think))
    said = matches[-1] if matches else None
    if box is not None and (said is None or boxed_at > said.start()):
        return box
    return said.group(1).strip() if said else None


def most_repeated(text: str) -> int:
    """How often the most frequent sentence (>= 3 words, case- and space-insensitive) occurs."""
    counts = Counter(" ".join(s.lower().split()) for s in _SENTENCE_RE.findall(text) if len(s.split()) >= 3)
    return max(counts.values(), default=0)


def judge_cot(raw: str, truth: str, *, finish_reason: str = "stop", rewrites: list[tuple[str, str]] = (),
              forbidden: list[str] = (), max_repeats: int = 3, checker=None) -> Verdict:
    """Keep or drop one reasoner output for a row whose ground truth is `truth` (module docstring)."""
    text = to_think_answer(raw)
    if finish_reason == "length":
        return Verdict(False, "truncated", text)
    if not check_format(text):
        return Verdict(False, "bad_format", text)
    predicted = extract_answer(text)
    if not predicted:
        return Verdict(False, "no_answer", text, predicted)
    if not answers_match(predicted, truth, checker=checker):
        return Verdict(False, "wrong_answer", text, predicted)
    think = text[text.index("<think>") + len("<think>") : text.index("</think>")]
    said = conclusion(think)
    if said is not None and not answers_match(said, truth, checker=checker):
        return Verdict(False, "think_contradicts_answer", text, predicted)
    if most_repeated(think) > max_repeats:
        return Verdict(False, "repetitive", text, predicted)
    text = rewrite(text, list(rewrites))
    for word in forbidden:
        if re.search(r"\b" + re.escape(word) + r"\b", text, re.IGNORECASE):
            return Verdict(False, "refers_to_description", text, predicted)
    return Verdict(True, "kept", text, predicted)


def truncate_reflection(response: str, marker: Optional[str]) -> str:
    """Cut the reasoning before the first `marker` ("Wait,"), keeping the answer block
    (OpenVLThinker trims reflections of the regenerated data); unchanged without the marker or
    when nothing would be left of the reasoning."""
    if not marker or "<think>" not in response or "</think>" not in response:
        return response
    start = response.index("<think>") + len("<think>")
    end = response.index("</think>")
    cut = response.find(marker, start, end)
    if cut < 0 or not response[start:cut].strip():
        return response
    return response[:start] + response[start:cut].rstrip() + response[end:]
