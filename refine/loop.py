"""``python -m refine.loop --images SPEC``: caption, find regions, critique, step, pair, update, record.

Each round reads top to bottom below, in :func:`_each_round`. The stages live in their modules; this file
only sequences them, records them through :class:`refine.infra.runlog.RunLog`, and draws progress.

Before the run directory exists, everything that can be wrong with the input is checked and loaded:
the config, the image sets, the student, the critic, the detector. A bad input therefore costs one
clear line (exit 2) and leaves nothing behind. Once running, the run stops early, resumable, when a
budget is spent (exit 0), when too many requests fail (exit 1) or on Ctrl-C (exit 130). Stages record
their finished rows as they go (``RunLog.stream``), so a stop or a kill loses only the work in
flight, and ``--resume`` repeats no answered request.
"""

from __future__ import annotations

import os
import shlex
import sys
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.markup import escape

from refine.cli import absolute_paths, check_effect, default_run_id, load_config
from refine.config import RESUMABLE_KEYS, Config, ConfigError, apply_dict
from refine.images import ImageSet, load_images, round_images
from refine.infra.cache import DiskCache, check_caches
from refine.infra.distributed import Ranks
from refine.infra.interrupts import exit_now, run_stoppable, stop_between_steps
from refine.infra.progress import RoundProgress, console
from refine.infra.runlog import RunLog, to_row
from refine.infra.trackers import Trackers
from refine.infra.trackers import parse as parse_trackers
from refine.metrics.summary import mean_score, metrics_of_rows, summarize_round
from refine.runs import render_round, round_notes
from refine.stages.critique import BudgetExhausted, CritiqueRow, Spend, TooManyFailures, critique, row_calls
from refine.stages.dpo import update
from refine.stages.lora import targets as lora_targets
from refine.stages.lost import gone_since, lost_metrics, readable_pairs, readable_rows
from refine.stages.pairs import PreferencePair, build_pairs, to_verify, verdicts, verification_counts
from refine.stages.regions import RegionRow, find, regions_stage
from refine.stages.step import Refinement, TextualStep, make_step
from refine.stages.student import CaptionSet, EvalCaption, caption, evaluate, load_student
from refine.stages.update_state import UpdateSaves


class RunStopped(Exception):
    """The run stopped before its end and can be resumed. ``code`` is the exit status for the shell."""

    def __init__(self, message: str, code: int, resume: str = ""):
        super().__init__(message)
        self.code, self.resume = code, resume  # resume: the command the message gives to continue, if any


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
    ranks: Ranks = field(default_factory=Ranks)  # this process's place in a data-parallel launch
    trackers: list[str] = field(default_factory=list)  # loop.log_with, checked

    def shared_stream(self, log: RunLog, k: int, name: str, compute, record: type) -> list:
        """A stage every process computes a share of (captions, eval). The main process records it; the
        others learn from it which rows an earlier session recorded, so all cut the same todo."""
        ranks = self.ranks
        if ranks.world == 1:
            return log.stream(k, name, compute, record)
        if ranks.main:
            if log.has_stage(k, name):
                ranks.broadcast(None)
                return log.read_stage(k, name, record)

            def run(done, sink):
                ranks.broadcast([r.image_id for r in done])
                return compute(done, sink)

            return log.stream(k, name, run, record)
        ids = ranks.broadcast(None)
        return [] if ids is None else compute([SimpleNamespace(image_id=i) for i in ids], lambda rows: None)

    def paid_stream(self, log: RunLog, k: int, name: str, compute, record: type) -> list:
        """A streaming stage that pays for requests (critiques, steps, verification). Calls of rows an
        earlier session recorded were counted when this session started (from the partial file); the
        ``stage_done`` event records them with this session's, and the partial file then goes."""
        carried = 0

        def run(done, sink):
            nonlocal carried
            carried = sum(row_calls(to_row(r)) for r in done)

            def recorded(rows):
                sink(rows)
                self.spend.recorded += sum(row_calls(to_row(r)) for r in rows)

            return compute(done, recorded)

        return log.stream(k, name, run, record, lambda rows: {"critic_calls": carried + self.spend.settle()})

    def readable_stream(self, log: RunLog, k: int, name: str, compute, record: type, records: list,
                        lost: dict[str, str]) -> list:
        """A shared stage that gives no row to an image it cannot read (its reason goes into ``lost``):
        too many without one stop the run before the stage is recorded as done, so a resume reads them
        again (:func:`refine.stages.lost.readable_rows`)."""
        share, stage = self.config.loop.max_failure_share, {"eval": "held-out captions"}.get(name, name)
        rows = self.shared_stream(log, k, name, lambda done, sink: readable_rows(
            compute(done, sink), records, lost, share, stage), record)
        return readable_rows(rows, records, lost)  # a stage recorded before may name images gone since

    def held_out(self, log: RunLog, k: int, student, lost: dict[str, str]) -> list[EvalCaption]:
        """The eval stage of the student entering round ``k``."""
        records, cfg = self.eval_images.records, self.config.student
        return self.readable_stream(log, k, "eval", lambda done, sink: evaluate(
            student, records, cfg, done, sink, self.ranks, lost), EvalCaption, records, lost)

    def regions_for(self, record):
        """The regions stage for one image (detections cached on disk), or None without a detector."""
        return None if self.detector is None else find([record], self.detector, self.config.regions,
                                                        self.region_cache)[0]

    def keep_best(self, log: RunLog, k: int, student, critiques: list, evaluation: list) -> None:
        """Offer the student entering round ``k`` (or the final one) as ``student/best``: ranked by held-out
        exact match if the held-out images are annotated (evaluated students only), else by the mean critic
        score of its captions in round ``k``."""
        if self.eval_images is None or all(r.objects is None for r in self.eval_images.records):
            if critiques:
                log.keep_best(k, student, "critic/mean_score", mean_score(critiques))
        elif (exact := metrics_of_rows(evaluation, self.images.vocabulary()).get("exact")) is not None:
            log.keep_best(k, student, "eval/exact", exact)

    def reload_student(self, path: Path):
        cfg = self.config.student
        return load_student(path, _device(cfg.device, self.ranks), cfg.precision, cfg.static_cache)


