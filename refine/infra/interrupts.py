"""How a refine command ends on Ctrl-C: the first press stops the work within seconds (the caller
records what finished), a second exits at once, and once the work is over a press exits quietly.
SIGTERM (``docker stop``, a scheduler's preemption, ``kill``) is a first Ctrl-C: the run stops the
same way, recorded and resumable, and exits with 130 too. Requests left in flight get a few seconds to
answer first (:func:`let_in_flight_finish`)."""

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


def run_stoppable(work: Callable[[], int], stopped: Callable[[BaseException], int]) -> int:
    """A command's body: ``work()``'s exit code, under :func:`second_interrupt_exits`. When it raises (Ctrl-C,
    SIGTERM, an error), the requests it left in flight get their grace (:func:`let_in_flight_finish`) and
    ``stopped(e)`` says how it ends; once either is under way, a Ctrl-C exits at once."""
    with second_interrupt_exits() as over:
        try:
            code = work()
        except BaseException as e:
            over(130)  # from here on a Ctrl-C has nothing left to stop
            let_in_flight_finish()
            return stopped(e)
        over(code)  # the work is done: a Ctrl-C now ends the process as it was about to end
    return code


IN_FLIGHT_GRACE_S = 5.0  # under docker stop's 10 s before SIGKILL


def let_in_flight_finish(seconds: float = IN_FLIGHT_GRACE_S) -> None:
    """Before a stopped command exits: the requests an interrupted stage left in flight get ``seconds`` to
    answer. An answer that arrives is cached by its thread, so a resume does not pay for it again; a
    Ctrl-C meanwhile exits at once (the caller has said the work is over)."""
    from refine.infra.concurrency import finish_in_flight, in_flight

    n = in_flight()
    if not n:
        return
    console.print(f"[yellow]Waiting up to {seconds:g} s for {n} critic call(s) in flight: an answer that arrives "
                  "is cached, and a resume does not pay for it again (Ctrl-C to quit now) …[/]")
    done, left = finish_in_flight(seconds)
    console.print(f"[yellow]{done} of {n} finished" + (f"; {left} abandoned (a resume asks them again)" if left else "")
                  + ".[/]")


def exit_now(code: int) -> None:
    """Exit without joining the threads of abandoned requests (their answers would arrive too late)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
