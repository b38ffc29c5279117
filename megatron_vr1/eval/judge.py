"""Optional LLM judge through any OpenAI-compatible chat-completions endpoint (stdlib only).

MathVista and MathVerse were scored in the papers by a GPT model that extracts and judges the
answer. `JudgeClient` sends the question, the ground truth and the model's response (its last
`MAX_RESPONSE_CHARS` characters) and asks for one word, CORRECT or INCORRECT (`parse_verdict`).

The HTTP side is `megatron_vr1.openai_client.OpenAIClient`: a timeout per request (`timeout_s`);
a timeout, a connection error, HTTP 408/409/429/5xx or a reply that is not chat-completions JSON
is retried `retries` times with exponential back-off; other HTTP errors (401, 404, ...) fail at
once. A request that still fails is recorded as `status="failed"` with the error; the
rule-based score is unaffected. The API key is read from an environment variable, never from
the command line.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from megatron_vr1.eval.loaders import LETTERS, EvalSample
from megatron_vr1.openai_client import EndpointError, OpenAIClient, base_url

MAX_RESPONSE_CHARS = 6000
"""The judge sees the end of a long response (where the answer is)."""

SYSTEM = (
    "You grade answers to math problems. Compare the final answer in the model's response with the "
    "ground truth. Equivalent forms count as correct (fractions vs decimals at the stated precision, "
    "units, an option letter vs that option's text). Reply with exactly one word: CORRECT or INCORRECT."
)


@dataclass
class JudgeResult:
    verdict: bool | None
    """True/False from the judge; None when it failed or its reply could not be read."""
    status: str
    """ok | failed | unparsable"""
    attempts: int
    error: str | None = None
    reply: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def chat_completions_url(base: str) -> str:
    """"http://host:8000/v1" -> "http://host:8000/v1/chat/completions" (a full URL is kept)."""
    return base_url(base, "--judge-url") + "/chat/completions"


def judge_messages(sample: EvalSample, response: str) -> list[dict]:
    """The chat messages that ask the judge about one response."""
    truth = sample.answer
    if sample.kind == "choice" and sample.answer_letter:
        text = sample.answer_text
        truth = f"({sample.answer_letter})" + (f" {text}" if text else "")
    question = sample.question
    if sample.choices and sample.choices != [] and "Choices" not in question:
        question += "\nChoices: " + " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(sample.choices))
    tail = response[-MAX_RESPONSE_CHARS:]
    user = (f"Question:\n{question}\n\nGround truth: {truth}\n\nModel response (end):\n{tail}\n\n"
            "Is the model's final answer correct? Reply CORRECT or INCORRECT.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_VERDICT_RE = re.compile(r"\b(incorrect|not\s+correct|wrong|correct|right|yes|no)\b", re.IGNORECASE)


def parse_verdict(reply: str) -> bool | None:
    """The judge's verdict: the last of CORRECT / INCORRECT (also yes/no, right/wrong) in the reply;
    None when it has none."""
    found = _VERDICT_RE.findall(reply or "")
    if not found:
        return None
    word = re.sub(r"\s+", " ", found[-1].lower())
    return word in ("correct", "right", "yes")


class JudgeClient:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 1.0, max_tokens: int = 16):
        if timeout_s <= 0:
            raise ValueError(f"--judge-timeout ({timeout_s}) must be > 0 seconds")
        if retries < 0:
            raise ValueError(f"--judge-retries ({retries}) must be >= 0")
        if not model:
            raise ValueError("--judge-model is required with --judge-url (the model name the endpoint serves)")
        self.url = chat_completions_url(url)
        self.model, self.max_tokens = model, max_tokens
        self.retries = retries
        self.client = OpenAIClient(self.url, api_key=api_key, timeout_s=timeout_s, max_retries=retries,
                                   backoff_s=backoff_s, name="judge")

    def complete(self, messages: list[dict]) -> tuple[str, int]:
        """(reply text, attempts used); `openai_client.EndpointError` after the last retry."""
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        reply = self.client.chat_completions(body, parse=lambda d: str(d["choices"][0]["message"]["content"] or ""))
        return reply.data, reply.attempts

    def judge(self, sample: EvalSample, response: str) -> JudgeResult:
        try:
            reply, attempts = self.complete(judge_messages(sample, response))
        except EndpointError as e:
            return JudgeResult(None, "failed", e.attempts, str(e))
        verdict = parse_verdict(reply)
        return JudgeResult(verdict, "ok" if verdict is not None else "unparsable", attempts, None, reply)

    def judge_many(self, items: list[tuple[EvalSample, str]], workers: int = 4) -> list[JudgeResult]:
        """Judges (sample, response) pairs with `workers` requests in flight; results in input order."""
        if workers < 1:
            raise ValueError(f"--judge-workers ({workers}) must be >= 1")
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda item: self.judge(*item), items))
