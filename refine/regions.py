"""Regions: YOLO over the full image plus sliding windows at several zoom levels.

(Data types are fixed here; the stage itself is being built — see issue 3.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in full-image pixels


@dataclass
class Detection:
    label: str
    score: float
    box: Box


@dataclass
class ObjectSummary:
    label: str
    count: int
    mean_score: float
    boxes: list[Box]


@dataclass
class View:
    """An image shown to the critic: the full image, a zoomed tile holding objects, or an object crop."""

    kind: str  # "full" | "tile" | "crop"
    box: Box  # where it sits in the full image
    image: Image.Image
    label: str | None = None  # for crops: the object's label


@dataclass
class Regions:
    image_id: str
    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)  # merged across tiles
    objects: list[ObjectSummary] = field(default_factory=list)  # by label, most confident first
    views: list[View] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {o.label: o.count for o in self.objects}
