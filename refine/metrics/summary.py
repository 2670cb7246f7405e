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
                    seconds: Mapping[str, float] = {}) -> dict[str, Any]:
    """The per-round summary written to ``metrics.json``: critic, step, pairs, update, object metrics on
    the training images (``train/*``) and the held-out set (``eval/*``), and seconds per stage."""
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
        "pairs/total": len(pairs),
        **{f"pairs/{s}": sum(1 for p in pairs if p.source == s) for s in sorted({p.source for p in pairs})},
    }
    if history:
        last = history[-max(1, len(history) // 10):]  # the round's final tenth of steps
        metrics["update/steps"] = len(history)
        metrics.update({f"update/{key}": mean(h[key] for h in last) for key in history[0]})
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
