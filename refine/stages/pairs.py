"""Preference pairs: what the student should prefer, and why.

Two sources per image (DESIGN.md):
- ``refined``: the critic-refined caption over the student's original;
- ``ranked``: the best over the worst of the student's sampled captions, by critic score.

Ties (equal text, or equal score for ranked pairs) carry no preference and are dropped, and so are
duplicates of a pair already made for the same image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from refine.metrics.summary import normalized

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
                sources: str, swap: bool = False, verified: Sequence[CritiqueRow] | None = None,
                verify_vocabulary=None) -> list[PreferencePair]:
    """The pairs stage: refined ≻ original, and best ≻ worst of the critic-scored captions, deduplicated.

    A refined pair's weight is the share of the caption's critiques that agreed on the refinement.
    With ``verified`` (critiques of the refined captions), a refined pair is kept only if its critique
    confirms it (``refine.metrics.summary.unverified`` lists the others: by its edits under
    ``verify_vocabulary``, else by score). ``swap`` is the
    control experiment: the same pairs with the preference reversed.
    """
    from refine.metrics.summary import consensus_score, samples_by_caption, unverified

    table = samples_by_caption(critiques)
    dropped = set(unverified(refined, critiques, verified, verify_vocabulary)) if verified is not None else set()
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


