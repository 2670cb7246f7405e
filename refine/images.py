"""Image sets and image records: the record type, decoding, and the specs ``--images`` accepts.

Every image in a set gets an id that is unique within the set: two different pictures must never share
one, or one picture's captions would be critiqued against the other's pixels. File ids are the file
name without its extension ("bus" for ``bus.jpg``); where two files would get the same id (``a.jpg``
and ``a.png``) both keep their extension. Names that are not valid UTF-8 keep their undecodable bytes
as ``\\xNN`` escapes, so every id can be written to the run directory and read back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps


@dataclass
class ImageRecord:
    id: str
    path: Path | None
    sha256: str  # of the encoded file bytes (or of the PNG encoding for generated images)
    image: Image.Image  # decoded, EXIF-transposed, RGB
    objects: dict[str, int] | None = None  # annotated label -> count, when known
    references: list[str] = field(default_factory=list)  # reference captions, when known


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. PIL's own ``convert("RGB")`` clips high-depth greyscale (16-bit
    "I;16", 32-bit "I", float "F") at 255, so a 16-bit image of any grey turns solid white; those are
    scaled to 8 bits first (16-bit: /257; "I" is read as 16-bit when any value exceeds 255; "F" as
    0..1 when no value exceeds 1, else 0..255)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 1 / 257 if mode.startswith("I;16") or top > 255 else 1.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def decode(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes: EXIF orientation applied, 8-bit RGB (:func:`to_rgb`). Errors name the input."""
    import io

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except Exception as e:  # PIL raises several types for bad files
        raise ValueError(f"{name}: not a readable image ({e}); remove it or fix the file") from e


def printable(name: str) -> str:
    """A file name as text that can be written anywhere: bytes that were not UTF-8 (which Python keeps as
    lone surrogates) become ``\\xNN``; valid names pass through unchanged."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def record_from_path(path: str | Path, id: str | None = None, **extra) -> ImageRecord:
    path = Path(path)
    data = path.read_bytes()
    return ImageRecord(id or printable(path.stem), path, sha256_bytes(data), decode(data, printable(str(path))),
                       **extra)


def record_from_image(id: str, image: Image.Image, **extra) -> ImageRecord:
    """For generated images: the hash is over the PNG encoding of the RGB pixels."""
    import io

    image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ImageRecord(id, None, sha256_bytes(buf.getvalue()), image, **extra)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def file_ids(paths: Sequence[Path]) -> list[str]:
    """One unique id per path: the file name without its extension, or, where two paths would share
    that, the name with its extension; where even that is shared (one name in two folders), the path
    relative to the folder the paths have in common. Undecodable bytes are escaped (:func:`printable`)."""
    paths = [Path(p) for p in paths]
    ids = [printable(p.stem) for p in paths]
    for attempt in (lambda p: printable(p.name), _relative_to_common(paths)):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, id_ in enumerate(ids):
            groups[id_].append(i)
        for members in groups.values():
            if len(members) > 1:
                for i in members:
                    ids[i] = attempt(paths[i])
    return ids


def _relative_to_common(paths: Sequence[Path]):
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath(resolved)) if resolved else Path(".")
    by_path = dict(zip(paths, resolved))
    return lambda p: printable(by_path[p].relative_to(root).as_posix()) if by_path[p] != root else printable(p.name)


def duplicate_notes(records: Sequence[ImageRecord]) -> list[str]:
    """One note per group of records whose files are byte-identical (kept, but worth knowing)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for r in records:
        groups[r.sha256].append(r.id)
    return [f"identical images: {', '.join(ids)} have the same bytes (all kept)" for ids in groups.values()
            if len(ids) > 1]


def _records_from_paths(paths: list[Path], source: str) -> tuple[list[ImageRecord], list[str]]:
    """Decode each path; a bad file is skipped with a note, never fatal for the set."""
    paths = sorted(paths)
    records, notes = [], []
    for path, id_ in zip(paths, file_ids(paths)):
        try:
            records.append(record_from_path(path, id=id_))
        except (OSError, ValueError) as e:
            notes.append(f"skipped {printable(str(path))}: {e}")
    if not paths:
        raise ValueError(f"--images {source}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) there; "
                         "point --images at a folder of images, a glob or a .jsonl manifest")
    if not records:
        raise ValueError(f"--images {source}: no readable images ({len(notes)} skipped); " + "; ".join(notes[:3]))
    return records, notes + duplicate_notes(records)


