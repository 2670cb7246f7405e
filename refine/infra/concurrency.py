"""Thread-pool mapping that stops at once: the one place the engine runs work concurrently.

``concurrent.futures``' own ``with ThreadPoolExecutor() as pool`` waits, on any exception, for every
submitted task, queued ones included. With a hanging API that is minutes after a Ctrl-C (each queued
request still runs its timeouts and retries). :func:`map_concurrently` instead cancels what has not
started and returns at once; requests already in flight finish (or not) in their threads, and the
command line then exits without waiting for them (see ``refine.loop.main``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_concurrently(fn: Callable[[T], R], items: Iterable[T], max_workers: int) -> list[R]:
    """``[fn(x) for x in items]`` with up to ``max_workers`` running at once, results in input order.

    If the caller is interrupted (``KeyboardInterrupt``) or ``fn`` raises, work not yet started is
    cancelled and the exception propagates without waiting for the work in flight.
    """
    items = list(items)
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(items))))
    try:
        futures = [pool.submit(fn, item) for item in items]
        results = [f.result() for f in futures]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results
