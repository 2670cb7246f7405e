"""The ``coco_val10`` image set: ten fixed COCO val2017 images with their captions and object counts.

The set is a manifest shipped in the package (``refine/data/coco_val10.json``: ids, URL templates and
optional pinned sha256s). On first use the ten images and those ids' annotations are fetched, from
``images.cocodataset.org`` or from a local COCO folder (``coco_root``), and cached under
``default_cache_dir() / "coco_val10"``::

    coco_val10/000000039769.jpg ...      the images, byte for byte as fetched
    coco_val10/annotations.json          per image: sha256, source, 5 captions, category name -> count

The ids were chosen without downloading anything, so checksums are trust-on-first-use: recorded when an
image is first fetched, then every later load (and every re-fetch of a deleted file) is verified against
them. A complete cache is read without touching the network or ``coco_root``.

Record ids are COCO's 12-digit file stems (``"000000039769"``), the same id a folder of val2017 files
gets from ``refine.images``; ``COCO_VAL10_IDS`` holds COCO's integer image ids.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from refine.images.records import FileSource, ImageRecord, sha256_bytes
from refine.infra.atomic import atomic_write_bytes
from refine.infra.cache import default_cache_dir

logger = logging.getLogger(__name__)

SET_NAME = "coco_val10"
COCO_BASE_URL = "http://images.cocodataset.org"
# 39769 (two cats, two remotes, a couch) and the first nine images of instances_val2017.json.
COCO_VAL10_IDS: tuple[int, ...] = (39769, 397133, 37777, 252219, 87038, 174482, 403385, 6818, 480985, 458054)
MANIFEST_PATH = Path(__file__).parent / "data" / "coco_val10.json"
STATE_FILE = "annotations.json"
STATE_FORMAT = 1
# Per socket operation (connect, each read), so a stalled server fails instead of hanging.
TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_USER_AGENT = "refine-coco-val10/1 (python-urllib)"


class CocoUnavailableError(RuntimeError):
    """coco_val10 is not (fully) cached and could not be fetched: offline, refused, HTTP error, truncated."""


class ChecksumError(ValueError):
    """An image's bytes differ from the sha256 recorded on first fetch or pinned in the manifest."""


# ---------------------------------------------------------------- manifest and annotations (pure)


def load_manifest(path: str | os.PathLike = MANIFEST_PATH) -> dict[str, Any]:
    """The coco_val10 manifest. Its ids must equal ``COCO_VAL10_IDS``: this catches editing only one."""
    manifest = json.loads(Path(path).read_text())
    ids = tuple(item["coco_id"] for item in manifest["images"])
    if ids != COCO_VAL10_IDS:
        raise ValueError(
            f"{path}: image ids {ids} differ from refine.images.coco.COCO_VAL10_IDS {COCO_VAL10_IDS}; "
            "edit both together"
        )
    return manifest


def record_id(coco_id: int) -> str:
    """COCO's file stem for an image id: 39769 -> "000000039769"."""
    return f"{coco_id:012d}"


