"""Chat completions on one OpenAI-compatible endpoint: the transport every critic call and textual step
goes through, and the usage record they all report.

Retries: the openai SDK already retries 408/409/429/5xx, timeouts and connection errors with
exponential backoff (0.5 s doubling to 8 s, jittered) and honours ``retry-after-ms`` / ``Retry-After``
up to 60 s (openai/_base_client.py: ``_should_retry``, ``_calculate_retry_timeout``). We use that with
``max_retries`` rather than a loop of our own, and read the attempt count back: ``retries_taken`` on
the raw response, or the ``x-stainless-retry-count`` header of the last request on the final error.

Usage is a plain dict (it is written to the run directory as it is): ``prompt_tokens``,
``completion_tokens`` and ``requests`` (HTTP requests, retries included), made by :func:`usage`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refine.config import DEFAULT_OPENAI_MODEL
from refine.infra.cache import DiskCache, cache_key

log = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
LOCAL_PLACEHOLDER_KEY = "not-needed"  # vLLM / Ollama ignore the key, but the SDK insists on one


def usage(prompt_tokens: int = 0, completion_tokens: int = 0, requests: int = 0) -> dict[str, int]:
    """The usage record of a call, or of a call that cost nothing (a cache hit)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "requests": requests}


def response_format_for(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": False}}


@dataclass
class ChatResult:
    content: str
    usage: dict[str, int]  # prompt_tokens, completion_tokens, requests (HTTP requests, retries included)
    response_format_used: bool = False
    cache_hit: bool = False


class ChatCallError(RuntimeError):
    """A chat call that failed after the SDK's retries. ``requests`` counts every HTTP request made."""

    def __init__(self, message: str, requests: int, raw: str = ""):
        super().__init__(f"{message} (after {requests} request{'s' if requests != 1 else ''})")
        self.message = message
        self.requests = requests
        self.raw = raw


def _requests_made(error: Exception) -> int:
    """HTTP requests behind a final openai error: the last request carries the SDK's retry count."""
    request = getattr(error, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, ValueError):
        return 1


def resolve_api_key(api_key_env: str, base_url: str | None) -> str:
    """The key from ``$api_key_env``; a placeholder for local servers (``base_url`` given) that need none."""
    key = os.environ.get(api_key_env)
    if key:
        return key
    if base_url:
        return LOCAL_PLACEHOLDER_KEY
    raise ValueError(
        f"${api_key_env} is not set: export your OpenAI API key as {api_key_env}, name another variable "
        "with --critic.api_key_env=NAME, or pass --critic.base_url=URL for a local OpenAI-compatible server "
        "that needs no key"
    )


class OpenAIChat:
    """Chat completions on one endpoint: lazy client, the SDK's retries, request counting, and the
    ``response_format`` fallback (remembered once a server has rejected it and then answered without)."""

    def __init__(
        self,
        model: str = DEFAULT_OPENAI_MODEL,
        base_url: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        timeout: float = 60.0,
        max_retries: int = 4,
    ):
        if not model:
            raise ValueError("model is empty: name the chat model, e.g. model='gpt-4o'")
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self._api_key = resolve_api_key(api_key_env, base_url)  # fail at construction, not mid-run
        self._client = None
        self._lock = threading.Lock()
        self.response_format_supported: bool | None = None  # unknown until a server says

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from openai import OpenAI

                    self._client = OpenAI(
                        api_key=self._api_key, base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries
                    )
        return self._client

    def create(self, messages: list[dict[str, Any]], *, response_format: dict | None = None, **params: Any) -> ChatResult:
        """One completion. Raises ``ChatCallError`` (with the request count and raw body) on failure."""
        import openai

        requests = 0
        if response_format is not None and self.response_format_supported is not False:
            try:
                result = self._send(messages, params, response_format)
            except ChatCallError as e:
                if not isinstance(e.__cause__, (openai.BadRequestError, openai.UnprocessableEntityError)):
                    raise
                requests = e.requests  # the server may not know response_format: ask once more without it
                log.info("%s rejected response_format (%s); retrying without it", self.base_url or "OpenAI", e)
            else:
                self.response_format_supported = True
                return result
        try:
            result = self._send(messages, params, None)
        except ChatCallError as e:
            raise ChatCallError(e.message, requests + e.requests, e.raw) from e.__cause__
        if requests:
            self.response_format_supported = False
        result.usage["requests"] += requests
        return result

    def _send(self, messages: list[dict[str, Any]], params: dict[str, Any], response_format: dict | None) -> ChatResult:
        import openai

        extra = {"response_format": response_format} if response_format is not None else {}
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, **params, **extra
            )
        except openai.APIStatusError as e:
            raise ChatCallError(f"{type(e).__name__} {e.status_code}: {e.message}", _requests_made(e), e.response.text) from e
        except openai.APIError as e:  # timeouts and connection errors
            raise ChatCallError(f"{type(e).__name__}: {e}", _requests_made(e)) from e
        requests = raw.retries_taken + 1
        body = raw.http_response.text
        try:
            completion = raw.parse()
            content = completion.choices[0].message.content
        except Exception as e:  # a 200 whose body is not a chat completion
            raise ChatCallError(f"malformed completion body ({type(e).__name__}: {e})", requests, body) from e
        if content is None:
            raise ChatCallError("the completion has no text content (a refusal or tool call?)", requests, body)
        tokens = completion.usage
        spent = usage(tokens.prompt_tokens, tokens.completion_tokens, requests) if tokens else usage(requests=requests)
        return ChatResult(content=content, usage=spent, response_format_used=bool(extra))


class ChatEngine:
    """Text-only chat completions with our client and our cache; what the TextGrad adapter calls.

    ``complete`` returns a ``ChatResult`` (content, usage, cache hit). Keys cover the engine id, model,
    sampling parameters, the system prompt and the prompt. Failures raise ``ChatCallError``; nothing
    is stored for them.
    """

    def __init__(
        self,
        model: str = DEFAULT_OPENAI_MODEL,
        base_url: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        *,
        temperature: float = 0.0,
        max_tokens: int = 200,
        seed: int | None = None,
        timeout: float = 60.0,
        max_retries: int = 4,
        cache: DiskCache | None = None,
        chat: OpenAIChat | None = None,
    ):
        self.model = model
        self.id = f"chat:{model}"
        self.chat = chat or OpenAIChat(model, base_url, api_key_env, timeout, max_retries)
        self.cache = cache if cache is not None else DiskCache(namespace="llm")
        self.sampling: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            self.sampling["seed"] = seed

    def complete(self, prompt: str, system_prompt: str | None = None,
                 cacheable: Callable[[str], bool] | None = None) -> ChatResult:
        """One completion, from the cache when the same request was answered before. A reply for which
        ``cacheable(content)`` is false is returned but not stored (a later run asks again); this process
        gives it to its later callers of the same request, who would pay for the same reply again."""
        if not isinstance(prompt, str):
            raise TypeError(f"ChatEngine takes text prompts only, got {type(prompt).__name__}")
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        key = cache_key(self.id, self.model, self.sampling, system_prompt or "", prompt)

        def compute() -> dict[str, Any]:
            result = self.chat.create(messages, **self.sampling)
            return {"content": result.content, "usage": result.usage}

        stored, hit = self.cache.get_or_compute(  # a reply that is no caption: one per prompt and process
            key, compute, cacheable=(lambda d: cacheable(d["content"])) if cacheable else (lambda _: True),
            share_refused=True)
        if hit:
            return ChatResult(stored["content"], usage(), cache_hit=True)
        return ChatResult(stored["content"], dict(stored["usage"]))
