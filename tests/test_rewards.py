"""Rewards: format rule, answer extraction, answer equivalence, the symbolic worker's time limit."""

import multiprocessing
import os
import time
import typing

import pytest

from megatron_vr1.config import GRPOConfig
from megatron_vr1.rewards import (
    REWARDS,
    SymbolicChecker,
    answers_match,
    check_format,
    extract_answer,
    format_and_result_reward,
    hard_format_result_reward,
    score_batch,
)

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def checker():
    with SymbolicChecker(timeout_s=TIMEOUT_S) as checker:
        checker.start()
        yield checker


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "response, ok",
    [
        ("<think>reasoning</think><answer>12</answer>", True),
        ("  \n<think>a\nb</think>\n\n<answer>\n12\n</answer>\n ", True),  # surrounding/inner whitespace
        ("<think></think><answer>12</answer>", True),  # empty think: the paper's regex accepts it
        ("<think>a</think><answer></answer>", True),  # empty answer: format ok, never correct
        ("<answer>12</answer>", False),  # missing think
        ("<think>a</think>", False),  # missing answer
        ("<think>a</think> 12", False),
        ("<think>a<answer>12</answer>", False),  # unclosed think
        ("<think>a</think><answer>12", False),  # unclosed answer
        ("<think>a</think><answer>12</answer> and more", False),  # text after </answer>
        ("Sure! <think>a</think><answer>12</answer>", False),  # text before <think>
        ("<think>a</think>text<answer>12</answer>", False),  # text between blocks
        ("<answer>12</answer><think>a</think>", False),  # wrong order
        ("<think>a</think><think>b</think><answer>12</answer>", False),  # two thinks (regex alone: True)
        ("<think>a</think><answer>1</answer><answer>2</answer>", False),  # two answers (regex alone: True)
        ("<think><think>a</think></think><answer>12</answer>", False),  # nested (regex alone: True)
        ("<think>a</think><answer><answer>12</answer></answer>", False),  # nested answer
        ("<think>a</think><answer>1</answer>\n<answer>2</answer>", False),
        ("<THINK>a</THINK><ANSWER>12</ANSWER>", False),  # tags are case-sensitive
    ],
)
def test_format(response, ok):
    assert check_format(response) is ok


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "response, answer",
    [
        ("<think>a</think><answer>12</answer>", "12"),
        ("<answer>  12 \n</answer>", "12"),
        ("<answer>Final Answer: 12</answer>", "12"),
        ("<answer>final answer:12</answer>", "12"),
        ("<answer>**Final Answer:** 12</answer>", "12"),
        ("<answer>**Final Answer**: $12$</answer>", "12"),
        ("<answer>The final answer is 12</answer>", "12"),
        ("<answer>$\\frac{1}{2}$</answer>", "\\frac{1}{2}"),
        ("<answer>$$x+1$$</answer>", "x+1"),
        ("<answer>\\(2\\sqrt{3}\\)</answer>", "2\\sqrt{3}"),
        ("<answer>\\boxed{12}</answer>", "12"),
        ("<answer>Final Answer: $\\boxed{\\frac{1}{2}}$</answer>", "\\frac{1}{2}"),
        ("<answer>\\boxed{\\{1, 2\\}}</answer>", "\\{1, 2\\}"),  # escaped braces inside
        ("<answer>The area is \\boxed{12}.</answer>", "12"),  # the one boxed value wins
        ("<answer>\\boxed{1} or \\boxed{2}</answer>", "\\boxed{1} or \\boxed{2}"),  # two: left alone
        ("<answer>\\boxed{12</answer>", "\\boxed{12"),  # unbalanced: left alone
        ("<answer>$1$ and $2$</answer>", "$1$ and $2$"),  # not one math span
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last block
        ("<answer>1</answer> then <answer>2", "1"),  # the last complete block
        ("<answer></answer>", ""),
        ("<answer>Final answers vary</answer>", "Final answers vary"),
        ("<think>12</think>", None),
        ("no tags at all", None),
        ("</answer><answer>", None),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "pred, truth, match",
    [
        # a. multiple choice: option letters only
        ("B", "B", True),
        ("(B)", "B", True),
        ("B", "(B)", True),
        ("B.", "B", True),
        ("B)", "B.", True),
        ("B. 12 cm", "B", True),
        ("(B) 12 cm", "B", True),
        ("B: 12", "B", True),
        ("Option B", "B", True),
        ("option (B)", "B", True),
        ("The answer is B.", "B", True),
        ("The correct answer is option B", "B", True),
        ("\\text{B}", "B", True),
        ("**B**", "B", True),
        ("C", "B", False),
        ("C. 12 cm", "B", False),
        ("12 cm", "B", False),  # the option's text is not compared
        ("B and C", "B", False),
        ("b", "B", False),  # letters are upper case
        ("Both", "B", False),
        ("Optional B", "B", False),
        ("A triangle", "A", False),  # a bare letter needs ".", ":" or ")" before more text
        # b. light normalisation
        ("triangle", "triangle", True),
        ("  x+1 .", "x+1", True),
        ("\\text{right angle}", "right angle", True),
        ("5 cm", "5", True),
        ("5\\text{ cm}", "5", True),
        ("5", "5 cm", True),
        ("30^\\circ", "30", True),
        ("30^{\\circ}", "30", True),
        ("30°", "30", True),
        ("30 degrees", "30", True),
        ("24 cm^2", "24", True),
        ("24 square units", "24", True),
        ("x = 4", "4", True),
        ("x=12", "12", True),
        ("", "", False),  # an empty truth never rewards
        ("Triangle", "triangle", False),  # no case folding for text
        # c. integer truth: a plain numeral of exactly that value
        ("12", "12", True),
        ("012", "12", True),
        ("12.0", "12", True),
        ("12.00", "12", True),
        ("1000", "1,000", True),
        ("1,000", "1000", True),
        ("-3", "-3", True),
        ("\u22123", "-3", True),  # unicode minus
        ("-3.0", "-3", True),
        ("3", "-3", False),
        ("12.5", "12", False),
        ("11.9999999", "12", False),
        ("24/2", "12", False),
        ("\\frac{24}{2}", "12", False),
        ("1,00", "100", False),
        ("1e1", "10", False),
        ("12 or 13", "12", False),
        ("", "12", False),
        # d. symbolic (math-verify)
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        ("\\sqrt{12}", "2\\sqrt{3}", True),
        ("2\\sqrt{3}", "\\sqrt{12}", True),
        ("3.4641016", "2\\sqrt{3}", True),
        ("3.46", "2\\sqrt{3}", False),
        ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}", True),
        ("\\frac{\\pi}{2}", "\\pi/2", True),
        ("(x+1)^2", "x^2+2x+1", True),
        ("\\{2, 1\\}", "\\{1,2\\}", True),
        ("[0, 1)", "[0,1)", True),
        ("[0, 1]", "(0,1)", False),
        ("7/2", "3.5", True),
        ("\\frac{5}{2} cm", "2.5", True),
        ("4\\sqrt{3} cm^2", "4\\sqrt{3}", True),
        ("3\\sqrt{2}", "2\\sqrt{3}", False),
        ("2", "\\frac{1}{2}", False),
        ("nonsense", "\\frac{1}{2}", False),
    ],
)
def test_answers_match(pred, truth, match, checker):
    assert answers_match(pred, truth, checker=checker) is match