def select_annotations(captions: dict, instances: dict, coco_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Keep only ``coco_ids``' captions and object counts from COCO's two annotation files.

    ``captions``: the captions_val2017.json dict (``images``; ``annotations`` with ``id``, ``image_id``,
    ``caption``). ``instances``: the instances_val2017.json dict (``images``; ``annotations`` with
    ``image_id``, ``category_id``; ``categories`` with ``id``, ``name``).

    Returns ``{coco_id: {"references": [caption, ...], "objects": {category name: count}}}``: captions in
    annotation-id order with surrounding whitespace stripped, objects sorted by name. A crowd annotation
    (``iscrowd=1``) counts as one instance, since COCO gives no count for a crowd. An image with no
    instance annotations gets ``{}`` (annotated, nothing there), not None.
    Raises ValueError naming the id when an id is not listed as an image in either file.
    """
    coco_ids = list(coco_ids)
    for name, data, keys in (
        ("captions_val2017.json", captions, ("images", "annotations")),
        ("instances_val2017.json", instances, ("images", "annotations", "categories")),
    ):
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise ValueError(f"{name}: not a COCO annotation file (needs keys {', '.join(keys)})")
        listed = {image["id"] for image in data["images"]}
        for coco_id in coco_ids:
            if coco_id not in listed:
                raise ValueError(f"{name}: image id {coco_id} is not listed; is this the val2017 file?")
    wanted = set(coco_ids)
    refs: dict[int, list[tuple[int, str]]] = {i: [] for i in coco_ids}
    for ann in captions["annotations"]:
        if ann["image_id"] in wanted:
            refs[ann["image_id"]].append((ann.get("id", 0), ann["caption"].strip()))
    category = {c["id"]: c["name"] for c in instances["categories"]}
    counts: dict[int, Counter] = {i: Counter() for i in coco_ids}
    for ann in instances["annotations"]:
        if ann["image_id"] in wanted:
            counts[ann["image_id"]][category[ann["category_id"]]] += 1
    return {
        i: {"references": [c for _, c in sorted(refs[i])], "objects": dict(sorted(counts[i].items()))}
        for i in coco_ids
    }


# ---------------------------------------------------------------- sources: COCO's server or a local folder


def _network_disabled() -> bool:
    """HF_HUB_OFFLINE is how this project (refine.offline) says "no network"; parsed like huggingface_hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _read_members(zip_path: Path, members: dict[str, str]) -> dict[str, Any]:
    """Parse the named JSON members of a zip; nothing is extracted to disk."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = set(zf.namelist())
            out = {}
            for key, member in members.items():
                if member not in names:
                    raise ValueError(
                        f"{zip_path}: has no {member}; is it COCO's annotations_trainval2017.zip?"
                    )
                with zf.open(member) as f:
                    out[key] = json.load(f)
            return out
    except zipfile.BadZipFile as e:
        raise ValueError(f"{zip_path}: not a readable zip ({e}); delete it and fetch it again") from e


class _HttpSource:
    """Fetches from COCO's server (or a mirror with the same layout) with urllib and timeouts."""

    def __init__(self, base_url: str, manifest: dict, set_dir: Path):
        self.base_url = base_url.rstrip("/")
        self.manifest = manifest
        self.set_dir = set_dir

    def where(self, file_name: str) -> str:
        return self.manifest["image_url"].format(base_url=self.base_url, file_name=file_name)

    def _fetch(self, url: str, out) -> int:
        """Stream ``url`` into the binary file ``out``; return the byte count.

        Any network failure (offline flag, refused, HTTP error, timeout, truncation): CocoUnavailableError.
        """
        if _network_disabled():
            raise CocoUnavailableError(
                _unavailable_message(self.set_dir, f"HF_HUB_OFFLINE is set, so {url} was not fetched")
            )
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        n = 0
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                expected = response.headers.get("Content-Length")
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    n += len(chunk)
        except urllib.error.HTTPError as e:
            raise CocoUnavailableError(
                _unavailable_message(self.set_dir, f"{url}: HTTP {e.code} {e.reason}")
            ) from e
        except urllib.error.URLError as e:
            raise CocoUnavailableError(_unavailable_message(self.set_dir, f"{url}: {e.reason}")) from e
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, truncated chunked bodies
            raise CocoUnavailableError(
                _unavailable_message(self.set_dir, f"{url}: {type(e).__name__}: {e}")
            ) from e
        if expected is not None and n != int(expected):
            raise CocoUnavailableError(
                _unavailable_message(self.set_dir, f"{url}: connection closed after {n} of {expected} bytes")
            )
        return n

    def image_bytes(self, file_name: str) -> bytes:
        import io

        buf = io.BytesIO()
        self._fetch(self.where(file_name), buf)
        return buf.getvalue()

    def annotations(self) -> tuple[dict, dict]:
        """Stream the annotation zip to a temp file beside the cache, parse our two members, delete it."""
        url = self.manifest["annotations_url"].format(base_url=self.base_url)
        logger.info("coco_val10: fetching %s once (about 241 MB); only 10 images' annotations are kept", url)
        self.set_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.set_dir, prefix=".annotations_trainval2017.", suffix=".zip.part")
        try:
            with os.fdopen(fd, "wb") as f:
                n = self._fetch(url, f)
            logger.info("coco_val10: fetched %.1f MB", n / 1e6)
            members = _read_members(Path(tmp), self.manifest["annotation_members"])
        finally:
            Path(tmp).unlink(missing_ok=True)
        return members["captions"], members["instances"]


