"""``python -m refine.loop --images SPEC``: caption, find regions, critique, step, pair, update, record.

Each round reads top to bottom below, in :func:`run`. The stages live in their modules; this file
only sequences them, records them through :class:`refine.runlog.RunLog`, and draws progress.

Before the run directory exists, everything that can be wrong with the input is checked and loaded:
the config, the image sets, the student, the critic, the detector. A bad input therefore costs one
clear line (exit 2) and leaves nothing behind. Once running, the run stops early, resumable, when a
budget is spent (exit 0), when too many requests fail (exit 1) or on Ctrl-C (exit 130); nothing
half-done is recorded, and ``--resume`` repeats no answered request.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from refine import stages
from refine.cache import DiskCache
from refine.config import RESUMABLE_KEYS, Config, ConfigError, apply_dict, load_config
from refine.progress import RoundTimer, console, progress_bar
from refine.runlog import RunLog


class RunStopped(Exception):
    """The run stopped before its end and can be resumed. ``code`` is the exit status for the shell."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class Parts:
    """Everything a run needs, loaded (and so checked) before its directory is created."""

    records: list
    eval_records: list
    student: Any
    critic: Any
    apply_step: Any
    detector: Any
    notes: list[str] = field(default_factory=list)


def run(argv: list[str] | None = None) -> RunLog:
    config, args = load_config(argv)
    if args.resume:
        log, config, changes = _reopen(config, args)
        if log.is_done():
            console.print(f"{escape(str(log.root))} is complete; nothing to resume.")
            return log
    else:
        config.loop.run_id = config.loop.run_id or (
            f"{datetime.now():%Y%m%d-%H%M%S}-{Path(config.loop.images).name.replace(':', '-')}")
        RunLog.check_new(config.loop.runs_dir, config.loop.run_id)
        log, changes = None, {}
    parts = _load_parts(config, log)
    for note in parts.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if log is None:
        log = RunLog.create(config.loop.runs_dir, config.loop.run_id, config.to_json())
    else:
        torn = log.repair_events()
        if torn:
            console.print(f"[yellow]warning:[/] {escape(str(log.root))}/events.jsonl: dropped {len(torn)} torn "
                          f"line(s) (line {', '.join(map(str, torn))}), left by a crash or a full disk")
        if changes:
            log.write_config(config.to_json())
        log.event("resume", completed_rounds=log.completed_rounds(), changes=changes)
    try:
        _rounds(log, config, parts)
    except KeyboardInterrupt:
        log.event("interrupted", completed_rounds=log.completed_rounds())
        raise RunStopped("Interrupted. Nothing half-done was recorded. Continue with: "
                         f"python -m refine.loop --resume {log.root}", 130) from None
    except stages.TooManyFailures as stop:
        log.event("failure_stop", stage=stop.stage, failures=stop.failures, total=stop.total,
                  first_error=stop.first_error, critic_calls=stop.critic_calls)
        raise RunStopped(f"Stopped: {stop}. More than loop.max_failure_share={config.loop.max_failure_share} "
                         "of the round failed; finished answers are cached. Fix the cause, then continue with: "
                         f"python -m refine.loop --resume {log.root} (settings such as --critic.base_url=URL or "
                         "--critic.timeout=S may change on resume)", 1) from None
    return log


