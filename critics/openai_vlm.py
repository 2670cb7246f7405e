"""A critic backed by GPT-4o or any OpenAI-compatible chat endpoint (vLLM, Ollama, LM Studio, ...).

Per request it sends the full image and up to ``max_views`` crops/tiles from the regions stage as
base64 data URLs, with the detector's object summary, the list of attached views and any known
annotations rendered into ``prompts/critique.txt``. It asks for structured JSON through
``response_format`` (a JSON schema); a server that answers 400 to that is asked again without it, and
the reply is then parsed tolerantly (the JSON object is dug out of prose or code fences).

Retries: the openai SDK already retries 408/409/429/5xx, timeouts and connection errors with
exponential backoff (0.5 s doubling to 8 s, jittered) and honours ``retry-after-ms`` / ``Retry-After``
up to 60 s (openai/_base_client.py: ``_should_retry``, ``_calculate_retry_timeout``). We use that with
``max_retries`` rather than a loop of our own, and read the attempt count back: ``retries_taken`` on
the raw response, or the ``x-stainless-retry-count`` header of the last request on the final error.

Concurrency: a thread pool of ``max_concurrency`` over images, sharing one sync client (its httpx pool
is thread-safe). Threads rather than the async client because everything around the call is
synchronous (diskcache, PIL encoding, textgrad's engine interface) and a sync API is callable from
anywhere, including a notebook that already runs an event loop.

Caching: every critique goes through ``refine.cache.DiskCache``; the key covers the critic id, model,
sampling parameters, the rendered prompt, the image hash, the attached views' boxes, the caption, the
output schema and the image encoding. Failures (transport or parse) are never cached.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from critics.base import Critique, CritiqueRequest
from critics.context import describe_views, format_annotations, format_objects
from refine.config import DEFAULT_MAX_CONCURRENCY, DEFAULT_OPENAI_MODEL
from refine.infra.cache import DiskCache, cache_key
from refine.infra.concurrency import map_concurrently
from refine.infra.llm import DEFAULT_API_KEY_ENV, ChatCallError, OpenAIChat, response_format_for, usage
from refine.infra.prompts import Template, load_template

log = logging.getLogger(__name__)


# The output format stated in prompts/critique.txt, as a JSON schema. Not ``strict``: strict mode forbids
# open-ended objects, and count_errors is {label: [said, true]} with labels unknown in advance.
CRITIQUE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "feedback": {"type": "string"},
        "hallucinated": {"type": "array", "items": {"type": "string"}},
        "missing": {"type": "array", "items": {"type": "string"}},
        "count_errors": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        },
        "revision": {"type": ["string", "null"]},
    },
    "required": ["score", "feedback", "hallucinated", "missing", "count_errors", "revision"],
}
JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}, "reason": {"type": "string"}},
    "required": ["winner", "reason"],
}


# --- parsing: each output format in exactly one function -------------------------------------------


class OutputParseError(ValueError):
    """A model reply that does not match the stated output format. ``raw`` is the reply text."""

    def __init__(self, message: str, raw: str):
        super().__init__(f"{message}; raw response: {raw[:300]!r}")
        self.raw = raw


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def extract_json_object(raw: str) -> dict[str, Any]:
    """The first JSON object in ``raw``: the whole text, a fenced code block, or an object inside prose."""
    text = raw.strip()
    candidates = [text] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise OutputParseError("no JSON object in the response", raw)


def _string_list(obj: dict[str, Any], key: str, raw: str) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OutputParseError(f"{key!r} must be a list of strings, got {value!r}", raw)
    return [v.strip() for v in value if v.strip()]


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    return int(str(value).strip())


def _count_errors(value: Any, raw: str) -> dict[str, tuple[int, int]]:
    """``{label: [said, true]}``; also accepts ``[{"label", "said", "true"}]``, which some models prefer."""
    if value is None:
        return {}
    if isinstance(value, list):
        try:
            value = {item["label"]: [item["said"], item["true"]] for item in value}
        except (TypeError, KeyError) as e:
            raise OutputParseError(f"'count_errors' list items need label/said/true, got {value!r}", raw) from e
    if not isinstance(value, dict):
        raise OutputParseError(f"'count_errors' must be an object {{label: [said, true]}}, got {value!r}", raw)
    out = {}
    for label, pair in value.items():
        try:
            said, true = pair
            out[str(label)] = (_as_int(said), _as_int(true))
        except (TypeError, ValueError) as e:
            raise OutputParseError(f"'count_errors'[{label!r}] must be [said, true] integers, got {pair!r}", raw) from e
    return out


def parse_critique(raw: str) -> Critique:
    """The critique JSON of prompts/critique.txt -> ``Critique`` (``raw`` set). Raises ``OutputParseError``.

    Required: ``score`` in [0, 1] and ``feedback`` (a string). Optional, defaulting to empty:
    ``hallucinated``, ``missing``, ``count_errors``, ``revision`` (an empty revision means none).
    """
    obj = extract_json_object(raw)
    score = obj.get("score")
    if isinstance(score, str):
        try:
            score = float(score.strip())
        except ValueError:
            pass
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise OutputParseError(f"'score' must be a number in [0, 1], got {score!r}", raw)
    if not 0.0 <= float(score) <= 1.0:
        raise OutputParseError(f"'score' {score} is outside [0, 1]", raw)
    feedback = obj.get("feedback")
    if not isinstance(feedback, str):
        raise OutputParseError(f"'feedback' must be a string, got {feedback!r}", raw)
    revision = obj.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise OutputParseError(f"'revision' must be a string or null, got {revision!r}", raw)
    return Critique(
        score=float(score),
        feedback=feedback.strip(),
        hallucinated=_string_list(obj, "hallucinated", raw),
        missing=_string_list(obj, "missing", raw),
        count_errors=_count_errors(obj.get("count_errors"), raw),
        revision=(revision.strip() or None) if revision else None,
        raw=raw,
    )


_WINNERS = {"A": 0, "CAPTION A": 0, "B": 1, "CAPTION B": 1, "TIE": None, "NONE": None, "EQUAL": None}


def parse_judgement(raw: str) -> int | None:
    """The judge JSON of prompts/judge.txt -> 0 (A wins), 1 (B wins) or None (tie). Raises ``OutputParseError``."""
    obj = extract_json_object(raw)
    winner = obj.get("winner")
    key = winner.strip().upper() if isinstance(winner, str) else None
    if key not in _WINNERS:
        raise OutputParseError(f"'winner' must be \"A\", \"B\" or \"tie\", got {winner!r}", raw)
    return _WINNERS[key]


# --- one OpenAI-compatible endpoint ------------------------------------------------------------------


# --- images as data URLs ---------------------------------------------------------------------------

JPEG_QUALITY = 90
CRITIQUE_VARIABLES = ("caption", "views", "objects", "annotations", "max_words")  # what a critique template gets
JUDGE_VARIABLES = ("caption_a", "caption_b")


def image_data_url(image: Image.Image, max_side: int | None = None) -> str:
    """A ``data:image/jpeg;base64,...`` URL; images with a side over ``max_side`` are shrunk to fit."""
    image = image.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(text: str, images: Sequence[Image.Image], detail: str, max_side: int | None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for image in images:
        parts.append({"type": "image_url", "image_url": {"url": image_data_url(image, max_side), "detail": detail}})
    return {"role": "user", "content": parts}


def pil_sha256(image: Image.Image) -> str:
    """A content hash of decoded pixels (mode, size, raw bytes): fast, and stable across processes.

    For an ``ImageRecord`` pass its ``sha256`` instead; this is for callers holding only a PIL image.
    """
    image = image.convert("RGB")
    h = hashlib.sha256(f"RGB:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- the critic ------------------------------------------------------------------------------------


class JudgeError(RuntimeError):
    """A pairwise judgement that failed (call or parse). ``raw`` is the response text, if any."""

    def __init__(self, message: str, raw: str = ""):
        super().__init__(message)
        self.raw = raw


@dataclass
class OpenAIVLMCritic:
    """``Critic`` over an OpenAI-compatible vision chat endpoint. Construction stores settings only;
    the HTTP client and the cache store open on first use. The API key is read from ``$api_key_env``."""

    model: str = DEFAULT_OPENAI_MODEL
    base_url: str | None = None
    api_key_env: str = DEFAULT_API_KEY_ENV
    temperature: float = 0.0
    max_tokens: int = 500
    seed: int | None = None
    detail: str = "auto"  # OpenAI's image detail: "low" | "high" | "auto"
    max_views: int = 4  # crops/tiles sent after the full image
    max_image_side: int | None = 2048  # GPT-4o downsizes beyond 2048 px anyway
    max_words: int = 20  # asked of the critic's own revision
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    timeout: float = 60.0
    max_retries: int = 4
    structured_output: bool = True  # send response_format (falls back automatically on a 400)
    template: str = "critique"
    judge_template: str = "judge"
    cache: DiskCache | None = None
    chat: OpenAIChat | None = field(default=None, repr=False)
    batch_size = 1  # the critique stage keeps max_concurrency single requests in flight (not a field)

    def __post_init__(self):
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency}: must be at least 1")
        if self.max_views < 0:
            raise ValueError(f"max_views={self.max_views}: must be 0 or more")
        if self.chat is None:
            self.chat = OpenAIChat(self.model, self.base_url, self.api_key_env, self.timeout, self.max_retries)
        if self.cache is None:
            self.cache = DiskCache(namespace="critiques")
        self.id = f"openai_vlm:{self.model}"

    @property
    def sampling(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.seed is not None:
            params["seed"] = self.seed
        return params

    @property
    def _encoding(self) -> dict[str, Any]:
        """What shapes the pixels and the parsing beyond the prompt; part of every key."""
        return {"jpeg_quality": JPEG_QUALITY, "max_side": self.max_image_side, "detail": self.detail}

    # --- critiques ---
    def critique_many(self, requests: Sequence[CritiqueRequest]) -> list[Critique]:
        """One ``Critique`` per request, in order; failures are recorded, never raised.

        A template that cannot be loaded is a setup error for the whole batch and does raise.
        """
        template = load_template(self.template, CRITIQUE_VARIABLES)
        if len(requests) <= 1:  # the critique stage's case: it keeps the requests in flight itself
            return [self._critique_safely(r, template) for r in requests]
        return map_concurrently(lambda r: self._critique_safely(r, template), requests, self.max_concurrency)

    def critique(self, request: CritiqueRequest) -> Critique:
        return self.critique_many([request])[0]

    def _critique_safely(self, request: CritiqueRequest, template: Template) -> Critique:
        try:
            return self._critique_one(request, template)
        except Exception as e:  # one bad image must not kill the batch
            log.exception("critique of %s failed", getattr(request, "image_id", "?"))
            critique = Critique.failure(f"{type(e).__name__}: {e}")
            critique.meta = {"critic": self.id, "image_id": getattr(request, "image_id", None), "cache_hit": False}
            return critique

    def select_views(self, request: CritiqueRequest) -> list[Any]:
        """The crops/tiles sent after the full image: the regions stage's order, full views skipped."""
        views = getattr(request.regions, "views", None) or []
        return [v for v in views if v.kind != "full"][: self.max_views]

    def _critique_one(self, request: CritiqueRequest, template: Template) -> Critique:
        if not isinstance(request.image, Image.Image):
            raise TypeError(f"request {request.image_id!r}: image must be a PIL image, got {type(request.image).__name__}")
        views = self.select_views(request)
        prompt = template.render(
            caption=request.caption,
            views=describe_views(request.image.size, views),
            objects=format_objects(request.regions),
            annotations=format_annotations(request.objects),
            max_words=self.max_words,
        )
        view_boxes = [(v.kind, [float(x) for x in v.box], v.label) for v in views]
        key = cache_key(
            self.id, self.model, self.sampling, prompt, request.image_sha256, view_boxes, request.caption,
            CRITIQUE_SCHEMA if self.structured_output else None, self._encoding,
            *([{"sample": request.sample}] if request.sample else []),  # agreement: each sample its own answer
        )

        def compute() -> dict[str, Any]:
            return self._ask_critique(prompt, [request.image] + [v.image for v in views]).to_json()

        stored, hit = self.cache.get_or_compute(key, compute, cacheable=lambda d: d["error"] is None)
        critique = Critique.from_json(stored)
        if hit:  # the call was paid for earlier; this run spent nothing
            critique.meta["cached_usage"] = critique.usage
            critique.usage = usage()
        critique.meta.update({
            "critic": self.id,
            "model": self.model,
            "image_id": request.image_id,
            "template": template.name,
            "template_sha256": template.sha256,
            "prompt_sha256": _sha256_text(prompt),
            "cache_key": key,
            "cache_hit": hit,
            "views": [{"kind": k, "box": b, "label": lbl} for k, b, lbl in view_boxes],
        })
        return critique

    def _ask_critique(self, prompt: str, images: Sequence[Image.Image]) -> Critique:
        """One call and its parse; every failure comes back as a failed ``Critique`` carrying the raw text."""
        message = user_message(prompt, images, self.detail, self.max_image_side)
        rf = response_format_for("critique", CRITIQUE_SCHEMA) if self.structured_output else None
        try:
            result = self.chat.create([message], response_format=rf, **self.sampling)
        except ChatCallError as e:
            return Critique.failure(str(e), raw=e.raw, usage=usage(requests=e.requests))
        try:
            critique = parse_critique(result.content)
        except OutputParseError as e:
            failed = Critique.failure(str(e), raw=e.raw, usage=result.usage)
            failed.meta["response_format_used"] = result.response_format_used
            return failed
        critique.usage = result.usage
        critique.meta["response_format_used"] = result.response_format_used
        return critique

    # --- pairwise judge ---
    def judge_pair(
        self, image: Image.Image, caption_a: str, caption_b: str, *, image_sha256: str | None = None
    ) -> tuple[int | None, str]:
        """Which caption describes ``image`` better: ``(0 | 1 | None for a tie, raw response)``.

        Cached like critiques. Randomising which caption is A is the caller's job. Raises ``JudgeError``
        when the call or the parse fails (never cached), so a tie is never confused with a failure.
        """
        template = load_template(self.judge_template, JUDGE_VARIABLES)
        prompt = template.render(caption_a=caption_a, caption_b=caption_b)
        digest = image_sha256 or pil_sha256(image)
        key = cache_key(
            self.id + ":judge", self.model, self.sampling, prompt, digest, caption_a, caption_b,
            JUDGE_SCHEMA if self.structured_output else None, self._encoding,
        )

        def compute() -> dict[str, Any]:
            message = user_message(prompt, [image], self.detail, self.max_image_side)
            rf = response_format_for("judgement", JUDGE_SCHEMA) if self.structured_output else None
            try:
                result = self.chat.create([message], response_format=rf, **self.sampling)
            except ChatCallError as e:
                raise JudgeError(f"judge call failed: {e}", e.raw) from e
            try:
                winner = parse_judgement(result.content)
            except OutputParseError as e:
                raise JudgeError(str(e), e.raw) from e
            return {"winner": winner, "raw": result.content}

        stored, _ = self.cache.get_or_compute(key, compute)
        return stored["winner"], stored["raw"]
