"""A local OpenAI-compatible ``/v1/chat/completions`` server for tests and benchmarks.

It is the one fake in the project, and it sits at the true edge: the real ``openai`` client talks to it
over real HTTP on 127.0.0.1. It records every request body, counts requests, adds a fixed latency,
plays a scripted sequence of faults (429 with Retry-After, 500, a hang past the client's timeout,
malformed JSON, a 400 on ``response_format``) and answers with a reply function of the request, so a
test can answer deterministically from what was sent::

    with FakeOpenAIServer(reply=lambda body: '{"score": 1, "feedback": "fine"}', latency=0.3) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        ...
        assert server.request_count == 1

It binds 127.0.0.1 only, on a free port chosen by the OS. Requests are served concurrently (one
thread per connection, HTTP/1.1 keep-alive) with Nagle's algorithm off: without ``TCP_NODELAY`` the
stdlib server adds ~40 ms per request (delayed ACK against a small second write).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"  # never anything else: this server must not be reachable from outside the machine


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, served in place of a normal reply.

    kind: ``"rate_limit"`` (429), ``"server_error"`` (500), ``"bad_request"`` (400), ``"hang"``
    (sleep ``seconds`` before replying normally, to outlast the client's timeout), ``"malformed_body"``
    (200 with a body that is not JSON), ``"malformed_content"`` (200 with a valid completion whose
    message content is ``content``, e.g. prose that is not the JSON the prompt asked for).
    """

    kind: str
    retry_after: float | None = None  # seconds, sent as ``Retry-After``
    retry_after_ms: float | None = None  # sent as ``retry-after-ms`` (openai reads it first)
    seconds: float = 0.0
    content: str = ""
    message: str = ""

    @staticmethod
    def rate_limit(retry_after: float | None = 1.0, retry_after_ms: float | None = None) -> Fault:
        return Fault("rate_limit", retry_after=retry_after, retry_after_ms=retry_after_ms)

    @staticmethod
    def server_error(retry_after_ms: float | None = None) -> Fault:
        return Fault("server_error", retry_after_ms=retry_after_ms)

    @staticmethod
    def bad_request(message: str = "bad request") -> Fault:
        return Fault("bad_request", message=message)

    @staticmethod
    def hang(seconds: float) -> Fault:
        return Fault("hang", seconds=seconds)

    @staticmethod
    def malformed_body() -> Fault:
        return Fault("malformed_body")

    @staticmethod
    def malformed_content(content: str = "Sure! The caption looks mostly fine to me.") -> Fault:
        return Fault("malformed_content", content=content)


Reply = Callable[[dict[str, Any]], "str | dict | Fault"]  # a dict reply is sent as its JSON text


def request_text(body: dict[str, Any]) -> str:
    """All text parts of all messages in a chat request, joined by newlines."""
    texts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part.get("text", "") for part in content if part.get("type") == "text")
    return "\n".join(texts)


_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+);base64,(?P<data>.*)$", re.S)


def request_images(body: dict[str, Any]) -> list[tuple[str, bytes]]:
    """``(mime type, decoded bytes)`` of every ``image_url`` data URL in a chat request, in order."""
    images = []
    for message in body.get("messages", []):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "image_url":
                match = _DATA_URL.match(part["image_url"]["url"])
                if match is None:
                    raise ValueError(f"image_url is not a base64 data URL: {part['image_url']['url'][:60]!r}")
                images.append((match["mime"], base64.b64decode(match["data"])))
    return images


def default_reply(body: dict[str, Any]) -> str:
    """A valid critique in the prompts' JSON format whose feedback says how many images arrived."""
    n_images = len(request_images(body))
    return json.dumps({
        "score": 0.5,
        "feedback": f"received {n_images} images",
        "hallucinated": [],
        "missing": [],
        "count_errors": {},
        "revision": None,
    })


def _count_tokens(text: str) -> int:
    """A stand-in for a tokenizer: whitespace words. Deterministic, so tests can check usage."""
    return len(text.split())


IMAGE_TOKENS = 85  # what GPT-4o bills a low-detail image; a fixed per-image count for the fake usage


