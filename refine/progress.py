"""Progress bars and stage timing for the loop (rich). Drawing tables is refine.runs' job."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


@contextmanager
def progress_bar(stage: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient bar for one stage; yields ``advance(n)``."""
    with Progress(TextColumn(f"{stage:>9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(stage, total=total)
        yield lambda n: bar.advance(task, n)


class RoundTimer:
    """``with timer("stage"):`` accumulates wall seconds per stage."""

    def __init__(self):
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        return {f"time/{k}": round(v, 3) for k, v in self._seconds.items()}
