"""A small client for OpenAI-compatible HTTP endpoints (stdlib `urllib` only).

Used by the benchmark judge (`eval.judge`) and the cold-start generator's HTTP backend
(`coldstart.backends.OpenAIBackend`).

- Every request has a timeout (`timeout_s`).
- Retried, up to `max_retries` times: a timeout, a connection error, HTTP 408, 409, 429 and
  5xx, and a reply that is not JSON or that `parse` rejects (a reply of the wrong shape). Other
  HTTP errors (400, 401, 404, ...) fail at once: sending the same request again cannot help.
- Back-off before retry k (k = 1, 2, ...): `backoff_s * 2**(k-1)`, capped at `max_backoff_s`,
  times a random factor in [1, 1 + jitter) so parallel workers do not retry in lock step; a
  429/503 reply's `Retry-After` (seconds) is honoured up to the cap.
- A request that still fails raises `EndpointError`, whose message names the method, the URL,
  the last error and the number of attempts.

The API key goes in an `Authorization: Bearer` header; callers read it from an environment
variable, never from the command line.
"""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})
"""Retried 4xx codes (every 5xx is retried too)."""
MAX_ERROR_BODY = 300
"""Characters of an error reply's body kept in the message."""


def is_retryable_status(code: int) -> bool:
    return code in RETRY_STATUS or 500 <= code <= 599


class EndpointError(RuntimeError):
    """A request that failed for good (after its retries, or at once when retrying cannot help)."""

    def __init__(self, message: str, *, url: str, attempts: int, status: Optional[int] = None):
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.status = status
        """The last HTTP status, None for a timeout, a connection error or a bad reply."""


class BadReply(ValueError):
    """Raised by a `parse` callback: the reply is JSON but not of the expected shape (retried)."""


@dataclass
class Reply:
    data: Any
    """The parsed JSON (or what `parse` returned)."""
    attempts: int


class _Attempt(Exception):
    """One failed attempt: what went wrong, whether to retry, a server-suggested delay."""

    def __init__(self, error: str, retry: bool, status: Optional[int] = None, retry_after: Optional[float] = None):
        super().__init__(error)
        self.error, self.retry, self.status, self.retry_after = error, retry, status, retry_after


def base_url(url: str, what: str = "url") -> str:
    """`"http://host:8000/v1/"` -> `"http://host:8000/v1"`; a full `.../chat/completions` URL is
    cut back to its base. ValueError (naming `what`) when it is not an http(s) URL."""
    url = (url or "").strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"{what} {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
    return url.removesuffix("/chat/completions")


class OpenAIClient:
    def __init__(self, url: str, *, api_key: Optional[str] = None, timeout_s: float = 60.0, max_retries: int = 3,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, jitter: float = 0.1, name: str = "endpoint",
                 sleep: Callable[[float], None] = time.sleep):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be > 0 seconds")
        if max_retries < 0:
            raise ValueError(f"max_retries ({max_retries}) must be >= 0")
        if backoff_s < 0 or max_backoff_s < 0 or jitter < 0:
            raise ValueError(f"backoff_s ({backoff_s}), max_backoff_s ({max_backoff_s}) and jitter ({jitter}) "
                             "must be >= 0")
        self.url = base_url(url)
        self.api_key = api_key
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.max_backoff_s, self.jitter = backoff_s, max_backoff_s, jitter
        self.name = name
        """Who is calling (in the retry warnings)."""
        self._sleep = sleep

    # ------------------------------------------------------------------ the endpoints

    def chat_completions(self, body: dict, parse: Optional[Callable[[Any], Any]] = None) -> Reply:
        """POST `<url>/chat/completions`."""
        return self.request("POST", "/chat/completions", body, parse)

    def model_ids(self) -> list[str]:
        """The ids `GET <url>/models` lists, in its order."""
        return self.request("GET", "/models", parse=_model_ids).data

    # ------------------------------------------------------------------ the retry loop

    def backoff(self, retry: int, retry_after: Optional[float] = None) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...)."""
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay * (1 + self.jitter * random.random())

    def request(self, method: str, path: str, body: Optional[dict] = None,
                parse: Optional[Callable[[Any], Any]] = None) -> Reply:
        """`method` `<url><path>` with a JSON body; the JSON reply (through `parse`) and the attempts used."""
        url = self.url + path
        last: Optional[_Attempt] = None
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            if last is not None:
                self._sleep(self.backoff(attempt - 1, last.retry_after))
            try:
                return Reply(self._once(method, url, body, parse), attempt)
            except _Attempt as failed:
                last = failed
                if not failed.retry:
                    raise EndpointError(f"{method} {url} failed: {failed.error} (not retried)", url=url,
                                        attempts=attempt, status=failed.status) from None
                if attempt < attempts:
                    log.warning("%s: %s %s failed (attempt %d of %d): %s; retrying", self.name, method, url,
                                attempt, attempts, failed.error)
        raise EndpointError(f"{method} {url} failed after {attempts} attempts: {last.error}", url=url,
                            attempts=attempts, status=last.status)

    def _once(self, method: str, url: str, body: Optional[dict], parse: Optional[Callable[[Any], Any]]) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read()[:MAX_ERROR_BODY].decode("utf-8", "replace").strip()
            except OSError:
                detail = ""
            error = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
            raise _Attempt(error, is_retryable_status(e.code), e.code, _retry_after(e.headers)) from None
        except (TimeoutError, socket.timeout):
            raise _Attempt(f"timed out after {self.timeout_s:g} s", True) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Attempt(f"timed out after {self.timeout_s:g} s", True) from None
            raise _Attempt(f"connection error: {e.reason}", True) from None
        except OSError as e:  # ConnectionResetError, RemoteDisconnected (http.client), ...
            raise _Attempt(f"connection error: {type(e).__name__}: {e}", True) from None
        try:
            reply = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Attempt(f"the reply is not JSON: {raw[:200]!r}", True) from None
        if parse is None:
            return reply
        try:
            return parse(reply)
        except (BadReply, KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise _Attempt(f"unexpected reply ({type(e).__name__}: {e}): {str(reply)[:200]}", True) from None


def _retry_after(headers) -> Optional[float]:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: ignored, the exponential back-off applies
        return None


def _model_ids(reply: Any) -> list[str]:
    return [str(m["id"]) for m in reply["data"]]
