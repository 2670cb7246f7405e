"""Preference pairs: what the student should prefer, and why.

Two sources per image (DESIGN.md):
- ``refined``: the critic-refined caption over the student's original (with verification, what the
  refinement's own critique leaves of it: :func:`verdicts`);
- ``ranked``: the best over the worst of the student's sampled captions, by critic score.

Ties (equal text, or equal score for ranked pairs) carry no preference and are dropped, and so are
duplicates of a pair already made for the same image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
                sources: str, swap: bool = False, judged: Mapping[tuple[str, str], str] | None = None
                ) -> list[PreferencePair]:
    """The pairs stage: refined ≻ original, and best ≻ worst of the critic-scored captions, deduplicated.

    A refined pair's weight is the share of the caption's critiques that agreed on the refinement.
    ``judged``: what verification made of each refinement, by ``(image_id, original)``
    (:func:`verdicts`); the pair's chosen caption is that verdict, so an unconfirmed refinement (its
    verdict is the original) makes no pair and a repaired one is the pair's chosen caption. ``swap`` is
    the control experiment: the same pairs with the preference reversed.
    """
    table = samples_by_caption(critiques)
    judged = judged or {}
    out: list[PreferencePair] = []
    if "refined" in sources:
        for row in refined:
            chosen = judged.get((row.image_id, row.original), row.refined)
            out += [replace(p, weight=row.votes / row.of) for p in refined_pairs(row.image_id, row.original, chosen)]
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


def verdicts(refined: Sequence, critiques: Sequence, verified: Sequence, rule: str = "score",
             vocabulary=None) -> dict[tuple[str, str], str]:
    """What verification makes of each refinement that changed its caption, by ``(image_id, original)``:
    the refinement (confirmed), the original (not confirmed: it makes no pair), or, by ``repair``, the
    original with only the refinement's edits that its critique does not contradict. Rows are the step's
    ``Refinement``s and the critique stage's rows (``verified``: the refinements' own critiques); a failed
    verification confirms nothing.

    ``rule`` (``loop.verify_by``): ``score``: the refinement's critique must score it above the
    original's. ``edits`` and ``repair`` judge a refinement that changes the objects named by its edits
    alone (:func:`repair`; a critique that errs about an object the rewrite left alone does not count
    against it): ``edits`` keeps it only if no edit is contradicted, ``repair`` keeps what is left of
    it. A refinement that changes no object is judged by score under every rule.
    """
    before, after = samples_by_caption(critiques), samples_by_caption(verified)
    out = {}
    for r in refined:
        if normalized(r.refined) == normalized(r.original):
            continue
        rows = after.get((r.image_id, r.refined), [])
        edits = _edits(r.original, r.refined, rows, vocabulary) if rule != "score" else None
        if edits is None:  # judged by score; NaN (failed) is not better
            better = consensus_score(rows) > consensus_score(before[(r.image_id, r.original)])
            out[(r.image_id, r.original)] = r.refined if better else r.original
        elif rule == "edits":
            out[(r.image_id, r.original)] = r.original if edits.undone else r.refined
        else:
            out[(r.image_id, r.original)] = edits.repaired(r.original, r.refined, vocabulary)
    return out


def verification_counts(judged: Mapping[tuple[str, str], str], refined: Sequence) -> dict[str, int]:
    """How many refinements verification left unconfirmed (their verdict is the original: no pair) and
    how many it repaired (neither the refinement nor the original), for the round summary."""
    made = {(r.image_id, r.original): normalized(r.refined) for r in refined}
    unconfirmed = [key for key, kept in judged.items() if normalized(kept) == normalized(key[1])]
    fixed = [key for key, kept in judged.items() if normalized(kept) not in (normalized(key[1]), made.get(key))]
    return {"unverified": len(unconfirmed), "repaired": len(fixed)}


@dataclass(frozen=True)
class _Edits:
    """What a refinement changed in the original's objects (label -> count), and which of those changes
    (labels) its critiques contradict."""

    said: dict
    now: dict
    changed: frozenset
    undone: frozenset

    def repaired(self, original: str, refined: str, vocabulary) -> str:
        """``refined`` when nothing is contradicted; ``original`` when everything is, or when the kept
        edits cannot be written exactly (free-form captions are rewritten best effort); otherwise
        ``original`` rewritten to the kept edits."""
        from refine.objects import compare, rewrite

        if not self.undone:
            return refined
        if self.undone == self.changed:
            return original
        kept = dict(self.now)
        for label in self.undone:  # removed or recounted: back as the original said it; added: out again
            if label in self.said:
                kept[label] = self.said[label]
            else:
                del kept[label]
        out = rewrite(original, kept, vocabulary)
        return out if out and compare(out, kept, vocabulary).exact else original


def _edits(original: str, refined: str, critiques: Sequence, vocabulary) -> _Edits | None:
    """The object edits of ``refined`` and those its critiques contradict (every edit when no critique
    succeeded: nothing is confirmed); None when it changed no object."""
    from refine.objects import mentions

    said, now = mentions(original, vocabulary), mentions(refined, vocabulary)
    removed, added = said.keys() - now.keys(), now.keys() - said.keys()
    recounted = {label for label in said.keys() & now.keys() if said[label] != now[label]}
    changed = frozenset(removed | added | recounted)
    if not changed:
        return None
    ok = [c for c in critiques if c.ok]
    if not ok:
        return _Edits(said, now, changed, changed)

    def labels(items) -> set[str]:
        return {label for c in ok for item in items(c) for label in mentions(item, vocabulary)}

    undone = (removed & labels(lambda c: c.missing) | added & labels(lambda c: c.hallucinated)
              | recounted & labels(lambda c: c.count_errors))
    return _Edits(said, now, changed, frozenset(undone))


def repair(original: str, refined: str, critiques: Sequence, vocabulary) -> str | None:
    """The edits ``refined`` made to ``original``'s objects that the critiques of ``refined`` do not
    contradict, applied to ``original``. An edit is contradicted when a critique reports missing an object
    it removed, hallucinated one it added, or a wrong count where it changed a count; errors reported
    about objects it left alone do not count.

    Returns ``refined`` when no edit is contradicted, ``original`` when every edit is (or no critique
    succeeded: nothing is confirmed), and otherwise ``original`` rewritten to the kept edits
    (``refine.objects.rewrite``: in a list caption its objects keep their place and added ones come
    last, so the pair differs by the confirmed edits alone; a free-form caption is rewritten best effort,
    and where the result does not say exactly the kept objects, the verdict is the original). None when
    ``refined`` changed no object (nothing to confirm).
    """
    edits = _edits(original, refined, critiques, vocabulary)
    return None if edits is None else edits.repaired(original, refined, vocabulary)
