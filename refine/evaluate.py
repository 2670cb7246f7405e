"""Evaluation on a set with known objects: greedy captions, then CHAIR-style object metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refine.images import ImageRecord


def vocabulary_for_truths(truths: Sequence[dict[str, int]]):
    """COCO's vocabulary (with synonyms) when every label is a COCO category, else exactly the labels seen."""
    from refine import objects

    labels = {label for truth in truths for label in truth}
    if labels <= set(objects.COCO_CATEGORIES):
        return objects.coco_vocabulary()
    return objects.vocabulary_for(sorted(labels))


def object_metrics(captions: Sequence[str], truths: Sequence[dict[str, int]]) -> dict[str, float]:
    """CHAIR_i, CHAIR_s, recall, exact match and mean length (refine.objects.chair)."""
    from refine import objects

    result = objects.chair(list(captions), list(truths), vocabulary_for_truths(truths))
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}


def evaluate(student, records: Sequence[ImageRecord], cfg) -> list[dict[str, Any]]:
    """Greedy-caption every record; rows carry the truth so metrics need nothing else."""
    rows = []
    for i in range(0, len(records), cfg.batch_size):
        batch = records[i : i + cfg.batch_size]
        captions = student.caption([r.image for r in batch], max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        rows += [{"image_id": r.id, "caption": c[0], "objects": r.objects} for r, c in zip(batch, captions)]
    return rows


def metrics_of_rows(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    known = [r for r in rows if r.get("objects") is not None]
    return object_metrics([r["caption"] for r in known], [r["objects"] for r in known]) if known else {}
