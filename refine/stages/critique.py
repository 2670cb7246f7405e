"""The critique stage: every distinct (image, caption) of the round asked once, within a budget.

It builds the critic's requests (the image, its regions and known objects, one caption) as the critic
is ready for them, keeps the critic busy with no barrier (:func:`run_requests`), records each finished
batch at once, counts the calls that reached the critic (cache hits are free), stops at the
critic-call budget, and stops as soon as too many critiques have failed for the round to succeed.
The critic backends themselves live in ``critics/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from critics.base import Critic, Critique, CritiqueRequest
from refine.images.records import ImageRecord, present, readable
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
    """The run's paid requests against its budget (``loop.max_critic_calls``; None: no budget).

    ``spent``: what earlier stages and sessions recorded, in events or in the partial files of stages
    in progress. ``pending``: what the stage in progress has made in this session; ``recorded``: how
    many of those belong to rows already in its partial file. A finished stage's event records all its
    pending calls (``settle``); a stop records only those no partial row holds (``settle_stop``), since
    a resume counts the partial rows' calls from the file. So every call is counted once, across
    resumes, kills and Ctrl-C; only a request in flight at a kill -9 can go uncounted.
    """

    limit: int | None
    spent: int = 0
    pending: int = 0
    recorded: int = 0

    def left(self) -> int | None:
        return None if self.limit is None else self.limit - self.spent - self.pending

    def settle(self) -> int:
        """The stage finished: its pending calls, now counted as spent (for its ``stage_done`` event)."""
        n, self.pending, self.recorded = self.pending, 0, 0
        self.spent += n
        return n

    def settle_stop(self) -> int:
        """The stage stopped: the pending calls that no recorded row holds (for the stop event)."""
        n = self.pending - self.recorded
        self.spent += self.pending
        self.pending = self.recorded = 0
        return n


def row_calls(row: dict[str, Any]) -> int:
    """The paid calls a recorded row stands for: one for a critique that reached the API, the requests
    of a refinement (one per critique of the caption that went through textgrad)."""
    if "critique" in row:
        return int((row["critique"].get("usage") or {}).get("requests", 0) > 0)
    return int((row.get("usage") or {}).get("requests", 0))


class BudgetExhausted(Exception):
    """The critic-call budget ran out mid-stage. Finished requests are in the disk cache."""

    def __init__(self, stage: str):
        super().__init__(f"the critic-call budget ran out during the {stage}")


class TooManyFailures(Exception):
    """More of a stage's requests failed than ``loop.max_failure_share`` allows. The stage's successful
    rows are recorded (its partial file), so a resume asks only the failed ones and those not yet asked."""

    def __init__(self, stage: str, failures: int, total: int, first_error: str, of: int | None = None):
        asked = f"{total} {stage}" if of is None or of == total else f"the first {total} of {of} {stage}"
        super().__init__(f"{failures} of {asked} failed; the first error: {first_error}")
        self.stage, self.failures, self.total, self.first_error = stage, failures, total, first_error


_END = object()


def run_requests(stage: str, jobs: Iterable[Any], ask: Callable[[list], list], paid: Callable[[Any], bool],
                 error: Callable[[Any], str | None], total: int, spend: Spend | None = None,
                 max_failure_share: float = 1.0, batch: int = 1, concurrency: int = 1,
                 sink: Callable[[list], None] = lambda rows: None,
                 progress: Callable[[int], None] = lambda n: None,
                 cost: Callable[[Any], int] = lambda job: 1) -> list:
    """``ask`` the jobs ``batch`` at a time with up to ``concurrency`` batches in flight and no barrier:
    how every stage that pays for requests runs. Returns the results in the order they finished.

    ``jobs`` is read lazily (a producer may decode images or find regions as jobs are needed). Each
    finished batch goes to ``sink`` at once (the stage's partial file), so a stop loses only what was
    in flight. The budget (``spend``) counts every request in flight as spent: a batch is sent only
    while calls are left, and when none are, the batches in flight finish, are recorded, and
    :class:`BudgetExhausted` is raised. :class:`TooManyFailures` is raised as soon as more than
    ``max_failure_share`` of the ``total`` jobs (``total`` is how many ``jobs`` yields) have failed (the
    stage can no longer succeed), or at the end of those asked. Whatever ends it early (a stop, Ctrl-C),
    the requests still in flight count as spent: they may have been paid for. ``cost(job)`` is the most
    requests a job can make (a textual step makes one per critique of its caption); the budget counts
    that.
    """
    from refine.infra.concurrency import stream_concurrently

    in_flight = dispatched = 0  # requests (by cost) in flight; jobs sent
    costs: dict[int, int] = {}  # id(batch) -> its cost, while in flight

    def batches():
        nonlocal in_flight, dispatched
        source = iter(jobs)
        while True:
            group, group_cost, fits = [], 0, True
            while len(group) < batch:
                left = spend.left() if spend is not None else None
                room = None if left is None else left - in_flight - group_cost
                if room is not None and room <= 0:  # checked before a job is built
                    fits = False
                    break
                job = next(source, _END)
                if job is _END:
                    break
                n = cost(job)
                if room is not None and n > room:  # the budget cannot pay for it: send what fits, then stop
                    fits = False
                    break
                group.append(job)
                group_cost += n
            if group:
                in_flight += group_cost
                dispatched += len(group)
                costs[id(group)] = group_cost
                yield group
            if not group or not fits:
                return

    results: list = []
    failed: list[str] = []
    try:
        for group, out in stream_concurrently(ask, batches(), concurrency):
            in_flight -= costs.pop(id(group))
            results += out
            if spend is not None:
                spend.pending += sum(paid(r) for r in out)
            sink(out)
            progress(len(group))
            failed += [e for r in out if (e := error(r)) is not None]
            if failed and len(failed) > max_failure_share * total:
                raise TooManyFailures(stage, len(failed), len(results), failed[0], total)
    except BaseException:
        if spend is not None:
            spend.pending += in_flight
        raise
    if dispatched < total:  # the budget ran out with jobs left
        raise BudgetExhausted(stage)
    if failed and len(failed) > max_failure_share * len(results):
        raise TooManyFailures(stage, len(failed), len(results), failed[0])
    return results


def critique(
    critic: Critic,
    records: Sequence[ImageRecord],
    captions: Sequence[CaptionSet],
    regions_for: Callable[[ImageRecord], Any] = lambda record: None,
    spend: Spend | None = None,
    progress: Callable[[int], None] = lambda n: None,
    max_failure_share: float = 1.0,
    samples: int = 1,
    done: Sequence[CritiqueRow] = (),
    sink: Callable[[list[CritiqueRow]], None] = lambda rows: None,
) -> list[CritiqueRow]:
    """Critique every distinct (image, caption), ``samples`` times each, through :func:`run_requests`
    (no barrier, budget, failure share); returns the rows in caption order.

    ``done`` are rows recorded before (a resumed stage): their requests are not made again. Requests
    are built as the critic is ready for them, so only those in flight hold decoded pixels and regions
    (``regions_for(record)``: the regions stage, cached on disk, or None). Each finished batch's
    successful rows go to ``sink``; failures are never recorded or cached, so a resume asks them again.
    """
    by_id = {r.id: r for r in records}
    keys = list(dict.fromkeys((row.image_id, text, sample) for row in captions for text in row.texts()
                              for sample in range(samples)))
    have = {(r.image_id, r.caption, r.sample): r for r in done}
    todo = [key for key in keys if key not in have]
    progress(len(keys) - len(todo))

    pixels = getattr(critic, "pixels", True)

    def requests():
        last = (None, None)  # the image whose regions were found last: its captions come together
        for image_id, text, sample in todo:
            record, lost = by_id.get(image_id), {}
            image = readable(record, lost) if record is not None and pixels else None
            if record is None or (image is None if pixels else not present(record, lost)):
                # a failed critique, asked of no critic: nothing is paid for
                yield _Lost(image_id, text, sample, lost.get(image_id, f"{image_id}: no longer in the image set"))
                continue
            if last[0] != image_id:
                last = (image_id, regions_for(record))
            yield CritiqueRequest(image_id, image, record.sha256, text, last[1], record.objects, sample)

    def ask(batch: list) -> list[CritiqueRow]:
        asked = [r for r in batch if isinstance(r, CritiqueRequest)]
        results = iter(critic.critique_many(asked) if asked else [])
        return [CritiqueRow(r.image_id, r.caption, next(results), r.sample) if isinstance(r, CritiqueRequest)
                else CritiqueRow(r.image_id, r.caption, Critique.failure(f"image lost: {r.why}"), r.sample)
                for r in batch]

    new = run_requests("critiques", requests(), ask, lambda row: row.paid, lambda row: row.critique.error,
                       len(todo), None if getattr(critic, "free", False) else spend, max_failure_share,
                       getattr(critic, "batch_size", 1),
                       getattr(critic, "max_concurrency", 1), lambda rows: sink([r for r in rows if r.critique.ok]),
                       progress)
    have.update(((r.image_id, r.caption, r.sample), r) for r in new)
    return [have[key] for key in keys]


@dataclass
class _Lost:
    """A critique the stage cannot ask: its image can no longer be read (the reason: ``why``)."""

    image_id: str
    caption: str
    sample: int
    why: str


def by_caption(rows: Sequence[CritiqueRow]) -> dict[tuple[str, str], Critique]:
    """``{(image_id, caption): critique}`` for looking critiques up by what they judged (the first
    sample; ``samples_by_caption`` has them all)."""
    table: dict[tuple[str, str], Critique] = {}
    for row in rows:
        table.setdefault((row.image_id, row.caption), row.critique)
    return table


