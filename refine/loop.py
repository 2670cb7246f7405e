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
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.markup import escape

from refine.config import RESUMABLE_KEYS, Config, ConfigError, apply_dict, load_config
from refine.images import ImageSet, load_images, world_of
from refine.infra.cache import DiskCache
from refine.infra.progress import RoundProgress, console
from refine.infra.runlog import RunLog
from refine.metrics.summary import mean_score, summarize_round
from refine.runs import render_round
from refine.stages.critique import BudgetExhausted, CritiqueRow, Spend, TooManyFailures, critique
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
    spend: Spend = field(default_factory=lambda: Spend(None))  # the paid calls against the budget
    region_cache: DiskCache = field(default_factory=lambda: DiskCache(namespace="regions"))

    def paid(self, rows) -> dict[str, int]:
        """The event fields of a stage that pays for requests: its calls, now counted as spent."""
        return {"critic_calls": self.spend.settle()}

    def reload_student(self, path: Path):
        cfg = self.config.student
        return load_student(path, cfg.device, cfg.precision, cfg.static_cache)


def run(argv: list[str] | None = None) -> RunLog:
    config, args = load_config(argv)
    with ExitStack() as held:
        if args.resume:
            log, config, changes = _reopen(config, args)
            held.enter_context(log.lock())
            if log.is_done():
                console.print(f"{escape(str(log.root))} is complete; nothing to resume.")
                return log
        else:
            config.loop.run_id = config.loop.run_id or (
                f"{datetime.now():%Y%m%d-%H%M%S}-{Path(config.loop.images).name.replace(':', '-')}")
            absolute_paths(config)
            RunLog.check_new(config.loop.runs_dir, config.loop.run_id)
            log, changes = None, {}
        parts = _load_parts(config, log)
        for note in parts.images.notes:
            console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
        if log is None:
            log = RunLog.create(config.loop.runs_dir, config.loop.run_id, config.to_json())
            held.enter_context(log.lock())
        else:
            torn = log.repair_events()
            if torn:
                console.print(f"[yellow]warning:[/] {escape(str(log.root))}/events.jsonl: dropped {len(torn)} torn "
                              f"line(s) (line {', '.join(map(str, torn))}), left by a crash or a full disk")
            if changes:
                log.write_config(config.to_json())
            log.event("resume", completed_rounds=log.completed_rounds(), changes=changes)
        _run_rounds(log, config, parts)
    return log


def _run_rounds(log: RunLog, config: Config, parts: Parts) -> None:
    """The rounds, and how a run that does not finish stops: each stop is an event, and resumable."""
    resume = f"python -m refine.loop --resume {log.root}"
    try:
        _rounds(log, config, parts)
    except BudgetExhausted as stop:
        log.event("budget_stop", round=log.completed_rounds(), critic_calls=parts.spend.settle())
        console.print(f"[yellow]Critic-call budget reached[/] ({stop}; {parts.spend.spent} of "
                      f"{config.loop.max_critic_calls} calls spent over the whole run). Continue with a larger "
                      f"total: {escape(resume)} --max-critic-calls N", soft_wrap=True)
    except KeyboardInterrupt:
        log.event("interrupted", completed_rounds=log.completed_rounds(), critic_calls=parts.spend.settle())
        raise RunStopped(f"Interrupted. Nothing half-done was recorded. Continue with: {resume}", 130) from None
    except TooManyFailures as stop:
        log.event("failure_stop", stage=stop.stage, failures=stop.failures, total=stop.total,
                  first_error=stop.first_error, critic_calls=parts.spend.settle())
        raise RunStopped(f"Stopped: {stop}. More than loop.max_failure_share={config.loop.max_failure_share} "
                         "of the round failed; finished answers are cached. Fix the cause, then continue with: "
                         f"{resume} (settings such as --critic.base_url=URL or --critic.timeout=S may change on "
                         "resume)", 1) from None
    except Exception as e:  # anything else mid-run: not an input error; keep what finished, say where to look
        trace = log.root / "crash.log"
        trace.write_text(traceback.format_exc())
        log.event("crashed", completed_rounds=log.completed_rounds(), error=f"{type(e).__name__}: {e}",
                  critic_calls=parts.spend.settle())
        raise RunStopped(f"Stopped by an error: {type(e).__name__}: {e}. Finished stages are kept; the traceback "
                         f"is in {trace}. Fix the cause, then continue with: {resume}", 1) from e


