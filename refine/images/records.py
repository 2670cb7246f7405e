"""The image record (the leaf type every stage passes around), decoding, and the bounded pixel cache.

An id is unique within its set: two different pictures must never share one, or one picture's
captions would be critiqued against the other's pixels (``refine.images.files`` makes file ids).

A record holds its pixels lazily: its ``source`` is a decoded image (small generated ones, tests) or a
loader that decodes them when a stage asks for ``record.image``. Decoded images live in one
process-wide LRU cache bounded in bytes (:data:`PIXELS`), so a set of a million files costs its ids,
hashes and annotations in memory, and at most the cache's worth of pixels.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class PixelCache:
    """Decoded images by key, least recently used first out once they hold more than ``max_bytes``
    (width × height × 3 each). Thread-safe: critique threads and the main thread share it. Two threads
    asking for the same missing image may both decode it; the second result replaces the first."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._lock = threading.Lock()
        self.decodes = 0  # how many times a loader ran (the benchmark and tests read it)

    def get(self, key: tuple, load: Callable[[], Image.Image]) -> Image.Image:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        image = load()
        size = image.width * image.height * 3
        with self._lock:
            self.decodes += 1
            if key in self._items:
                self.bytes -= _size(self._items.pop(key))
            self._items[key] = image
            self.bytes += size
            while self.bytes > self.max_bytes and len(self._items) > 1:
                self.bytes -= _size(self._items.popitem(last=False)[1])
        return image

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


def _size(image: Image.Image) -> int:
    return image.width * image.height * 3


# 256 MiB: a few hundred camera photos, far more than a stage holds at once (one batch of the student,
# or the critic's requests in flight). REFINE_PIXEL_CACHE_MB changes it.
PIXELS = PixelCache(int(float(os.environ.get("REFINE_PIXEL_CACHE_MB", "256")) * 2**20))


@dataclass(eq=False)
class ImageRecord:
    """One image of a set. ``source`` is the decoded image, a zero-argument loader that decodes it
    (kept in :data:`PIXELS` while it is in use), or None (a record whose pixels are gone)."""

    id: str
    path: Path | None
    sha256: str  # of the encoded file bytes (or of the PNG encoding for generated images)
    source: Image.Image | Callable[[], Image.Image] | None
    objects: dict[str, int] | None = None  # annotated label -> count, when known
    references: list[str] = field(default_factory=list)  # reference captions, when known

    @property
    def image(self) -> Image.Image | None:
        """The pixels: decoded, EXIF-transposed, 8-bit RGB."""
        source = self.source
        if source is None or isinstance(source, Image.Image):
            return source
        return PIXELS.get((self.id, self.sha256), source)


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


_INDEX: dict[Path, object] = {}
INDEX_VERSION = 1  # bump when what ``decode`` accepts changes


def image_index():
    """The image index: what is known about an image source (its sha256, or why it does not decode),
    in the cache directory's ``image-index`` store."""
    from refine.infra.cache import DiskCache, default_cache_dir

    directory = default_cache_dir()
    if directory not in _INDEX:
        _INDEX[directory] = DiskCache(namespace="image-index")
    return _INDEX[directory].store


def checked(path: Path, stat: os.stat_result | None = None) -> str:
    """The sha256 of an image file that decodes, else ``ValueError`` naming it. Each file is read and
    decoded once per (path, size, mtime; ``stat`` if the caller has it): the answer is kept in the
    :func:`image_index`, so a set of a million files is loaded again (a resume, a score) without reading
    them (:func:`refine.images.files.index_files` asks it of many files at once)."""
    path = Path(path)
    stat = stat or path.stat()
    key = index_key(path, stat)
    return sha256_of(image_index().get(key) or read_into_index(path, key))


def index_key(path: Path, stat: os.stat_result) -> str:
    """A file's key in the image index: its path, size and mtime."""
    from refine.infra.cache import cache_key

    return cache_key("image-index", INDEX_VERSION, os.fsencode(path.resolve()).hex(), stat.st_size, stat.st_mtime_ns)