def run(argv: list[str] | None = None) -> RunLog:
    """A run, or its resume. Under ``accelerate launch`` / ``torchrun`` every process runs this: all
    check the input alike (a bad one fails everywhere before anything is written), the main process
    alone writes the run directory and talks to the critic, and all share captioning and the update."""
    config, args = load_config(argv)
    ranks = Ranks.from_env()
    with ExitStack() as held:
        if args.resume:
            log, config, changes = _reopen(config, args)
            log.writer = ranks.main
            if ranks.main:
                held.enter_context(log.lock())
            if log.is_done() and config.loop.rounds <= log.completed_rounds():  # more rounds continue it
                if ranks.main:
                    console.print(f"{escape(str(log.root))} is complete; nothing to resume (--rounds N takes it on for more rounds).")
                return log
        else:
            config.loop.run_id = ranks.broadcast(config.loop.run_id or default_run_id(config.loop.images))
            absolute_paths(config)
            RunLog.check_new(config.loop.runs_dir, config.loop.run_id)  # every process: a bad one fails everywhere
            log, changes = None, {}
        parts = _load_parts(config, log, ranks)
        if log is None:
            if ranks.main:
                log = RunLog.create(config.loop.runs_dir, config.loop.run_id, config.to_json())
                held.enter_context(log.lock())
            ranks.barrier()  # the others open the run once it exists
            if not ranks.main:
                log = RunLog(Path(config.loop.runs_dir) / config.loop.run_id, writer=False)
        elif ranks.main:
            torn = log.repair_events()
            if torn:
                console.print(f"[yellow]warning:[/] {escape(str(log.root))}/events.jsonl: dropped {len(torn)} torn "
                              f"line(s) (line {', '.join(map(str, torn))}), left by a crash or a full disk")
            if changes:
                log.write_config(config.to_json())
            log.event("resume", completed_rounds=log.completed_rounds(), changes=changes)
            console.print(f"resuming {escape(str(log.root))}: {log.completed_rounds()} of {config.loop.rounds} "
                          "round(s) done" + "".join(f"; {key} {old!r} → {new!r}" for key, (old, new) in changes.items()),
                          soft_wrap=True)
        _run_rounds(log, config, parts)
    return log


