"""How a refine command ends on Ctrl-C: the first press stops the work within seconds (the caller
records what finished), a second exits at once, and once the work is over a press exits quietly.
SIGTERM (``docker stop``, a scheduler's preemption, ``kill``) is a first Ctrl-C: the run stops the
same way, recorded and resumable, and exits with 130 too; so is SIGHUP (the terminal was closed), after
which the process writes to /dev/null instead of the dead terminal. Requests left in flight get a few
seconds to answer first (:func:`let_in_flight_finish`)."""

from __future__ import annotations

import errno
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
    terminal = _Terminal()

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
        if signum == HANGUP:
            terminal.detach()
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = f"({'press Ctrl-C' if signum == signal.SIGINT else 'send it'} again to quit at once)"
        if _deferred["depth"]:
            _deferred["requested"] = True
            console.print(f"[yellow]Stopping ({what}) at the update's next step boundary, with its progress saved "
                          f"{again} …[/]")
            return
        console.print(f"[yellow]Stopping ({what}): queued requests cancelled, finished work is recorded {again} …[/]")
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, HANGUP) if sig}
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_TerminalStream(s, terminal) if _fd(s) in terminal.fds else s for s in streams)
    try:
        yield over
    finally:
        sys.stdout, sys.stderr = streams
        for sig, before in previous.items():
            signal.signal(sig, before)


HANGUP = getattr(signal, "SIGHUP", None)  # not on Windows
_deferred = {"depth": 0, "requested": False}  # open stop_between_steps() regions, and a stop noted in them


@contextmanager
def stop_between_steps() -> Iterator[None]:
    """Within it (nested: the outermost counts), a first Ctrl-C (SIGTERM, SIGHUP) under
    :func:`second_interrupt_exits` does not raise where it lands: it is noted, and :func:`stop_requested`
    says so, for the code to stop at its next safe point (an update: the step in progress finishes and
    its progress is saved). A stop noted and not acted on is raised as ``KeyboardInterrupt`` when the
    outermost region ends. A second one exits at once."""
    _deferred["depth"] += 1
    pending = False
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        if not _deferred["depth"]:
            pending, _deferred["requested"] = _deferred["requested"], False
    if pending:
        raise KeyboardInterrupt


def stop_requested() -> bool:
    """Whether a stop was noted within the open :func:`stop_between_steps` regions."""
    return _deferred["requested"]


class _Terminal:
    """Which of standard input, output and error are the terminal. When it is gone (closed, a lost ssh
    connection), every write to it fails with EIO and it no longer says it is a terminal; :meth:`detach`
    points them at /dev/null (what ``nohup`` arranges in advance), so the stop's messages and the rest
    of a run go nowhere instead of failing."""

    def __init__(self):
        self.fds = {fd for fd in (0, 1, 2) if _isatty(fd)}

    def detach(self) -> None:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in self.fds:
            os.dup2(null, fd)
        os.close(null)


def _fd(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        return None


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


class _TerminalStream:
    """``sys.stdout`` or ``sys.stderr`` on a terminal. The first write after the terminal is gone (a
    progress bar's refresh, any print) fails with EIO and would end the run as a crash before SIGHUP
    stops it, or a ``disown``-ed run that was meant to go on: instead the terminal is detached and the
    write goes to /dev/null."""

    def __init__(self, stream, terminal: _Terminal):
        self._stream, self._terminal = stream, terminal

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def _guard(self, write, *text):
        try:
            return write(*text)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            self._terminal.detach()
            return write(*text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def run_stoppable(work: Callable[[], int], stopped: Callable[[BaseException], int]) -> int:
    """A command's body: ``work()``'s exit code, under :func:`second_interrupt_exits`. When it raises (Ctrl-C,
    SIGTERM, an error), the requests it left in flight get their grace (:func:`let_in_flight_finish`) and
    ``stopped(e)`` says how it ends; once either is under way, a Ctrl-C exits at once."""
    with second_interrupt_exits() as over:
        try:
            code = work()
        except BaseException as e:
            over(130)  # from here on a Ctrl-C has nothing left to stop
            abandoned = let_in_flight_finish()
            code = stopped(e)
            if abandoned:  # a normal exit joins their threads: it would wait out each one's timeout
                exit_now(code)
            return code
        over(code)  # the work is done: a Ctrl-C now ends the process as it was about to end
    return code


IN_FLIGHT_GRACE_S = 5.0  # under docker stop's 10 s before SIGKILL


def let_in_flight_finish(seconds: float = IN_FLIGHT_GRACE_S) -> int:
    """Before a stopped command exits: the requests an interrupted stage left in flight get ``seconds`` to
    answer. An answer that arrives is cached by its thread, so a resume does not pay for it again; a
    Ctrl-C meanwhile exits at once (the caller has said the work is over). Returns how many are left."""
    from refine.infra.concurrency import finish_in_flight, in_flight

    n = in_flight()
    if not n:
        return 0
    console.print(f"[yellow]Waiting up to {seconds:g} s for {n} critic call(s) in flight: an answer that arrives "
                  "is cached, and a resume does not pay for it again (Ctrl-C to quit now) …[/]")
    done, left = finish_in_flight(seconds)
    console.print(f"[yellow]{done} of {n} finished" + (f"; {left} abandoned (a resume asks them again)" if left else "")
                  + ".[/]")
    return left


def exit_now(code: int) -> None:
    """Exit without joining the threads of abandoned requests (their answers would arrive too late)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