class _LocalSource:
    """Reads a local COCO folder: ``val2017/*.jpg`` and ``annotations/{captions,instances}_val2017.json``
    (or, failing those, ``annotations_trainval2017.zip`` in the folder or its ``annotations/``)."""

    def __init__(self, root: str | os.PathLike, manifest: dict):
        self.root = Path(root).expanduser()
        self.manifest = manifest

    def _missing(self, what: Path) -> FileNotFoundError:
        return FileNotFoundError(
            f"coco_root {self.root}: {what} does not exist. coco_root must hold COCO's layout: "
            "val2017/<12-digit id>.jpg and annotations/captions_val2017.json + "
            "annotations/instances_val2017.json "
            f"(ids in {MANIFEST_PATH}); fix the folder or drop coco_root / --coco-root to download instead"
        )

    def where(self, file_name: str) -> str:
        return str(self.root / "val2017" / file_name)

    def image_bytes(self, file_name: str) -> bytes:
        path = self.root / "val2017" / file_name
        if not path.is_file():
            raise self._missing(path)
        return path.read_bytes()

    def annotations(self) -> tuple[dict, dict]:
        members = self.manifest["annotation_members"]
        paths = {key: self.root / member for key, member in members.items()}
        if all(p.is_file() for p in paths.values()):
            return tuple(json.loads(paths[k].read_text()) for k in ("captions", "instances"))
        for zip_path in (
            self.root / "annotations_trainval2017.zip",
            self.root / "annotations" / "annotations_trainval2017.zip",
        ):
            if zip_path.is_file():
                parsed = _read_members(zip_path, members)
                return parsed["captions"], parsed["instances"]
        raise self._missing(next(p for p in paths.values() if not p.is_file()))


def _unavailable_message(set_dir: Path, reason: str) -> str:
    return (
        f"coco_val10 is not cached in {set_dir} and could not be fetched ({reason}).\n"
        "To get it, either:\n"
        "  - run once with internet access (and HF_HUB_OFFLINE unset): the 10 images and COCO's "
        "annotation zip "
        "(about 241 MB, deleted after our 10 images' captions and labels are kept) are fetched once; "
        "later runs need no network; or\n"
        f"  - download the 10 images listed in {MANIFEST_PATH} from {COCO_BASE_URL}/val2017/ and "
        f"{COCO_BASE_URL}/annotations/annotations_trainval2017.zip, lay them out as DIR/val2017/*.jpg and "
        "DIR/annotations/{captions,instances}_val2017.json, and pass --coco-root DIR "
        "(coco_root=DIR in Python).\n"
        "Or use another image set: --images DIR (a folder of images), a glob, a JSONL manifest, "
        "or shapes (synthetic, fully offline)."
    )


# ---------------------------------------------------------------- the cache


def _read_state(set_dir: Path) -> dict[str, Any]:
    path = set_dir / STATE_FILE
    if not path.exists():
        return {"format": STATE_FORMAT, "set": SET_NAME, "images": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable ({e}); delete {set_dir} and load coco_val10 again") from e
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{path}: format {state.get('format')!r}, expected {STATE_FORMAT}; "
            f"delete {set_dir} and load coco_val10 again"
        )
    return state


def _write_state(set_dir: Path, state: dict) -> None:
    atomic_write_bytes(set_dir / STATE_FILE, (json.dumps(state, indent=1, ensure_ascii=False) + "\n").encode())


def _expected_sha256(entry: dict, item: dict, set_dir: Path) -> list[tuple[str, str]]:
    """(sha256, where it comes from) for each checksum this image must match."""
    out = []
    if entry.get("sha256"):
        out.append((entry["sha256"], f"the sha256 recorded on first fetch in {set_dir / STATE_FILE}"))
    if item.get("sha256"):
        out.append((item["sha256"], f"the sha256 pinned in {MANIFEST_PATH}"))
    return out