def _run_rounds(log: RunLog, config: Config, parts: Parts) -> None:
    """The rounds, and how a run that does not finish stops: each stop is an event, and resumable."""
    resume = f"python -m refine.loop --resume {shlex.quote(str(log.root))}"
    try:
        _rounds(log, config, parts)
    except RunStopped:  # another process's stop, relayed by the main one
        raise
    except BudgetExhausted as stop:
        log.event("budget_stop", round=log.completed_rounds(), critic_calls=parts.spend.settle_stop())
        console.print(f"[yellow]Critic-call budget reached[/] ({stop}; {parts.spend.spent} of "
                      f"{config.loop.max_critic_calls} calls spent over the whole run). Continue with a larger "
                      f"total: {escape(resume)} --max-critic-calls N", soft_wrap=True)
    except KeyboardInterrupt:
        log.event("interrupted", completed_rounds=log.completed_rounds(), critic_calls=parts.spend.settle_stop())
        said = f"Interrupted. Finished work is recorded. Continue with: {resume}" if parts.ranks.main else ""
        raise RunStopped(said, 130, resume) from None  # Ctrl-C reaches every process: one says it
    except TooManyFailures as stop:
        log.event("failure_stop", stage=stop.stage, failures=stop.failures, total=stop.total,
                  first_error=stop.first_error, critic_calls=parts.spend.settle_stop())
        raise RunStopped(f"Stopped: {stop}. More than loop.max_failure_share={config.loop.max_failure_share} "
                         "of the round failed; finished answers are cached. Fix the cause, then continue with: "
                         f"{resume} (settings such as --critic.base_url=URL or --critic.timeout=S may change on "
                         "resume)", 1, resume) from None
    except Exception as e:  # anything else mid-run: not an input error; keep what finished, say where to look
        trace = log.root / "crash.log"
        if log.writer:
            trace.write_text(traceback.format_exc())
        log.event("crashed", completed_rounds=log.completed_rounds(), error=f"{type(e).__name__}: {e}",
                  critic_calls=parts.spend.settle_stop())
        hint = getattr(e, "hint", "Fix the cause, then continue with: {resume}").format(resume=resume)  # UpdateDiverged's
        raise RunStopped(f"Stopped by an error: {type(e).__name__}: {e}. Finished stages are kept; the traceback "
                         f"is in {trace}. {hint}", 1, resume) from e


def _rounds(log: RunLog, config: Config, parts: Parts) -> None:
    """The rounds: caption, find regions, critique, step, build pairs, update, score, record.

    In a data-parallel run every process captions its share and trains; the main process alone asks
    the critic (regions, critiques, steps, pairs) while the others wait for its pairs.
    """
    loop, student, ranks = config.loop, parts.student, parts.ranks
    vocab, pixels = parts.images.vocabulary(), parts.images.pixels()
    trackers = Trackers(parts.trackers if ranks.main else [], log.root.name, log.root, config.to_json())
    try:
        student = _each_round(log, config, parts, student, vocab, pixels, trackers)
    finally:
        trackers.finish()
    lost: dict[str, str] = {}
    final = parts.held_out(log, loop.rounds, student, lost) if parts.eval_images else []
    if not ranks.main:
        return
    pairs_made = sum(m.get("pairs/total", 0) for m in log.metrics())
    # the final student's held-out metrics: no round summary holds them (a round's are its entering student's)
    held_out = {f"eval/{key}": value for key, value in metrics_of_rows(final, vocab).items()}
    parts.keep_best(log, loop.rounds, student, [], final)
    log.event("run_done", pairs=pairs_made, **({"eval": held_out} if held_out else {}))
    if held_out:
        console.print("held-out, the final student: " + ", ".join(
            f"{name} {held_out[f'eval/{key}']:.3f}" for key, name in FINAL_EVAL if f"eval/{key}" in held_out),
            soft_wrap=True)
    if lost:
        console.print(f"[yellow]note:[/] {len(lost)} held-out image(s) could not be read and are not in these "
                      f"metrics (the first: {escape(next(iter(lost.values())))})", soft_wrap=True)
    if pairs_made == 0 and loop.rounds > 0:
        console.print("[yellow]The run made no preference pairs in any round, so the student is unchanged.[/] "
                      "See why in: python -m refine.runs show " + escape(shlex.quote(str(log.root))), soft_wrap=True)
    root = escape(shlex.quote(str(log.root)))
    console.print(f"Run written to [bold]{escape(str(log.root))}[/]. Inspect: python -m refine.runs show {root}; "
                  f"the report: python -m refine.report {root}", soft_wrap=True)


