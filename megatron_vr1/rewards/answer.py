"""Answer extraction and answer equivalence for the rule-based rewards (pure Python).

`extract_answer` takes the last `<answer>...</answer>` of a response and peels off the
wrappers models put around it ("Final Answer:", `$...$`, `\\(...\\)`); when the answer holds
exactly one `\\boxed{...}` (balanced braces), its content is the answer ("The area is \\boxed{12}."
-> "12"); two boxes or an unbalanced one are left as they are.
`answers_match(pred, truth)` applies, in order (PRM800K / MathRuler style, see docs/method.md):

  a. multiple choice: a truth that is one option letter A-H ("B", "(B)", "B.", "B)") is
     matched by the prediction's option letter only (`option_letter`: "B", "(B) 12 cm",
     "Option B", "The answer is B."); option text is never compared;
  b. equality after light normalisation (whitespace, a trailing period, `\\text{}`,
     `\\dfrac`, a short "x =" prefix, and a unit suffix after a number: "5 cm", "30^\\circ");
  c. integer truth ("12", "-3", "1,000"): the prediction must be a plain decimal numeral of
     exactly that value ("12", "012", "12.0", "12 cm"); "24/2", "\\frac{24}{2}", "12.5" fail;
  d. otherwise math-verify on both sides, in a worker process killed after `timeout_s`
     (a timeout, a crash, or either side over `MAX_SYMBOLIC_CHARS` scores False).

Model text is never `eval`ed: the worker uses math-verify's LaTeX parser only, not its
`ExprExtractionConfig` (that one calls sympy's `parse_expr`, which is `eval`-based).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

MAX_SYMBOLIC_CHARS = 2000
"""Longer answers (either side, after normalisation) get literal comparison only."""
DEFAULT_TIMEOUT_S = 2.0
"""Wall-clock limit of one symbolic check."""
WORKER_MEMORY_BYTES = 4 << 30
"""Address-space cap of the worker (a runaway power like 2^{2^{2^{40}}} grows ~250 MB/s)."""

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_FINAL_ANSWER_RE = re.compile(
    r"^[*_]{0,2}\s*(?:the\s+)?final\s+answer\b(?:\s+is)?\s*[*_]{0,2}\s*:?\s*[*_]{0,2}\s*", re.IGNORECASE
)
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


# ----------------------------------------------------------------------------- extraction


def extract_answer(response: str) -> str | None:
    """The content of the last complete `<answer>...</answer>`, unwrapped; None without one."""
    end = response.rfind(_ANSWER_CLOSE)
    start = response.rfind(_ANSWER_OPEN, 0, max(end, 0))
    if end < 0 or start < 0:
        return None
    return _unwrap(response[start + len(_ANSWER_OPEN) : end])


def _unwrap(text: str) -> str:
    """Strip whitespace, a "Final Answer:" prefix, math delimiters and one `\\boxed{}`, to a fixpoint."""
    for _ in range(8):
        before = text
        text = _FINAL_ANSWER_RE.sub("", text.strip(), count=1)
        for left, right in _DELIMITERS:
            inner = text[len(left) : len(text) - len(right)]
            if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
                if left not in inner and right not in inner:
                    text = inner.strip()
                break
        text = _unbox(text)
        if text == before:
            break
    return text


def brace_group(text: str, i: int) -> tuple[str, int] | None:
    """(content, index after the closing brace) of the balanced `{...}` group that starts at
    text[i]; `\\{` and `\\}` are literal braces. None when text[i] is not `{` or it never closes."""
    if i >= len(text) or text[i] != "{":
        return None
    depth, j = 0, i
    while j < len(text):
        char = text[j]
        if char == "\\":
            j += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j], j + 1
        j += 1
    return None


def _boxed_at(text: str, start: int) -> str | None:
    """The stripped content of the `\\boxed{...}` whose backslash is at text[start]."""
    i = start + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    group = brace_group(text, i)
    return group[0].strip() if group else None


def last_boxed(text: str) -> str | None:
    """The content of the last balanced `\\boxed{...}` in `text` (None when there is none)."""
    start = text.rfind("\\boxed")
    while start >= 0:
        content = _boxed_at(text, start)
        if content is not None:
            return content
        start = text.rfind("\\boxed", 0, start)
    return None


def _unbox(text: str) -> str:
    """The content of the only `\\boxed{...}` in `text`, or `text` if there is not exactly one."""
    if text.count("\\boxed") != 1:
        return text
    content = _boxed_at(text, text.index("\\boxed"))
    return text if content is None else content


# ----------------------------------------------------------------------------- normalisation

_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_SPACES_RE = re.compile(r"\s+")
_THIN_SPACES_RE = re.compile(r"\\[,!;:]")
_POWER = r"(?:\^\{?[23]\}?|[²³])?"
_UNIT_RE = re.compile(
    r"(?<=[\d}])\s*(?:"
    r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ|\\degree"
    r"|(?:sq(?:uare)?\.?\s*)?(?:cm|mm|km|ft|yd|inch(?:es)?|feet|foot|(?:centi|milli)?met(?:er|re)s?"
    r"|units?|degrees?)" + _POWER + r"|\s(?:sq(?:uare)?\.?\s*)?(?:m|in)" + _POWER + r")$"
)
_VAR_PREFIX_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?=\S)")
_NUMBER_WITH_COMMAS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INT_RE = re.compile(r"[+-]?\d+")
_DECIMAL_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")


def _normalize(text: str) -> str:
    """Light, conservative normalisation applied to both sides before any comparison."""
    for _ in range(8):
        before = text
        text = _unwrap(text).replace("\u2212", "-")
        text = _TEXT_RE.sub(r"\1", text)
        text = _THIN_SPACES_RE.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
        text = _SPACES_RE.sub(" ", text).strip()
        if text.endswith("."):
            text = text[:-1].rstrip()
        text = _UNIT_RE.sub("", text).strip() or text
        if text.count("=") == 1:
            text = _VAR_PREFIX_RE.sub("", text)
        if _NUMBER_WITH_COMMAS_RE.fullmatch(text):
            text = text.replace(",", "")
        if text == before:
            break
    return text


# ----------------------------------------------------------------------------- multiple choice

_MC_TRUTH_RE = re.compile(r"\(?([A-H])\)?")
_MC_PREFIX_RE = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\b(?:\s+is)?(?:\s*:)?\s*", re.IGNORECASE
)
_MC_PRED_RE = re.compile(r"\(([A-H])\)(?:[.:]?\s.*|[.:])?|([A-H])(?:[.:)](?:\s.*)?)?", re.DOTALL)


def option_letter(text: str) -> str | None:
    """The option letter an answer gives, or None: "B", "(B)", "B) 12", "B. 12 cm", "\\text{B}",
    "**B**", "Option B", "The answer is (B)" -> "B"; "b", "B and C", "A triangle" (a bare letter
    needs ".", ":" or ")" before more text), "Optional B" -> None.

    The one option-letter parser of the project: the rewards (rule a of `answers_match`) and the
    benchmark scorer (`eval.scoring`) both read letters with it.
    """
    return _letter_of(_normalize(text))


def _letter_of(text: str) -> str | None:
    """`option_letter` of an already normalised answer."""
    text = text.strip().strip("*").strip()
    for _ in range(3):
        text = _MC_PREFIX_RE.sub("", text, count=1).strip().strip("*").strip()
    match = _MC_PRED_RE.fullmatch(text)
    return (match.group(1) or match.group(2)) if match else None


# ----------------------------------------------------------------------------- matching


def answers_match(
    pred: str, truth: str, timeout_s: float | None = None, *, checker: SymbolicChecker | None = None
) -> bool:
    """Whether the extracted answer `pred` equals the ground truth `truth` (rules a-d above).

    `timeout_s` limits the symbolic step (None: the checker's own, 2 s for the default one);
    `checker` defaults to the process-wide `default_checker()`.
    """
    if len(pred) > MAX_SYMBOLIC_CHARS or len(truth) > MAX_SYMBOLIC_CHARS:
        return pred.strip() == truth.strip()
    pred_n, truth_n = _normalize(pred), _normalize(truth)
    if not pred_n or not truth_n:
        return False
    truth_letter = _MC_TRUTH_RE.fullmatch(truth_n)
    if truth_letter:
        return _letter_of(pred_n) == truth_letter.group(1)
    if pred_n == truth_n:
        return True
    if _INT_RE.fullmatch(truth_n):
        return _DECIMAL_RE.fullmatch(pred_n) is not None and Decimal(pred_n) == int(truth_n)
    return (checker or default_checker()).check(pred_n, truth_n, timeout_s)


# ----------------------------------------------------------------------------- symbolic worker


class SymbolicChecker:
    """math-verify equivalence in a long-lived worker process with a hard wall-clock limit.

    The worker is a plain `subprocess` (`python -c ...`, started through vfork/exec, not
    multiprocessing: no re-import of `__main__`, no "daemonic processes cannot have children",
    no copy of a large trainer). It reads one JSON request per line and answers "1"/"0".
    A check that does not answer within the limit, or a worker that dies, kills the worker and
    scores False; the next check starts a fresh one (startup, ~0.3-1 s, is not counted in the
    limit). Thread-safe (one lock). Fork-safe: a forked child never talks to, waits for or kills
    its parent's worker; it notices the new pid and starts its own. A worker orphaned by a
    parent killed mid-check stops itself through a CPU-time rlimit armed per request.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, startup_timeout_s: float = 60.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be > 0, e.g. {DEFAULT_TIMEOUT_S}")
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0
        """Workers killed after a timeout or found dead (a metric; each costs one startup)."""
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def check(self, pred: str, truth: str, timeout_s: float | None = None) -> bool:
        """math-verify `verify(parse(truth), parse(pred))`; False on timeout, crash or long input."""
        if len(pred) > MAX_SYMBOLIC_CHARS or len(truth) > MAX_SYMBOLIC_CHARS:
            return False
        limit = self.timeout_s if timeout_s is None else timeout_s
        self._forget_parents_worker()
        with self._lock:
            proc = self._start()
            request = json.dumps([pred, truth, limit]).encode() + b"\n"
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
            except OSError:  # died since _start (BrokenPipeError)
                reply = None
            else:
                reply = self._read_line(time.monotonic() + limit)
            if reply is None:
                self._kill()
                self.restarts += 1
                return False
            return reply == b"1"

    def start(self) -> None:
        """Start the worker now (otherwise the first check does); waits until it is ready."""
        self._forget_parents_worker()
        with self._lock:
            self._start()

    @property
    def worker_pid(self) -> int | None:
        """The pid of the running worker, if any (for tests and logs)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def close(self) -> None:
        """Stop the worker (a later check starts a new one)."""
        self._forget_parents_worker()
        with self._lock:
            self._kill()

    def __enter__(self) -> SymbolicChecker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:  # died between checks
            self._kill()
            self.restarts += 1
        root = str(Path(__file__).resolve().parents[2])
        bootstrap = (
            f"import sys; sys.path.insert(0, {root!r}); "
            "from megatron_vr1.rewards.answer import _worker_main; _worker_main()"
        )
        self._proc = subprocess.Popen([sys.executable, "-c", bootstrap], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self._read_line(time.monotonic() + self.startup_timeout_s) != b"ready":
            proc = self._proc
            try:
                proc.wait(timeout=1)  # let a crashed worker report its own exit code
            except subprocess.TimeoutExpired:
                pass
            self._kill()
            why = f"exited with code {proc.returncode}" if proc.returncode != -9 else "was not ready in time"
            raise RuntimeError(
                f"the math-verify worker {why} (startup_timeout_s={self.startup_timeout_s}; its error is on stderr"
                " above); is math-verify installed? `pip install math-verify`"
            )
        return self._proc

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the worker, or None at the deadline or at EOF (the worker died)."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc.stdout.close()
        self._proc, self._buffer = None, b""

    def _forget_parents_worker(self) -> None:
        """In a forked child: drop the inherited worker handle (our pipe ends only) and lock."""
        if self._pid == os.getpid():
            return
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.stdout.close()
            self._proc.returncode = 0  # not our child: Popen must never wait for or kill it
        self._proc, self._buffer = None, b""
        self._lock = threading.Lock()
        self._pid = os.getpid()


_default_checker: SymbolicChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> SymbolicChecker:
    """The process-wide checker, created on first use and closed at exit."""
    global _default_checker
    with _default_lock:
        if _default_checker is None:
            _default_checker = SymbolicChecker()
            atexit.register(_default_checker.close)
        return _default_checker


def _reset_default_lock() -> None:
    global _default_lock
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_default_lock)


def _worker_main() -> None:
    """The worker loop: stdin lines `[pred, truth, timeout_s]` -> stdout lines `1`/`0`."""
    import logging
    import resource
    import signal

    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    logging.disable(logging.CRITICAL)  # math-verify logs every unparsable answer
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > WORKER_MEMORY_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, hard))
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig()]
    protocol.write(b"ready\n")
    for line in sys.stdin.buffer:
        pred, truth, timeout_s = json.loads(line)
        _arm_cpu_watchdog(timeout_s)
        try:
            gold = parse(f"${truth}$", config, parsing_timeout=None)
            target = parse(f"${pred}$", config, parsing_timeout=None)
            ok = bool(gold) and bool(target) and verify(gold, target, timeout_seconds=None)
        except Exception:  # RecursionError, MemoryError, sympy internals: not equal
            ok = False
        protocol.write(b"1\n" if ok else b"0\n")


def _arm_cpu_watchdog(timeout_s: float) -> None:
    """SIGXCPU (fatal) once this request used timeout_s + 2 s of CPU: an orphan cannot spin forever."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + timeout_s) + 2
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
