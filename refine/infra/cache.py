"""A content-addressed disk cache (diskcache) for critiques, detections and LLM calls.

Keys are sha256 over everything that determines the answer: for a critique that is the critic id,
model, sampling parameters, the rendered template text, the image bytes, crop boxes and the caption.
Editing a template therefore re-asks only what changed. Failures are never stored.

Computing a missing value takes a lock on its key, shared by every process using the same cache
directory: when two runs (or two threads) need the same answer at once, one asks and the others wait
for its answer instead of paying for the same request again. A lock whose owner died (kill -9) is
taken over at once; one whose owner is alive expires after ``LOCK_EXPIRE`` seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LOCK_EXPIRE = 900.0  # seconds: longer than any one computation (a request with all its retries)
_POLL = 0.05  # seconds between looks while another process computes the same key


def default_cache_dir() -> Path:
    """``$REFINE_CACHE_DIR``, else ``~/.cache/refine``."""
    return Path(os.environ.get("REFINE_CACHE_DIR") or Path.home() / ".cache" / "refine")


def _dead(holder: Any) -> bool:
    """Whether a lock's owner ``[host, pid, token]`` is a process of this machine that no longer runs."""
    try:
        host, pid, _ = holder
    except (TypeError, ValueError):
        return True  # not a lock of ours
    if host != socket.gethostname():
        return False  # another machine's process: only its expiry frees the lock
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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


NAMESPACES = ("image-index", "regions", "critiques", "llm")  # the stores a run uses


class CacheUnusable(OSError):
    """A store that cannot be opened: not a database (damaged, or another file put there), or a folder
    that cannot be made. One line naming it and the two ways out."""

    def __init__(self, path: Path, error: Exception):
        why = (str(error).strip().splitlines() or [type(error).__name__])[0]
        super().__init__(f"the cache {path} cannot be used ({type(error).__name__}: {why}); delete that folder "
                         "(what it held is computed or asked again) or set REFINE_CACHE_DIR to another folder")


def check_caches(directory: str | os.PathLike | None = None) -> None:
    """Open each store a run uses, so that a damaged one is refused before the run starts, not met by
    every request of its first paid stage."""
    for namespace in NAMESPACES:
        cache = DiskCache(directory, namespace)
        cache.store  # noqa: B018 (opening it is the check)
        cache.close()


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
        self._uncached: dict[str, Any] = {}  # refused values kept for this process (``share_refused``)

    @property
    def store(self):
        if self._store is None:
            import diskcache

            with self._lock:
                if self._store is None:
                    path = self.directory / self.namespace
                    try:
                        # never evict: diskcache's default drops the oldest answers past 1 GiB (about
                        # 900,000 critiques), and each would be paid for again; the setting is stored,
                        # so a store made before is mended when it is opened
                        self._store = diskcache.Cache(str(path), eviction_policy="none")
                    except (sqlite3.DatabaseError, OSError) as e:
                        raise CacheUnusable(path, e) from None
        return self._store

    def get_or_compute(self, key: str, compute: Callable[[], T], cacheable: Callable[[T], bool] = lambda _: True,
                       share_refused: bool = False) -> tuple[T, bool]:
        """Return ``(value, hit)``. ``compute`` runs on a miss; its value is stored only if ``cacheable``.

        While ``compute`` runs, the key is locked across processes: another caller of the same key
        waits, then takes the stored value (a hit), or computes itself if nothing was stored. A value
        ``cacheable`` refuses is not stored, so a later call computes it again; with ``share_refused`` (a
        reply that is no caption, not a transient failure) this process keeps it, and its later callers
        of the key take it (a hit) instead of paying again; a later process asks again.
        """
        sentinel = object()
        value = self._uncached.get(key, sentinel)
        if value is sentinel:
            value = self.store.get(key, sentinel)
        if value is sentinel:
            with self._key_lock(key, sentinel) as value:
                if value is sentinel:
                    with self._lock:
                        self.misses += 1
                    value = compute()
                    if cacheable(value):
                        self.store.set(key, value)
                    elif share_refused:
                        self._uncached[key] = value
                    return value, False
        with self._lock:
            self.hits += 1
        return value, True

    @contextlib.contextmanager
    def _key_lock(self, key: str, sentinel: object):
        """Hold the lock on ``key``; yields the key's value if another holder stored one meanwhile
        (then the lock is not needed), else ``sentinel`` with the lock held."""
        lock_key = f"lock:{key}"
        owner = [socket.gethostname(), os.getpid(), uuid.uuid4().hex]
        while not self.store.add(lock_key, owner, expire=LOCK_EXPIRE):
            value = self._uncached.get(key, sentinel)
            if value is sentinel:
                value = self.store.get(key, sentinel)
            if value is not sentinel:
                yield value
                return
            holder = self.store.get(lock_key)
            if holder is not None and _dead(holder):
                self.store.delete(lock_key)  # its owner was killed: take over at once
                continue
            time.sleep(_POLL)
        try:  # stored (or kept) between our first look and the lock
            yield self._uncached.get(key, self.store.get(key, sentinel))
        finally:
            if self.store.get(lock_key) == owner:
                self.store.delete(lock_key)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
