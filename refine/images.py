"""Image sets and image records. (Loaders are being built — see issue 4; the record type is fixed.)"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

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


def decode(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes: EXIF orientation applied, mode converted to RGB. Errors name the input."""
    import io

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises several types for bad files
        raise ValueError(f"{name}: not a readable image ({e}); remove it or fix the file") from e
    return ImageOps.exif_transpose(image).convert("RGB")


def record_from_path(path: str | Path, id: str | None = None, **extra) -> ImageRecord:
    path = Path(path)
    data = path.read_bytes()
    return ImageRecord(id or path.stem, path, sha256_bytes(data), decode(data, str(path)), **extra)


def record_from_image(id: str, image: Image.Image, **extra) -> ImageRecord:
    """For generated images: the hash is over the PNG encoding of the RGB pixels."""
    import io

    image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ImageRecord(id, None, sha256_bytes(buf.getvalue()), image, **extra)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _records_from_paths(paths: list[Path], source: str) -> tuple[list[ImageRecord], list[str]]:
    """Decode each path; a bad file is skipped with a message, never fatal for the set."""
    records, skipped = [], []
    for path in sorted(paths):
        try:
            records.append(record_from_path(path))
        except (OSError, ValueError) as e:
            skipped.append(f"{path}: {e}")
    if not records:
        raise ValueError(f"--images {source}: no readable images ({len(skipped)} skipped); " + "; ".join(skipped[:3]))
    return records, skipped


def load_manifest(path: Path) -> tuple[list[ImageRecord], list[str]]:
    """A JSONL manifest: one ``{"path": ..., "id"?: ..., "objects"?: {label: count}, "references"?: [...]}`` a line.

    Relative paths are resolved against the manifest's folder.
    """
    import json

    records, skipped = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image_path = (path.parent / row["path"]).resolve()
            records.append(record_from_path(
                image_path, id=row.get("id"), objects=row.get("objects"), references=list(row.get("references", []))
            ))
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{n}: each line must be JSON with a 'path' key ({e})") from e
        except (OSError, ValueError) as e:
            skipped.append(f"{path}:{n}: {e}")
    if not records:
        raise ValueError(f"--images {path}: no readable images in the manifest; " + "; ".join(skipped[:3]))
    return records, skipped


def load_images(spec: str, coco_root: str | None = None) -> tuple[list[ImageRecord], list[str]]:
    """Resolve an image-set spec into records. Returns ``(records, skipped)``; skipped lists bad files.

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