# ----------------------------------------------------------------------------- adversarial inputs

ADVERSARIAL = {
    "tower_of_powers": "10^{10^{10^{10}}}",
    "python_power": "9**9**9**9",
    "latex_power_growing": "2^{2^{2^{40}}}",
    "nested_frac_500": "\\frac{" * 500,  # over MAX_SYMBOLIC_CHARS: literal comparison only
    "nested_frac_300": "\\frac{" * 300,
    "nested_frac_closed": "\\frac{" * 150 + "1}{2}" * 150,
    "nested_sqrt": "\\sqrt{" * 250 + "2" + "}" * 250,
    "factorial": "(10^{100})!",
    "binomial": "\\binom{10^{12}}{10^{6}}",
    "one_megabyte": "1" * (1 << 20),
    "one_megabyte_braces": "{" * (1 << 20),
    "import_os": "__import__('os').system('touch {canary}')",
    "eval_latex": "\\text{__import__('os').system('touch {canary}')}",
    "unbalanced": "\\frac{1}{2",
    "unbalanced_close": "}}}\\sqrt{2}}}",
    "nan": "nan",
    "nan_latex": "\\mathrm{NaN}",
    "inf": "\\infty",
    "unicode_junk": "\u202e\x00\ud800\U0001f600" * 50,
    "tags_in_answer": "<answer>" * 1000,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
@pytest.mark.parametrize("truth", ["\\frac{1}{2}", "12"])
def test_adversarial_answer_scores_zero_in_time(name, truth, checker, tmp_path):
    canary = tmp_path / "pwned"
    pred = ADVERSARIAL[name].replace("{canary}", str(canary))
    response = f"<think>hmm</think><answer>{pred}</answer>"
    checker.start()  # a previous timeout's restart is not part of this case's limit
    start = time.monotonic()
    result = hard_format_result_reward(response, truth, checker=checker)
    elapsed = time.monotonic() - start
    print(f"{name} vs {truth}: {elapsed:.3f} s")
    assert result.reward == 0.0 and not result.correct
    assert elapsed < 3 * TIMEOUT_S
    assert not canary.exists()


def test_adversarial_whole_response_in_time(checker):
    """A 1 MB response full of tags: the format check and extraction stay linear."""
    response = "<think>" + "</think><answer>" * 60_000 + "</answer>"
    start = time.monotonic()
    result = hard_format_result_reward(response, "\\frac{1}{2}", checker=checker)
    assert time.monotonic() - start < 3 * TIMEOUT_S
    assert result.reward == 0.0 and not result.format_ok


def test_timeout_restarts_worker_and_it_still_works(checker):
    checker.start()
    before_pid, before_restarts = checker.worker_pid, checker.restarts
    start = time.monotonic()
    assert not checker.check("10^{10^{10^{10}}}", "\\frac{1}{2}", timeout_s=0.5)
    assert time.monotonic() - start < 1.5
    assert checker.restarts == before_restarts + 1 and checker.worker_pid is None
    assert checker.check("0.5", "\\frac{1}{2}")
    assert checker.worker_pid not in (None, before_pid)


def test_dead_worker_is_replaced(checker):
    checker.start()
    os.kill(checker.worker_pid, 9)
    time.sleep(0.05)
    assert checker.check("\\sqrt{12}", "2\\sqrt{3}")


def _check_in_child(checker, queue):
    queue.put((checker.check("1/2", "0.5"), checker.worker_pid))


def test_forked_child_uses_its_own_worker(checker):
    checker.start()
    parent_worker = checker.worker_pid
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_check_in_child, args=(checker, queue))
    child.start()
    ok, child_worker = queue.get(timeout=30)
    child.join(timeout=30)
    assert ok and child_worker not in (None, parent_worker)
    assert checker.worker_pid == parent_worker and checker.check("1/2", "0.5")


