"""The demo driver (``python -m refine.demo``, ``make demo``): the offline evidence that the loop cuts
hallucination.

A controlled world (refine.images.shapes), a student with a known flaw (refine.demo.toy_student: it mentions a
blue square next to red circles that is not there), the grounded critic reading the scene
annotations, and a measurement on held-out scenes the loop never trains on. Everything runs through
the real engine: ``refine.loop`` with the grounded critic, the pairs and DPO modules.

Prints before versus after on the held-out split: CHAIR_s, CHAIR_i, object recall, exact match and
mean caption length, with a few example captions per round, for the real run and (``--control``)
the swapped-pair control, which trains on the same pairs with the preference reversed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from refine.infra.atomic import read_jsonl
from refine.infra.runlog import RunLog

console = Console()

# The prototype's loop (issue 5): greedy + 2 samples at T = 1.0 over 300 training scenes; the
# grounded rewrite as chosen and the original as rejected; sigmoid DPO with beta = 0.2 plus
# 0.5 x NLL on the chosen caption; RAdam at lr 1e-4. It ran 6 epochs a round for 5 rounds. Through
# the engine, 6 epochs a round cost 1.4 points of held-out recall (training-scene recall 0.980 -> 0.966
# after one round, against 0.979 with 3 epochs), so 3 epochs. Rounds (issue 12, chosen on validation
# scenes of seeds 2 and 3, the two worst): 5 rounds cut CHAIR_s by 56% and 55% against 45% and 52%
# with 3, at the same recall; 5 epochs, lr 2e-4, 4 samples, mDPO's terms, ranked pairs, fresh scenes
# each round and a longer-pretrained student did not do better on both (docs/results.md, "How the
# settings were chosen"). A round takes ~70 s here since sampling and the update got faster.
ROUNDS = 5
DEMO_OVERRIDES = [
    "--critic.backend=grounded", "--student.n_samples=2", "--student.temperature=1.0", "--student.max_new_tokens=32",
    "--student.batch_size=64", "--loop.pair_sources=refined", "--loop.refine_samples=true",
    "--update.beta=0.2", "--update.nll_weight=0.5", "--update.lr=1e-4", "--update.epochs=3", "--update.batch_size=32",
]
DPO_ONLY = ("--update.beta=", "--update.nll_weight=")  # refused with update.mode=sft, which trains no DPO


def demo_overrides(sets: list[str]) -> list[str]:
    """DEMO_OVERRIDES, less DPO's settings when ``--set update.mode=sft`` makes the round pure SFT."""
    sft = "update.mode=sft" in sets
    return [o for o in DEMO_OVERRIDES if not (sft and o.startswith(DPO_ONLY))]


METRICS = [("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"), ("recall", "recall"), ("exact", "exact"),
           ("mean_len", "mean length"), ("additions", "additions"), ("substitutions", "substitutions"),
           ("omissions", "omissions")]
# The defences against a wrong critic, by name (``--defences verify,mdpo``); README, "A critic that is
# sometimes wrong", says what each does and how its setting was chosen.
DEFENCES = {
    "verify": ["--loop.verify_refinements=true"],  # by score (loop.verify_by's default)
    "verify_edits": ["--loop.verify_refinements=true", "--loop.verify_by=edits"],
    "repair": ["--loop.verify_refinements=true", "--loop.verify_by=repair"],
    "agree": ["--critic.samples=3"],
    "agree_objects": ["--critic.samples=3", "--loop.agree_by=object"],
    "cdpo": ["--update.label_smoothing=0.2"],
    "robust": ["--update.loss=robust", "--update.label_smoothing=0.2"],
    "mdpo": ["--update.image_negatives=true"],
    "gate": ["--loop.pair_gate=true"],
}
EVAL_SETS = {"heldout": "shapes-heldout", "val": "shapes-val"}


