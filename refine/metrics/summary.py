"""The round summary and the object metrics of caption rows: pure functions of recorded rows.

``summarize_round`` is what ``rounds/<k>/metrics.json`` holds and the loop prints after each round;
``object_metrics`` is CHAIR (and recall, exact match, length) read with the image set's vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from refine.metrics.chair import chair


def object_metrics(captions: Sequence[str], truths: Sequence[Mapping[str, int]], vocab) -> dict[str, float]:
    """CHAIR_i, CHAIR_s, recall, exact match and mean length (``refine.metrics.chair``), numbers only."""
    result = chair(list(captions), list(truths), vocab)
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}


def metrics_of_rows(rows: Iterable[Any], vocab) -> dict[str, float]:
    """Object metrics of rows that carry ``caption`` and ``objects`` (eval rows; dicts or records)."""
    known = [(_get(r, "caption"), _get(r, "objects")) for r in rows if _get(r, "objects") is not None]
    return object_metrics([c for c, _ in known], [o for _, o in known], vocab) if known else {}


def _get(row: Any, key: str) -> Any:
    return row.get(key) if isinstance(row, Mapping) else getattr(row, key)


def mean(values: Iterable[float], skip_nan: bool = False) -> float:
    """The mean; NaN for no values. ``skip_nan`` leaves NaNs out (scores of images that failed); without
    it a NaN shows through (a NaN loss must not be averaged away)."""
    kept = [float(v) for v in values if not (skip_nan and v != v)]
    return sum(kept) / len(kept) if kept else float("nan")


def summarize_round(k: int, records: Sequence, captions: Sequence, critiques: Sequence, refined: Sequence,
                    pairs: Sequence, history: Sequence[Mapping[str, float]], evaluation: Sequence, vocab,
                    seconds: Mapping[str, float] = {}, verification: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The per-round summary written to ``metrics.json``: critic (with the errors a noisy critic made,
    ``critic/noise/*``), step, pairs (``verification``, counted by the loop from
    ``refine.stages.pairs.verdicts``: ``pairs/unverified``, the refinements their verification did not
    confirm, and ``pairs/repaired``; absent without verification), update, object metrics on the
    training images (``train/*``) and the held-out set (``eval/*``), and seconds per stage."""
    from collections import Counter
    usage = [row.critique.usage for row in critiques]
    metrics: dict[str, Any] = {
        "round": k,
        "images": len(records),
        "critic/mean_score": mean_score(critiques),
        "critic/critiques": len(critiques),
        "critic/failures": sum(1 for row in critiques if not row.critique.ok),
        "critic/cache_hits": sum(1 for row in critiques if row.critique.meta.get("cache_hit")),
        "critic/requests": sum(u.get("requests", 0) for u in usage),
        "critic/tokens": sum(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0) for u in usage),
        "step/changed": sum(1 for r in refined if r.refined.strip() != r.original.strip()),
        "step/rejected": sum(1 for r in refined if r.rejected),
        **{f"step/rejected/{why}": sum(1 for r in refined if r.rejected == why)
           for why in sorted({r.rejected for r in refined if r.rejected})},
        "step/errors": sum(1 for r in refined if r.error),
        "step/requests": sum(r.usage.get("requests", 0) for r in refined),
        "step/tokens": sum(r.usage.get("prompt_tokens", 0) + r.usage.get("completion_tokens", 0) for r in refined),
        **{f"critic/noise/{kind}": n for kind, n in sorted(Counter(
            e["kind"] for row in critiques for e in row.critique.meta.get("noise", [])).items())},
        "pairs/total": len(pairs),
        **{f"pairs/{what}": n for what, n in (verification or {}).items()},
        **{f"pairs/{s}": sum(1 for p in pairs if p.source == s) for s in sorted({p.source for p in pairs})},
    }
    if history:
        # per phase (sft+dpo rounds have both): the mean over its final tenth of steps
        for phase in dict.fromkeys(h.get("phase", "dpo") for h in history):
            steps = [h for h in history if h.get("phase", "dpo") == phase]
            last = steps[-max(1, len(steps) // 10):]
            prefix = "update/" if phase == "dpo" else f"update/{phase}/"
            metrics[f"{prefix}steps"] = len(steps)
            metrics.update({f"{prefix}{key}": mean(h[key] for h in last) for key in steps[0] if key != "phase"})
    known = [r for r in records if r.objects is not None]
    if known:
        main = {row.image_id: row.caption for row in captions}
        metrics.update({f"train/{key}": v for key, v in
                        object_metrics([main[r.id] for r in known], [r.objects for r in known], vocab).items()})
    if evaluation:
        metrics.update({f"eval/{key}": v for key, v in metrics_of_rows(evaluation, vocab).items()})
    metrics.update({f"time/{stage}": round(s, 3) for stage, s in seconds.items()})
    return metrics


def mean_score(critiques: Sequence) -> float:
    """The mean critic score of the critiques (rows with a ``critique``) that succeeded; NaN if none did."""
    scores = [row.critique.score for row in critiques if row.critique.ok]
    return sum(scores) / len(scores) if scores else float("nan")


def samples_by_caption(rows: Sequence) -> dict[tuple[str, str], list]:
    """``{(image_id, caption): [critique of each sample]}``."""
    table: dict[tuple[str, str], list] = {}
    for row in rows:
        table.setdefault((row.image_id, row.caption), []).append(row.critique)
    return table


def consensus_score(critiques: Sequence) -> float:
    """The mean score of the critiques of one caption that succeeded (NaN if none did)."""
    scores = [c.score for c in critiques if c.ok]
    return sum(scores) / len(scores) if scores else float("nan")


def normalized(caption: str) -> str:
    """A caption up to case, surrounding space and a final full stop: two captions equal in this form
    carry no preference (the pairs stage's tie)."""
    return " ".join(caption.lower().strip().rstrip(".").split())
