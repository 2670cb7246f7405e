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

from rich.markup import escape

from refine.config import RESUMABLE_KEYS, Config, ConfigError, apply_dict, load_config
from refine.images import ImageSet, load_images
from refine.infra.cache import DiskCache
from refine.infra.progress import RoundProgress, console
from refine.infra.runlog import RunLog
from refine.metrics.summary import mean_score, summarize_round
from refine.runs import render_round
from refine.stages.critique import BudgetExhausted, CritiqueRow, TooManyFailures, critic_calls, critique
from refine.stages.dpo import update
from refine.stages.pairs import PreferencePair, build_pairs, to_verify
from refine.stages.regions import find
from refine.stages.step import Refinement, TextualStep, make_step
from refine.stages.student import CaptionSet, EvalCaption, caption, evaluate, load_student


class RunStopped(Exception):
    """The run stopped before its end and can be resumed. ``code`` is the exit status for the shell."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class Parts:
    """Everything a run needs, loaded (and so checked) before its directory is created."""

    images: ImageSet
    eval_images: ImageSet | None
    student: Any
    critic: Any
    step: TextualStep
    detector: Any
    config: Config
    region_cache: DiskCache = field(default_factory=lambda: DiskCache(namespace="regions"))

    def reload_student(self, path: Path):
        cfg = self.config.student
        return load_student(path, cfg.device, cfg.precision, cfg.static_cache)


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
    for note in parts.images.notes:
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
    except BudgetExhausted as stop:
        log.event("budget_stop", round=log.completed_rounds(), critic_calls=stop.calls)
        console.print(f"[yellow]Critic-call budget reached[/] ({config.loop.max_critic_calls}). Continue with: "
                      f"python -m refine.loop --resume {escape(str(log.root))} --max-critic-calls N")
    except KeyboardInterrupt:
        log.event("interrupted", completed_rounds=log.completed_rounds())
        raise RunStopped("Interrupted. Nothing half-done was recorded. Continue with: "
                         f"python -m refine.loop --resume {log.root}", 130) from None
    except TooManyFailures as stop:
        log.event("failure_stop", stage=stop.stage, failures=stop.failures, total=stop.total,
                  first_error=stop.first_error, critic_calls=stop.critic_calls)
        raise RunStopped(f"Stopped: {stop}. More than loop.max_failure_share={config.loop.max_failure_share} "
                         "of the round failed; finished answers are cached. Fix the cause, then continue with: "
                         f"python -m refine.loop --resume {log.root} (settings such as --critic.base_url=URL or "
                         "--critic.timeout=S may change on resume)", 1) from None
    return log


def _rounds(log: RunLog, config: Config, parts: Parts) -> None:
    """The rounds: caption, find regions, critique, step, build pairs, update, score, record."""
    loop, cfg, records, student = config.loop, config.student, parts.images.records, parts.student
    vocab, pixels = parts.images.vocabulary(), {r.id: r.image for r in records}
    for k in range(log.completed_rounds(), loop.rounds):
        with RoundProgress() as bars:
            evaluation = log.stage(k, "eval", lambda: evaluate(student, parts.eval_images.records, cfg), EvalCaption) \
                if parts.eval_images else []
            captions = log.stage(k, "captions", lambda: caption(student, records, cfg, loop.seed * 1_000_003 + k,
                                                                bars.add("caption", len(records))), CaptionSet)
            regions = log.stage(k, "regions", lambda: find(records, parts.detector, config.regions, parts.region_cache),
                               persist=False) \
                if parts.detector else []
            critiques = log.stage(k, "critiques", lambda: critique(
                parts.critic, records, captions, {r.image_id: r for r in regions}, _budget_left(log, loop),
                progress=bars.add("critique", len(records) * (1 + cfg.n_samples) * config.critic.samples),
                max_failure_share=loop.max_failure_share, samples=config.critic.samples), CritiqueRow, _paid)
            refined = log.stage(k, "refined", lambda: parts.step.refine(captions, critiques, loop.refine_samples,
                                                                        loop.max_failure_share), Refinement)
            verified = log.stage(k, "verify", lambda: critique(
                parts.critic, records, to_verify(refined), {r.image_id: r for r in regions}, _budget_left(log, loop),
                max_failure_share=loop.max_failure_share), CritiqueRow, _paid) if loop.verify_refinements else None
            pairs = log.stage(k, "pairs", lambda: build_pairs(captions, critiques, refined, loop.pair_sources,
                                                              loop.swap_pairs, verified), PreferencePair)
            log.keep_best(k, student, mean_score(critiques))
            student, history = log.checkpoint(k, "update", lambda: update(student, pairs, pixels, config.update,
                                                                          in_place=True), parts.reload_student)
        metrics = summarize_round(k, records, captions, critiques, refined, pairs, history, evaluation, vocab,
                                  log.stage_seconds(k), verified)
        log.finish_round(k, metrics)
        render_round(metrics)
        if not pairs:
            console.print(f"[yellow]round {k}: no preference pairs[/] (no critique led to a different caption), "
                          "so the student did not change this round")
    if parts.eval_images and not log.has_stage(loop.rounds, "eval"):
        log.stage(loop.rounds, "eval", lambda: evaluate(student, parts.eval_images.records, cfg), EvalCaption)
    pairs_made = sum(m.get("pairs/total", 0) for m in log.metrics())
    log.event("run_done", pairs=pairs_made)
    if pairs_made == 0 and loop.rounds > 0:
        console.print("[yellow]The run made no preference pairs in any round, so the student is unchanged.[/] "
                      "See why in: python -m refine.runs show " + escape(log.root.name))
    console.print(f"Run written to [bold]{escape(str(log.root))}[/]. Inspect: python -m refine.runs show "
                  f"{escape(log.root.name)}")


def _paid(rows) -> dict[str, int]:
    """The event fields of a stage that asks the critic: the calls it paid for (budgets survive resumes)."""
    return {"critic_calls": critic_calls(rows)}


def _budget_left(log: RunLog, loop) -> int | None:
    """Critic calls this stage may still make (None: no budget), counted over every session of the run."""
    return loop.max_critic_calls - log.critic_calls() if loop.max_critic_calls else None


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
    from refine.stages.regions import load_detector

    loop = config.loop
    images = load_images(loop.images, loop.coco_root or None)
    eval_images = load_images(loop.eval_images) if loop.eval_images else None
    critic = make_critic(config.critic, vocabulary=images.vocabulary(), max_words=config.step.max_words)
    step = make_step(config.critic, config.step, images.vocabulary() if loop.pair_gate else None, loop.min_agreement)
    if loop.use_regions and not images.detectable:
        console.print(f"regions: skipped — no detector exists for the image set {escape(loop.images)}")
    detector = load_detector(config.regions.model) if loop.use_regions and images.detectable else None
    source = log.student_dir("last") if log is not None and log.student_state("last") else config.student.model
    cfg = config.student
    student = load_student(source, cfg.device, cfg.precision, cfg.static_cache)
    return Parts(images, eval_images, student, critic, step, detector, config)


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
