"""A content-addressed disk cache (diskcache) for critiques, detections and LLM calls.

Keys are sha256 over everything that determines the answer: for a critique that is the critic id,
model, sampling parameters, the rendered template text, the image bytes, crop boxes and the caption.
Editing a template therefore re-asks only what changed. Failures are never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$REFINE_CACHE_DIR``, else ``~/.cache/refine``."""
    return Path(os.environ.get("REFINE_CACHE_DIR") or Path.home() / ".cache" / "refine")


def _canonical(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode()
    return json.dumps(part, sort_keys=True, separators=(",", ":"), default=str).encode()


def cache_key(*parts: Any) -> str:
    """sha256 over the parts, each length-prefixed so that ("ab", "c") != ("a", "bc")."""
    h = hashlib.sha256()
    for part in parts:
        data = _canonical(part)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class DiskCache:
    """``get_or_compute`` over a diskcache store, counting hits and misses. Thread- and process-safe.

    The store is opened on first use, not on construction.
    """

    def __init__(self, directory: str | os.PathLike | None = None, namespace: str = "default"):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.namespace = namespace
        self.hits = 0
        self.misses = 0
        self._store = None
        self._lock = threading.Lock()

    @property
    def store(self):
        if self._store is None:
            import diskcache

            with self._lock:
                if self._store is None:
                    self._store = diskcache.Cache(str(self.directory / self.namespace))
        return self._store

    def get(self, key: str, default: Any = None) -> Any:
        return self.store.get(key, default)

    def get_or_compute(self, key: str, compute: Callable[[], T], cacheable: Callable[[T], bool] = lambda _: True) -> tuple[T, bool]:
        """Return ``(value, hit)``. ``compute`` runs on a miss; its value is stored only if ``cacheable``."""
        sentinel = object()
        value = self.store.get(key, sentinel)
        if value is not sentinel:
            with self._lock:
                self.hits += 1
            return value, True
        with self._lock:
            self.misses += 1
        value = compute()
        if cacheable(value):
            self.store.set(key, value)
        return value, False

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
