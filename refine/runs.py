"""``python -m refine.runs list | show RUN [--image ID] | diff RUN_A RUN_B``: read runs/, draw tables.

It draws the run tables (the loop prints its round summary with them too) and needs nothing but the run
directories. Everything read
from a run (captions, critic feedback, image ids, errors) is data, never rich markup: it goes through
``escape`` (or into a ``Text``), so "[dog]" prints as "[dog]" and a stray "[/]" cannot crash a view.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from refine.infra.runlog import RunLog

console = Console()

# What the per-round summary shows, in order: (metric key, row title).
ROUND_COLUMNS = [
    ("critic/mean_score", "critic mean score"), ("critic/failures", "critic failures"),
    ("critic/requests", "critic requests"), ("critic/cache_hits", "cache hits"), ("critic/tokens", "tokens"),
    ("step/changed", "captions changed by step"), ("step/rejected", "step replies rejected"),
    ("step/errors", "step failures"), ("images/lost", "images lost"), ("eval/lost", "held-out images lost"),
    ("pairs/total", "pairs"), ("pairs/refined", "pairs refined≻orig"),
    ("pairs/ranked", "pairs best≻worst"), ("update/sft/loss", "SFT loss"), ("update/loss", "loss"),
    ("update/dpo_loss", "DPO loss"),
    ("update/nll", "NLL"), ("update/rewards/accuracies", "reward accuracy"), ("update/rewards/margins", "reward margin"),
    ("train/chair_s", "train CHAIR_s"), ("train/chair_i", "train CHAIR_i"), ("train/recall", "train recall"),
    ("eval/chair_s", "eval CHAIR_s"), ("eval/chair_i", "eval CHAIR_i"), ("eval/recall", "eval recall"),
    ("eval/exact", "eval exact"), ("eval/mean_len", "eval mean length"),
]


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if 0 < abs(value) < 0.0005:  # would print 0.000: a reward margin of 1e-5 is not zero
            return f"{value:.2g}"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def metrics_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    """Metrics down, rounds across: stays readable in 80 columns for a handful of rounds."""
    keys = [(k, t) for k, t in ROUND_COLUMNS if any(k in r for r in rows)]
    keys += [(k, k) for k in sorted({k for r in rows for k in r if k.startswith("time/")})]
    table = Table(title=title)
    table.add_column("metric")
    for r in rows:
        table.add_column(f"round {r.get('round', '?')}" + (" (final)" if r.get("final") else ""), justify="right")
    for key, name in keys:
        table.add_row(name, *[fmt(r.get(key)) for r in rows])
    return table


def render_round(metrics: dict[str, Any], out: Console | None = None) -> None:
    """The summary the loop prints after each round."""
    (out or Console(stderr=True)).print(metrics_table([metrics], title=f"round {metrics['round']}"))


def round_notes(m: dict[str, Any]) -> list[str]:
    """What went wrong in a round, one line each, from its summary: the loop prints them under its table."""
    k, notes = m.get("round"), []
    if m.get("images/lost"):
        notes.append(f"round {k}: {m['images/lost']} image(s) could no longer be read and were left out of the "
                     f"round (the first: {m.get('images/lost_first')}); a later round reads them again")
    if m.get("eval/lost"):
        notes.append(f"round {k}: {m['eval/lost']} held-out image(s) could no longer be read and are not in its "
                     f"held-out metrics (the first: {m.get('eval/lost_first')})")
    if m.get("step/rejected"):
        why = ", ".join(f"{key.removeprefix('step/rejected/')} {n}" for key, n in m.items()
                        if key.startswith("step/rejected/"))
        notes.append(f"round {k}: the textual step's reply was rejected for {m['step/rejected']} caption(s) ({why}); "
                     "those made no refined pair (python -m refine.runs show RUN --image ID says why)")
    if m.get("step/errors"):
        notes.append(f"round {k}: {m['step/errors']} textual step(s) failed (a call error, recorded with its "
                     "caption); those made no refined pair (python -m refine.runs show RUN --image ID says why)")
    if not m.get("pairs/total"):
        critiques, failed = m.get("critic/critiques", 0), m.get("critic/failures", 0)
        causes = [  # the first that applies
            (critiques and failed == critiques, f"all {failed} critiques failed"),
            (m.get("step/rejected") and not m.get("step/changed"), "every step reply was rejected"),
            (not m.get("step/changed"), "no critique led to a different caption"),
            (m.get("pairs/unverified"), f"verification confirmed none of the {m.get('pairs/unverified')} refinements"),
        ]
        reason = next((why for applies, why in causes if applies), "no refinement made a pair")
        notes.append(f"round {k}: no preference pairs ({reason}), so the student did not change this round")
    return notes


def cmd_list(runs_dir: Path) -> None:
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"--runs-dir {runs_dir}: no such directory (runs are written under runs/ by default)")
    table = Table(title=escape(f"runs in {runs_dir}"))
    table.add_column("run", overflow="fold")  # whole ids, wrapped if need be: they are meant to be copied
    for col in ("images", "critic", "rounds", "score first→last", "pairs", "status"):
        table.add_column(col)
    for root in sorted(p for p in runs_dir.iterdir() if (p / "config.json").is_file()):
        log = RunLog(root)
        try:
            cfg, metrics = log.config, log.metrics()
        except (ValueError, KeyError) as e:  # one broken run must not hide the others
            table.add_row(escape(root.name), "", "", "", "", "", escape(f"unreadable ({type(e).__name__})"))
            continue
        scores = [m.get("critic/mean_score") for m in metrics]
        table.add_row(escape(root.name), escape(str(cfg["loop"]["images"])), escape(str(cfg["critic"]["backend"])),
                      f"{len(metrics)}/{cfg['loop']['rounds']}",
                      f"{fmt(scores[0])} → {fmt(scores[-1])}" if scores else "–",
                      str(sum(m.get("pairs/total", 0) for m in metrics)), escape(log.status()))
    console.print(table)


def _critique_line(c: dict[str, Any]) -> str:
    if c.get("error"):
        return f"[red]critic failed:[/] {escape(str(c['error']))}"
    parts = [f"score {c['score']:.2f}"]
    if c.get("hallucinated"):
        parts.append(f"hallucinated: {escape(', '.join(c['hallucinated']))}")
    if c.get("missing"):
        parts.append(f"missing: {escape(', '.join(c['missing']))}")
    if c.get("count_errors"):
        parts.append("counts: " + escape(", ".join(f"{k} {s}≠{t}" for k, (s, t) in c["count_errors"].items())))
    return " · ".join(parts)


def image_histories(log: RunLog, image_ids: list[str]) -> list[Tree]:
    """How each image's caption changed round by round, and the critique that caused each change; each
    stage file is read once for all of them (a round of a million images is not read once per image)."""
    wanted = set(image_ids)
    trees = {i: Tree(f"[bold]{escape(i)}[/]") for i in image_ids}
    for k in log.rounds_with("captions"):
        captions = {r["image_id"]: r for r in log.read_stage(k, "captions") if r["image_id"] in wanted}
        if not captions:
            continue
        stage = {name: [r for r in log.read_stage(k, name) if r["image_id"] in captions]
                 if log.has_stage(k, name) else None for name in ("critiques", "refined", "pairs")}
        for image_id, caption in captions.items():
            node = trees[image_id].add(f"round {k}: [cyan]{escape(caption['caption'])}[/]")
            if stage["critiques"] is None:
                node.add("[dim]not critiqued: the run stopped before this round's critiques were done "
                         "(--resume finishes them)[/]")
                continue
            critiques = {r["caption"]: r["critique"] for r in stage["critiques"] if r["image_id"] == image_id}
            if c := critiques.get(caption["caption"]):
                node.add(_critique_line(c))
                if c.get("feedback"):
                    node.add(f"[dim]feedback:[/] {escape(c['feedback'])}")
            for r in stage["refined"] or []:
                if r["image_id"] == image_id and r["original"] == caption["caption"]:
                    if r.get("rejected"):
                        node.add(f"[yellow]step rejected ({escape(r['rejected'])}):[/] {escape(r.get('reason') or '')}")
                    elif r.get("error"):
                        node.add(f"[red]step failed:[/] {escape(r['error'])}")
                    else:
                        node.add(f"refined → [green]{escape(r['refined'])}[/]")
            if stage["pairs"] is not None:
                n = sum(1 for p in stage["pairs"] if p["image_id"] == image_id)
                node.add(f"[dim]{n} preference pair(s)[/]")
    return [trees[i] for i in image_ids]


def held_out_history(log: RunLog, image_id: str) -> Tree | None:
    """One held-out image's caption by each evaluated student (the final one last), or None if the run
    never evaluated it. Held-out images are captioned only: never critiqued, never trained on."""
    final = log.final_eval()
    tree = None
    for k in log.rounds_with("eval"):
        row = next((r for r in log.read_stage(k, "eval") if r["image_id"] == image_id), None)
        if row is None:
            continue
        if tree is None:
            truth = ", ".join(f"{n} {label}" if n > 1 else label for label, n in (row.get("objects") or {}).items())
            tree = Tree(f"[bold]{escape(image_id)}[/] (held-out: captioned, never critiqued or trained on)"
                        + (f"\n[dim]annotated:[/] {escape(truth)}" if truth else ""))
        who = "the final student" if final and k == final["round"] else f"the student entering round {k}"
        tree.add(f"{who}: [cyan]{escape(row['caption'])}[/]")
    return tree


def cmd_show(log: RunLog, image: str | None) -> None:
    cfg = log.config
    rounds = log.rounds_with("captions")
    captions = log.read_stage(rounds[0], "captions") if rounds else []
    ids = [image] if image else [r["image_id"] for r in captions][:8]
    trained = image is None or any(r["image_id"] == image for r in captions) or any(  # round 0 read once
        r["image_id"] == image for k in rounds[1:] for r in log.read_stage(k, "captions"))
    held_out = None if trained else held_out_history(log, image)
    if not trained and held_out is None:  # checked before anything is printed
        evaluated = next((log.read_stage(k, "eval") for k in log.rounds_with("eval")), [])
        raise LookupError(f"image {image!r} is not in run {log.root.name}, neither trained on nor held out; known: "
                          + ", ".join(r["image_id"] for r in [*captions[:6], *evaluated[:4]]))
    console.print(escape(f"{log.root.name}  images={cfg['loop']['images']}  student={cfg['student']['model']}  "
                         f"critic={cfg['critic']['backend']}  status={log.status()}"))
    if rows := log.metrics(final=True):
        console.print(metrics_table(rows, title="rounds"))
    if held_out is not None:
        console.print(held_out)
        return
    for tree in image_histories(log, ids):
        console.print(tree)
    if not image and len(captions) > len(ids):
        console.print(f"[dim]… {len(captions) - len(ids)} more images: use --image ID[/]")


def cmd_diff(a: RunLog, b: RunLog) -> None:
    ca, cb = a.config, b.config
    table = Table(title=escape(f"config: {a.root.name} vs {b.root.name}"))
    for col in ("key", a.root.name, b.root.name):
        table.add_column(escape(col))
    for section in sorted(set(ca) | set(cb)):
        for key in sorted(set(ca.get(section, {})) | set(cb.get(section, {}))):
            va, vb = ca.get(section, {}).get(key), cb.get(section, {}).get(key)
            if va != vb and key != "run_id":
                table.add_row(escape(f"{section}.{key}"), escape(json.dumps(va)), escape(json.dumps(vb)))
    console.print(table if table.row_count else f"config: {escape(a.root.name)} and {escape(b.root.name)} have the "
                  "same settings (run_id aside)")
    for log in (a, b):
        if rows := log.metrics(final=True):
            console.print(metrics_table(rows, title=escape(log.root.name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refine.runs", description="Inspect refine runs (reads runs/ only).")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where runs live (default: runs)")
    common = argparse.ArgumentParser(add_help=False)  # --runs-dir after the command works too
    common.add_argument("--runs-dir", type=Path, default=argparse.SUPPRESS, help="where runs live (default: runs)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="one line per run: images, critic, rounds, score, status")
    show = sub.add_parser("show", parents=[common], help="a run's rounds, and per image how its caption changed and why")
    show.add_argument("run", help="run id (a folder of runs/) or a path")
    show.add_argument("--image", help="only this image id")
    diff = sub.add_parser("diff", parents=[common], help="config differences and metrics of two runs")
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            cmd_list(args.runs_dir)
        elif args.command == "show":
            cmd_show(RunLog.open(args.run, args.runs_dir), args.image)
        else:
            cmd_diff(RunLog.open(args.run_a, args.runs_dir), RunLog.open(args.run_b, args.runs_dir))
    except (OSError, LookupError, ValueError) as e:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
