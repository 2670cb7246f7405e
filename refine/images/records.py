"""The image record (the leaf type every stage passes around) and decoding.

An id is unique within its set: two different pictures must never share one, or one picture's
captions would be critiqued against the other's pixels (``refine.images.files`` makes file ids).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


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
        why = "not a format PIL can read" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{name}: not a readable image ({why}); remove it or fix the file") from e


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