def _rounds(log: RunLog, config: Config, parts: Parts) -> None:
    from refine import dpo, regions
    from refine.evaluate import evaluate
    from refine.runs import render_round

    loop, records, student = config.loop, parts.records, parts.student
    images = {r.id: r.image for r in records}
    region_cache = DiskCache(namespace="regions")
    budget_used = sum(e.get("critic_calls", 0) for e in log.events())

    for k in range(log.completed_rounds(), loop.rounds):
        timer = RoundTimer()
        with timer("eval"):
            evaluation = log.stage(k, "eval", lambda: evaluate(student, parts.eval_records, config.student))[0] \
                if parts.eval_records else []
        torch.manual_seed(loop.seed * 1_000_003 + k)  # sampled captions: reproducible per (seed, round)
        with timer("caption"), progress_bar("caption", len(records)) as advance:
            captions, _ = log.stage(k, "captions", lambda: stages.caption(student, records, config.student, advance))
        with timer("regions"):
            found = {r.image_id: r for r in regions.find(records, parts.detector, config.regions, region_cache)} \
                if parts.detector else {}
        with timer("critique"), progress_bar("critique", len(records) * (1 + config.student.n_samples)) as advance:
            budget = loop.max_critic_calls - budget_used if loop.max_critic_calls else None
            try:
                critiques, calls = _critique_stage(log, k, parts.critic, records, captions, found, budget, advance,
                                                   loop.max_failure_share)
            except stages.BudgetExhausted as stop:
                log.event("budget_stop", round=k, critic_calls=stop.calls)
                console.print(f"[yellow]Critic-call budget reached[/] ({loop.max_critic_calls}). Continue with: "
                              f"python -m refine.loop --resume {escape(str(log.root))} --max-critic-calls N")
                return
            budget_used += calls
        with timer("step"):
            refined, _ = log.stage(k, "refined", lambda: stages.refine_captions(
                captions, critiques, parts.apply_step, loop.refine_samples, loop.max_failure_share))
        pairs, _ = log.stage(k, "pairs", lambda: stages.build_pairs(captions, critiques, refined, loop.pair_sources,
                                                                    loop.swap_pairs))
        _save_if_best(log, k, student, critiques)
        with timer("update"):
            student, history = _update_stage(log, k, student, pairs, images, config.update, dpo)
        metrics = stages.summarize_round(k, records, captions, critiques, refined, pairs, history, evaluation)
        metrics.update(timer.seconds())
        log.write_metrics(k, metrics)
        log.event("round_done", round=k)
        render_round(metrics)
        if not pairs:
            console.print(f"[yellow]round {k}: no preference pairs[/] (no critique led to a different caption), "
                          "so the student did not change this round")
    if parts.eval_records and not log.has_stage(loop.rounds, "eval"):
        log.stage(loop.rounds, "eval", lambda: evaluate(student, parts.eval_records, config.student))
    pairs_made = sum(m.get("pairs/total", 0) for m in log.metrics())
    log.event("run_done", pairs=pairs_made)
    if pairs_made == 0 and loop.rounds > 0:
        console.print("[yellow]The run made no preference pairs in any round, so the student is unchanged.[/] "
                      "See why in: python -m refine.runs show " + escape(log.root.name))
    console.print(f"Run written to [bold]{escape(str(log.root))}[/]. Inspect: python -m refine.runs show "
                  f"{escape(log.root.name)}")


def _reopen(cli: Config, args) -> tuple[RunLog, Config, dict[str, list]]:
    """The run to resume and its config, with the command line's safe overrides applied.

    An override that would change what the run computes is refused with the key named; a safe one
    (``RESUMABLE_KEYS``: endpoint, concurrency, timeouts, budget) is applied and returned as
    ``{key: [old, new]}`` for the resume event. Overrides equal to the stored value change nothing.
    """
    log = RunLog.open(args.resume, cli.loop.runs_dir)
    config = apply_dict(Config(), log.config, source=f"{log.root}/config.json")
    changes: dict[str, list] = {}
    for key in args.overrides:
        if key == "loop.runs_dir":  # where to find the run, not a setting of it
            continue
        section, name = key.split(".", 1)
        old, new = getattr(getattr(config, section), name), getattr(getattr(cli, section), name)
        if old == new:
            continue
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"--resume {args.resume}: {key} cannot change when a run is resumed (the run has "
                              f"{old!r}, the command gives {new!r}); only {', '.join(sorted(RESUMABLE_KEYS))} can. "
                              "Start a new run to change it")
        setattr(getattr(config, section), name, new)
        changes[key] = [old, new]
    return log, config.validate(), changes


