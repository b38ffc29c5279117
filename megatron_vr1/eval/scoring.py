"""Answer extraction and rule-based scoring of benchmark responses (pure functions).

Extraction (`extract_prediction`), first that applies:
  1. the last complete `<answer>...</answer>` (Vision-R1's format; "Final Answer:", `$..$` and one
     `\\boxed{}` inside are peeled off by `rewards.extract_answer`);
  2. the text after the last "Final Answer:" (to the end of its line);
  3. the last `\\boxed{...}` of the response.

Rules (`score_sample`), by `EvalSample.kind`:
  choice   the option letter ("B", "(B) 12", "Option B"; read by `rewards.option_letter`, the
           parser the rewards use) or, when the options are known, the option's text ("145°"
           for the choice "145°"); another option's text is wrong
  integer  a plain numeral of exactly that value (the rewards' strict integer rule), unit stripped
  float    MathVista: both rounded to the row's `precision` decimals; DynaMath: |pred - truth| <=
           1e-3; then the general rule
  list     MathVista lists: same length, element-wise equal as numbers (or as text)
  text     equal after normalisation, ignoring case; then the general rule
  expr     MM-Math (tolerance 1e-2): top-level comma lists matched as unordered sets, each part
           numerically within 1.01 x 1e-2 (also truth x 100 and truth / 100, as MM-Math allows
           percentages), otherwise symbolically; others: the general rule
The general rule is `rewards.answers_match` (normalisation, units after a number dropped,
strict integers, then math-verify in a time-limited worker; model text is never `eval`ed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from megatron_vr1.eval.loaders import LETTERS, EvalSample
from megatron_vr1.rewards.answer import (
    SymbolicChecker, answers_match, brace_group, extract_answer, last_boxed, option_letter,
)

# ----------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Extraction:
    text: str | None
    """The extracted answer; None when the response has none."""
    method: str
    """answer_tag | final_answer | boxed | none"""


_FINAL_ANSWER_RE = re.compile(r"final\s+answer\s*(?:is)?\s*[:：]?", re.IGNORECASE)


def extract_prediction(response: str) -> Extraction:
    """The answer a response gives (see the module docstring for the order)."""
    tagged = extract_answer(response)
    if tagged is not None and tagged.strip():
        return Extraction(tagged, "answer_tag")
    matches = list(_FINAL_ANSWER_RE.finditer(response))
    if matches:
        tail = response[matches[-1].end():].strip().split("\n", 1)[0].strip().strip("*").strip()
        if tail:
            return Extraction(extract_answer(f"<answer>{tail}</answer>"), "final_answer")
    boxed = last_boxed(response)
    if boxed:
        return Extraction(boxed, "boxed")
    return Extraction(None, "none")


# ----------------------------------------------------------------------------- numbers and units

_UNIT_WORDS = (
    r"(?:square\s+|sq\.?\s*|cubic\s+)?(?:centimet(?:er|re)s?|millimet(?:er|re)s?|kilomet(?:er|re)s?|met(?:er|re)s?"
    r"|cm|mm|km|m|inch(?:es)?|in|feet|foot|ft|yards?|yd|units?|degrees?|deg|°|radians?|rad|hours?|minutes?|min"
    r"|seconds?|s|kg|g|dollars?|years?|厘米|米|度)(?:\^?\{?[23]\}?|²|³)?"
)
_TRAILING_UNIT_RE = re.compile(r"(?<=[\d}.)])\s*(?:\\(?:text|mathrm|mbox)\s*\{\s*" + _UNIT_WORDS + r"\s*\}|" +
                               _UNIT_WORDS + r")(?:\^\{?[23]\}?|²|³)?\s*\.?$", re.IGNORECASE)
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def strip_units(text: str, unit: str | None = None) -> str:
    """Drops a trailing unit ("12 cm", "30°", "5\\text{ cm}^2", the row's own `unit`), `$`s and a final period."""
    text = text.strip().replace("$", "").strip().rstrip(".").strip()
    text = _DEGREE_RE.sub("", text).strip()
    if unit and unit.strip() and text.endswith(unit.strip()) and len(text) > len(unit.strip()):
        text = text[: -len(unit.strip())].strip()
    for _ in range(2):
        text = _TRAILING_UNIT_RE.sub("", text).strip()
    return text


def parse_number(text: str, unit: str | None = None, _depth: int = 0) -> float | None:
    """A plain numeric answer -> float; None when it is not one. Understands "1,000", "-3.5",
    "25%", "3/4", "\\frac{3}{4}", "2\\sqrt{3}", "\\sqrt{2}/2", "3\\pi", "\\frac{\\sqrt{3}}{2}" and
    trailing units. No general expression evaluation (that is math-verify's job)."""
    if _depth > 4:
        return None
    s = strip_units(text, unit).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\u2212", "-").replace(" ", "")
    s = re.sub(r"\\[,!;:]", "", s)
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if not s:
        return None
    if s.endswith("\\%") or s.endswith("%"):
        inner = parse_number(s.rstrip("%").rstrip("\\"), None, _depth + 1)
        return None if inner is None else inner  # MM-Math compares percentages by value (x100 tolerated)
    if _NUMBER_RE.fullmatch(s):
        return float(s)
    sign = -1.0 if s.startswith("-") else 1.0
    body = s[1:] if s[0] in "+-" else s
    if body.startswith("(") and body.endswith(")"):
        inner = parse_number(body[1:-1], None, _depth + 1)
        return None if inner is None else sign * inner
    if body.startswith("\\frac"):
        num = brace_group(body, len("\\frac"))
        den = brace_group(body, num[1]) if num else None
        if num and den and den[1] == len(body):
            a, b = parse_number(num[0], None, _depth + 1), parse_number(den[0], None, _depth + 1)
            if a is not None and b:
                return sign * a / b
        return None
    if body.count("/") == 1:
        a, b = (parse_number(part, None, _depth + 1) for part in body.split("/"))
        return sign * a / b if a is not None and b else None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)?\\sqrt(?:\{([^{}]+)\}|(\d+))", body)
    if m:
        radicand = parse_number(m.group(2) or m.group(3), None, _depth + 1)
        if radicand is None or radicand < 0:
            return None
        return sign * float(m.group(1) or 1) * math.sqrt(radicand)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)?\\pi", body)
    if m:
        return sign * float(m.group(1) or 1) * math.pi
    return None


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Verdict:
    correct: bool
    rule: str
    """Which rule decided (for the records): letter, choice_text, integer, rounded, tolerance, list,
    text, symbolic, no_answer, ..."""


