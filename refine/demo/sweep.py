"""``python -m refine.demo.sweep --plan NAME``: many demo runs, one JSON table, resumable.

Each cell is one ``python -m refine.demo`` run (a seed, a critic noise, a set of defences, a scene set),
with the swapped-pair control beside it when the plan asks for one. A cell whose run finished is read
back, not run again, so the command can be stopped (Ctrl-C, SIGTERM: each run records what finished) and
started again at any time; an unfinished run is resumed by the demo itself. The table,
``runs/sweep-NAME.json``, holds every finished cell's before and after metrics and is rewritten after
each cell. ``--rounds N`` runs every cell for N rounds instead of the demo's 5 and writes
``runs/sweep-NAME-roundsN.json``; a finished sweep's runs are taken on from their last round (the run
names leave rounds out), and the real run's curve (``demo.json``, ``per_round``) keeps every round's
metrics, so the table of fewer rounds is still read from the same runs.

Plans:

- ``tune``: the choice of defences, on validation scenes only (``--eval-set val``), no controls: 25%
  noise on seeds 0 and 1, plain DPO, each defence in ``TUNED`` alone and ``COMBINATIONS`` (the cheap
  filters and their combination first);
- ``readme``: the README's main table on the held-out scenes: seeds 0-5, perfect critic, plain DPO; then
  the chosen defences ``BEST`` with the perfect critic;
- ``noise``: the noisy-critic table on the held-out scenes (docs/results.md; the README gives its summary
  and the grid): seeds 0-5 x {plain DPO, the chosen defences ``BEST``}.

Every held-out cell runs with its swapped-pair control.

The cells run in plan order, so a sweep stopped early has its first seeds complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from refine.demo.driver import ROUNDS, chair_s_change, run_name

# The defences the README calls "the chosen defences", chosen on validation scenes (plan "tune": the
# largest CHAIR_s cut on the worse of seeds 0 and 1 with recall at most 1 point lower on both): verify
# (by score) with mDPO's image-side terms, -59% / -55% at recall -0.7 / -0.7 points (verify alone:
# -33% / -30%); see README, "A critic that is sometimes wrong".
BEST = ("verify", "mdpo")
NOISE = 0.25
# The defences tuned, each alone: the pair filters (verify: by score, verify_edits: by edits, repair:
# the contradicted edits undone, gate, agree), the losses that tolerate flipped labels (cdpo, robust)
# and mDPO's image-side negatives.
TUNED = ("verify", "verify_edits", "repair", "gate", "cdpo", "agree", "robust", "mdpo", "agree_objects")
# Combinations tried besides each defence alone: each verification with the gate, verify (the best
# filter alone) with each loss that cut CHAIR_s most alone (cdpo, mdpo), whose recall it might protect,
# the other two verifications with mdpo, and per-object agreement with the chosen two.
COMBINATIONS = [("verify", "gate"), ("verify_edits", "gate"), ("repair", "gate"), ("verify", "cdpo"),
                ("verify", "mdpo"), ("verify_edits", "mdpo"), ("repair", "mdpo"), ("agree_objects", "verify", "mdpo")]


@dataclass(frozen=True)
class Cell:
    seed: int
    noise: float = 0.0
    defences: tuple[str, ...] = ()
    eval_set: str = "heldout"
    control: bool = False
    rounds: int = ROUNDS

    def args(self) -> list[str]:
        return ["--seed", str(self.seed), "--noise", str(self.noise), "--defences", ",".join(self.defences),
                "--eval-set", self.eval_set, "--rounds", str(self.rounds), *(["--control"] if self.control else [])]

    @property
    def name(self) -> str:
        return run_name(argparse.Namespace(seed=self.seed, noise=self.noise, defences=list(self.defences),
                                           eval_set=self.eval_set))


def plan(name: str, rounds: int = ROUNDS) -> list[Cell]:
    """The plan's cells, each run for ``rounds`` rounds (the run name leaves rounds out: a sweep with more
    rounds takes the same runs on from their last round)."""
    return [replace(c, rounds=rounds) for c in _cells(name)]


def _cells(name: str) -> list[Cell]:
    seeds = range(6)
    if name == "tune":  # under noise, on validation scenes: plain DPO, each defence alone, a few combinations
        # the cheap filters and their combination first: a sweep cut short has those
        first = ("verify", "verify_edits", "repair", "gate")
        sets = [(), *[(d,) for d in first], *COMBINATIONS, *[(d,) for d in TUNED if d not in first]]
        return [Cell(s, NOISE, defences, eval_set="val") for defences in sets for s in (0, 1)]
    if name == "readme":  # the held-out table: every seed, perfect critic; then BEST on it
        return [Cell(s, control=True) for s in seeds] + [Cell(s, 0.0, BEST, control=True) for s in seeds]
    if name == "noise":  # the held-out table under noise: every seed, plain and BEST
        return [Cell(s, NOISE, defences, control=True) for s in seeds for defences in ((), BEST)]
    raise SystemExit(f"unknown plan {name!r}: choose tune, readme or noise")


def result_of(cell: Cell, runs_dir: Path) -> dict[str, Any] | None:
    """The cell's results (its run's demo.json), None while unfinished. A run taken on for more rounds
    since gives its results at the cell's round, cut from its curves (None where that round was not
    evaluated: a control evaluates only its end)."""
    path = runs_dir / cell.name / "demo.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    cut = {}
    for name in ("refine", *(["swapped control"] if cell.control else [])):
        if name not in results:
            return None
        run, k = results[name], cell.rounds
        curve = run.get("per_round") or []
        if len(curve) <= k or curve[k] is None:
            return None
        if len(curve) > k + 1:
            run = {**run, "after": curve[k], "per_round": curve[: k + 1],
                   "chair_s_change": chair_s_change(run["before"], curve[k])}
        cut[name] = run
    return cut


class Children:
    """The sweep's processes (pretraining, demo runs), each with one torch thread. ``stop`` ends them as
    Ctrl-C ends a demo (SIGTERM: each records what finished) and starts no more."""

    def __init__(self) -> None:
        self.running: set[subprocess.Popen] = set()
        self.stopping = False
        self.lock = threading.Lock()

    def run(self, command: list[str], out=subprocess.DEVNULL) -> int | None:
        """``command``'s exit status; None if the sweep is stopping (then it is not started)."""
        with self.lock:
            if self.stopping:
                return None
            # a session of its own: a terminal's Ctrl-C reaches the sweep only, and ``stop`` sends one SIGTERM
            # and it stops, recorded, if the sweep dies (kill -9, a closed terminal): see driver.stop_with_parent
            env = {**os.environ, "OMP_NUM_THREADS": "1", "REFINE_STOP_WITH_PARENT": str(os.getpid())}
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.running.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.running.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.running)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def run_cell(cell: Cell, runs_dir: Path, log_dir: Path, children: Children) -> int | None:
    """One demo run in a process of its own (the demo's control takes another)."""
    with open(log_dir / f"{cell.name}.log", "a") as out:
        return children.run([sys.executable, "-m", "refine.demo", *cell.args(), "--runs-dir", str(runs_dir)], out)