FINAL_EVAL = [("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"), ("recall", "recall"), ("exact", "exact")]


def _each_round(log: RunLog, config: Config, parts: Parts, student, vocab, pixels, trackers: Trackers):
    """The rounds not yet recorded; returns the student after the last."""
    loop, cfg, ranks = config.loop, config.student, parts.ranks
    steps = sum(len(log.read_stage(j, "update")) for j in range(log.completed_rounds()) if log.has_stage(j, "update"))
    for k in range(log.completed_rounds(), loop.rounds):
        records = _round_records(log, k, parts.images.records, loop)
        lost, lost_eval = {}, {}  # images that could not be read during the round, and why
        with RoundProgress(enabled=ranks.main) as bars:
            evaluation = parts.held_out(log, k, student, lost_eval) if (
                parts.eval_images and (_evaluates(k, loop) or log.has_stage(k, "eval"))) else []
            parts.keep_best(log, k, student, [], evaluation)  # by held-out: before a stop in this round's critiques
            captions = parts.readable_stream(log, k, "captions", lambda done, sink: caption(
                student, records, cfg, loop.seed * 1_000_003 + k, bars.add("caption", len(records)), done, sink, ranks,
                lost), CaptionSet, records, lost)
            if ranks.main:
                with _relay_stops(ranks):
                    critiques, refined, judged, pairs = _judge(log, k, config, parts, records, captions, bars)
                    pairs = readable_pairs(pairs, records, captions, lost, loop.max_failure_share)
                ranks.broadcast(pairs)
                parts.keep_best(log, k, student, critiques, [])  # by the critic, without annotated held-out images
            else:
                pairs = ranks.broadcast(None)
                if isinstance(pairs, tuple) and pairs[:1] == ("stop",):  # the main process stopped
                    raise RunStopped("", pairs[1])
            saves = UpdateSaves(log.progress_path(k, "update"), config.update.save_minutes, writer=ranks.main)
            with stop_between_steps():  # a stop after the update's last step waits for the round's student to be saved
                student, history = log.checkpoint(k, "update", lambda: update(
                    student, pairs, pixels, config.update, in_place=True, saves=saves), parts.reload_student)
        if not ranks.main:
            continue
        metrics = summarize_round(k, records, captions, critiques, refined, pairs, history, evaluation, vocab,
                                  log.stage_seconds(k),
                                  None if judged is None else verification_counts(judged, refined))
        metrics.update(lost_metrics(lost, lost_eval))
        log.finish_round(k, metrics)
        trackers.log_round(k, metrics, history, steps)
        steps += len(history)
        render_round(metrics)
        for note in round_notes(metrics):
            console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    return student


def _evaluates(k: int, loop) -> bool:
    """Whether the student entering round ``k`` is due an evaluation (``loop.eval_every``); the final
    student (``k == loop.rounds``) always is."""
    return k == loop.rounds or (loop.eval_every > 0 and k % loop.eval_every == 0)


def _round_records(log: RunLog, k: int, records: list, loop) -> list:
    """Round ``k``'s images. A slice (``loop.images_per_round``) is recorded (``rounds/<k>/images.jsonl``)
    and read back on resume, so a round keeps its images if files were added to the set since."""
    if loop.images_per_round <= 0:
        return list(records)
    if log.has_stage(k, "images"):  # a resumed round (its images were checked in _load_parts)
        by_id = {r.id: r for r in records}  # one gone since is left out (checked in _load_parts)
        return [by_id[row["image_id"]] for row in log.read_stage(k, "images") if row["image_id"] in by_id]
    picked = round_images(records, loop.images_per_round, loop.seed, k)
    log.record(k, "images", [{"image_id": r.id} for r in picked])
    return picked


