"""The object-centric context a critique prompt carries: the detector's objects, the views attached to
the request, and known annotations, as text for ``prompts/critique.txt``.

Regions come from the regions stage, but critics never import a stage: a request's ``regions`` is
read through its own ``describe()`` and its views' ``kind``, ``box`` and ``label``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def format_objects(regions: Any) -> str:
    """The detector's classes and counts as prompt text (``Regions.describe()``); ``regions=None`` says
    detection was skipped."""
    if regions is None:
        return "no object detection was run for this image"
    return regions.describe()


def _box_text(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{round(v)}" for v in box) + ")"


def describe_views(full_size: tuple[int, int], views: Iterable[Any]) -> str:
    """Numbered lines naming each attached image, in the order they are attached.

    Image 1 is always the full image; ``views`` are the extra ``refine.stages.regions.View``s sent after it.
    Boxes are ``(x0, y0, x1, y1)`` in full-image pixels.
    """
    width, height = full_size
    lines = [f"Image 1: the full image ({width}x{height} pixels)."]
    for i, view in enumerate(views, start=2):
        if view.kind == "crop":
            what = f"a crop around a detected {view.label}" if view.label else "a crop"
        elif view.kind == "tile":
            what = "a zoomed-in tile"
        else:
            what = f"a {view.kind} view"
        lines.append(f"Image {i}: {what} at box {_box_text(view.box)} of the full image.")
    return "\n".join(lines)


def format_annotations(objects: Mapping[str, int] | None) -> str:
    """Ground-truth label counts, when the image set has them."""
    if not objects:
        return "No annotations are available for this image."
    listed = ", ".join(f"{label}: {count}" for label, count in sorted(objects.items()))
    return f"Human annotations list these objects (label: count): {listed}."