def main(argv: list[str] | None = None) -> int:
    """The sweep; Ctrl-C or SIGTERM stops its runs (each records what finished) and exits 130 with the
    command that continues it: itself, run again."""
    from refine.infra.interrupts import exit_now, run_stoppable

    children = Children()

    def stopped(e: BaseException) -> int:
        if not isinstance(e, KeyboardInterrupt):
            raise e
        children.stop()
        again = f"python -m refine.demo.sweep {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip()
        print(f"Interrupted. Finished cells and rounds are recorded. Continue with: {again}", flush=True)
        exit_now(130)

    return run_stoppable(lambda: _sweep(argv, children), stopped)


def _sweep(argv: list[str] | None, children: Children) -> int:
    parser = argparse.ArgumentParser(prog="python -m refine.demo.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="tune | readme | noise")
    parser.add_argument("--runs-dir", default="runs", help="where the runs and the table go (default: runs)")
    parser.add_argument("--jobs", type=int, default=2, help="cells at a time (a cell with a control takes two cores; default: 2)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="rounds per cell; more than a finished sweep's takes its runs on from their last round "
                             "(a sweep of fewer rounds reads its cells from their curves)")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    log_dir = runs_dir / "sweep-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cells = plan(args.plan, args.rounds)
    table_path = runs_dir / (f"sweep-{args.plan}.json" if args.rounds == ROUNDS else f"sweep-{args.plan}-rounds{args.rounds}.json")

    def write_table() -> None:
        from refine.demo.toy_student import ToyRecipe, toy_student_dir, trained_on  # torch: not at import

        rows = [{**asdict(c), "run": c.name, "results": r, "student_trained_on": trained_on(toy_student_dir(ToyRecipe(c.seed)))}
                for c in cells if (r := result_of(c, runs_dir))]
        table_path.write_text(json.dumps({"plan": args.plan, "rounds": args.rounds, "cells": len(cells), "rows": rows}, indent=1))

    todo = [c for c in cells if result_of(c, runs_dir) is None]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells done; running {len(todo)}", flush=True)
    jobs = max(1, args.jobs // 2) if all(c.control for c in todo) else args.jobs
    start = time.time()
    # Pretrain the toy students first, one process per seed: cells of one seed would otherwise train it twice.
    from refine.demo.toy_student import ToyRecipe, toy_student_dir

    seeds = sorted({c.seed for c in todo if not (toy_student_dir(ToyRecipe(seed=c.seed)) / "train_log.json").is_file()})

    def pretrain(seed: int) -> None:
        # SIGTERM as Ctrl-C: the interrupted training removes its temp dir (the default SIGTERM left it behind)
        code = children.run([sys.executable, "-c", "import signal; signal.signal(signal.SIGTERM, signal.default_int_handler); "
                                                    "from refine.demo.driver import stop_with_parent, os; "
                                                    "stop_with_parent(int(os.environ.pop('REFINE_STOP_WITH_PARENT'))); "
                                                    "from refine.demo.toy_student import ToyRecipe, ensure_toy_student; "
                                                    f"ensure_toy_student(ToyRecipe(seed={seed}))"])
        if code:
            raise RuntimeError(f"pretraining the toy student of seed {seed} failed (exit {code})")

    def one(cell: Cell) -> None:
        code = run_cell(cell, runs_dir, log_dir, children)
        if code is not None:
            print(f"{cell.name}: exit {code} ({time.time() - start:.0f} s)", flush=True)
            write_table()

    for work, items, n in ((pretrain, seeds, args.jobs), (one, todo, jobs)):
        pool = ThreadPoolExecutor(n)
        try:
            list(pool.map(work, items))
        except BaseException:
            children.stop()  # before waiting for the threads: they wait for the children
            raise
        finally:
            pool.shutdown(cancel_futures=True)
        if work is pretrain:
            print(f"toy students ready for seeds {seeds} ({time.time() - start:.0f} s)", flush=True)
    write_table()
    print(f"table: {table_path}")
    return 0 if all(result_of(c, runs_dir) for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