def _norm_text(text: str) -> str:
    text = strip_units(text)
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", text)
    return re.sub(r"\s+", " ", text).strip().strip(".").strip().casefold()


def score_choice(sample: EvalSample, pred: str, checker: SymbolicChecker | None = None) -> Verdict:
    truth_letter, truth_text = sample.answer_letter, sample.answer_text
    pred_n = _norm_text(pred)
    # an option's exact text first (a choice such as "A cat" must not be read as letter A) ...
    if truth_text is not None:
        if pred_n == _norm_text(truth_text):
            return Verdict(True, "choice_text")
        if any(_norm_text(c) == pred_n for c in (sample.choices or []) if c != truth_text):
            return Verdict(False, "choice_text")
    # ... then an option letter (the rewards' parser: the same text gives the same letter) ...
    letter = option_letter(pred)
    if letter is not None and truth_letter is not None:
        return Verdict(letter == truth_letter, "letter")
    if truth_text is None:
        return Verdict(False, "letter")
    # ... then the right option's value in another form ("0.5" for "$\\frac{1}{2}$", "145" for "145°")
    a, b = parse_number(pred, sample.unit), parse_number(truth_text, sample.unit)
    if a is not None and b is not None:
        return Verdict(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), "choice_text")
    return Verdict(answers_match(pred, truth_text, checker=checker), "choice_text")


