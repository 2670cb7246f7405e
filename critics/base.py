"""The critic protocol and the ``Critique`` record every backend returns.

A critique is a *textual gradient*: free-text feedback on what the caption gets wrong, plus the
structured parts we can act on and measure (hallucinated / missing objects, count errors, a score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass
class Critique:
    score: float  # 0..1, higher is better
    feedback: str  # the textual gradient
    hallucinated: list[str] = field(default_factory=list)  # objects named but not there
    missing: list[str] = field(default_factory=list)  # objects there but not named
    count_errors: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (said, true)
    revision: str | None = None  # the critic's own corrected caption, when it makes one
    raw: str = ""  # the raw response text (or a JSON dump for local critics)
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens, requests
    error: str | None = None  # set when the call failed; failed critiques are never cached
    meta: dict[str, Any] = field(default_factory=dict)  # template hash, cache hit, critic id, ...

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def approves(self) -> bool:
        """The critic found nothing wrong: no hallucinated, missing or miscounted object, a full score."""
        return self.ok and not (self.hallucinated or self.missing or self.count_errors) and self.score >= 1.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["count_errors"] = {k: list(v) for k, v in self.count_errors.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Critique:
        d = dict(d)
        d["count_errors"] = {k: tuple(v) for k, v in d.get("count_errors", {}).items()}
        return cls(**d)

    @classmethod
    def failure(cls, error: str, raw: str = "", usage: dict[str, int] | None = None) -> Critique:
        return cls(score=float("nan"), feedback="", raw=raw, usage=usage or {}, error=error)


@dataclass
class CritiqueRequest:
    """One unit of critic work: an image (with its id, bytes hash and known objects) and a caption."""

    image_id: str
    image: Image.Image | None  # None for a critic that does not look at pixels (``pixels = False``)
    image_sha256: str
    caption: str
    regions: Any = None  # refine.stages.regions.Regions, or None when the regions stage is skipped
    objects: dict[str, int] | None = None  # ground-truth label -> count (annotations), when known
    sample: int = 0  # which of several critiques of the same caption this is (agreement); part of the key


@runtime_checkable
class Critic(Protocol):
    """Backends implement ``critique_many``; it must never raise for one bad item.

    ``id`` names the backend and its model (part of every cache key). The critique stage also reads,
    when a backend has them: ``batch_size`` (requests per ``critique_many`` call; default 1),
    ``max_concurrency`` (calls in flight; default 1), ``free`` (True for local critics, which no
    budget counts; default False) and ``pixels`` (False for a critic that reads only annotations or
    regions: its requests carry no decoded image; default True).
    """

    id: str

    def critique_many(self, requests: Sequence[CritiqueRequest]) -> list[Critique]: ...
