"""Image sets: ``load_images(spec)`` resolves what ``--images`` names into an :class:`ImageSet`.

An image set knows what it is: its records, notes about files it skipped, whether a detector can help
with it (not for the synthetic shapes world), and the object vocabulary that the critic, the rewrite
and CHAIR all read captions with (:func:`object_vocabulary`).
"""

from __future__ import annotations

import glob
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from refine.images.files import _records_from_paths, load_manifest
from refine.images.records import IMAGE_SUFFIXES, ImageRecord

__all__ = ["ImageRecord", "ImageSet", "load_images", "object_vocabulary", "round_images", "world_of"]


@dataclass
class ImageSet:
    spec: str
    records: list[ImageRecord]
    notes: list[str] = field(default_factory=list)  # skipped files, byte-identical duplicates

    @property
    def world(self) -> str | None:
        return world_of(self.spec)

    @property
    def detectable(self) -> bool:
        """Whether the regions stage can help: a detector exists for photos, not for the shapes world."""
        return self.world is None

    def pixels(self) -> PixelMap:
        """``{id: image}`` that decodes on lookup (through the bounded pixel cache), for the update."""
        return PixelMap({r.id: r for r in self.records})

    def labels(self) -> set[str]:
        return {label for r in self.records for label in (r.objects or {})}

    def vocabulary(self):
        return object_vocabulary(self.world, self.labels())

    def held_out_note(self, held_out: ImageSet) -> str | None:
        """What to say when ``held_out`` (``--loop.eval_images``) shares images with this training set: the
        same bytes, under any name or path. None when it shares none."""
        trained = {r.sha256 for r in self.records}
        shared = sum(r.sha256 in trained for r in held_out.records)
        if shared == len(held_out.records):
            return f"--loop.eval_images is the training set ({self.spec}): its metrics are not held-out ones"
        if shared:
            return (f"--loop.eval_images: {shared} of its {len(held_out.records)} images are training images too (the "
                    "same bytes), and its metrics count them; leave them out of it")
        return None


class PixelMap(Mapping):
    """A read-only ``{image id: PIL image}`` whose values are decoded when looked up."""

    def __init__(self, records: Mapping[str, ImageRecord]):
        self._records = records

    def __getitem__(self, key: str):
        return self._records[key].image

    def __iter__(self):
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


def world_of(spec: str) -> str | None:
    """"shapes" for the synthetic world's specs, None for photos."""
    return "shapes" if spec.split(":")[0] in ("shapes", "shapes-train", "shapes-val", "shapes-heldout") else None


def object_vocabulary(world: str | None, labels: Iterable[str] = ()):
    """The one object vocabulary of a set: the whole label space of its world. For the shapes world that
    is its twelve labels; for photos, COCO's 80 categories with CHAIR's synonyms plus the set's own labels.
    A hallucination is an object absent from the image, so the vocabulary must name more than the truth."""
    if world == "shapes":
        from refine.images import shapes

        return shapes.vocabulary()
    from refine.objects import coco_vocabulary

    return coco_vocabulary().extended(sorted(set(labels)))


def load_images(spec: str, coco_root: str | None = None, flag: str = "--images", columns=None) -> ImageSet:
    """Resolve an image-set spec: a named set (``coco_val10``, ``shapes[:N]``, ``shapes-heldout[:N]``), a
    folder (with its subfolders), a glob, a ``.jsonl`` manifest, or a Hugging Face dataset
    (``hf:NAME_OR_PATH[:split]``, its columns named by ``columns``: :class:`refine.images.hf.Columns`).
    Records hold no pixels (they are decoded when a stage asks). Bad files are skipped with a note; a
    spec that names nothing usable, or no image at all, is a ``ValueError`` naming ``flag`` (the setting
    it came from)."""
    images = _load(spec, coco_root, flag, columns)
    if not images.records:
        raise ValueError(f"{flag} {spec}: the image set is empty; name at least one image")
    images.notes = folded(images.notes)
    return images


def folded(notes: list[str], keep: int = 3) -> list[str]:
    """The notes on images skipped, one each up to ``keep`` of them, else one note with their count and
    the first ``keep`` (a set of a million files must not print a line per bad one, at every start)."""
    skipped = [n.removeprefix("skipped ") for n in notes if n.startswith("skipped ")]
    if len(skipped) <= keep:
        return notes
    return [f"skipped {len(skipped):,} images that could not be read, the first {keep}: " + "; ".join(skipped[:keep]),
            *(n for n in notes if not n.startswith("skipped "))]


def _load(spec: str, coco_root: str | None, flag: str, columns) -> ImageSet:
    if spec.startswith("hf:"):
        from refine.images.hf import Columns, load_dataset_records

        return ImageSet(spec, *load_dataset_records(spec, columns or Columns(), flag))
    if spec == "coco_val10":
        from refine.images.coco import load_coco_val10

        return ImageSet(spec, load_coco_val10(coco_root=coco_root))
    if world_of(spec) == "shapes":
        from refine.images import shapes

        split, n, seed = shapes.parse_spec(spec)
        return ImageSet(spec, shapes.lazy_records(n, split=split, seed=seed))
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        return ImageSet(spec, *load_manifest(path, flag))
    if path.is_dir():  # with its subfolders
        files = [p for p in path.rglob("*")  # a broken link is kept: it is skipped with a note, not unsaid
                 if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink() and not p.exists())]
        return ImageSet(spec, *_records_from_paths(files, spec, flag))
    matches = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    if matches:
        return ImageSet(spec, *_records_from_paths(matches, spec, flag))
    raise ValueError(
        f"{flag} {spec!r}: not a named set (coco_val10, shapes, shapes:N, shapes-val:N, shapes-heldout:N), an existing "
        "folder, a .jsonl manifest, a glob that matches files, or hf:DATASET[:split]"
    )


def round_images(records: list, per_round: int, seed: int, k: int) -> list:
    """The images of round ``k``: all of them, or with ``per_round`` > 0 the ``k``-th slice of that size of
    one fixed shuffle of the set (by ``seed``), wrapping around, so consecutive rounds see fresh images
    until the set is used up."""
    if per_round <= 0 or per_round >= len(records):
        return list(records)
    order = list(range(len(records)))
    random.Random(f"rounds/{seed}").shuffle(order)
    start = (k * per_round) % len(records)
    picked = [order[(start + i) % len(records)] for i in range(per_round)]
    return [records[i] for i in sorted(picked)]