def _judge(log: RunLog, k: int, config: Config, parts: Parts, records: list, captions: list[CaptionSet],
           bars: RoundProgress):
    """The main process's part of a round: critiques (with regions), steps, verification, pairs."""
    loop = config.loop
    if parts.detector is not None:  # recorded for the report and for reading the run; the critique stage
        # rebuilds each image's views from the detection cache
        log.stream(k, "regions", lambda done, sink: regions_stage(records, parts.detector, config.regions,
                                                                  parts.region_cache, done, sink), RegionRow)
    critiques = parts.paid_stream(log, k, "critiques", lambda done, sink: critique(
        parts.critic, records, captions, parts.regions_for, parts.spend,
        bars.add("critique", len(records) * (1 + config.student.n_samples) * config.critic.samples),
        loop.max_failure_share, config.critic.samples, done, sink), CritiqueRow)
    refined = parts.paid_stream(log, k, "refined", lambda done, sink: parts.step.refine(
        captions, critiques, loop.refine_samples, loop.max_failure_share, parts.spend, done, sink), Refinement)
    verified = parts.paid_stream(log, k, "verify", lambda done, sink: critique(
        parts.critic, records, to_verify(refined), parts.regions_for, parts.spend,
        max_failure_share=loop.max_failure_share, done=done, sink=sink), CritiqueRow) if loop.verify_refinements else None
    judged = None  # what verification made of each refinement (from the rows: a resumed round counts them too)
    if verified is not None:
        judged = verdicts(refined, critiques, verified, loop.verify_by, parts.step.vocabulary)
    pairs = log.stage(k, "pairs", lambda: build_pairs(captions, critiques, refined, loop.pair_sources,
                                                      loop.swap_pairs, judged), PreferencePair)
    return critiques, refined, judged, pairs


@contextmanager
def _relay_stops(ranks: Ranks) -> Iterator[None]:
    """When the main process stops mid-round (budget, failures, Ctrl-C, an error), the others, waiting for
    its pairs, get ``("stop", exit status)`` instead, and stop too (a ``RunStopped`` with no message)."""
    try:
        yield
    except BaseException as e:
        if ranks.world > 1:
            code = {BudgetExhausted: 0, KeyboardInterrupt: 130}.get(type(e), 1)
            ranks.broadcast(("stop", code))
        raise


def _reopen(cli: Config, args) -> tuple[RunLog, Config, dict[str, list]]:
    """The run to resume and its config, with the command line's safe overrides applied.

    An override that would change what the run computes is refused with the key named; a safe one
    (``RESUMABLE_KEYS``: endpoint, concurrency, timeouts, budget, trackers, more rounds, how often to
    evaluate) is applied and returned as
    ``{key: [old, new]}`` for the resume event. Overrides equal to the stored value change nothing.
    """
    log = RunLog.open(args.resume, cli.loop.runs_dir)
    config = apply_dict(Config(), log.config, source=f"{log.root}/config.json")
    absolute_paths(cli)  # the run's own command again, relative paths and all, changes nothing
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
    completed = log.completed_rounds()
    if config.loop.rounds < completed:
        raise ConfigError(f"--resume {args.resume}: loop.rounds {config.loop.rounds} is fewer than the {completed} "
                          f"round(s) the run has completed; give --rounds {completed} or more")
    check_effect(config.validate(), changes, args.resume)
    return log, config, changes


HOW_TO_ANNOTATE = ['a manifest\'s "objects"', "a column of {label: count} or labels, named by loop.objects_column"]