def load_coco_val10(
    coco_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    base_url: str = COCO_BASE_URL,
) -> list[ImageRecord]:
    """The ten coco_val10 images, in manifest order, with ``references`` (COCO's captions, usually 5) and
    ``objects`` (COCO category name -> instance count).

    ``cache_dir`` is the refine cache root (default ``refine.cache.default_cache_dir()``); the set lives in
    ``cache_dir / "coco_val10"``. What the cache lacks is fetched from ``coco_root`` when given, else from
    ``base_url`` (COCO's layout: ``/val2017/<id>.jpg``, ``/annotations/annotations_trainval2017.zip``).
    A complete cache is read with no network and without looking at ``coco_root``.

    Raises CocoUnavailableError (saying how to fetch it, or what to pass instead) when something is missing
    and cannot be fetched, ChecksumError naming the file when bytes differ from the recorded or pinned
    sha256, FileNotFoundError naming the path when ``coco_root`` lacks a file.
    """
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(
            f"base_url {base_url!r}: must be an http(s) URL; for a local COCO folder pass coco_root"
        )
    manifest = load_manifest()
    set_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()) / SET_NAME
    state = _read_state(set_dir)
    entries: dict[str, dict] = state["images"]
    source: _HttpSource | _LocalSource | None = None

    def open_source():  # only when something is missing: a complete cache never touches either source
        nonlocal source
        if source is None:
            source = (
                _LocalSource(coco_root, manifest)
                if coco_root is not None
                else _HttpSource(base_url, manifest, set_dir)
            )
        return source

    for item in manifest["images"]:
        entry = entries.setdefault(
            record_id(item["coco_id"]), {"coco_id": item["coco_id"], "file_name": item["file_name"]}
        )
        path = set_dir / item["file_name"]
        if path.exists():
            continue
        data = open_source().image_bytes(item["file_name"])
        actual = sha256_bytes(data)
        for expected, origin in _expected_sha256(entry, item, set_dir):
            if actual != expected:
                raise ChecksumError(
                    f"coco_val10: {source.where(item['file_name'])} has sha256 {actual}, "
                    f"but {origin} is {expected}. The source now serves different bytes than were first "
                    "fetched (changed upstream, or a mirror or proxy altered it); nothing was written. "
                    f"If you trust the new file, delete {set_dir} and load coco_val10 again."
                )
        atomic_write_bytes(path, data)
        entry.update(sha256=actual, source=source.where(item["file_name"]))
        # Record each checksum as soon as its file exists, so an interrupted fetch loses nothing.
        _write_state(set_dir, state)

    if any("references" not in entries[record_id(i)] for i in COCO_VAL10_IDS):
        captions, instances = open_source().annotations()
        for coco_id, ann in select_annotations(captions, instances, COCO_VAL10_IDS).items():
            entries[record_id(coco_id)].update(ann)
        _write_state(set_dir, state)

    records = []
    for item in manifest["images"]:
        rid = record_id(item["coco_id"])
        entry, path = entries[rid], set_dir / item["file_name"]
        data = path.read_bytes()
        actual = sha256_bytes(data)
        expected_all = _expected_sha256(entry, item, set_dir)
        for expected, origin in expected_all:
            if actual != expected:
                raise ChecksumError(
                    f"coco_val10: cached image {path} has sha256 {actual}, but {origin} is {expected}. "
                    "The file is corrupt or was replaced: delete it and load coco_val10 again to re-fetch it "
                    f"(the new copy is checked against the same sha256), or delete {set_dir} to start over."
                )
        if not expected_all:  # a file our atomic write left before its checksum was saved: trust it now
            entry["sha256"] = actual
            _write_state(set_dir, state)
        records.append(
            ImageRecord(
                rid,
                path,
                actual,
                FileSource.of(path, actual),
                objects=dict(entry["objects"]),
                references=list(entry["references"]),
            )
        )
    return records