def _load_parts(config: Config, log: RunLog | None) -> Parts:
    """Load and check every input of the run; raises (ValueError / OSError) before anything is written.
    The cheap checks come first, the student (the slowest load) last."""
    from critics import make_critic
    from refine import regions
    from refine.images import load_images
    from refine.student import load_student

    loop = config.loop
    records, notes = load_images(loop.images, loop.coco_root or None)
    eval_records = load_images(loop.eval_images)[0] if loop.eval_images else []
    critic = make_critic(config.critic, labels={label for r in records for label in (r.objects or {})})
    apply_step = stages.make_step(config.critic, config.step)
    detector = regions.load_detector(config.regions.model) if _wants_regions(loop, records) else None
    state = log.student_state("last") if log is not None else None
    source = log.student_dir("last") if state else config.student.model
    cfg = config.student
    student = load_student(source, cfg.device, cfg.precision, cfg.static_cache)
    return Parts(records, eval_records, student, critic, apply_step, detector, notes)


def _wants_regions(loop, records) -> bool:
    if not loop.use_regions:
        return False
    if loop.images.startswith("shapes"):
        console.print("regions: skipped — no detector exists for the synthetic shapes world; "
                      "the grounded critic reads the scene annotations instead")
        return False
    return True


def _critique_stage(log, k, critic, records, captions, found, budget, advance, max_failure_share):
    """Recorded like any stage; its call count goes into the event so budgets survive a resume."""
    if log.has_stage(k, "critiques"):
        return log.read_stage(k, "critiques"), 0
    import time

    start = time.perf_counter()
    rows, calls = stages.critique(critic, records, captions, found, budget, progress=advance,
                                  max_failure_share=max_failure_share)
    from refine.runlog import write_jsonl

    write_jsonl(log.stage_path(k, "critiques"), rows)
    log.event("stage_done", round=k, stage="critiques", rows=len(rows), critic_calls=calls,
              seconds=round(time.perf_counter() - start, 3))
    return rows, calls


def _update_stage(log, k, student, pairs, images, update_config, dpo):
    """DPO against the round's starting student; the result is checkpointed as ``student/last``."""
    from refine.pairs import PreferencePair
    from refine.student import load_student

    state = log.student_state("last")
    if state and state["round"] >= k:  # crashed after this round's update was saved
        return (load_student(log.student_dir("last"), student.device.type, student.precision, student.static_cache),
                log.read_stage(k, "update"))
    # In place: this round's starting student is already on disk (student/last, or the configured model).
    policy, history = dpo.update(student, [PreferencePair(**p) for p in pairs], images, update_config, in_place=True)
    from refine.runlog import write_jsonl

    write_jsonl(log.stage_path(k, "update"), history)
    log.save_student(policy, "last", {"round": k})
    return policy, history


def _save_if_best(log: RunLog, k: int, student, critiques) -> None:
    """Round k's mean critic score rates the student that entered round k: keep the best one."""
    state = log.student_state("last")
    if state and state["round"] >= k:  # resumed after this round's update: that student is gone
        return
    mean = stages.mean_score(critiques)
    best = log.student_state("best")
    if best is None or mean > best["critic/mean_score"]:
        log.save_student(student, "best", {"round": k - 1, "critic/mean_score": mean})


@contextmanager
def _second_interrupt_exits() -> Iterator[None]:
    """The first Ctrl-C raises ``KeyboardInterrupt`` (the run records it and stops within seconds);
    a second one exits at once."""
    presses = 0

    def handler(signum, frame):
        nonlocal presses
        presses += 1
        if presses > 1:
            os._exit(130)
        console.print("[yellow]Stopping: queued requests cancelled, nothing half-done is recorded "
                      "(press Ctrl-C again to quit at once) …[/]")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_now(code: int) -> None:
    """Exit without joining the threads of abandoned requests (their answers would arrive too late)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    with _second_interrupt_exits():
        try:
            run(argv)
        except RunStopped as stop:
            console.print(("[red]" if stop.code != 130 else "[yellow]") + escape(str(stop)) + "[/]", soft_wrap=True)
            if stop.code == 130:
                _exit_now(130)
            return stop.code
        except KeyboardInterrupt:
            console.print("[yellow]Interrupted before the run started; nothing was written.[/]")
            _exit_now(130)
        except (ValueError, OSError, KeyError) as e:
            console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)  # one line, however long
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