@dataclass
class FakeOpenAIServer:
    """Context manager running the fake server in a background thread.

    ``faults`` is consumed in arrival order, one entry per request (``None`` = answer normally); after
    it runs out, ``reply`` answers. ``reply`` may itself return a ``Fault`` to misbehave for chosen
    requests (e.g. one image). ``reject_response_format`` makes every request that carries
    ``response_format`` fail with 400, like servers without structured output.
    """

    reply: Reply = default_reply
    latency: float = 0.0
    faults: Sequence[Fault | None] = ()
    reject_response_format: bool = False
    model: str = "fake-model"
    requests: list[dict[str, Any]] = field(default_factory=list, init=False)
    request_headers: list[dict[str, str]] = field(default_factory=list, init=False)  # lower-cased names
    request_times: list[float] = field(default_factory=list, init=False)  # time.perf_counter() at arrival
    responses: list[dict[str, Any]] = field(default_factory=list, init=False)  # bodies of 200 replies

    def __post_init__(self):
        self._lock = threading.Lock()
        self._script = list(self.faults)
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> FakeOpenAIServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"server_state": self})
        httpd = ThreadingHTTPServer((HOST, 0), handler, bind_and_activate=False)
        httpd.daemon_threads = True  # a hanging handler must not block shutdown
        httpd.request_queue_size = 256  # benchmarks open many connections at once
        httpd.server_bind()
        httpd.server_activate()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()  # wakes hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer is not running; use it as a context manager")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def reset(self) -> None:
        """Forget recorded requests and responses (the fault script is not refilled)."""
        with self._lock:
            self.requests.clear()
            self.request_headers.clear()
            self.request_times.clear()
            self.responses.clear()

    # --- serving ---------------------------------------------------------------------------------
    def _next_fault(self, body: dict[str, Any], headers: dict[str, str]) -> Fault | None:
        with self._lock:
            self.request_times.append(time.perf_counter())
            self.requests.append(body)
            self.request_headers.append(headers)
            scripted = self._script.pop(0) if self._script else None
        if scripted is not None:
            return scripted
        if self.reject_response_format and "response_format" in body:
            return Fault.bad_request("response_format is not supported by this server")
        return None

    def handle(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for one request (runs on the connection's thread)."""
        fault = self._next_fault(body, headers or {})
        if self.latency:
            time.sleep(self.latency)
        if fault is None:
            answer = self.reply(body)
            fault = answer if isinstance(answer, Fault) else None
            content = json.dumps(answer) if isinstance(answer, dict) else answer
        if fault is not None:
            if fault.kind == "hang":
                self._stopping.wait(fault.seconds)
                content = self.reply(body)
                if isinstance(content, Fault):
                    content = default_reply(body)
            elif fault.kind == "malformed_content":
                content = fault.content
            else:
                return _fault_response(fault)
        return self._completion(body, content)

    def _completion(self, body: dict[str, Any], content: str) -> tuple[int, dict[str, str], bytes]:
        prompt_tokens = _count_tokens(request_text(body)) + IMAGE_TOKENS * len(request_images(body))
        completion_tokens = _count_tokens(content)
        with self._lock:
            n = len(self.responses)
        response = {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        with self._lock:
            self.responses.append(response)
        return 200, {"Content-Type": "application/json"}, json.dumps(response).encode()


def _error_body(message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def _fault_response(fault: Fault) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"}
    if fault.retry_after is not None:
        value = fault.retry_after
        headers["Retry-After"] = str(int(value)) if float(value).is_integer() else str(value)
    if fault.retry_after_ms is not None:
        headers["retry-after-ms"] = str(fault.retry_after_ms)
    if fault.kind == "rate_limit":
        return 429, headers, _error_body("Rate limit reached (fake)", "requests", "rate_limit_exceeded")
    if fault.kind == "server_error":
        return 500, headers, _error_body("The server had an error (fake)", "server_error")
    if fault.kind == "bad_request":
        return 400, headers, _error_body(fault.message, "invalid_request_error")
    if fault.kind == "malformed_body":
        return 200, headers, b'{"id": "chatcmpl-broken", "choices": [{"message": '
    raise ValueError(f"unknown fault kind {fault.kind!r}; use one of the Fault.* constructors")


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeOpenAIServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections
    disable_nagle_algorithm = True  # TCP_NODELAY (see module docstring)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(404, {"Content-Type": "application/json"}, _error_body(f"no route GET {self.path}", "not_found"))

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"Content-Type": "application/json"}, _error_body(f"no route {self.path}", "not_found"))
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            self._send(400, {"Content-Type": "application/json"}, _error_body(f"request is not JSON: {e}", "invalid_request_error"))
            return
        try:
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, headers, payload = self.server_state.handle(body, headers)
        except Exception as e:  # a broken reply function should show up as a 500, not a dropped socket
            status, headers, payload = 500, {"Content-Type": "application/json"}, _error_body(repr(e), "server_error")
        self._send(status, headers, payload)

    def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to do
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass  # quiet: tests and benchmarks read the recorded requests instead