def _load_parts(config: Config, log: RunLog | None, ranks: Ranks | None = None) -> Parts:
    """Load and check every input of the run; raises (ValueError / OSError) before anything is written.
    The cheap checks come first, the student (the slowest load) last. In a data-parallel run only the
    main process loads the critic and the detector, and each process puts its student on its device."""
    ranks = ranks or Ranks()
    for var, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):  # as accelerate launch sets them
            raise ConfigError(f"{var}={os.environ[var]}: accelerate is set up for {name}, and refine's update runs "
                              "plain data parallelism (DDP) only; launch with --multi_gpu and without "
                              f"--use_{name.lower()} (or a config file without it)")
    trackers = parse_trackers(config.loop.log_with)  # a tracker that is not installed fails here
    check_caches()  # a damaged store is refused here, not met by each request of a paid stage
    from critics import make_critic
    from refine.stages.regions import load_detector

    loop = config.loop
    from refine.images.hf import Columns

    columns = Columns(loop.image_column, loop.caption_column, loop.objects_column)
    images = load_images(loop.images, loop.coco_root or None, columns=columns)
    eval_images = load_images(loop.eval_images, flag="--loop.eval_images", columns=columns) if loop.eval_images else None
    if eval_images is not None and (note := images.held_out_note(eval_images)):
        images.notes.append(note)
    if loop.images_per_round >= len(images.records):  # round_images then takes the whole set every round
        images.notes.append(f"loop.images_per_round={loop.images_per_round}: the set has {len(images.records)} "
                            "image(s), so every round takes all of them")
    held_out_notes = [f"--loop.eval_images: {n}" for n in (eval_images.notes if eval_images else [])]
    for note in [*images.notes, *held_out_notes] if ranks.main else []:  # now: a refusal below may follow from one
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if log is not None:  # the images the run has used, gone since: a few are left out, most refused
        if (note := gone_since(log, {r.id for r in images.records}, loop)) and ranks.main:
            console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    detects = loop.use_regions and images.detectable
    if config.critic.backend == "grounded" and not detects and all(r.objects is None for r in images.records):
        raise ConfigError(f"--images {loop.images}: no image has annotations, and without them (or the regions "
                          "stage's detections: --loop.use_regions=true) the grounded critic cannot judge a caption; "
                          f"annotate them ({HOW_TO_ANNOTATE[loop.images.startswith('hf:')]}) or use --critic.backend=openai"
                          + (" in a new run (a resume cannot change the critic)" if log is not None else ""))
    critic = step = detector = None
    if ranks.main:
        critic = make_critic(config.critic, vocabulary=images.vocabulary(), max_words=config.step.max_words)
        step = make_step(config.critic, config.step, loop, images.vocabulary())
        if loop.use_regions and not images.detectable:
            console.print(f"regions: skipped — no detector exists for the image set {escape(loop.images)}")
        detector = load_detector(config.regions.model) if detects else None
    resumed, cfg = log.resume_student() if log is not None else None, config.student
    try:
        student = load_student(resumed or cfg.model, _device(cfg.device, ranks), cfg.precision, cfg.static_cache)
    except OSError as e:  # a checkpoint cut short, say; the message names student.model
        raise e if resumed is None else OSError(f"--resume {log.root}: its student {resumed} cannot be loaded "
                                                f"({e.__cause__ or e}); put it back from a copy of the run, or "
                                                "start a new run") from None
    if (limit := student.caption_limit) is not None and cfg.max_new_tokens > limit:
        raise ConfigError(f"student.max_new_tokens={cfg.max_new_tokens}: the student's decoder holds {student.positions} "
                          f"tokens, the start token{f' and {student.text_prefix()} image tokens' * bool(student.text_prefix())} "
                          f"included; use at most {limit}")
    if config.update.lora_r:  # a LoRA target that is not there fails now, not after a round of critic calls
        lora_targets(student, config.update)
    # A stop records only the calls that no partial row holds (see Spend), so count both.
    spend = Spend(loop.max_critic_calls or None, log.critic_calls(row_calls) if log is not None else 0)
    return Parts(images, eval_images, student, critic, step, detector, config, spend, ranks=ranks, trackers=trackers)


def _device(setting: str, ranks: Ranks) -> str:
    """``student.device``; ``auto`` in a data-parallel launch is this process's own device (cuda:<local rank>)."""
    return str(ranks.device) if setting == "auto" and ranks.device is not None else setting


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-checkpoint "Loading weights" / "Writing model shards" bars: noise here
    def done() -> int:
        run(argv)
        return 0

    return run_stoppable(done, _exit_code)


def _exit_code(e: BaseException) -> int:
    """How ``main`` ends on ``e``: one line and its exit code; anything unexpected is raised."""
    if isinstance(e, RunStopped):
        if str(e):  # the other processes of a data-parallel run stop silently with the main one
            console.print(("[red]" if e.code != 130 else "[yellow]") + escape(str(e)) + "[/]", soft_wrap=True)
        if e.code == 130:
            exit_now(130)
        return e.code
    if isinstance(e, KeyboardInterrupt):  # the rounds convert theirs into RunStopped: this came before them
        console.print("[yellow]Interrupted before the rounds began; nothing new was written.[/]")
        exit_now(130)
    if isinstance(e, (ValueError, OSError, KeyError)):
        console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)  # one line, however long
        return 2
    raise e


if __name__ == "__main__":
    sys.exit(main())