def _parse_list(text: str) -> list[str] | None:
    s = strip_units(text).strip()
    if not (s.startswith(("[", "(")) and s.endswith(("]", ")"))):
        return None
    return [p.strip().strip("'\"") for p in s[1:-1].split(",") if p.strip()]


def _split_top_level(text: str) -> list[str]:
    """"1, (2, 3)" -> ["1", "(2, 3)"]: commas outside brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch in ",，" and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * 1.01


def _mmmath_part(pred: str, truth: str, tol: float, checker: SymbolicChecker | None) -> bool:
    pred = re.sub(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*", "", pred.strip())
    truth = re.sub(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*", "", truth.strip())
    a, b = parse_number(pred), parse_number(truth)
    if a is not None and b is not None:
        return any(_close(a, t, tol) for t in (b, b * 100, b / 100))
    return answers_match(pred, truth, checker=checker)


def score_expr(sample: EvalSample, pred: str, checker: SymbolicChecker | None = None) -> Verdict:
    if sample.tolerance is None:
        return Verdict(answers_match(pred, sample.answer, checker=checker), "symbolic")
    truth_parts, pred_parts = _split_top_level(sample.answer), _split_top_level(pred)
    if len(truth_parts) <= 1:
        return Verdict(_mmmath_part(pred, sample.answer, sample.tolerance, checker), "tolerance")
    if len(pred_parts) != len(truth_parts):
        return Verdict(False, "tolerance")
    remaining = list(pred_parts)
    for t in truth_parts:
        hit = next((p for p in remaining if _mmmath_part(p, t, sample.tolerance, checker)), None)
        if hit is None:
            return Verdict(False, "tolerance")
        remaining.remove(hit)
    return Verdict(True, "tolerance")


def score_sample(sample: EvalSample, pred: str | None, checker: SymbolicChecker | None = None) -> Verdict:
    """Whether the extracted answer `pred` is right for `sample` under its benchmark's rules."""
    if pred is None or not pred.strip():
        return Verdict(False, "no_answer")
    kind = sample.kind
    if kind == "choice":
        return score_choice(sample, pred, checker)
    if kind == "integer":
        return Verdict(answers_match(strip_units(pred, sample.unit), sample.answer, checker=checker), "integer")
    if kind == "float":
        a, b = parse_number(pred, sample.unit), parse_number(sample.answer)
        if a is not None and b is not None:
            if sample.tolerance is not None:
                return Verdict(_close(a, b, sample.tolerance), "tolerance")
            if sample.precision is not None:
                return Verdict(round(a, sample.precision) == round(b, sample.precision), "rounded")
            return Verdict(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), "number")
        return Verdict(answers_match(pred, sample.answer, checker=checker), "symbolic")
    if kind == "list":
        p, t = _parse_list(pred), _parse_list(sample.answer)
        if p is None or t is None or len(p) != len(t):
            return Verdict(False, "list")
        for x, y in zip(p, t):
            a, b = parse_number(x), parse_number(y)
            same = (math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) if a is not None and b is not None
                    else _norm_text(x) == _norm_text(y))
            if not same:
                return Verdict(False, "list")
        return Verdict(True, "list")
    if kind == "text":
        if _norm_text(pred) == _norm_text(sample.answer):
            return Verdict(True, "text")
        return Verdict(answers_match(pred, sample.answer, checker=checker), "symbolic")
    if kind == "expr":
        return score_expr(sample, pred, checker)
    raise AssertionError(f"unknown sample kind {kind!r}")


__all__ = [
    "Extraction", "Verdict", "extract_prediction", "option_letter", "parse_number", "score_sample", "strip_units",
    "LETTERS",
]  # fmt: skip
