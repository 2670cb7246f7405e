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
        """Whether this critique reached a paid API (a request was sent; cache hits and local critics
        cost nothing)."""
        return self.critique.usage.get("requests", 0) > 0


@dataclass
class Spend:
    """The run's paid requests against its budget (``loop.max_critic_calls``; None: no budget): what
    earlier stages and sessions recorded (``spent``), and what the stage in progress has made so far
    (``pending``). A stage's event records its pending calls when it finishes (``settle``), and so does
    the stop event of a stage that does not, so every call made is counted once, across resumes."""

    limit: int | None
    spent: int = 0
    pending: int = 0

    def left(self) -> int | None:
        return None if self.limit is None else self.limit - self.spent - self.pending

    def settle(self) -> int:
        """The pending calls, now counted as spent (for the event that records them)."""
        n, self.pending = self.pending, 0
        self.spent += n
        return n


class BudgetExhausted(Exception):
    """The critic-call budget ran out mid-stage. Finished requests are in the disk cache."""

    def __init__(self, stage: str):
        super().__init__(f"the critic-call budget ran out during the {stage}")


class TooManyFailures(Exception):
    """More of a stage's requests failed than ``loop.max_failure_share`` allows. Nothing of the stage is
    recorded; the answers that did arrive are in the disk cache, so a resume asks only the failed ones."""

    def __init__(self, stage: str, failures: int, total: int, first_error: str):
        super().__init__(f"{failures} of {total} {stage} failed; the first error: {first_error}")
        self.stage, self.failures, self.total, self.first_error = stage, failures, total, first_error


def in_chunks(stage: str, items: Sequence[Any], ask: Callable[[list], list], paid: Callable[[Any], bool],
              error: Callable[[Any], str | None], spend: Spend | None = None, max_failure_share: float = 1.0,
              chunk: int = 32, progress: Callable[[int], None] = lambda n: None) -> list:
    """``ask`` the items ``chunk`` at a time: how every stage that pays for requests runs.

    Before a chunk, the budget (``spend``) caps its size, and :class:`BudgetExhausted` is raised when
    nothing is left. After a chunk, its paid results are added to ``spend``, and :class:`TooManyFailures`
    is raised as soon as more than ``max_failure_share`` of all the items have failed (the stage can no
    longer succeed) or, at the end, of those asked.
    """
    results: list = []
    i = 0
    while i < len(items):
        take = chunk
        if spend is not None and (left := spend.left()) is not None:
            if left <= 0:
                raise BudgetExhausted(stage)
            take = min(chunk, left)
        batch = items[i : i + take]
        out = ask(list(batch))
        results += out
        if spend is not None:
            spend.pending += sum(paid(r) for r in out)
        progress(len(batch))
        i += take
        failed = [e for r in results if (e := error(r)) is not None]
        if failed and len(failed) > max_failure_share * len(items):
            raise TooManyFailures(stage, len(failed), len(results), failed[0])
    return results


def critique(
    critic: Critic,
    records: Sequence[ImageRecord],
    captions: Sequence[CaptionSet],
    regions: Mapping[str, Any],
    spend: Spend | None = None,
    chunk: int = 32,
    progress: Callable[[int], None] = lambda n: None,
    max_failure_share: float = 1.0,
    samples: int = 1,
) -> list[CritiqueRow]:
    """Critique every distinct (image, caption), ``samples`` times each, in caption order, through
    :func:`in_chunks` (budget, failure share). Failures are never cached, so a resume asks them again."""
    by_id = {r.id: r for r in records}
    requests, seen = [], set()
    for row in captions:
        record = by_id[row.image_id]
        for text in row.texts():
            if (record.id, text) not in seen:
                seen.add((record.id, text))
                requests += [CritiqueRequest(record.id, record.image, record.sha256, text, regions.get(record.id),
                                             record.objects, sample) for sample in range(samples)]

    def ask(batch: list[CritiqueRequest]) -> list[CritiqueRow]:
        return [CritiqueRow(r.image_id, r.caption, result, r.sample) for r, result in zip(batch, critic.critique_many(batch))]

    return in_chunks("critiques", requests, ask, lambda row: row.paid, lambda row: row.critique.error, spend,
                     max_failure_share, chunk, progress)


def by_caption(rows: Sequence[CritiqueRow]) -> dict[tuple[str, str], Critique]:
    """``{(image_id, caption): critique}`` for looking critiques up by what they judged (the first
    sample; ``samples_by_caption`` has them all)."""
    table: dict[tuple[str, str], Critique] = {}
    for row in rows:
        table.setdefault((row.image_id, row.caption), row.critique)
    return table


