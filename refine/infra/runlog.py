"""The run directory: the only place the loop writes, and everything needed to explain a run.

Layout of ``runs/<id>/``::

    config.json                 resolved config, written first (a resume that changes a setting rewrites it)
    events.jsonl                append-only: run_start, stage_done, stage_stopped, round_done, resume,
                                budget_stop, failure_stop, interrupted, run_done
    rounds/<k>/<stage>.jsonl    one file per completed stage (captions, critiques, refined, pairs, ...)
    rounds/<k>/<stage>.partial.jsonl  the finished rows of a stage in progress (removed when it completes)
    rounds/<k>/update.progress.pt   an update in progress: weights, optimizer, steps taken (removed likewise)
    rounds/<k>/metrics.json     the round summary
    student/last/, student/best/  checkpoints (from_pretrained-loadable) with refine_state.json

Every file is written atomically (temp file + rename) or appended line by line, so a crash leaves
either the whole stage output or its finished rows (the partial file), never a half-written file. ``stage()`` is what makes ``--resume`` work: a stage
whose file exists is loaded, not recomputed, so resuming repeats no critic request and duplicates
no record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from refine.infra.atomic import read_jsonl, write_json, write_jsonl

STATE_FILE = "refine_state.json"
SYNC_SECONDS = 2.0  # how often a streaming stage's appended rows are synced to disk
STAGE_TIMES = ("stage_done", "stage_timed", "stage_stopped")  # the events that time a stage (stage_seconds)


class StageDamaged(ValueError):
    """A finished stage's file that is not what was written (cut short, edited)."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"{path}: damaged ({detail}); a finished stage's file is written whole. Put it back from "
                         "a copy of the run, or delete it (a round not yet finished computes it again; answers "
                         "already paid for come from the cache)")


class RunInUse(OSError):
    """Another process holds the run (``RunLog.lock``)."""


def to_row(item: Any) -> dict[str, Any]:
    """A typed stage row as JSON: its ``to_json()``, or its dataclass fields, or the dict itself."""
    if hasattr(item, "to_json"):
        return item.to_json()
    return dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item


