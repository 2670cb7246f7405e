"""Image sets from Hugging Face ``datasets``: ``--images hf:NAME_OR_PATH[:split]``.

``NAME_OR_PATH`` is a dataset saved with ``save_to_disk``, a folder in ``imagefolder`` layout (images,
optionally with a ``metadata.jsonl`` whose ``file_name`` column names them), or a hub name, read from
the local HF cache when offline (``HF_HUB_OFFLINE=1``) and downloaded otherwise. ``split`` defaults
to ``train`` when the dataset has several.

Columns (``loop.image_column``, ``loop.caption_column``, ``loop.objects_column``; empty means "find
it"): the image column is the first ``Image`` feature; references come from ``caption``, ``captions``,
``text``, ``sentences`` or ``references`` (a string or a list of strings); objects from ``objects``
(``{label: count}`` or a list of labels; an ``objects`` column in another format, such as a detection
dataset's boxes, is ignored with a note unless named). Ids come from an ``image_id`` or ``id`` column when its
values are unique, else from the row: ``<split>-<row>``.

Rows are read lazily: a record keeps its row number, and its pixels are decoded from the dataset
(memory-mapped Arrow) when a stage asks. The first load of a dataset reads each image once to hash
it and to find broken ones; the answers are kept in the image index (``refine.images.records.checked``
does the same for files), keyed by the dataset's fingerprint, so loading it again reads no image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from refine.images.records import ImageRecord, decode, sha256_bytes

CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "references")
ID_COLUMNS = ("image_id", "id")


@dataclass(frozen=True)
class Columns:
    image: str = ""
    caption: str = ""
    objects: str = ""


def parse(spec: str) -> tuple[str, str | None]:
    """``"hf:NAME_OR_PATH[:split]"`` -> ``(NAME_OR_PATH, split or None)``. A path that exists keeps its
    colons (``hf:/data/a:b`` is the folder ``/data/a:b`` if it exists)."""
    body = spec[len("hf:"):]
    if not body:
        raise ValueError(f"{spec!r}: name a dataset after hf:, e.g. hf:/data/coco_saved:validation")
    if Path(body).expanduser().exists() or ":" not in body:
        return body, None
    name, split = body.rsplit(":", 1)
    return name, split or None


def _open(name: str, split: str | None, flag: str):
    import datasets

    path = Path(name).expanduser()
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:  # only the split asked for is loaded (datasets may still download and prepare the others)
            loaded = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        where = "a saved dataset, an imagefolder, or a hub name in the local cache (offline) or on the hub"
        raise ValueError(f"{flag} hf:{name}: cannot open it as {where} ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if chosen not in loaded:
            raise ValueError(f"{flag} hf:{name}: {'no split ' + repr(split) if split else 'several splits'}; "
                             f"name one of {', '.join(splits)} as hf:{name}:SPLIT")
        return loaded[chosen], chosen
    if split and split != (loaded.split and str(loaded.split)):
        raise ValueError(f"{flag} hf:{name}: the dataset has no splits; drop ':{split}'")
    return loaded, str(loaded.split) if loaded.split else "train"


def _column(names: Sequence[str], given: str, candidates: Sequence[str], what: str, flag: str, name: str) -> str | None:
    if given:
        if given not in names:
            raise ValueError(f"{flag} hf:{name}: no column {given!r} for the {what}; columns: {', '.join(names)}")
        return given
    return next((c for c in candidates if c in names), None)


def _references(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):  # e.g. {"raw": [...]} or {"text": [...]}
        value = next((v for v in value.values() if isinstance(v, list | str)), [])
        return _references(value)
    return [v if isinstance(v, str) else str(v.get("raw", v)) if isinstance(v, dict) else str(v) for v in value]


def _objects(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if isinstance(value, dict):  # Arrow gives every row every key: absent labels come back as None
        value = {k: v for k, v in value.items() if v is not None}
        if all(isinstance(v, int) and v >= 0 for v in value.values()):
            return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        counts: dict[str, int] = {}
        for label in value:
            counts[label] = counts.get(label, 0) + 1
        return counts
    raise ValueError(f"objects {value!r}: expected {{label: count}} or a list of labels")


def _image_bytes(cell: Any, name: str) -> bytes:
    """An undecoded ``Image`` cell: ``{"bytes": ..., "path": ...}``; ``ValueError`` for a row without one."""
    if not cell or not (cell.get("bytes") or cell.get("path")):
        raise ValueError(f"{name}: the row has no image")
    if cell.get("bytes"):
        return cell["bytes"]
    return Path(cell["path"]).read_bytes()


def _load_row(dataset, column: str, row: int, name: str) -> Any:
    return decode(_image_bytes(dataset[row][column], name), name)


def load_dataset_records(spec: str, columns: Columns = Columns(), flag: str = "--images") -> tuple[list[ImageRecord], list[str]]:
    """Records for an ``hf:`` spec, and notes for rows skipped (an image that does not decode)."""
    import datasets

    from refine.images.records import INDEX_VERSION, image_index

    name, split = parse(spec)
    dataset, split = _open(name, split, flag)
    names = list(dataset.column_names)
    image_column = columns.image or next((c for c, f in dataset.features.items() if isinstance(f, datasets.Image)), "")
    if image_column not in names or not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(f"{flag} {spec}: no image column{' ' + repr(columns.image) if columns.image else ''}; "
                         f"columns: {', '.join(names)} (set loop.image_column)")
    caption_column = _column(names, columns.caption, CAPTION_COLUMNS, "reference captions", flag, name)
    objects_column = _column(names, columns.objects, ("objects",), "object annotations", flag, name)
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    meta = raw.remove_columns([image_column])
    notes = []
    head = meta.select(range(min(100, len(meta))))[objects_column] if objects_column else []
    first = next((v for v in head if v is not None), None)
    try:
        _objects(first)
    except ValueError as e:  # e.g. a detection dataset's {"bbox": [...], "category": [...]}
        if columns.objects:
            raise ValueError(f"{flag} {spec}: loop.objects_column={columns.objects}: {e}") from None
        why = str(e) if len(str(e)) <= 160 else str(e)[:160] + "..."
        notes.append(f"the column 'objects' is not {{label: count}} or a list of labels ({why}); it is ignored "
                     "(loop.objects_column names another)")
        objects_column = None
    id_column = next((c for c in ID_COLUMNS if c in names and len(set(meta[c])) == len(meta)), None)
    # len(raw): a set of one image column has no metadata columns, and then len(meta) is 0
    ids = [str(i) for i in meta[id_column]] if id_column else [f"{split}-{i:06d}" for i in range(len(raw))]

    index = image_index()
    fingerprint = getattr(dataset, "_fingerprint", None) or hashlib.sha256(str(dataset).encode()).hexdigest()
    records = []
    for row, record_id in enumerate(ids):
        key = f"dataset/{INDEX_VERSION}/{fingerprint}/{image_column}/{row}"
        known = index.get(key)
        where = f"{spec} row {row}"
        if known is None:
            try:
                data = _image_bytes(raw[row][image_column], where)
                decode(data, where)
                known = {"sha256": sha256_bytes(data)}
            except ValueError as e:
                known = {"error": str(e)}
            except OSError as e:  # an imagefolder's file gone: not remembered, it may come back
                notes.append(f"skipped {where}: {e}")
                continue
            index.set(key, known)
        if "error" in known:
            notes.append(f"skipped {known['error']}")
            continue
        values = meta[row] if meta.column_names else {}
        try:
            objects = _objects(values[objects_column]) if objects_column else None
        except ValueError as e:
            notes.append(f"skipped {spec} row {row}: {e}")
            continue
        records.append(ImageRecord(
            record_id, None, known["sha256"], partial(_load_row, raw, image_column, row, f"{spec} row {row}"),
            objects=objects, references=_references(values[caption_column]) if caption_column else [],
        ))
    return records, notes

