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
