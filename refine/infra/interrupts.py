"""How a refine command ends on Ctrl-C: the first press stops the work within seconds (the caller
records what finished), a second exits at once, and once the work is over a press exits quietly.
SIGTERM (``docker stop``, a scheduler's preemption, ``kill``) is a first Ctrl-C: the run stops the
same way, recorded and resumable, and exits with 130 too."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from refine.infra.progress import console


@contextmanager
def second_interrupt_exits() -> Iterator[Callable[[int], None]]:
    """The first Ctrl-C raises ``KeyboardInterrupt`` (the run records it and stops within seconds);
    a second one exits at once. Yields ``over(code)``: once called (the run has returned or stopped), a
    Ctrl-C has nothing left to stop and exits at once with ``code``, with no traceback."""
    presses, finished = 0, None

    def over(code: int) -> None:
        nonlocal finished
        finished = code

    def handler(signum, frame):
        nonlocal presses
        if finished is not None:
            exit_now(finished)
        presses += 1
        if presses > 1:
            os._exit(130)
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        console.print(f"[yellow]Stopping ({what}): queued requests cancelled, finished work is recorded "
                      f"({'press Ctrl-C' if signum == signal.SIGINT else 'send it'} again to quit at once) …[/]")
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield over
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def exit_now(code: int) -> None:
    """Exit without joining the threads of abandoned requests (their answers would arrive too late)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
