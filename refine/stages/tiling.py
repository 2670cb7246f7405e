"""Tiling for the regions stage, after SAHI: sliding windows, boxes mapped back to the full image,
boxes cut by a window edge, and merging across windows and zoom levels. Pure and exact.

Slicing follows SAHI (Akyon, Altinuc & Temizel 2022, "Slicing Aided Hyper Inference and Fine-tuning
for Small Object Detection"): a small object that is a few pixels at the detector's input size in
the full image becomes large enough to detect in a zoomed tile. Its defaults, overlap 0.2 and a 0.5
match threshold, are ours too.

Coordinates are full-image pixels, ``(x0, y0, x1, y1)``, unless a name says "local".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in full-image pixels


SIDES = ("left", "top", "right", "bottom")


# A box edge within this fraction of its tile's side from an inner tile edge counts as cut by it.
# Ultralytics clips boxes to the tile, so a cut object usually sits exactly on the edge; detectors
# also often stop a few pixels short, hence a small tolerance rather than equality.
CUT_TOLERANCE = 0.02


@dataclass
class Detection:
    label: str
    score: float
    box: Box
    view: Box | None = None  # the window the detector saw (full-image coords); None when merged/unknown
    grid: int = 1  # zoom level of that window: 1 = full image, g = one of g x g tiles
    cut: tuple[str, ...] = ()  # sides of the box cut by an inner edge of its window (see cut_sides)
    merged: int = 1  # how many raw detections were merged into this one

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Detection:
        d = dict(d)
        d["box"] = tuple(d["box"])
        d["view"] = tuple(d["view"]) if d.get("view") is not None else None
        d["cut"] = tuple(d.get("cut", ()))
        return cls(**d)


def _window_starts(length: int, grid: int, overlap: float) -> tuple[int, list[int]]:
    """Tile size and start offsets of ``grid`` equal windows covering ``[0, length]`` on one axis.

    The size ``t`` solves ``grid * t - (grid - 1) * overlap * t = length``, rounded up to whole pixels
    (the 1e-9 guards against ``42 / 2.8 = 15.000000000000002``). Starts are spread evenly from 0 to
    ``length - t`` and rounded half up, so the last window ends exactly at the border and neighbours
    share at least ``overlap * t`` pixels (up to the half-pixel rounding of starts).
    """
    size = min(length, max(1, math.ceil(length / (grid - (grid - 1) * overlap) - 1e-9)))
    if grid == 1:
        return size, [0]
    span = length - size
    return size, [(2 * i * span + (grid - 1)) // (2 * (grid - 1)) for i in range(grid)]


def tile_boxes(width: int, height: int, grid: int, overlap: float) -> list[Box]:
    """``grid x grid`` equal windows covering a ``width x height`` image, row by row.

    Neighbouring windows share (at least) ``overlap`` of a window's side; all lie inside the image and
    have integer corners, so they crop exactly and batch without padding. ``grid=1`` is the image.
    """
    if not (isinstance(grid, int) and grid >= 1):
        raise ValueError(f"grid={grid!r} must be an integer >= 1")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap!r} must be in [0, 1)")
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} must be at least 1x1")
    tw, xs = _window_starts(width, grid, overlap)
    th, ys = _window_starts(height, grid, overlap)
    boxes: list[Box] = []
    for y in ys:
        for x in xs:
            box = (float(x), float(y), float(x + tw), float(y + th))
            if box not in boxes:  # tiny images: several rounded windows can coincide
                boxes.append(box)
    return boxes


def to_full_image(local_box: Sequence[float], view: Box) -> Box:
    """Map a box in a window's own pixel coordinates back to full-image coordinates (a translation)."""
    x0, y0, x1, y1 = local_box
    return (x0 + view[0], y0 + view[1], x1 + view[0], y1 + view[1])