def read_into_index(path: Path, key: str) -> dict[str, str]:
    """Read, decode and hash a file, and keep the answer under ``key``: ``{"sha256"}`` or ``{"error"}``."""
    data = path.read_bytes()
    try:
        decode(data, printable(str(path)))
        known = {"sha256": sha256_bytes(data)}
    except ValueError as e:
        known = {"error": str(e)}
    image_index().set(key, known)
    return known


def sha256_of(known: dict[str, str]) -> str:
    """An image index entry's sha256, or ``ValueError`` saying why the file does not decode."""
    if "error" in known:
        raise ValueError(known["error"])
    return known["sha256"]


class ImageLost(ValueError):
    """An image that could be read when its set was loaded and cannot be now: its file is gone, no longer
    decodes, or holds other bytes (its captions and critiques so far were of the old picture). The stages
    leave such an image out of what remains of the round (:func:`readable`), never the whole run."""


def load_path(path: Path, sha256: str | None = None) -> Image.Image:
    """Decode one image file. With ``sha256`` (the record's), a file whose bytes changed since is
    :class:`ImageLost` too, as is one that is gone or no longer decodes."""
    name = printable(str(path))
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageLost(f"{name}: can no longer be read ({e.strerror or type(e).__name__}); it was read when the "
                        "run loaded its images") from e
    try:
        image = decode(data, name)
    except ValueError as e:
        raise ImageLost(str(e)) from e
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise ImageLost(f"{name}: its bytes changed after the run loaded it (another picture under the same "
                        "name); the run leaves it out rather than judge new pixels against old captions")
    return image


@dataclass(frozen=True)
class FileSource:
    """The loader of a file's record: :func:`load_path` with the sha256 the file had when the set was
    loaded, and its size and mtime then, which tell at the cost of one ``stat`` that it is unchanged."""

    path: Path
    sha256: str
    stamp: tuple[int, int]  # (st_size, st_mtime_ns) when loaded

    @classmethod
    def of(cls, path: Path, sha256: str, stat: os.stat_result | None = None) -> FileSource:
        stat = stat or path.stat()
        return cls(path, sha256, (stat.st_size, stat.st_mtime_ns))

    def __call__(self) -> Image.Image:
        return load_path(self.path, self.sha256)

    def unchanged(self) -> bool:
        try:
            stat = self.path.stat()
        except OSError:
            return False
        return (stat.st_size, stat.st_mtime_ns) == self.stamp


def present(record: ImageRecord, lost: dict[str, str] | None = None) -> bool:
    """Whether ``record``'s pixels can still be read, as cheaply as that can be told: a file whose size and
    mtime are as loaded is taken as present (one ``stat``, no read); any other is read in full
    (:func:`readable`, the reason going into ``lost``)."""
    source = record.source
    if not isinstance(source, FileSource) or source.unchanged():
        return True
    return readable(record, lost) is not None


def readable(record: ImageRecord, lost: dict[str, str] | None = None) -> Image.Image | None:
    """``record.image``, or None when it is :class:`ImageLost`: the reason then goes into ``lost`` (by id,
    the first reason kept)."""
    try:
        return record.image
    except ImageLost as e:
        if lost is not None:
            lost.setdefault(record.id, str(e))
        return None


def record_from_path(path: str | Path, id: str | None = None,
                     indexed: tuple[os.stat_result, dict[str, str]] | None = None, **extra) -> ImageRecord:
    """A lazy record of an image file. The file is read and decoded once here, to hash it and to find a
    broken file before the run starts, then its pixels are dropped; :func:`checked`
    remembers both results for files it has seen, so loading a large set again reads nothing.
    ``indexed``: the file's stat and image index entry, when the caller has them."""
    path = Path(path)
    if indexed:
        stat, sha256 = indexed[0], sha256_of(indexed[1])
    else:
        stat = path.stat()
        sha256 = checked(path, stat)
    return ImageRecord(id or printable(path.stem), path, sha256, FileSource.of(path, sha256, stat), **extra)


def record_from_image(id: str, image: Image.Image, **extra) -> ImageRecord:
    """For generated images: the hash is over the PNG encoding of the RGB pixels."""
    import io

    image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ImageRecord(id, None, sha256_bytes(buf.getvalue()), image, **extra)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


