"""Preference pairs: what the student should prefer, and why.

Two sources per image (DESIGN.md):
- ``refined``: the critic-refined caption over the student's original;
- ``ranked``: the best over the worst of the student's sampled captions, by critic score.

Ties (equal text, or equal score for ranked pairs) carry no preference and are dropped, and so are
duplicates of a pair already made for the same image.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from refine.metrics.summary import consensus_score, normalized, samples_by_caption

if TYPE_CHECKING:
    from refine.stages.critique import CritiqueRow
    from refine.stages.step import Refinement
    from refine.stages.student import CaptionSet


@dataclass(frozen=True)
class PreferencePair:
    image_id: str
    chosen: str
    rejected: str
    source: str  # "refined" | "ranked" | anything a caller names
    margin: float = 0.0  # critic score(chosen) - score(rejected) when known
    weight: float = 1.0  # its weight in the update: the share of critiques that agreed on it


def refined_pairs(image_id: str, original: str, refined: str, margin: float = 0.0) -> list[PreferencePair]:
    """``refined ≻ original``, or nothing when the step left the caption unchanged."""
    if not refined.strip() or normalized(refined) == normalized(original):
        return []
    return [PreferencePair(image_id, refined.strip(), original.strip(), "refined", margin)]


def ranked_pairs(image_id: str, scored: Sequence[tuple[str, float]], min_margin: float = 0.0) -> list[PreferencePair]:
    """``best ≻ worst`` among ``(caption, score)`` candidates, when their scores differ by more than ``min_margin``."""
    distinct: dict[str, tuple[str, float]] = {}
    for caption, score in scored:
        distinct.setdefault(normalized(caption), (caption.strip(), score))
    if len(distinct) < 2:
        return []
    ordered = sorted(distinct.values(), key=lambda cs: cs[1])
    (worst, lo), (best, hi) = ordered[0], ordered[-1]
    if hi - lo <= min_margin:
        return []
    return [PreferencePair(image_id, best, worst, "ranked", hi - lo)]


def dedupe(pairs: Iterable[PreferencePair]) -> list[PreferencePair]:
    """Drop pairs whose (image, chosen, rejected) was already seen, keeping the first."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for p in pairs:
        key = (p.image_id, normalized(p.chosen), normalized(p.rejected))
        if key not in seen and key[1] != key[2]:
            seen.add(key)
            out.append(p)
    return out


def build_pairs(captions: Sequence[CaptionSet], critiques: Sequence[CritiqueRow], refined: Sequence[Refinement],
                sources: str, swap: bool = False, dropped: Collection[tuple[str, str]] = ()) -> list[PreferencePair]:
    """The pairs stage: refined ≻ original, and best ≻ worst of the critic-scored captions, deduplicated.

    A refined pair's weight is the share of the caption's critiques that agreed on the refinement.
    ``dropped``: the ``(image_id, original)`` of refinements their verification did not confirm
    (:func:`unverified`); they make no refined pair. ``swap`` is the control
    experiment: the same pairs with the preference reversed.
    """
    table = samples_by_caption(critiques)
    dropped = set(dropped)
    out: list[PreferencePair] = []
    if "refined" in sources:
        for row in refined:
            if (row.image_id, row.original) not in dropped:
                out += [replace(p, weight=row.votes / row.of)
                        for p in refined_pairs(row.image_id, row.original, row.refined)]
    if "ranked" in sources:
        for row in captions:
            scored = [(t, consensus_score(table[(row.image_id, t)])) for t in row.texts()
                      if any(c.ok for c in table[(row.image_id, t)])]
            out += ranked_pairs(row.image_id, scored)
    pairs = dedupe(out)
    if swap:
        pairs = [replace(p, chosen=p.rejected, rejected=p.chosen, source=p.source + ":swapped") for p in pairs]
    return pairs


def to_verify(refined: Sequence[Refinement]) -> list[CaptionSet]:
    """The refined captions that changed something, as the captions a verification critiques."""
    from refine.stages.student import CaptionSet

    changed = dict.fromkeys((r.image_id, r.refined) for r in refined if normalized(r.refined) != normalized(r.original))
    return [CaptionSet(image_id, caption) for image_id, caption in changed]


def unverified(refined: Sequence, critiques: Sequence, verified: Sequence, vocabulary=None) -> list[tuple[str, str]]:
    """``(image_id, original)`` of each refinement its own critique does not confirm. Rows are the step's
    ``Refinement``s and the critique stage's rows; a failed verification confirms nothing.

    With a ``vocabulary`` (``loop.verify_by=edits``), a refinement that changes the objects named is
    judged by its edits alone (:func:`edits_confirmed`), so a critique that errs about an object the
    rewrite left alone does not count against it. Without one (``score``), and for a refinement that
    changes no object, its critique must score it above the original's.
    """
    before, after = samples_by_caption(critiques), samples_by_caption(verified)
    out = []
    for r in refined:
        if normalized(r.refined) == normalized(r.original):
            continue
        rows = after.get((r.image_id, r.refined), [])
        confirmed = edits_confirmed(r.original, r.refined, rows, vocabulary) if vocabulary is not None else None
        if confirmed is None:  # NaN (failed) is not better
            confirmed = consensus_score(rows) > consensus_score(before[(r.image_id, r.original)])
        if not confirmed:
            out.append((r.image_id, r.original))
    return out


def edits_confirmed(original: str, refined: str, critiques: Sequence, vocabulary) -> bool | None:
    """Whether the critiques of ``refined`` confirm what it changed in ``original``'s objects: none reports
    missing an object it removed, hallucinated an object it added, or a wrong count where it changed a
    count. None when it changed no object (nothing to confirm); False when no critique succeeded."""
    from refine.objects import mentions

    said, now = mentions(original, vocabulary), mentions(refined, vocabulary)
    removed, added = said.keys() - now.keys(), now.keys() - said.keys()
    recounted = {label for label in said.keys() & now.keys() if said[label] != now[label]}
    if not (removed or added or recounted):
        return None
    ok = [c for c in critiques if c.ok]

    def labels(items) -> set[str]:
        return {label for item in items for label in mentions(item, vocabulary)}

    return bool(ok) and not any(removed & labels(c.missing) or added & labels(c.hallucinated)
                                or recounted & labels(c.count_errors) for c in ok)