def cut_sides(
    box: Box, view: Box, width: int, height: int, tolerance: float = CUT_TOLERANCE
) -> tuple[str, ...]:
    """Sides of ``box`` that touch an edge of its window lying inside the image (not on its border).

    Such a box may be a fragment of a larger object that the window cut off. Touching means within
    ``tolerance`` of the window's side length. Sides come in ``SIDES`` order.
    """
    tol_x, tol_y = tolerance * (view[2] - view[0]), tolerance * (view[3] - view[1])
    cut = {
        "left": view[0] > 0 and box[0] - view[0] <= tol_x,
        "top": view[1] > 0 and box[1] - view[1] <= tol_y,
        "right": view[2] < width and view[2] - box[2] <= tol_x,
        "bottom": view[3] < height and view[3] - box[3] <= tol_y,
    }
    return tuple(side for side in SIDES if cut[side])


def pad_box(box: Box, pad: float, width: int, height: int) -> Box:
    """Grow ``box`` by ``pad`` of its width/height on each side, clip to the image, round outwards.

    The result has integer corners and is at least 1x1, so ``image.crop`` takes it exactly.
    """
    x0, y0, x1, y1 = box
    dx, dy = pad * (x1 - x0), pad * (y1 - y0)
    left = min(max(0, math.floor(x0 - dx)), width - 1)
    top = min(max(0, math.floor(y0 - dy)), height - 1)
    right = max(min(width, math.ceil(x1 + dx)), left + 1)
    bottom = max(min(height, math.ceil(y1 + dy)), top + 1)
    return (float(left), float(top), float(right), float(bottom))


