"""Thread pools that stop at once: the one place the engine runs work concurrently.

``concurrent.futures``' own ``with ThreadPoolExecutor() as pool`` waits, on any exception, for every
submitted task, queued ones included. With a hanging API that is minutes after a Ctrl-C (each queued
request still runs its timeouts and retries). :func:`map_concurrently` instead cancels what has not
started and returns at once; requests already in flight finish (or not) in their threads. Before it
exits, the command line gives them a few seconds (:func:`finish_in_flight`): a critic's answer that
arrives then is in the disk cache, and a resume does not pay for it again (see ``refine.loop.main``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_in_flight: set[Future] = set()  # work an interrupted pool left running


def _abandon(futures: Iterable[Future]) -> None:
    _in_flight.update(f for f in futures if not f.done())


def in_flight() -> int:
    """How many tasks an interrupted pool left running."""
    return sum(not f.done() for f in _in_flight)


def finish_in_flight(seconds: float) -> tuple[int, int]:
    """Wait up to ``seconds`` for the tasks interrupted pools left running; ``(finished, still running)``.
    A critique that finishes is cached by its own thread, so a resume gets it free."""
    pending = [f for f in _in_flight if not f.done()]
    _in_flight.clear()
    if not pending:
        return 0, 0
    done, not_done = wait(pending, timeout=seconds)
    return len(done), len(not_done)


def map_concurrently(fn: Callable[[T], R], items: Iterable[T], max_workers: int, *, requests: bool = True) -> list[R]:
    """``[fn(x) for x in items]`` with up to ``max_workers`` running at once, results in input order.

    If the caller is interrupted (``KeyboardInterrupt``) or ``fn`` raises, work not yet started is
    cancelled and the exception propagates without waiting for the work in flight. That work counts as
    requests :func:`finish_in_flight` waits for, unless ``requests`` is false (file reads: nothing to keep).
    """
    items = list(items)
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(items))))
    futures: list[Future] = []
    try:
        futures.extend(pool.submit(fn, item) for item in items)
        results = [f.result() for f in futures]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        if requests:
            _abandon(futures)
        raise
    pool.shutdown(wait=True)
    return results


def stream_concurrently(fn: Callable[[T], R], items: Iterable[T], max_workers: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` pairs as they finish, with up to ``max_workers`` running at once: a pool
    with no barrier, for stages bound by an API.

    ``items`` is read lazily, one item each time a worker is free, so a producer can make inputs just
    in time (decode an image, find its regions) and at most ``max_workers`` of them exist at once. If
    the consumer stops early, is interrupted, or ``fn`` raises, queued work is cancelled and the
    generator returns without waiting for the work in flight.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, max_workers))
    running: dict = {}
    source = iter(items)
    finished = False
    try:
        for item in itertools.islice(source, max(1, max_workers)):
            running[pool.submit(fn, item)] = item
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                item = running.pop(future)
                result = future.result()
                for nxt in itertools.islice(source, 1):
                    running[pool.submit(fn, nxt)] = nxt
                yield item, result
        finished = True
    finally:
        pool.shutdown(wait=finished, cancel_futures=True)
        _abandon(running)