# ----------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    "response, truth, hfrrf, format_and_result",
    [
        ("<think>a</think><answer>12</answer>", "12", 1.0, 1.0),
        ("<think>a</think><answer>13</answer>", "12", 0.0, 0.5),
        ("<think>a</think><answer>12</answer> done", "12", 0.0, 0.5),  # right answer, bad format
        ("<answer>12</answer>", "12", 0.0, 0.5),
        ("12", "12", 0.0, 0.0),
        ("<think>a</think><answer>Final Answer: B. 5 cm</answer>", "B", 1.0, 1.0),
        ("<think>a</think><answer>$\\boxed{0.5}$</answer>", "\\frac{1}{2}", 1.0, 1.0),
    ],
)
def test_rewards(response, truth, hfrrf, format_and_result, checker):
    assert hard_format_result_reward(response, truth, checker=checker).reward == hfrrf
    assert format_and_result_reward(response, truth, checker=checker).reward == format_and_result


def test_format_weight():
    with pytest.raises(ValueError, match="format_weight"):
        format_and_result_reward("<think>a</think><answer>1</answer>", "1", format_weight=1.5)
    result = format_and_result_reward("<think>a</think><answer>2</answer>", "1", format_weight=0.1)
    assert result.reward == pytest.approx(0.1) and result.format_ok and not result.correct