def absolute_paths(config: Config) -> None:
    """Store file paths absolute, so a resume or a score from another directory finds the same files."""
    def absolute(value: str) -> str:
        if not value or world_of(value) or value == "coco_val10":
            return value
        if Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        if any(ch in value for ch in "*?[") and not Path(value).is_absolute():  # a glob
            return str(Path.cwd() / value)
        return value  # a hub id, or a name ultralytics resolves

    loop = config.loop
    loop.images, loop.eval_images = absolute(loop.images), absolute(loop.eval_images)
    loop.coco_root = absolute(loop.coco_root)
    config.student.model, config.regions.model = absolute(config.student.model), absolute(config.regions.model)
    loop.runs_dir = str(Path(loop.runs_dir).expanduser().resolve())


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
                parts.critic, records, captions, {r.image_id: r for r in regions}, parts.spend,
                progress=bars.add("critique", len(records) * (1 + cfg.n_samples) * config.critic.samples),
                max_failure_share=loop.max_failure_share, samples=config.critic.samples), CritiqueRow, parts.paid)
            refined = log.stage(k, "refined", lambda: parts.step.refine(
                captions, critiques, loop.refine_samples, loop.max_failure_share, parts.spend), Refinement, parts.paid)
            verified = log.stage(k, "verify", lambda: critique(
                parts.critic, records, to_verify(refined), {r.image_id: r for r in regions}, parts.spend,
                max_failure_share=loop.max_failure_share), CritiqueRow, parts.paid) if loop.verify_refinements else None
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
                      "See why in: python -m refine.runs show " + escape(str(log.root)), soft_wrap=True)
    console.print(f"Run written to [bold]{escape(str(log.root))}[/]. Inspect: python -m refine.runs show "
                  f"{escape(str(log.root))}", soft_wrap=True)


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
    eval_images = load_images(loop.eval_images, flag="--loop.eval_images") if loop.eval_images else None
    if log is not None and log.has_stage(0, "captions"):
        gone = sorted({r["image_id"] for r in log.read_stage(0, "captions")} - {r.id for r in images.records})
        if gone:
            raise ValueError(f"--resume {log.root}: {len(gone)} image(s) of the run are no longer in {loop.images} "
                             f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}); restore them, or start a new run")
    critic = make_critic(config.critic, vocabulary=images.vocabulary(), max_words=config.step.max_words)
    step = make_step(config.critic, config.step, images.vocabulary() if loop.pair_gate else None, loop.min_agreement)
    if loop.use_regions and not images.detectable:
        console.print(f"regions: skipped — no detector exists for the image set {escape(loop.images)}")
    detector = load_detector(config.regions.model) if loop.use_regions and images.detectable else None
    source = log.student_dir("last") if log is not None and log.student_state("last") else config.student.model
    cfg = config.student
    student = load_student(source, cfg.device, cfg.precision, cfg.static_cache)
    if student.positions and cfg.max_new_tokens >= student.positions:
        raise ConfigError(f"student.max_new_tokens={cfg.max_new_tokens}: the student's decoder holds "
                          f"{student.positions} tokens, the start token included; use at most {student.positions - 1}")
    spend = Spend(loop.max_critic_calls or None, log.critic_calls() if log is not None else 0)
    return Parts(images, eval_images, student, critic, step, detector, config, spend)


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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-checkpoint "Loading weights" / "Writing model shards" bars: noise here
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