def _contains(outer: Box, inner: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _match_strengths(boxes: np.ndarray, cuts: list[tuple[str, ...]], iou: float) -> np.ndarray:
    """``[N, N]`` strength of "same object" for same-label boxes ``[N, 4]``; 0 where they do not match.

    Two boxes match when any of these reaches ``iou``:

    - IoU: the same object seen whole from two windows or zooms;
    - intersection over the smaller box, when the smaller box is cut by its window: a fragment lying
      inside a larger view of the object (SAHI's IOS metric, limited to fragments so that a child
      standing in front of an adult is not merged into them);
    - for two fragments cut by the same tile boundary from opposite sides (one cut on its right, the
      other on its left, overlapping across the boundary strip): the 1-D IoU of their extents along
      the boundary. Their 2-D IoU is small, since they share only the overlap strip, so IoU alone
      would count one bus cut by a tile edge as two buses.
    """
    x0, y0, x1, y1 = (boxes[:, k] for k in range(4))
    area = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    ix = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    iy = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    inter = ix * iy
    with np.errstate(divide="ignore", invalid="ignore"):
        iou_2d = np.nan_to_num(inter / (area[:, None] + area[None] - inter))
        smaller = np.minimum(area[:, None], area[None])
        ios = np.nan_to_num(inter / smaller)
        ux = np.maximum(x1[:, None], x1[None]) - np.minimum(x0[:, None], x0[None])
        uy = np.maximum(y1[:, None], y1[None]) - np.minimum(y0[:, None], y0[None])
        iou_x, iou_y = np.nan_to_num(ix / ux), np.nan_to_num(iy / uy)

    has = {s: np.array([s in c for c in cuts], dtype=bool) for s in SIDES}
    is_cut = np.array([bool(c) for c in cuts], dtype=bool)
    smaller_is_cut = np.where(area[:, None] <= area[None], is_cut[:, None], is_cut[None])

    def facing(a: str, b: str) -> np.ndarray:  # i cut on side a and j on side b, or the other way round
        return (has[a][:, None] & has[b][None]) | (has[b][:, None] & has[a][None])

    across_x = facing("right", "left") & (ix > 0)  # a vertical boundary, and they meet across its strip
    across_y = facing("bottom", "top") & (iy > 0)

    candidates = np.stack([
        iou_2d,
        np.where(smaller_is_cut, ios, 0.0),
        np.where(across_x, iou_y, 0.0),
        np.where(across_y, iou_x, 0.0),
    ])
    strength = np.where(candidates >= iou, candidates, 0.0).max(axis=0)
    np.fill_diagonal(strength, 0.0)
    return strength


def merge(detections: Sequence[Detection], iou: float) -> list[Detection]:
    """Merge detections of one object across windows and zooms; most confident first.

    Class-aware: only equal labels merge. Pairs match by ``_match_strengths`` (IoU, a fragment inside
    a larger box, fragments across a tile boundary). Objects grow Kruskal-style: matching pairs are
    joined strongest first and transitively, so a bus cut in three by a 3x3 grid is one object even
    though its end fragments never touch. One rule limits the chaining: an object never takes two
    boxes from the same window, because the detector's NMS already decided that two boxes it kept in
    one window are two objects (two people side by side), and a third box overlapping both must not
    join them. Hand-made detections with ``view=None`` are not limited.

    A merged object gets the union box (fragments add up to the whole object; SAHI's greedy
    non-maximum merging also takes the union), the highest score, the coarsest zoom level that saw it,
    and ``merged`` = the number of raw boxes joined. The result does not depend on input order except
    through exact score ties.
    """
    order = sorted(range(len(detections)), key=lambda i: -detections[i].score)
    dets = [detections[i] for i in order]
    parent = list(range(len(dets)))
    # a window that a group already holds a box from; None windows (hand-made boxes) never clash
    windows = [{d.view} if d.view is not None else set() for d in dets]

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for label in dict.fromkeys(d.label for d in dets):
        idx = [i for i, d in enumerate(dets) if d.label == label]
        if len(idx) < 2:
            continue
        boxes = np.array([dets[i].box for i in idx], dtype=np.float64)
        strength = _match_strengths(boxes, [dets[i].cut for i in idx], iou)
        a, b = np.nonzero(np.triu(strength, k=1))
        for k in sorted(range(len(a)), key=lambda k: (-strength[a[k], b[k]], a[k], b[k])):
            ra, rb = root(idx[a[k]]), root(idx[b[k]])
            if ra == rb or windows[ra] & windows[rb]:
                continue
            keep, gone = min(ra, rb), max(ra, rb)  # the lower index is the more confident
            parent[gone] = keep
            windows[keep] |= windows[gone]

    groups: dict[int, list[Detection]] = {}
    for i, d in enumerate(dets):
        groups.setdefault(root(i), []).append(d)
    merged = []
    for members in groups.values():
        if len(members) == 1:
            merged.append(members[0])
            continue
        boxes = np.array([m.box for m in members])
        union = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
        merged.append(Detection(
            label=members[0].label,
            score=max(m.score for m in members),
            box=tuple(float(v) for v in union),
            view=None,
            grid=min(m.grid for m in members),
            cut=(),
            merged=sum(m.merged for m in members),
        ))
    return sorted(merged, key=lambda d: -d.score)


def choose_tiles(
    detections: Sequence[Detection], tiles: Sequence[tuple[int, Box]], k: int
) -> list[tuple[int, Box]]:
    """Up to ``k`` zoomed tiles ``(grid, box)`` that show the most objects not shown yet.

    Greedy cover: each pick is the tile whose wholly contained, still-unshown objects have the largest
    summed score; ties go to the finer zoom, then to the earlier tile. Tiles with nothing new stop it.
    Objects that no tile contains whole (large ones) are left to the full view and the crops.
    """
    shown: set[int] = set()
    chosen: list[tuple[int, Box]] = []
    candidates = list(tiles)
    while len(chosen) < k and candidates:
        gains = [sum(d.score for i, d in enumerate(detections) if i not in shown and _contains(box, d.box))
                 for _, box in candidates]
        best = max(range(len(candidates)), key=lambda t: (gains[t], candidates[t][0], -t))
        if gains[best] <= 0:
            break
        grid, box = candidates.pop(best)
        chosen.append((grid, box))
        shown |= {i for i, d in enumerate(detections) if _contains(box, d.box)}
    return chosen


def crop_boxes(
    detections: Sequence[Detection], k: int, pad: float, width: int, height: int
) -> list[tuple[Detection, Box]]:
    """The ``k`` most confident detections with their padded, clipped, integer crop boxes."""
    top = sorted(detections, key=lambda d: -d.score)[:k]
    return [(d, pad_box(d.box, pad, width, height)) for d in top]