def test_score_batch(checker):
    responses = ["<think>a</think><answer>1/2</answer>", "<answer>0.5</answer>", "<think>a</think><answer>2</answer>"]
    results = score_batch(responses, ["0.5"] * 3, checker=checker)
    assert [r.reward for r in results] == [1.0, 0.0, 0.0]
    assert [r.correct for r in results] == [True, True, False]
    assert [r.answer for r in results] == ["1/2", "0.5", "2"]
    zero = score_batch(responses, ["0.5"] * 3, reward="format_and_result", checker=checker)
    assert [r.reward for r in zero] == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="hfrrf"):
        score_batch(responses, ["0.5"] * 3, reward="nope")
    with pytest.raises(ValueError, match="one truth per response"):
        score_batch(responses, ["0.5"], checker=checker)


def test_reward_names_match_config():
    assert set(REWARDS) == set(typing.get_args(typing.get_type_hints(GRPOConfig)["reward"]))


# ----------------------------------------------------------------------------- one letter parser

LETTER_TEXTS = {  # answer text -> the option letter both paths must read from it (None: no letter)
    "B": "B", "(B)": "B", "B.": "B", "B)": "B", "B: 12": "B", "B. 12 cm": "B", "(B) 12 cm": "B",
    "Option B": "B", "option (B)": "B", "The answer is B.": "B", "The correct answer is option B": "B",
    "Final Answer: (C)": "C", "\\text{D}": "D", "**E**": "E", "$A$": "A", "\\boxed{H}": "H", "C: 60°": "C",
    "(A) yes": "A",
    "b": None, "(b)": None, "B and C": None, "A triangle": None, "B 12": None, "Both": None, "Optional B": None,
    "12 cm": None, "I": None, "": None,
}


def test_rewards_and_benchmark_scorer_read_the_same_option_letters(checker):
    """The same texts through the GRPO reward (HFRRF against each letter truth) and through the
    benchmark scorer (a multiple-choice sample per letter): both award exactly the letter
    `option_letter` reads, and nothing for a text without one."""
    from megatron_vr1.eval.loaders import LETTERS, EvalSample
    from megatron_vr1.eval.scoring import extract_prediction, score_sample
    from megatron_vr1.rewards.answer import option_letter

    letters = LETTERS[:8]
    assert letters == "ABCDEFGH"
    texts = list(LETTER_TEXTS)
    responses = [f"<think>reasoning</think><answer>{t}</answer>" for t in texts]
    for truth in letters:
        rewards = score_batch(responses, [truth] * len(texts), checker=checker)
        sample = EvalSample("bench", "0", "<image>q", [], truth, "choice", "q")
        for text, response, reward in zip(texts, responses, rewards):
            scorer = score_sample(sample, extract_prediction(response).text, checker).correct
            expected = LETTER_TEXTS[text] == truth
            assert (reward.reward == 1.0, scorer, option_letter(text) == truth) == (expected,) * 3, (text, truth)
    assert [option_letter(t) for t in texts] == list(LETTER_TEXTS.values())