def from_row(record: type | None, row: dict[str, Any]) -> Any:
    """A JSON row as ``record``: its ``from_json``, or its dataclass fields (keys it does not know are
    ignored, missing ones take their defaults, so runs written by older versions still load)."""
    if record is None:
        return row
    if hasattr(record, "from_json"):
        return record.from_json(row)
    names = {f.name for f in dataclasses.fields(record)}
    return record(**{k: v for k, v in row.items() if k in names})


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class RunLog:
    def __init__(self, root: Path, writer: bool = True):
        self.root = Path(root)
        # False on the other processes of a data-parallel run: they compute with the main process but
        # only the main process writes (every write below is then skipped).
        self.writer = writer

    # -- creation ------------------------------------------------------------------------------
    @staticmethod
    def check_new(runs_dir: str | os.PathLike, run_id: str) -> None:
        """Raise ``FileExistsError`` if ``run_id`` is taken (checked before anything is loaded)."""
        root = Path(runs_dir) / run_id
        if (root / "config.json").exists():
            raise FileExistsError(f"run {root} already exists; continue it with --resume {shlex.quote(str(root))}, "
                                  "or pass another --loop.run_id")
        existing = next(p for p in (root.parent, *root.parent.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise OSError(f"--loop.runs_dir {runs_dir}: {existing} is not a directory this process can write to; "
                          "choose another --loop.runs_dir")

    @classmethod
    def create(cls, runs_dir: str | os.PathLike, run_id: str, config: dict[str, Any]) -> RunLog:
        cls.check_new(runs_dir, run_id)
        root = Path(runs_dir) / run_id
        log = cls(root)
        write_json(root / "config.json", config)
        log.event("run_start", run_id=run_id)
        return log

    @classmethod
    def open(cls, run: str | os.PathLike, runs_dir: str | os.PathLike = "runs") -> RunLog:
        """A run by id (under ``runs_dir``) or by path."""
        for root in (Path(run), Path(runs_dir) / str(run)):
            if (root / "config.json").is_file():
                return cls(root)
        raise FileNotFoundError(f"no run {run!r}: expected {Path(runs_dir) / str(run)}/config.json (see `python -m refine.runs list`)")

    @property
    def config(self) -> dict[str, Any]:
        path = self.root / "config.json"
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: damaged, not valid JSON ({e}); restore it from a backup, or start a new "
                             "run") from None

    @contextlib.contextmanager
    def lock(self):
        """Hold the run for this process (an exclusive ``flock`` on ``.lock``): two sessions of one run
        would both write its stages and checkpoints. Raises ``RunInUse`` when another process holds it."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise RunInUse(f"run {self.root} is in use by another refine process" + (f" (pid {holder})" if holder else "")
                           + "; wait for it to finish or stop it, then resume") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield self
        finally:
            f.close()  # closing the file releases the lock

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.root / "config.json", config)

    def is_done(self) -> bool:
        """A ``run_done`` event after the last ``resume``: a finished run resumed for more rounds
        (``--resume RUN --rounds N``) is not done again until they are."""
        return self._done(self.events()) is not None

    @staticmethod
    def _done(events: list[dict[str, Any]]) -> dict[str, Any] | None:
        last = next((e for e in reversed(events) if e["event"] in ("run_done", "resume")), None)
        return last if last is not None and last["event"] == "run_done" else None

    def final_eval(self) -> dict[str, Any] | None:
        """The final student's held-out metrics as a row beside the rounds' metrics (``round``: the number
        of rounds, ``final``: True, ``eval/*``; recorded with ``run_done``): None before the run is done,
        without ``loop.eval_images``, or for a run that predates them."""
        events = self.events()
        done = self._done(events)
        if done is None or not done.get("eval"):
            return None
        return {"round": sum(e["event"] == "round_done" for e in events), "final": True, **done["eval"]}

    def status(self) -> str:
        """One phrase for ``refine.runs``: done, or how it stopped and that it can be resumed."""
        events = self.events()
        done = self._done(events)
        if done is not None:
            return "done, no pairs" if done.get("pairs") == 0 else "done"
        last = next((e for e in reversed(events) if e["event"] not in STAGE_TIMES), {})
        stops = {"budget_stop": "budget stop", "failure_stop": "stopped: too many failed requests",
                 "interrupted": "interrupted", "crashed": "stopped by an error"}
        return f"{stops.get(last.get('event'), 'incomplete')} (resumable)"

    # -- events --------------------------------------------------------------------------------
    def event(self, kind: str, **fields: Any) -> None:
        """Append one event line. If the file ends in a torn line (no newline), end that line first, so
        the torn fragment never swallows this event."""
        if not self.writer:
            return
        row = {"time": round(time.time(), 3), "event": kind, **fields}
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "events.jsonl"
        with open(path, "ab") as f:
            if f.tell() > 0 and not _ends_with_newline(path):
                f.write(b"\n")
            f.write((json.dumps(row, default=str) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> list[dict[str, Any]]:
        path = self.root / "events.jsonl"
        return read_jsonl(path) if path.exists() else []

    def repair_events(self) -> list[int]:
        """Rewrite ``events.jsonl`` without its torn lines (a crash or a full disk during an append);
        returns their line numbers."""
        path = self.root / "events.jsonl"
        torn: list[int] = []
        if path.exists():
            rows = read_jsonl(path, torn)
            if torn:
                write_jsonl(path, rows)
        return torn

    # -- stages --------------------------------------------------------------------------------
    def round_dir(self, k: int) -> Path:
        return self.root / "rounds" / f"{k:03d}"

    def stage_path(self, k: int, name: str) -> Path:
        return self.round_dir(k) / f"{name}.jsonl"

    def has_stage(self, k: int, name: str) -> bool:
        return self.stage_path(k, name).exists()

    def rounds_with(self, name: str) -> list[int]:
        """The rounds whose stage ``name`` is on disk, in order, among the run's: each round below
        ``loop.rounds``, and at ``loop.rounds`` the final student's evaluation. A resume that cut an
        interrupted extension short (``--rounds`` back down) leaves rows beyond them that are not the run's."""
        return self._own_rounds(lambda k: self.has_stage(k, name), final=name == "eval")

    def _own_rounds(self, has: Callable[[int], bool], final: bool = False) -> list[int]:
        rounds = self.config.get("loop", {}).get("rounds")
        found = (int(p.name) for p in (self.root / "rounds").glob("*") if p.name.isdigit())
        return sorted(k for k in found if (rounds is None or k < rounds + final) and has(k))

    def read_stage(self, k: int, name: str, record: type | None = None) -> list[Any]:
        """A recorded stage's rows, as ``record`` instances when a record type is given. The file is
        written whole, so a line that is not a row, or fewer rows than its ``stage_done`` event counted,
        is damage (``StageDamaged``), not a smaller stage."""
        path, torn = self.stage_path(k, name), []
        rows = read_jsonl(path, torn)
        counted = next((e.get("rows") for e in reversed(self.events()) if e["event"] == "stage_done"
                        and e.get("round") == k and e.get("stage") == name), None)
        if torn or (counted is not None and counted != len(rows)):
            raise StageDamaged(path, f"line {torn[0]} is not a row" if torn else f"{len(rows)} rows of {counted}")
        return [from_row(record, row) for row in rows]

    def stage(self, k: int, name: str, compute: Callable[[], Sequence[Any]], record: type | None = None,
              event: Callable[[Sequence[Any]], dict[str, Any]] | None = None) -> list[Any]:
        """Run ``compute`` once per (round, stage); later calls (a resume) load its recorded rows. For stages
        computed at once (pairs); stages that work through the image set use :meth:`stream`.

        ``compute`` returns ``record`` instances (typed rows; dicts when ``record`` is None), which are
        written to ``rounds/<k>/<name>.jsonl`` atomically and read back as ``record`` again. ``event``
        adds fields to the ``stage_done`` event.
        """
        if self.has_stage(k, name):
            return self.read_stage(k, name, record)
        start = time.perf_counter()
        rows = list(compute())
        if self.writer:
            write_jsonl(self.stage_path(k, name), [to_row(row) for row in rows])
        self.event("stage_done", round=k, stage=name, rows=len(rows), seconds=round(time.perf_counter() - start, 3),
                   **(event(rows) if event else {}))
        return rows

    def record(self, k: int, name: str, rows: Sequence[Any]) -> None:
        """Write rows that describe a round's input (``rounds/<k>/<name>.jsonl``), once: not a stage, so
        no event and no time in the round summary."""
        if self.writer and not self.has_stage(k, name):
            write_jsonl(self.stage_path(k, name), [to_row(row) for row in rows])

    def partial_path(self, k: int, name: str) -> Path:
        return self.round_dir(k) / f"{name}.partial.jsonl"

    def stream(self, k: int, name: str, compute: Callable[[list[Any], Callable[[Sequence[Any]], None]], Sequence[Any]],
               record: type | None = None, event: Callable[[Sequence[Any]], dict[str, Any]] | None = None) -> list[Any]:
        """A stage that records its progress as it goes: ``compute(done, sink)`` gets the rows an earlier
        session recorded (``done``) and a ``sink`` that appends finished rows to
        ``rounds/<k>/<name>.partial.jsonl`` at once; it returns every row of the stage, in order. Then
        the stage is written like :meth:`stage`'s and the partial file removed. So a kill loses only the
        rows that were not yet given to ``sink``, and a resume continues from the rest.

        Appends are flushed to the OS at once (a killed process loses nothing flushed) and synced to
        disk at most every ``SYNC_SECONDS`` (a power cut loses at most that much).
        """
        if self.has_stage(k, name):
            return self.read_stage(k, name, record)
        if not self.writer:  # it would redo the rows an earlier session recorded, and record nothing
            raise RuntimeError(f"RunLog.stream({k}, {name!r}) on a read-only log: only the main process records "
                               "stages (the others compute their share through Parts.shared_stream)")
        partial = self.partial_path(k, name)
        done = [from_row(record, row) for row in read_jsonl(partial)] if partial.exists() else []
        partial.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with self._timed_if_stopped(k, name, start), open(partial, "ab") as f:
            if f.tell() > 0 and not _ends_with_newline(partial):
                f.write(b"\n")  # end a line torn by a kill, so the next row starts on its own
            synced = time.monotonic()

            def sink(rows: Sequence[Any]) -> None:
                nonlocal synced
                if not rows:
                    return
                f.write("".join(json.dumps(to_row(r), ensure_ascii=False, default=str) + "\n" for r in rows).encode())
                f.flush()
                if time.monotonic() - synced > SYNC_SECONDS:
                    os.fsync(f.fileno())
                    synced = time.monotonic()

            rows = list(compute(done, sink))
        write_jsonl(self.stage_path(k, name), [to_row(row) for row in rows])
        partial.unlink()
        self.event("stage_done", round=k, stage=name, rows=len(rows), resumed_rows=len(done),
                   seconds=round(time.perf_counter() - start, 3), **(event(rows) if event else {}))
        return rows

    def partial_rows(self) -> Iterator[dict[str, Any]]:
        """The rows of every stage in progress (``*.partial.jsonl``), e.g. to count the calls they paid for."""
        for path in sorted((self.root / "rounds").glob("*/*.partial.jsonl")):
            yield from read_jsonl(path)

    def checkpoint(self, k: int, name: str, compute: Callable[[], tuple[Any, Sequence[dict[str, Any]]]],
                   load: Callable[[Path], Any]) -> tuple[Any, list[dict[str, Any]]]:
        """A stage whose result is a student: ``compute`` returns ``(student, rows)``; the student is saved
        as ``student/last`` with its round. A resume after that save loads it (``load(dir)``) and the rows
        instead of training again."""
        state = self.student_state("last")
        if state and state["round"] >= k:  # crashed after this round's student was saved
            self._drop_progress(k, name)
            return load(self.student_dir("last")), self.read_stage(k, name)
        start = time.perf_counter()
        with self._timed_if_stopped(k, name, start):
            student, rows = compute()
        if not self.writer:
            return student, list(rows)
        write_jsonl(self.stage_path(k, name), rows)
        self.save_student(student, "last", {"round": k})
        self._drop_progress(k, name)
        self.event("stage_done", round=k, stage=name, rows=len(rows), seconds=round(time.perf_counter() - start, 3))
        return student, list(rows)

    def progress_path(self, k: int, name: str) -> Path:
        """Where ``compute`` of :meth:`checkpoint` may keep its progress (removed once its student is saved)."""
        return self.round_dir(k) / f"{name}.progress.pt"

    def _drop_progress(self, k: int, name: str) -> None:
        """Remove the progress file, and the temp files of saves that a kill cut short."""
        if self.writer:
            path = self.progress_path(k, name)
            for stale in [path, *path.parent.glob(f".{path.name}.*")]:
                stale.unlink(missing_ok=True)

    def keep_best(self, k: int, student, by: str, score: float) -> None:
        """Save the student entering round ``k`` (after the last round: the final one) as ``student/best``
        if its ``score`` (the measure ``by``, higher is better) beats the best so far, or the best so far
        has none by that measure. Saved before round ``k``'s update, which changes the student; a NaN
        score (every critique failed) is no score."""
        state = self.student_state("last")
        if not self.writer or (state and state["round"] >= k) or score != score:
            return
        previous = (self.student_state("best") or {}).get(by)
        if previous is None and by.startswith("eval/"):  # a run from before best was ranked so: its own rounds count
            previous = max((m[by] for m in self.metrics() if m["round"] < k and by in m), default=None)
        if previous is None or previous != previous or score > previous:
            self.save_student(student, "best", {"round": k - 1, "by": by, by: score})

    @contextlib.contextmanager
    def _timed_if_stopped(self, k: int, name: str, start: float) -> Iterator[None]:
        """A stage that resumes its progress (:meth:`stream`, :meth:`checkpoint`) and is stopped (Ctrl-C,
        an error) records the seconds it ran (``stage_stopped``), so its time counts every session."""
        try:
            yield
        except BaseException:
            self.event("stage_stopped", round=k, stage=name, seconds=round(time.perf_counter() - start, 3))
            raise

    def stage_seconds(self, k: int) -> dict[str, float]:
        """Seconds per stage of round ``k``, over every session that worked on it: the ``stage_done`` event
        of the session that finished it plus the ``stage_stopped`` events of those stopped in it (older runs
        also have ``stage_timed`` events of a stage that was not recorded)."""
        seconds: dict[str, float] = {}
        for e in self.events():
            if e["event"] in STAGE_TIMES and e.get("round") == k:
                seconds[e["stage"]] = seconds.get(e["stage"], 0.0) + e.get("seconds", 0.0)
        return seconds

    def critic_calls(self, row_calls: Callable[[dict[str, Any]], int] | None = None) -> int:
        """Critic calls paid for so far, over every session of the run (budgets survive a resume): those
        the events record, plus, with ``row_calls`` (the calls a row stands for), those of the rows in
        the partial files of stages in progress, which no event records yet."""
        partial = sum(row_calls(row) for row in self.partial_rows()) if row_calls else 0
        return sum(e.get("critic_calls", 0) for e in self.events()) + partial

    def finish_round(self, k: int, metrics: dict[str, Any]) -> None:
        if not self.writer:
            return
        write_json(self.round_dir(k) / "metrics.json", metrics)
        self.event("round_done", round=k)

    def metrics(self, final: bool = False) -> list[dict[str, Any]]:
        """Every completed round's metrics, in round order (a round's are its entering student's); with
        ``final``, the final student's held-out row (``final_eval``) after them, once the run is done."""
        own = self._own_rounds(lambda k: (self.round_dir(k) / "metrics.json").exists())
        rows = [json.loads((self.round_dir(k) / "metrics.json").read_text()) for k in own]
        return [*rows, *([last] if final and (last := self.final_eval()) else [])]

    def completed_rounds(self) -> int:
        return sum(1 for e in self.events() if e["event"] == "round_done")

    # -- checkpoints ---------------------------------------------------------------------------
    def save_student(self, student, tag: str, state: dict[str, Any]) -> Path:
        """Save atomically to ``student/<tag>``: write aside, then swap the directory in."""
        final = self.root / "student" / tag
        tmp = self.root / "student" / f".{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        student.save(tmp)
        write_json(tmp / STATE_FILE, state)
        old = self.root / "student" / f".{tag}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def student_state(self, tag: str) -> dict[str, Any] | None:
        path = self.root / "student" / tag / STATE_FILE
        if not path.exists():  # a crash between the two renames leaves the previous one as .old
            path = self.root / "student" / f".{tag}.old" / STATE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def resume_student(self) -> Path | None:
        """Where a resume's student comes from: ``student/last``, or None before any update finished (the
        run starts from ``student.model``). An update that finished must have left its student: one
        deleted, or an older copy put back, is refused, or the resume would train on from the wrong one."""
        trained = self.rounds_with("update")
        saved = (self.student_state("last") or {}).get("round")
        if trained and (saved is None or saved < trained[-1]):
            found = "is missing" if saved is None else f"is round {saved}'s"
            raise ValueError(f"--resume {self.root}: round {trained[-1]}'s update finished, but its student "
                             f"(student/last) {found}; put {self.root / 'student' / 'last'} back from a copy of the "
                             "run, or start a new run")
        return None if saved is None else self.student_dir("last")

    def student_dir(self, tag: str) -> Path:
        final = self.root / "student" / tag
        return final if final.exists() else self.root / "student" / f".{tag}.old"
