"""Image sets from files: a folder, a glob, or a JSONL manifest, with ids unique within the set.

File ids are the file name without its extension ("bus" for ``bus.jpg``); where two files would get
the same id (``a.jpg`` and ``a.png``) both keep their extension. Names that are not valid UTF-8 keep
their undecodable bytes as ``\\xNN`` escapes, so every id can be written to the run directory.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refine.images.records import (
    IMAGE_SUFFIXES,
    ImageRecord,
    image_index,
    index_key,
    printable,
    read_into_index,
    record_from_path,
)

INDEX_THREADS = min(32, (os.cpu_count() or 1) + 4)  # files new to the image index read at once (ThreadPoolExecutor's)
PROGRESS_FROM = 1000  # files new to the index: this many show a progress bar


def index_files(paths: Sequence[Path]) -> dict[Path, tuple[os.stat_result, dict[str, str]]]:
    """What the image index knows of each file: its stat, and its sha256 or why it does not decode. The
    files new to the index (a set's first load) are read, decoded and hashed on :data:`INDEX_THREADS`
    threads at once (Pillow and hashlib release the GIL), with a progress bar when there are many; the
    others cost a ``stat`` and a lookup. A file that cannot be read is left out, for
    :func:`record_from_path` to say why."""
    from refine.infra.concurrency import map_concurrently
    from refine.infra.progress import RoundProgress

    index, known, new = image_index(), {}, []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        key = index_key(path, stat)
        entry = index.get(key)
        if entry is None:
            new.append((path, stat, key))
        else:
            known[path] = (stat, entry)
    with RoundProgress(enabled=len(new) >= PROGRESS_FROM) as bars:
        advance = bars.add("indexing", len(new))

        def read(job: tuple[Path, os.stat_result, str]) -> dict[str, str] | None:
            try:
                return read_into_index(job[0], job[2])
            except OSError:
                return None
            finally:
                advance(1)

        for (path, stat, _), entry in zip(new, map_concurrently(read, new, INDEX_THREADS, requests=False)):
            if entry is not None:
                known[path] = (stat, entry)
    return known


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


def duplicate_notes(records: Sequence[ImageRecord], keep: int = 3) -> list[str]:
    """A note per group of records whose files are byte-identical (kept, but worth knowing); past ``keep``
    groups, one note with their count and the first ``keep``."""
    by_sha: dict[str, list[str]] = defaultdict(list)
    for r in records:
        by_sha[r.sha256].append(r.id)
    groups = [ids for ids in by_sha.values() if len(ids) > 1]
    named = [", ".join(ids[:5]) + (f" and {len(ids) - 5:,} more" if len(ids) > 5 else "") for ids in groups]
    if len(groups) > keep:
        return [f"identical images: {len(groups):,} groups of files with the same bytes (all kept), the first "
                f"{keep}: " + "; ".join(named[:keep])]
    return [f"identical images: {ids} have the same bytes (all kept)" for ids in named]


def _records_from_paths(paths: list[Path], source: str, flag: str = "--images") -> tuple[list[ImageRecord], list[str]]:
    """Decode each path; a bad file is skipped with a note, never fatal for the set."""
    paths = sorted(paths)
    records, notes = [], []
    indexed = index_files(paths)
    for path, id_ in zip(paths, file_ids(paths)):
        try:
            records.append(record_from_path(path, id=id_, indexed=indexed.get(path)))
        except (OSError, ValueError) as e:
            notes.append(f"skipped {e}" if isinstance(e, ValueError) else f"skipped {printable(str(path))}: {e}")
    if not paths:
        raise ValueError(f"{flag} {source}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) there; "
                         "point --images at a folder of images, a glob or a .jsonl manifest")
    if not records:
        raise ValueError(f"{flag} {source}: no readable images ({len(notes)} skipped); " + "; ".join(notes[:3]))
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


def load_manifest(path: Path, flag: str = "--images") -> tuple[list[ImageRecord], list[str]]:
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
        raise ValueError(f"{flag} {path}: the manifest has no lines; write one JSON object per image")
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
    files = [(path.parent / row["path"]).resolve() for _, row in rows]
    indexed = index_files(files)
    for (where, row), file in zip(rows, files):
        try:
            records.append(record_from_path(file, id=row.get("id") or derived[where], indexed=indexed.get(file),
                                            objects=row.get("objects"), references=list(row.get("references", []))))
        except (OSError, ValueError) as e:
            notes.append(f"skipped {where}: {e}")  # the line, then the file's own message
    if not records:
        raise ValueError(f"{flag} {path}: no readable images in the manifest; " + "; ".join(notes[:3]))
    return records, notes + duplicate_notes(records)