def eval_rows(log: RunLog) -> dict[int, list[dict[str, Any]]]:
    """Held-out captions by round: round k's are those of the student entering round k, the last round's
    the final student's (a run with ``loop.eval_every`` other than 1 has fewer)."""
    return {k: read_jsonl(log.stage_path(k, "eval")) for k in log.rounds_with("eval")}


def eval_vocabulary(log: RunLog):
    """The held-out set's object vocabulary (``refine.images.object_vocabulary``), from the run alone."""
    from refine.images import object_vocabulary, world_of

    labels = {label for rows in eval_rows(log).values() for r in rows for label in (r["objects"] or {})}
    return object_vocabulary(world_of(log.config["loop"]["eval_images"]), labels)


def summary(log: RunLog, start: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Before and after, and ``per_round`` (None where a round was not evaluated). ``start``: the
    opening evaluation's rows for a run that skipped its own (the control: the real run's)."""
    from refine.metrics.summary import metrics_of_rows

    points, vocab = eval_rows(log), eval_vocabulary(log)
    points.setdefault(0, start)
    if points[0] is None:
        raise ValueError(f"{log.root}: its starting student was not evaluated")
    per_round = [metrics_of_rows(points[k], vocab) if k in points else None for k in range(max(points) + 1)]
    before, after = per_round[0], per_round[-1]
    return {"run": log.root.name, "before": before, "after": after, "per_round": per_round,
            "chair_s_change": chair_s_change(before, after)}


def chair_s_change(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """The relative change of CHAIR_s (None when it started at 0)."""
    return (after["chair_s"] - before["chair_s"]) / before["chair_s"] if before["chair_s"] else None


def render(results: dict[str, dict[str, Any]], scenes: str = "held-out scenes") -> None:
    """One "before" column when every run started from the same student (the demo's case), then "after" per run."""
    shared = all(r["before"] == next(iter(results.values()))["before"] for r in results.values())
    columns = [("before", "before", name) for name in list(results)[:1]] if shared else []
    for name in results:
        if not shared:
            columns.append((f"{name}: before", "before", name))
        columns.append((f"{name}: after" if len(results) > 1 else "after", "after", name))
    table = Table(title=f"{scenes}: before → after the loop")
    table.add_column("metric")
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for key, label in METRICS:
        table.add_row(label, *(_fmt(results[name][when][key]) for _, when, name in columns))
    table.add_row("CHAIR_s change", *(
        f"{results[name]['chair_s_change']:+.0%}" if when == "after" and results[name]["chair_s_change"] is not None
        else "" for _, when, name in columns))
    console.print(table)
    console.print(headline(results))


def headline(results: dict[str, dict[str, Any]]) -> str:
    """The table in one line: what the loop did to hallucination, recall and substitutions, and the control."""
    r = results["refine"]
    b, a = r["before"], r["after"]
    change = "n/a" if r["chair_s_change"] is None else f"{r['chair_s_change']:+.0%}"
    line = (f"Headline: CHAIR_s {b['chair_s']:.3f} → {a['chair_s']:.3f} ({change}), "
            f"recall {100 * (a['recall'] - b['recall']):+.1f} points, substitutions {b['substitutions']} → "
            f"{a['substitutions']}, additions {b['additions']} → {a['additions']}")
    control = results.get("swapped control")
    if control is not None and control["chair_s_change"] is not None:
        line += f"; the swapped control: CHAIR_s {control['chair_s_change']:+.0%}"
    return line


def machine_line(key: str, machine: dict[str, str] | None) -> str:
    """Where the toy student was trained: the same seed trains another student, and so prints other
    numbers, on a CPU whose torch kernels use other vector instructions (README, "One seed, two CPUs")."""
    where = ("an unrecorded machine" if machine is None
             else f"{machine['cpu']}, torch {machine['torch']} with {machine['cpu_capability']} kernels")
    return (f"Toy student {key} trained on {where}. A CPU with other vector instructions trains another "
            "student from the same seed: compare the README's spread over seeds, not one row.")


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def examples(log: RunLog, n: int = 3) -> None:
    """Held-out scenes whose starting caption hallucinated, round by round."""
    from refine.objects import compare

    points = eval_rows(log)
    vocab = eval_vocabulary(log)
    picked = [i for i, r in enumerate(points[min(points)]) if compare(r["caption"], r["objects"], vocab).hallucinated][:n]
    for i in picked:
        first = points[min(points)][i]
        truth = ", ".join(f"{c} {label}" for label, c in first["objects"].items())
        console.print(f"[bold]{escape(first['image_id'])}[/]  truth: {escape(truth)}")
        for k, rows in points.items():
            console.print(f"  round {k}: {escape(rows[i]['caption'])}")


def run_name(args: argparse.Namespace) -> str:
    """``demo-shapes-seed0``, plus what differs from the default demo: ``-noise25``, the defences, ``-val``."""
    name = f"demo-shapes-seed{args.seed}"
    if args.noise:
        name += f"-noise{round(args.noise * 100)}"
    name += "".join(f"-{d}" for d in args.defences)
    name += "".join("-" + item.replace("=", "").replace(".", "_") for item in getattr(args, "set", []))
    return name + ("-val" if args.eval_set == "val" else "")


def loop_args(args: argparse.Namespace, student_dir: Path, run_id: str, swap: bool) -> list[str]:
    """``refine.loop`` arguments for one demo run. A run that exists already is resumed (a finished one
    returns at once, or with more ``--rounds`` goes on from its last round), but only if it was made with
    these settings (read as ``--resume`` reads them: a setting the run predates has its default; those a
    resume may change are passed on) and has not completed more rounds than asked: otherwise a
    ``ValueError`` says so.

    The swapped control evaluates its final student only (``loop.eval_every=0``): it starts from the
    same student as the real run, on the same held-out scenes, so its opening evaluation is the real
    run's, and the demo prints no other round of it."""
    from refine.cli import load_config
    from refine.config import RESUMABLE_KEYS

    common = [f"--loop.runs_dir={args.runs_dir}", f"--loop.run_id={run_id}"]
    fresh = [
        "--images", f"shapes:{args.train}", f"--student.model={student_dir}", f"--rounds={args.rounds}",
        f"--loop.eval_images={EVAL_SETS[args.eval_set]}:{args.heldout}", f"--loop.seed={args.seed}",
        f"--update.seed={args.seed}", f"--loop.swap_pairs={swap}", f"--critic.noise={args.noise}",
        f"--critic.seed={args.seed}", f"--loop.eval_every={0 if swap else 1}", *common, *demo_overrides(args.set),
        *(flag for name in args.defences for flag in DEFENCES[name]),
        *(f"--{item}" for item in args.set),
    ]
    stored = Path(args.runs_dir) / run_id / "config.json"
    if not stored.exists():
        return fresh
    from refine.config import Config, apply_dict
    from refine.loop import absolute_paths

    config = load_config(fresh)[0]
    absolute_paths(config)  # as the loop stores them
    want = json.loads(json.dumps(config.to_json()))  # tuples as JSON lists, like the stored file
    # read as --resume reads it: a setting added after the run was made takes its default
    have = json.loads(json.dumps(apply_dict(Config(), json.loads(stored.read_text()), str(stored)).to_json()))
    changed = {f"{section}.{key}": (have.get(section, {}).get(key), value) for section, values in want.items()
               for key, value in values.items() if have.get(section, {}).get(key) != value and key != "runs_dir"}
    differ = [f"{key}: {old!r} (wanted {new!r})" for key, (old, new) in changed.items() if key not in RESUMABLE_KEYS]
    if differ:
        raise ValueError(f"{stored.parent} was made with other settings ({'; '.join(differ[:4])}). "
                         f"Remove it, or pass --runs-dir to write the demo elsewhere.")
    completed = RunLog(stored.parent).completed_rounds()
    if args.rounds < completed:
        raise ValueError(f"{stored.parent} has completed {completed} rounds, more than --rounds {args.rounds}. "
                         f"Pass --rounds {completed} or more, or --runs-dir to write the demo elsewhere.")
    return ["--resume", run_id, *common[:1], *(f"--{key}={new}" for key, (_, new) in changed.items())]


# The control's process: ``python -c _CONTROL DEMO_PID STUDENT_DIR LOOP_ARGS...``.
_CONTROL = ("import sys; from refine.demo.driver import control_when_ready, stop_with_parent; "
            "stop_with_parent(int(sys.argv[1])); "
            "sys.exit(control_when_ready(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))")


def stop_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel send this process SIGTERM when its parent dies (kill -9, a closed terminal):
    a refine run in it then stops as on Ctrl-C, recorded, instead of running on alone (elsewhere only the
    check below). A parent already gone by now: SIGTERM at once."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def control_when_ready(demo_pid: int, student_dir: str, argv: list[str]) -> int:
    """Run ``refine.loop`` with ``argv`` once the toy student in ``student_dir`` is complete, having loaded
    the loop's modules meanwhile (seconds of the demo's wall time). Gives up (exit 1) if the demo
    (``demo_pid``, its parent) is gone, and quietly (130) on Ctrl-C."""
    try:
        import transformers.image_processing_utils  # noqa: F401

        import critics  # noqa: F401  (loaded now, used by the run)
        import refine.stages.critique  # noqa: F401
        from refine import loop

        ready = Path(student_dir) / "train_log.json"
        while not ready.is_file():
            if os.getppid() != demo_pid:  # the demo died without stopping us
                print(f"the demo (pid {demo_pid}) is gone before its toy student was trained; not started")
                return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 130
    return loop.main(argv)


def main(argv: list[str] | None = None) -> int:
    """The demo; on Ctrl-C or SIGTERM it stops both runs with what finished recorded (exit 130) and gives
    the command that continues them: itself, run again."""
    from refine.infra.interrupts import run_stoppable

    if parent := os.environ.pop("REFINE_STOP_WITH_PARENT", None):  # a sweep's cell (its control: _CONTROL)
        stop_with_parent(int(parent))
    return run_stoppable(lambda: _demo(argv), lambda e: _stopped(e, sys.argv[1:] if argv is None else argv))


def _stopped(e: BaseException, argv: list[str]) -> int:
    """How the demo ends on ``e``: a run that stopped (Ctrl-C, SIGTERM, failures) says so in one line with
    the demo's own command to continue (the loop's ``--resume`` would not print the demo's table);
    anything else is raised."""
    from refine.infra.interrupts import exit_now
    from refine.loop import RunStopped

    again = f"python -m refine.demo {shlex.join(argv)}".rstrip()
    if isinstance(e, RunStopped):
        message = str(e).replace(e.resume, again) if e.resume else str(e)
        console.print(("[red]" if e.code != 130 else "[yellow]") + escape(message) + "[/]", soft_wrap=True)
        if e.code == 130:
            exit_now(130)  # without joining the threads of abandoned requests
        return e.code
    if isinstance(e, KeyboardInterrupt):  # outside the rounds: pretraining the toy student, or awaiting the control
        console.print(f"[yellow]Interrupted. Finished work is recorded (nothing half-made is kept). Continue "
                      f"with: {escape(again)}[/]", soft_wrap=True)
        exit_now(130)
    raise e


def _demo(argv: list[str] | None) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from refine import loop
    from refine.demo.toy_student import ToyRecipe, ensure_toy_student, toy_student_dir, trained_on

    parser = argparse.ArgumentParser(prog="python -m refine.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"rounds of the loop (default {ROUNDS}); more than an existing run's take it on from its last round")
    parser.add_argument("--train", type=int, default=300, help="training scenes per round (default: 300)")
    parser.add_argument("--heldout", type=int, default=480, help="held-out scenes for evaluation (default: 480)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the toy student's pretraining and the loop's sampling and shuffling (default: 0)")
    parser.add_argument("--control", action="store_true",
                        help="also run the swapped-pair control, in a second process beside the real run")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="the grounded critic's error rate per object and critique (default: 0, a perfect critic)")
    parser.add_argument("--defences", default="", help=f"comma-separated defences: {', '.join(DEFENCES)}")
    parser.add_argument("--eval-set", choices=sorted(EVAL_SETS), default="heldout",
                        help="measure on the held-out scenes, or on validation scenes (for choosing settings)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other loop setting, e.g. --set update.nll_weight=1.0 (repeatable; part of the run name)")
    parser.add_argument("--runs-dir", default="runs", help="where the runs go (default: runs)")
    args = parser.parse_args(argv)
    args.defences = [d.strip() for d in args.defences.split(",") if d.strip()]
    unknown = [d for d in args.defences if d not in DEFENCES]
    if unknown:
        parser.error(f"unknown defence(s) {', '.join(unknown)}; choose from {', '.join(DEFENCES)}")
    if any(item.startswith("loop.eval_every") for item in args.set):
        parser.error("--set loop.eval_every: the demo evaluates its run every round and the control at its end; leave it out")

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" each round, as refine.loop does
    recipe = ToyRecipe(seed=args.seed)
    student_dir, run_id = toy_student_dir(recipe), run_name(args)
    # Both runs' settings are checked before anything is trained, started or written: a run that
    # exists with other settings is refused with nothing left behind.
    run_args = loop_args(args, student_dir, run_id, swap=False)
    control_args = loop_args(args, student_dir, f"{run_id}-swapped", swap=True) if args.control else None
    control = None
    if control_args is not None:
        # The control runs in its own process on the second core; one torch thread each is faster
        # than two runs taking turns at two threads (small models scale poorly across threads). It
        # starts now, loads its modules while the toy student trains here, and waits for the student.
        made_runs_dir = not Path(args.runs_dir).exists()
        Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
        control_log = Path(args.runs_dir) / f"{run_id}-swapped.log"
        new_log = not control_log.exists()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(control_log, "a") as out:
            # In a session of its own: a Ctrl-C reaches this process only, which stops the control with one
            # SIGTERM (a terminal's SIGINT followed by ours would be a second Ctrl-C: an exit at once).
            control = subprocess.Popen([sys.executable, "-c", _CONTROL, str(os.getpid()), str(student_dir), *control_args],
                                       stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    failed = False
    try:
        ensure_toy_student(recipe)
        if control is not None:
            console.print(f"swapped-pair control: running beside this one, log in {escape(str(control_log))}")
            torch.set_num_threads(1)
        logs = {"refine": loop.run(run_args)}
        if control is not None:
            console.print("waiting for the swapped-pair control …")
            if control.wait() == 0:
                logs["swapped control"] = RunLog(Path(args.runs_dir) / f"{run_id}-swapped")
            else:
                failed = True
    except BaseException:
        if control is not None:
            if control.poll() is None:
                control.terminate()  # the real run failed or was stopped: do not leave the control writing on its own
                control.wait()
            if new_log and not (Path(args.runs_dir) / f"{run_id}-swapped").exists():
                control_log.unlink(missing_ok=True)  # it never started: leave nothing behind
                if made_runs_dir and not any(Path(args.runs_dir).iterdir()):
                    Path(args.runs_dir).rmdir()
        raise
    start = eval_rows(logs["refine"]).get(0)  # the control's opening evaluation (see loop_args)
    results = {name: summary(log, start) for name, log in logs.items()}
    render(results, "validation scenes" if args.eval_set == "val" else "held-out scenes")
    examples(logs["refine"])
    console.print(machine_line(recipe.key(), trained_on(student_dir)))
    out = Path(args.runs_dir) / run_id / "demo.json"
    out.write_text(json.dumps(results, indent=2))
    console.print(f"Numbers written to {escape(str(out))}")
    if failed:
        console.print(f"[red]the swapped-pair control failed[/] (exit {control.returncode}); see {escape(str(control_log))}. "
                      "Run the demo again to resume it.")
        return 1
    return 0
