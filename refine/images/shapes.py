"""The ``shapes`` image world: deterministic synthetic scenes with exact annotations and captions.

A scene is a 72×72 white image cut into a 3×3 grid of 24-px cells. Each object is one shape
(circle, square, triangle) in one colour (red, green, blue, yellow), drawn inside its own cell with
jittered size and position, so objects never overlap and each lies wholly inside one cell. The cell
size is what lets a ViT with ``patch_size == CELL`` give each encoder token exactly one cell (see
``refine.demo.toy_student``).

Every scene carries its annotations (``"<colour> <shape>"`` label -> count; ``LABELS`` is the whole
vocabulary a grounded critic matches against) and a reference caption in a fixed grammar::

    "two red circles and a blue square"
    "a green triangle, three yellow squares and a red circle"

Number words ("a", "two" ... "nine"), plural nouns, items joined by ", " with " and " before the
last. Canonical item order: by the first grid cell (row-major, 0 = top left) in which each label
occurs, which is the reading order of the image.

Splits. Scene ``i`` of a split is drawn from its own RNG, seeded by the string
``"shapes/<split>/<seed>/<i>/<attempt>"``, so splits and seeds never share a random stream. On top of
that, each image belongs to exactly one split by the parity of the sha256 of its pixels; a draw whose
image belongs to the other split is redrawn (next ``attempt``). A held-out image can therefore never
equal a training image, for any seeds or sizes.

Object counts: ``P(k) ∝ COUNT_DECAY ** (k - lo)`` over ``objects=(lo, hi)``, so sparse scenes
dominate: over 1..6, 70% of scenes have 1-3 objects.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from refine.images.records import ImageRecord, record_from_image

GENERATOR_VERSION = 1  # bump whenever drawing or sampling changes: cached toy students key on it
GRID = 3  # cells per side
CELL = 24  # px per cell side
IMAGE_SIZE = GRID * CELL  # 72
MIN_SIZE, MAX_SIZE = 12, 20  # object side in px (size jitter); cells keep >= 2 px of margin
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
LABELS: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
SPLITS = ("train", "heldout")
COUNT_DECAY = 0.75  # P(k objects) ∝ 0.75 ** (k - lo): sparse scenes dominate
NUMBER_WORDS = ("a", "two", "three", "four", "five", "six", "seven", "eight", "nine")

Item = tuple[str, str, int]  # (colour, shape, cell); cell = row * GRID + col


@dataclass
class Scene:
    """One generated scene. ``objects`` and ``items`` are in canonical (caption) order."""

    id: str
    image: Image.Image
    objects: dict[str, int]  # "<colour> <shape>" -> count
    items: list[Item]  # one per drawn object, sorted by cell
    caption: str  # describe(objects)


def vocabulary():
    """The grounded critic's and CHAIR's vocabulary for this world: all of ``LABELS``.

    Always the whole world, never the labels of the scenes at hand: a vocabulary built from a scene's
    truth cannot see an object that is absent from it, which is exactly what a hallucination is.
    """
    from refine.objects import vocabulary_for

    return vocabulary_for(LABELS)


# -- grammar -----------------------------------------------------------------------------------------
def plural(label: str) -> str:
    """``"red circle"`` -> ``"red circles"``."""
    from refine.objects import pluralize_phrase

    return pluralize_phrase(label)


def phrase(label: str, count: int) -> str:
    """``("red circle", 2)`` -> ``"two red circles"``; ``("red circle", 1)`` -> ``"a red circle"``: the
    object matcher's noun-phrase grammar (``refine.objects.noun_phrase``), for this world's labels and
    counts only."""
    from refine.objects import noun_phrase

    if label not in LABELS:
        raise ValueError(f"unknown shapes label {label!r}; expected one of {LABELS}")
    if not isinstance(count, int) or not 1 <= count <= len(NUMBER_WORDS):
        raise ValueError(f"count for {label!r} must be an int in 1..{len(NUMBER_WORDS)}, got {count!r}")
    return noun_phrase(label, count)


def describe(objects: Mapping[str, int] | Iterable[tuple[str, int]]) -> str:
    """The caption for labelled counts, in the order given (use a scene's ``objects`` for canonical order).

    ``{"red circle": 2, "blue square": 1}`` -> ``"two red circles and a blue square"``.
    """
    pairs = list(objects.items() if isinstance(objects, Mapping) else objects)
    if not pairs:
        raise ValueError("describe() needs at least one (label, count); a shapes scene is never empty")
    labels = [label for label, _ in pairs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"describe(): each label may appear once, got {labels}")
    from refine.objects import join_list

    return join_list([phrase(label, count) for label, count in pairs])


def canonical_objects(items: Sequence[Item]) -> dict[str, int]:
    """Label -> count, ordered by the first cell (row-major) holding each label."""
    objects: dict[str, int] = {}
    for colour, shape, _ in sorted(items, key=lambda item: item[2]):
        label = f"{colour} {shape}"
        objects[label] = objects.get(label, 0) + 1
    return objects


# -- drawing -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Placed:
    colour: str
    shape: str
    cell: int
    size: int
    x0: int  # top-left corner of the object's size×size box, in image px
    y0: int


def cell_box(cell: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a cell in image px, right/bottom exclusive."""
    row, col = divmod(cell, GRID)
    return col * CELL, row * CELL, (col + 1) * CELL, (row + 1) * CELL


def _draw(placed: Sequence[_Placed]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for p in placed:
        fill = COLOURS[p.colour]
        x1, y1 = p.x0 + p.size - 1, p.y0 + p.size - 1  # PIL boxes are inclusive
        if p.shape == "circle":
            draw.ellipse((p.x0, p.y0, x1, y1), fill=fill)
        elif p.shape == "square":
            draw.rectangle((p.x0, p.y0, x1, y1), fill=fill)
        else:  # upright isosceles triangle
            draw.polygon([((p.x0 + x1) / 2, p.y0), (p.x0, y1), (x1, y1)], fill=fill)
    return image


def _count_weights(lo: int, hi: int) -> list[float]:
    return [COUNT_DECAY ** (k - lo) for k in range(lo, hi + 1)]


def _sample(rng: random.Random, lo: int, hi: int) -> list[_Placed]:
    k = rng.choices(range(lo, hi + 1), weights=_count_weights(lo, hi))[0]
    placed = []
    for cell in sorted(rng.sample(range(GRID * GRID), k)):
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        left, top, _, _ = cell_box(cell)
        # At least 2 px from the cell border, so neighbouring objects never touch.
        x0 = left + rng.randint(2, CELL - 2 - size)
        y0 = top + rng.randint(2, CELL - 2 - size)
        placed.append(_Placed(rng.choice(list(COLOURS)), rng.choice(SHAPES), cell, size, x0, y0))
    return placed


def split_of(image: Image.Image) -> str:
    """The split an image belongs to: parity of the sha256 of its RGB pixels (makes splits disjoint)."""
    return SPLITS[hashlib.sha256(image.convert("RGB").tobytes()).digest()[0] & 1]


def _validate(n: int, split: str, objects: tuple[int, int]) -> tuple[int, int]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}: the number of scenes must be an int >= 0")
    try:
        lo, hi = (int(v) for v in objects)
    except (TypeError, ValueError) as e:
        raise ValueError(f"objects={objects!r} must be a (min, max) pair of ints") from e
    if not 1 <= lo <= hi <= GRID * GRID:
        raise ValueError(f"objects={objects!r} must satisfy 1 <= min <= max <= {GRID * GRID} (one object per cell)")
    return lo, hi


def make_scene(index: int, split: str = "train", seed: int = 0, objects: tuple[int, int] = (1, 6)) -> Scene:
    """Scene ``index`` of a split: a pure function of its arguments."""
    lo, hi = _validate(index, split, objects)
    attempt = 0
    while True:
        rng = random.Random(f"shapes/{split}/{seed}/{index}/{attempt}")
        placed = _sample(rng, lo, hi)
        image = _draw(placed)
        if split_of(image) == split:
            break
        attempt += 1
    items = [(p.colour, p.shape, p.cell) for p in placed]
    counts = canonical_objects(items)
    scene_id = f"shapes-{split}-s{seed}-{index:05d}" + ("" if (lo, hi) == (1, 6) else f"-o{lo}{hi}")
    return Scene(scene_id, image, counts, items, describe(counts))


def make_scenes(n: int, split: str = "train", seed: int = 0, objects: tuple[int, int] = (1, 6)) -> list[Scene]:
    """The first ``n`` scenes of ``split``; ``make_scenes(m)[:n] == make_scenes(n)`` for ``m >= n``."""
    _validate(n, split, objects)
    return [make_scene(i, split, seed, objects) for i in range(n)]


def records(scenes: Iterable[Scene]) -> list[ImageRecord]:
    """Scenes as image records with their annotations and reference caption (pixels kept in memory)."""
    return [
        record_from_image(s.id, s.image, objects=dict(s.objects), references=[s.caption]) for s in scenes
    ]


def lazy_records(n: int, split: str = "train", seed: int = 0, objects: tuple[int, int] = (1, 6)) -> list[ImageRecord]:
    """The first ``n`` scenes of ``split`` as records that draw their pixels again when asked (a scene is
    a pure function of its index), so a large set keeps only ids, hashes and annotations in memory."""
    from functools import partial

    _validate(n, split, objects)
    out = []
    for i in range(n):
        scene = make_scene(i, split, seed, objects)
        record = record_from_image(scene.id, scene.image, objects=dict(scene.objects), references=[scene.caption])
        record.source = partial(_scene_image, i, split, seed, objects)
        out.append(record)
    return out


def _scene_image(index: int, split: str, seed: int, objects: tuple[int, int]) -> Image.Image:
    return make_scene(index, split, seed, objects).image.convert("RGB")


# What a bare "shapes" / "shapes-val" / "shapes-heldout" means: the loop's 300 training scenes (the
# DPO rounds' prompt set), a validation set for choosing settings, and a held-out set large enough
# (>= 400) to measure CHAIR_s to about ±2 points.
DEFAULT_SCENES = {"train": 300, "val": 480, "heldout": 400}
# The validation set is drawn from the training split (its image hashes), with a generator seed that
# no toy student pretrains on (they use seeds 0, 1, ...) and the loop does not train on (seed 0): its
# scenes are new to the student but for the simplest, which recur (4 of the first 480 are among the loop's
# 300 training scenes, byte for byte; a run says so), and settings can be chosen on them.
VALIDATION_SEED = 1000
_SPEC = re.compile(r"^shapes(?:-(train|val|heldout))?(?::(\d+))?$")


def parse_spec(spec: str) -> tuple[str, int, int]:
    """``"shapes:N"`` -> ``("train", N, 0)``, the first N training scenes; ``"shapes-val:N"`` ->
    ``("train", N, VALIDATION_SEED)``; ``"shapes-heldout:N"`` -> ``("heldout", N, 0)``.

    Without ``:N`` the size is ``DEFAULT_SCENES``'s. ``"shapes-train:N"`` is accepted too.
    """
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ValueError(
            f"image set {spec!r} is not a shapes spec; write shapes, shapes:N, shapes-train:N, shapes-val:N, "
            "shapes-heldout or shapes-heldout:N (N = number of scenes)"
        )
    kind = m.group(1) or "train"
    n = int(m.group(2)) if m.group(2) is not None else DEFAULT_SCENES[kind]
    return ("train", n, VALIDATION_SEED) if kind == "val" else (kind, n, 0)
