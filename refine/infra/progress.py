"""Progress bars for the loop (rich) and the console it prints on. Drawing tables is refine.runs' job."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, soft_wrap=True)  # a message stays one line when piped, not cut at 80 columns


class RoundProgress:
    """One transient rich display for a round, a bar per stage: ``with RoundProgress() as bars:`` then
    ``advance = bars.add("caption", total)`` gives the stage its ``advance(n)``."""

    def __init__(self, enabled: bool = True):
        self._progress = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console, transient=True, disable=not enabled)
        self.enabled = enabled

    def __enter__(self) -> RoundProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def add(self, stage: str, total: int) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        task = self._progress.add_task(stage, total=total)
        return lambda n: self._progress.advance(task, n)
