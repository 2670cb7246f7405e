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


def _norm(caption: str) -> str:
    return " ".join(caption.lower().strip().rstrip(".").split())


def refined_pairs(image_id: str, original: str, refined: str, margin: float = 0.0) -> list[PreferencePair]:
    """``refined ≻ original``, or nothing when the step left the caption unchanged."""
    if not refined.strip() or _norm(refined) == _norm(original):
        return []
    return [PreferencePair(image_id, refined.strip(), original.strip(), "refined", margin)]


def ranked_pairs(image_id: str, scored: Sequence[tuple[str, float]], min_margin: float = 0.0) -> list[PreferencePair]:
    """``best ≻ worst`` among ``(caption, score)`` candidates, when their scores differ by more than ``min_margin``."""
    distinct: dict[str, tuple[str, float]] = {}
    for caption, score in scored:
        distinct.setdefault(_norm(caption), (caption.strip(), score))
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
        key = (p.image_id, _norm(p.chosen), _norm(p.rejected))
        if key not in seen and key[1] != key[2]:
            seen.add(key)
            out.append(p)
    return out


def build_pairs(captions: Sequence[CaptionSet], critiques: Sequence[CritiqueRow], refined: Sequence[Refinement],
                sources: str, swap: bool = False) -> list[PreferencePair]:
    """The pairs stage: refined ≻ original, and best ≻ worst of the critic-scored captions, deduplicated.

    ``swap`` is the control experiment: the same pairs with the preference reversed.
    """
    from refine.stages.critique import by_caption

    table = by_caption(critiques)
    out: list[PreferencePair] = []
    if "refined" in sources:
        for row in refined:
            out += refined_pairs(row.image_id, row.original, row.refined)
    if "ranked" in sources:
        for row in captions:
            scored = [(t, table[(row.image_id, t)].score) for t in row.texts() if table[(row.image_id, t)].ok]
            out += ranked_pairs(row.image_id, scored)
    pairs = dedupe(out)
    if swap:
        pairs = [replace(p, chosen=p.rejected, rejected=p.chosen, source=p.source + ":swapped") for p in pairs]
    return pairs
