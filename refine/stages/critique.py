"""The critique stage: every distinct (image, caption) of the round asked once, within a budget.

It builds the critic's requests (the image, its regions and known objects, one caption), asks the
critic in chunks, counts the calls that reached the critic (cache hits are free), stops at the
critic-call budget, and stops as soon as too many critiques have failed for the round to succeed.
The critic backends themselves live in ``critics/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from critics.base import Critic, Critique, CritiqueRequest
from refine.images.records import ImageRecord
from refine.stages.student import CaptionSet


@dataclass
class CritiqueRow:
    """One critique of one caption of one image, as ``rounds/<k>/critiques.jsonl`` stores it."""

    image_id: str
    caption: str
    critique: Critique
    sample: int = 0  # which of ``critic.samples`` critiques of this caption

    def to_json(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "caption": self.caption, "sample": self.sample,
                "critique": self.critique.to_json()}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> CritiqueRow:
        return cls(row["image_id"], row["caption"], Critique.from_json(row["critique"]), row.get("sample", 0))

    @property
    def paid(self) -> bool:
        """Whether this critique cost a call (it did not come from the cache)."""
        return not self.critique.meta.get("cache_hit")


class BudgetExhausted(Exception):
    """The critic-call budget ran out mid-stage. Finished critiques are in the disk cache."""

    def __init__(self, calls: int):
        super().__init__(f"critic-call budget exhausted after {calls} calls")
        self.calls = calls


class TooManyFailures(Exception):
    """More of a stage's requests failed than ``loop.max_failure_share`` allows. Nothing of the stage is
    recorded; the answers that did arrive are in the disk cache, so a resume asks only the failed ones."""

    def __init__(self, stage: str, failures: int, total: int, first_error: str, critic_calls: int = 0):
        super().__init__(f"{failures} of {total} {stage} failed; the first error: {first_error}")
        self.stage, self.failures, self.total, self.first_error = stage, failures, total, first_error
        self.critic_calls = critic_calls


def check_failures(stage: str, errors: Sequence[str | None], max_share: float, critic_calls: int = 0) -> None:
    """Raise :class:`TooManyFailures` when the share of non-None ``errors`` exceeds ``max_share``."""
    failed = [e for e in errors if e is not None]
    if failed and len(failed) / len(errors) > max_share:
        raise TooManyFailures(stage, len(failed), len(errors), failed[0], critic_calls)


def critic_calls(rows: Sequence[CritiqueRow]) -> int:
    """Calls the stage paid for: every critique that did not come from the cache."""
    return sum(row.paid for row in rows)


def critique(
    critic: Critic,
    records: Sequence[ImageRecord],
    captions: Sequence[CaptionSet],
    regions: Mapping[str, Any],
    budget: int | None = None,
    chunk: int = 32,
    progress: Callable[[int], None] = lambda n: None,
    max_failure_share: float = 1.0,
    samples: int = 1,
) -> list[CritiqueRow]:
    """Critique every distinct (image, caption), ``samples`` times each, in caption order.

    ``budget`` caps the calls that miss the cache; hits are free. When it runs out, raises
    :class:`BudgetExhausted` after the calls it did make are cached, so a resume re-asks nothing.
    Raises :class:`TooManyFailures` as soon as more than ``max_failure_share`` of the stage's critiques
    have failed (the stage can then no longer succeed); failures are never cached, so a resume asks
    them again.
    """
    by_id = {r.id: r for r in records}
    requests, seen = [], set()
    for row in captions:
        record = by_id[row.image_id]
        for text in row.texts():
            if (record.id, text) not in seen:
                seen.add((record.id, text))
                requests += [CritiqueRequest(record.id, record.image, record.sha256, text, regions.get(record.id),
                                             record.objects, sample) for sample in range(samples)]
    rows: list[CritiqueRow] = []
    i = 0
    while i < len(requests):
        take = chunk if budget is None else min(chunk, budget - critic_calls(rows))
        if take <= 0:
            raise BudgetExhausted(critic_calls(rows))
        batch = requests[i : i + take]
        rows += [CritiqueRow(request.image_id, request.caption, result, request.sample)
                 for request, result in zip(batch, critic.critique_many(batch))]
        progress(len(batch))
        i += take
        errors = [row.critique.error for row in rows]
        failed = [e for e in errors if e is not None]
        if failed and (len(failed) > max_failure_share * len(requests) or i >= len(requests)):
            check_failures("critiques", errors + [None] * (len(requests) - len(rows)), max_failure_share,
                           critic_calls(rows))
    return rows


def by_caption(rows: Sequence[CritiqueRow]) -> dict[tuple[str, str], Critique]:
    """``{(image_id, caption): critique}`` for looking critiques up by what they judged (the first
    sample; ``samples_by_caption`` has them all)."""
    table: dict[tuple[str, str], Critique] = {}
    for row in rows:
        table.setdefault((row.image_id, row.caption), row.critique)
    return table


