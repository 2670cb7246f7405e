"""``python -m refine.loop --images SPEC``: caption, find regions, critique, step, pair, update, record.

Each round reads top to bottom below, in :func:`run`. The stages live in their modules; this file
only sequences them, records them through :class:`refine.runlog.RunLog`, and draws progress.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from refine import stages
from refine.cache import DiskCache
from refine.config import Config, apply_dict, load_config
from refine.progress import RoundTimer, console, progress_bar
from refine.runlog import RunLog


def _setup(config: Config, args) -> tuple[Config, RunLog]:
    if args.resume:
        log = RunLog.open(args.resume, config.loop.runs_dir)
        config = apply_dict(Config(), log.config)
        if args.max_critic_calls is not None:  # a resume may raise the budget
            config.loop.max_critic_calls = args.max_critic_calls
        if any(e["event"] == "run_done" for e in log.events()):
            return config, log
        log.event("resume", completed_rounds=log.completed_rounds())
        return config, log
    run_id = config.loop.run_id or f"{datetime.now():%Y%m%d-%H%M%S}-{Path(config.loop.images).name.replace(':', '-')}"
    config.loop.run_id = run_id
    return config, RunLog.create(config.loop.runs_dir, run_id, config.to_json())


def run(argv: list[str] | None = None) -> RunLog:
    from critics import make_critic
    from refine import dpo, regions
    from refine.evaluate import evaluate
    from refine.images import load_images
    from refine.runs import render_round
    from refine.student import load_student

    config, args = load_config(argv)
    config, log = _setup(config, args)
    if any(e["event"] == "run_done" for e in log.events()):
        console.print(f"{log.root} is complete; nothing to resume.")
        return log
    loop = config.loop
    records, skipped = load_images(loop.images, loop.coco_root or None)
    for line in skipped:
        console.print(f"[yellow]skipped[/] {line}")
    eval_records = load_images(loop.eval_images)[0] if loop.eval_images else []
    images = {r.id: r.image for r in records}

    start, student = _resume_student(log, config, load_student)
    critic = make_critic(config.critic, labels={label for r in records for label in (r.objects or {})})
    apply_many = stages.make_step(config.critic, config.step)
    detector = regions.load_detector(config.regions.model) if _wants_regions(loop, records) else None
    region_cache = DiskCache(namespace="regions")
    budget_used = sum(e.get("critic_calls", 0) for e in log.events())

    for k in range(start, loop.rounds):
        timer = RoundTimer()
        with timer("eval"):
            evaluation = log.stage(k, "eval", lambda: evaluate(student, eval_records, config.student))[0] if eval_records else []
        torch.manual_seed(loop.seed * 1_000_003 + k)  # sampled captions: reproducible per (seed, round)
        with timer("caption"), progress_bar("caption", len(records)) as advance:
            captions, _ = log.stage(k, "captions", lambda: stages.caption(student, records, config.student, advance))
        with timer("regions"):
            found = {r.image_id: r for r in regions.find(records, detector, config.regions, region_cache)} if detector else {}
        with timer("critique"), progress_bar("critique", len(records) * (1 + config.student.n_samples)) as advance:
            budget = loop.max_critic_calls - budget_used if loop.max_critic_calls else None
            try:
                critiques, calls = _critique_stage(log, k, critic, records, captions, found, budget, advance)
            except stages.BudgetExhausted as stop:
                log.event("budget_stop", round=k, critic_calls=stop.calls)
                console.print(f"[yellow]Critic-call budget reached[/] ({loop.max_critic_calls}). "
                              f"Continue with: python -m refine.loop --resume {log.root} --max-critic-calls N")
                return log
            budget_used += calls
        with timer("step"):
            refined, _ = log.stage(k, "refined", lambda: stages.refine_captions(captions, critiques, apply_many, loop.refine_samples))
        pairs, _ = log.stage(k, "pairs", lambda: stages.build_pairs(captions, critiques, refined, loop.pair_sources, loop.swap_pairs))
        _save_if_best(log, k, student, critiques)
        with timer("update"):
            student, history = _update_stage(log, k, student, pairs, images, config.update, dpo)
        metrics = stages.summarize_round(k, records, captions, critiques, refined, pairs, history, evaluation)
        metrics.update(timer.seconds())
        log.write_metrics(k, metrics)
        log.event("round_done", round=k)
        render_round(metrics)
    if eval_records and not log.has_stage(loop.rounds, "eval"):
        log.stage(loop.rounds, "eval", lambda: evaluate(student, eval_records, config.student))
    log.event("run_done")
    console.print(f"Run written to [bold]{log.root}[/]. Inspect: python -m refine.runs show {log.root.name}")
    return log


def _wants_regions(loop, records) -> bool:
    if not loop.use_regions:
        return False
    if loop.images.startswith("shapes"):
        console.print("regions: skipped — no detector exists for the synthetic shapes world; "
                      "the grounded critic reads the scene annotations instead")
        return False
    return True


def _critique_stage(log, k, critic, records, captions, found, budget, advance):
    """Recorded like any stage; its call count goes into the event so budgets survive a resume."""
    if log.has_stage(k, "critiques"):
        return log.read_stage(k, "critiques"), 0
    start = time.perf_counter()
    rows, calls = stages.critique(critic, records, captions, found, budget, progress=advance)
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


def _resume_student(log: RunLog, config: Config, load_student):
    """Start at the first round without ``round_done``, from the newest checkpoint (or the configured model)."""
    state = log.student_state("last")
    source = log.student_dir("last") if state else config.student.model
    cfg = config.student
    return log.completed_rounds(), load_student(source, cfg.device, cfg.precision, cfg.static_cache)


def _save_if_best(log: RunLog, k: int, student, critiques) -> None:
    """Round k's mean critic score rates the student that entered round k: keep the best one."""
    state = log.student_state("last")
    if state and state["round"] >= k:  # resumed after this round's update: that student is gone
        return
    mean = stages.mean_score(critiques)
    best = log.student_state("best")
    if best is None or mean > best["critic/mean_score"]:
        log.save_student(student, "best", {"round": k - 1, "critic/mean_score": mean})


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, KeyError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