def _manifest_row(line: str, where: str) -> dict[str, Any]:
    """One manifest line, checked: ``{"path": str, "id"?: str, "objects"?: {label: int >= 0},
    "references"?: [str, ...]}``. Raises ``ValueError`` naming the line and what to write instead."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    example = '{"path": "img.jpg", "objects": {"dog": 1}, "references": ["a dog"]}'
    if not isinstance(row, dict):
        got = {list: "an array", type(None): "null", str: "a string", int: "a number", float: "a number",
               bool: "a boolean"}[type(row)]
        raise ValueError(f"{where}: each line must be a JSON object like {example}, got {got}")
    unknown = sorted(set(row) - {"path", "id", "objects", "references"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a line may have path, id, "
                         "objects and references")
    if not isinstance(row.get("path"), str) or not row["path"].strip():
        raise ValueError(f"{where}: 'path' must be a non-empty string (the image file), got {row.get('path')!r}")
    if "id" in row and (not isinstance(row["id"], str) or not row["id"].strip()):
        raise ValueError(f"{where}: 'id' must be a non-empty string, got {row['id']!r}")
    objects = row.get("objects")
    if objects is not None and not (
        isinstance(objects, dict) and all(isinstance(k, str) and k.strip() for k in objects)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in objects.values())
    ):
        raise ValueError(f"{where}: 'objects' must map object labels to counts, e.g. {{\"dog\": 2}}, got {objects!r}")
    references = row.get("references", [])
    if not (isinstance(references, list) and all(isinstance(r, str) for r in references)):
        raise ValueError(f"{where}: 'references' must be a list of caption strings, e.g. [\"a dog on grass\"], "
                         f"got {references!r}")
    return row


def load_manifest(path: Path) -> tuple[list[ImageRecord], list[str]]:
    """A JSONL manifest: one ``{"path": ..., "id"?: ..., "objects"?: {label: count}, "references"?: [...]}`` a line.

    Relative paths are resolved against the manifest's folder. A malformed line or a repeated id is an
    error naming the line; an image that cannot be read is skipped with a note. Lines without an id get
    one from their file name (:func:`file_ids`, unique among those lines and distinct from given ids).
    """
    rows: list[tuple[str, dict[str, Any]]] = []
    for n, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if line.strip():
            rows.append((f"{path}:{n}", _manifest_row(line, f"{path}:{n}")))
    if not rows:
        raise ValueError(f"--images {path}: the manifest has no lines; write one JSON object per image")
    given: dict[str, str] = {}
    for where, row in rows:
        if "id" in row:
            if row["id"] in given:
                raise ValueError(f"{where}: id {row['id']!r} is already used at {given[row['id']]}; ids must be "
                                 "unique, or two pictures would share captions and critiques")
            given[row["id"]] = where
    unnamed = [(where, row) for where, row in rows if "id" not in row]
    derived = dict(zip((where for where, _ in unnamed),
                       file_ids([(path.parent / row["path"]) for _, row in unnamed])))
    for where, id_ in derived.items():
        if id_ in given:
            raise ValueError(f"{where}: the id {id_!r} taken from the file name is already given at {given[id_]}; "
                             "add an explicit unique 'id' to this line")
    records, notes = [], []
    for where, row in rows:
        try:
            records.append(record_from_path((path.parent / row["path"]).resolve(), id=row.get("id") or derived[where],
                                            objects=row.get("objects"), references=list(row.get("references", []))))
        except (OSError, ValueError) as e:
            notes.append(f"skipped {where}: {e}")
    if not records:
        raise ValueError(f"--images {path}: no readable images in the manifest; " + "; ".join(notes[:3]))
    return records, notes + duplicate_notes(records)


def load_images(spec: str, coco_root: str | None = None) -> tuple[list[ImageRecord], list[str]]:
    """Resolve an image-set spec into records. Returns ``(records, notes)``: notes name skipped files and
    byte-identical duplicates, one line each.

    ``spec`` is a named set (``coco_val10``, ``shapes[:N]``, ``shapes-heldout[:N]``), a folder, a glob,
    or a ``.jsonl`` manifest.
    """
    import glob

    if spec == "coco_val10":
        from refine.coco import load_coco_val10

        return load_coco_val10(coco_root=coco_root), []
    if spec.split(":")[0] in ("shapes", "shapes-heldout"):
        from refine import shapes

        split, n = shapes.parse_spec(spec)
        return shapes.records(shapes.make_scenes(n, split=split)), []
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        return load_manifest(path)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        return _records_from_paths(files, spec)
    matches = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    if matches:
        return _records_from_paths(matches, spec)
    raise ValueError(
        f"--images {spec!r}: not a named set (coco_val10, shapes, shapes:N, shapes-heldout:N), an existing "
        "folder, a .jsonl manifest, or a glob that matches files"
    )
