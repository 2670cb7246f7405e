"""Regions: YOLO over the full image plus sliding windows at several zoom levels.

Owns object finding for the critic: one batched detector call per zoom level, per-label counts, the
views (full image, zoomed tiles, object crops) a critic looks at, and the detection cache. The
geometry (windows, mapping, merging) is ``refine.stages.tiling``. Tiles are batched at a small
``imgsz``: ultralytics letterboxes a batch of equal-size images to a tight rectangle but pads mixed
sizes to full squares, so all tiles of one zoom level are made the same size and go in one
``predict`` call.

Coordinates are full-image pixels, ``(x0, y0, x1, y1)``, unless a name says "local".
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from refine.config import RegionConfig
from refine.images.records import ImageRecord
from refine.infra.cache import DiskCache, cache_key
from refine.infra.devices import preserved_torch_threads
from refine.stages.tiling import (
    Box,
    Detection,
    choose_tiles,
    crop_boxes,
    cut_sides,
    merge,
    tile_boxes,
    to_full_image,
)

CACHE_VERSION = "regions/detections/v1"  # bump when the cached detection format changes


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
    grid: int | None = None  # for tiles: the zoom level (g for a g x g tile)


@dataclass
class RegionRow:
    """The regions stage's row (``rounds/<k>/regions.jsonl``): what was found, without the views' pixels;
    for the report and for reading a run. The critique stage rebuilds the views from the detection cache."""

    image_id: str
    width: int
    height: int
    detections: list[dict[str, Any]] = field(default_factory=list)  # {label, score, box: [x0, y0, x1, y1]}
    objects: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Regions:
    image_id: str
    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)  # merged across tiles
    objects: list[ObjectSummary] = field(default_factory=list)  # by label, most confident first
    views: list[View] = field(default_factory=list)
    grids: tuple[int, ...] = ()  # zoom levels searched besides the full image
    error: str | None = None  # set when this image failed; everything else is then empty

    def counts(self) -> dict[str, int]:
        return {o.label: o.count for o in self.objects}

    def row(self) -> RegionRow:
        return RegionRow(self.image_id, self.width, self.height,
                         [{"label": d.label, "score": round(d.score, 4), "box": [round(v, 1) for v in d.box]}
                          for d in self.detections], self.counts(), self.error)

    def describe(self) -> str:
        """The object summary critics put into prompts, e.g. ``"2 person, 1 bus (tiles: 2x2, 3x3)"``.

        The parenthesis names the zoom levels searched besides the full image, so a critic knows small
        objects were looked for.
        """
        if self.error is not None:
            return "object detection failed for this image"
        found = ", ".join(f"{o.count} {o.label}" for o in self.objects) or "no objects detected"
        if not self.grids:
            return found
        return f"{found} (tiles: {', '.join(f'{g}x{g}' for g in self.grids)})"


# ---------------------------------------------------------------------------------------------------
# Geometry: pure and exact.


def summarize(detections: Sequence[Detection]) -> list[ObjectSummary]:
    """Per-label count, mean score and boxes (most confident box first); labels by mean score, descending.

    Ties break by count (more first), then label, so the order is deterministic.
    """
    by_label: dict[str, list[Detection]] = {}
    for d in detections:
        by_label.setdefault(d.label, []).append(d)
    objects = []
    for label, dets in by_label.items():
        dets = sorted(dets, key=lambda d: -d.score)
        mean_score = sum(d.score for d in dets) / len(dets)
        objects.append(ObjectSummary(label, len(dets), mean_score, [d.box for d in dets]))
    return sorted(objects, key=lambda o: (-o.mean_score, -o.count, o.label))


def select_views(image: Image.Image, detections: Sequence[Detection], config: RegionConfig) -> list[View]:
    """Full image, then up to ``max_tile_views`` zoomed tiles holding objects, then the top-k crops."""
    width, height = image.size
    tiles = [(g, box) for g in config.grids for box in tile_boxes(width, height, g, config.overlap)]
    views = [View("full", (0.0, 0.0, float(width), float(height)), image)]
    for grid, box in choose_tiles(detections, tiles, config.max_tile_views):
        views.append(View("tile", box, image.crop(tuple(int(v) for v in box)), grid=grid))
    for det, box in crop_boxes(detections, config.top_k_crops, config.crop_pad, width, height):
        views.append(View("crop", box, image.crop(tuple(int(v) for v in box)), label=det.label))
    return views


# ---------------------------------------------------------------------------------------------------
# The detector.


def _offline() -> bool:
    from ultralytics.utils import env_bool

    return env_bool("YOLO_OFFLINE")


def _weights_on_disk(model: str) -> bool:
    """Whether ultralytics finds ``model`` without downloading (``attempt_download_asset``'s lookup)."""
    from ultralytics.utils import SETTINGS, checks

    if model.lower().startswith(("http://", "https://", "ul://")):
        return False
    name = checks.check_yolov5u_filename(checks.check_model_file_from_stem(model))
    return Path(name).exists() or (Path(SETTINGS["weights_dir"]) / name).exists()


def load_detector(model: str):
    """An ultralytics ``YOLO`` for ``model``: a weights file (``.pt``, exported formats) or a model yaml.

    A yaml (``"yolov8n.yaml"``) builds a randomly initialised detector from ultralytics' bundled configs
    and needs no download. Named release weights such as ``"yolov8n.pt"`` are downloaded by
    ultralytics when online; offline (``YOLO_OFFLINE=1``) ultralytics still tries the network before
    failing, so we check the disk first and fail at once with what to pass instead.
    """
    from ultralytics import YOLO

    model = str(model)
    if Path(model).suffix.lower() in (".yaml", ".yml"):
        return YOLO(model)
    hint = (f"pass a local weights file (regions.model=/path/to/{Path(model).name}) or "
            "regions.model=yolov8n.yaml for a randomly initialised detector")
    if _offline() and not _weights_on_disk(model):
        raise FileNotFoundError(
            f"detector weights {model!r} are not on disk and YOLO_OFFLINE is set, so they cannot be "
            f"downloaded; {hint}"
        )
    try:
        detector = YOLO(model, task="detect")
        # ultralytics loads some formats only on the first predict: do it now, so a file that is no
        # detector fails here, before the run starts, not after its first stage.
        with preserved_torch_threads():
            detector.predict(Image.new("RGB", (32, 32)), imgsz=32, verbose=False)
        return detector
    except ConnectionError as e:  # ultralytics' download failed (no network)
        raise FileNotFoundError(f"detector weights {model!r} could not be downloaded ({e}); {hint}") from e
    except Exception as e:  # a file that is not a model ultralytics can run
        first = (str(e).splitlines() or [""])[0].split(". ")[0]
        raise ValueError(f"regions.model={model!r} is not a detector ultralytics can run "
                         f"({type(e).__name__}: {first}); {hint}") from None


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def detector_fingerprint(detector) -> str:
    """A content hash naming the detector's weights and labels, for cache keys.

    Weights loaded from a file hash the file. Otherwise (a yaml-built, random detector) the parameters
    are hashed, since the name "yolov8n.yaml" says nothing about the weights. The value is memoised
    per detector object: ultralytics fuses conv and batch-norm in place on the first ``predict``,
    which changes the parameters but not the function. Detectors are never trained here, so the memo
    cannot go stale.
    """
    if detector in _fingerprints:
        return _fingerprints[detector]
    h = hashlib.sha256()
    ckpt = getattr(detector, "ckpt_path", None)
    if ckpt and Path(ckpt).is_file():
        with open(ckpt, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        kind = "file"
    else:
        for name, tensor in sorted(detector.model.state_dict().items()):
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        kind = "weights"
    h.update(repr(sorted(dict(detector.names).items())).encode())
    _fingerprints[detector] = fingerprint = f"{kind}:{h.hexdigest()}"
    return fingerprint


def _predict(detector, images: list[Image.Image], config: RegionConfig) -> list:
    """One batched ultralytics ``predict`` over equal-size images."""
    kwargs: dict[str, Any] = {"imgsz": config.imgsz, "conf": config.conf, "verbose": False}
    if config.device is not None:
        kwargs["device"] = config.device
    return detector.predict(images, **kwargs)


def detect(image: Image.Image, detector, config: RegionConfig) -> list[Detection]:
    """Raw (unmerged) detections from the full image and every zoom level, in full-image coordinates.

    One ``predict`` call for the full image and one per zoom level: a level's tiles are all the same
    size (``tile_boxes``), so ultralytics batches them without padding; grouping by size below only
    matters if that ever changes. torch's thread count is restored afterwards.
    """
    from refine.infra.devices import preserved_torch_threads

    width, height = image.size
    levels = [(1, [(0.0, 0.0, float(width), float(height))])]
    levels += [(g, tile_boxes(width, height, g, config.overlap)) for g in config.grids]
    detections: list[Detection] = []
    with preserved_torch_threads():
        for grid, tiles in levels:
            by_size: dict[tuple[float, float], list[Box]] = {}
            for t in tiles:
                by_size.setdefault((t[2] - t[0], t[3] - t[1]), []).append(t)
            for group in by_size.values():
                crops = [image if grid == 1 else image.crop(tuple(int(v) for v in t)) for t in group]
                for view, result in zip(group, _predict(detector, crops, config), strict=True):
                    names, boxes = result.names, result.boxes
                    xyxys, scores, classes = boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist()
                    for xyxy, score, cls in zip(xyxys, scores, classes, strict=True):
                        box = to_full_image(xyxy, view)
                        detections.append(Detection(
                            label=str(names[int(cls)]), score=float(score), box=box, view=view, grid=grid,
                            cut=cut_sides(box, view, width, height),
                        ))
    return detections


def _regions_for(record: ImageRecord, detector, config: RegionConfig, cache: DiskCache | None,
                 fingerprint: str | None) -> Regions:
    image = record.image
    if not isinstance(image, Image.Image):
        raise TypeError(f"image {record.id!r}: expected a PIL image, got {type(image).__name__}")
    image.load()  # a truncated or corrupt file fails here, inside this image's own error handling
    if image.mode != "RGB":
        image = image.convert("RGB")

    def compute() -> list[dict[str, Any]]:
        return [d.to_json() for d in detect(image, detector, config)]

    if cache is not None and record.sha256 and fingerprint is not None:
        key = cache_key(CACHE_VERSION, record.sha256, fingerprint, config.detection_params())
        raw, _hit = cache.get_or_compute(key, compute)
    else:
        raw = compute()
    merged = merge([Detection.from_json(d) for d in raw], config.merge_iou)
    return Regions(
        image_id=record.id, width=image.width, height=image.height, detections=merged,
        objects=summarize(merged), views=select_views(image, merged, config), grids=config.grids,
    )


def find(records: Sequence[ImageRecord], detector, config: RegionConfig,
         cache: DiskCache | None = None) -> list[Regions]:
    """Regions for each record, in order. A bad image yields ``Regions(error=...)``; it never raises.

    Detections are cached per (image sha256, detector weights, detection parameters); merging and
    views are recomputed from the image on a hit, so ``merge_iou`` and the view settings can change
    without re-running the detector.
    """
    from ultralytics import __version__ as ultralytics_version

    fingerprint = None
    if cache is not None:
        fingerprint = f"{detector_fingerprint(detector)}|ultralytics={ultralytics_version}"
    out = []
    for record in records:
        try:
            out.append(_regions_for(record, detector, config, cache, fingerprint))
        except Exception as e:  # one bad image must not kill the batch; the error is recorded instead
            size = getattr(record.image, "size", (0, 0)) if record.image is not None else (0, 0)
            out.append(Regions(image_id=record.id, width=size[0], height=size[1], grids=config.grids,
                               error=f"{type(e).__name__}: {e}"))
    return out


def regions_stage(records: Sequence[ImageRecord], detector, config: RegionConfig, cache: DiskCache | None = None,
                  done: Sequence[RegionRow] = (), sink=lambda rows: None, chunk: int = 16) -> list[RegionRow]:
    """The regions stage: :func:`find` over the images ``chunk`` at a time, each chunk's rows to ``sink``."""
    have = {r.image_id: r for r in done}
    todo = [r for r in records if r.id not in have]
    for i in range(0, len(todo), chunk):
        rows = [regions.row() for regions in find(todo[i : i + chunk], detector, config, cache)]
        sink(rows)
        have.update((row.image_id, row) for row in rows)
    return [have[r.id] for r in records]
