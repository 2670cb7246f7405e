"""``python -m refine.score RUN``: per-round scores, the student's captions before and after the step.

For every round ``k`` of a run, "before" is the student's main caption and "after" the refined one.
Metrics (``--metrics``, default all that apply):

- ``clipscore``: CLIP-S (Hessel et al. 2021): "A photo depicts " prefix, w = 2.5, clamped per sample
- ``pickscore``: PickScore_v1, ``exp(logit_scale) * cos`` as in its reference snippet
- ``chair``: CHAIR_i, CHAIR_s, recall, exact (images with known objects; the grounded critic's matcher)
- ``cider`` / ``bleu``: CIDEr-D and BLEU-4 (images with reference captions)
- ``diversity``: distinct-1/2, vocabulary size, mean length
- ``winrate``: the last round's caption against round 0's, judged pairwise by the run's critic
  (order randomised per image with a fixed seed; the judge's answers are cached)

Writes ``runs/<id>/scores.json`` and prints a table. Images are re-read from the run's config.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Collection, Sequence
from typing import Any

from refine.infra.atomic import write_json
from refine.infra.runlog import RunLog
from refine.metrics.summary import mean, object_metrics

METRICS = ("clipscore", "pickscore", "chair", "cider", "bleu", "diversity", "winrate")


def text_scores(captions: Sequence[str], records: Sequence, metrics: Sequence[str], vocab) -> dict[str, float]:
    """Scores that need only text and annotations (CHAIR read with the image set's ``vocab``)."""
    from refine.metrics import text as m

    out: dict[str, float] = {}
    if "chair" in metrics:
        known = [(c, r.objects) for c, r in zip(captions, records) if r.objects is not None]
        if known:
            out.update({f"chair/{k}": v for k, v in
                        object_metrics([c for c, _ in known], [o for _, o in known], vocab).items()})
    with_refs = [(c, r.references) for c, r in zip(captions, records) if r.references]
    if len(with_refs) >= 2 and "cider" in metrics:  # CIDEr-D's idf needs a corpus of 2+ images
        out["cider_d"] = float(m.cider_d([c for c, _ in with_refs], [refs for _, refs in with_refs]).mean())
    if with_refs and "bleu" in metrics:
        out["bleu_4"] = m.corpus_bleu([c for c, _ in with_refs], [refs for _, refs in with_refs])
    if "diversity" in metrics:
        out.update({f"diversity/{k}": v for k, v in m.diversity(list(captions)).to_json().items()})
    return out


def win_rate(critic, records, first: dict[str, str], last: dict[str, str], seed: int = 0) -> dict[str, float]:
    """Fraction of images where the critic prefers the last round's caption to round 0's.

    An image whose caption did not change is not judged (no request: the answer could only be the judge's
    position bias) and is counted in ``winrate/unchanged``. A critic with a pairwise judge
    (``judge_pair``) is asked which caption is better, in a random order per image; its ties are left
    out, and a judgement that fails (call or parse) is counted in ``winrate/failed`` instead of ending
    the scoring. The grounded critic has no judge; it compares the two captions' critique scores (ties
    count half).
    """
    from critics.base import CritiqueRequest

    rng = random.Random(seed)
    wins, n, failed, unchanged, first_error = 0.0, 0, 0, 0, None
    for r in records:
        a, b = first.get(r.id), last.get(r.id)
        if a is None or b is None:
            continue
        if a.strip() == b.strip():
            unchanged += 1
            continue
        if hasattr(critic, "judge_pair"):
            from critics.openai_vlm import JudgeError

            flip = rng.random() < 0.5
            try:
                winner, _ = critic.judge_pair(r.image, *((b, a) if flip else (a, b)), image_sha256=r.sha256)
            except JudgeError as e:
                failed, first_error = failed + 1, first_error or str(e)
                continue
            if winner is None:
                continue
            last_won = (winner == 0) == flip
            wins += 1.0 if last_won else 0.0
        else:
            ca, cb = critic.critique_many([CritiqueRequest(r.id, r.image, r.sha256, t, None, r.objects) for t in (a, b)])
            if not (ca.ok and cb.ok):
                continue
            wins += 1.0 if cb.score > ca.score else 0.5 if cb.score == ca.score else 0.0
        n += 1
    return {"winrate/last_vs_first": wins / n if n else float("nan"), "winrate/judged": n, "winrate/failed": failed,
            "winrate/unchanged": unchanged, **({"winrate/first_error": first_error} if first_error else {})}


IMAGELESS = {"diversity"}  # metrics that read the captions alone


IMAGES_AT_ONCE = 256  # decoded images a CLIP-style score holds at a time


def _in_chunks(scorer, recs: list, texts: list[str]) -> list[float]:
    """``scorer.score`` of each (image, text), ``IMAGES_AT_ONCE`` images decoded at a time: a round of a
    million images is scored without holding them all (5,000 photos held at once took 7 GB)."""
    return [value for i in range(0, len(recs), IMAGES_AT_ONCE)
            for value in scorer.score([r.image for r in recs[i : i + IMAGES_AT_ONCE]],
                                      texts[i : i + IMAGES_AT_ONCE]).tolist()]


def score_run(log: RunLog, metrics: Sequence[str], clip_model: str, pick_model: str, pick_processor: str,
              device: str | None = None, chosen: Collection[str] = METRICS) -> dict[str, Any]:
    """The run's scores. A model metric not in ``chosen`` (asked for by name, or its model named) whose model
    cannot be loaded is skipped with a note instead of stopping the scoring."""
    from refine.images import ImageSet, load_images
    from refine.metrics.clip import load_clip_scorer, load_pick_scorer

    cfg = log.config
    notes: list[str] = []
    try:
        images = load_images(cfg["loop"]["images"], cfg["loop"].get("coco_root") or None)
    except (OSError, ValueError) as e:
        if not set(metrics) <= IMAGELESS:
            raise ValueError(f"{e} (the run's images are needed for {', '.join(sorted(set(metrics) - IMAGELESS))}; "
                             f"--metrics {','.join(sorted(IMAGELESS))} scores without them)") from None
        images = ImageSet(cfg["loop"]["images"], [])
    notes.extend(images.notes)
    records, vocab = images.records, images.vocabulary()
    by_id = {r.id: r for r in records}
    metrics = list(metrics)
    models = {"clipscore": lambda: load_clip_scorer(clip_model, device=device),
              "pickscore": lambda: load_pick_scorer(pick_model, pick_processor, device=device)}
    loaded = {}
    for name, load in models.items():
        if name in metrics:
            try:
                loaded[name] = load()
            except OSError as e:
                if name in chosen:
                    raise
                metrics.remove(name)
                notes.append(f"{name}: skipped ({e})")
    clip, pick = loaded.get("clipscore"), loaded.get("pickscore")

    rounds: list[dict[str, Any]] = []
    main_by_round: list[dict[str, str]] = []
    for k in log.rounds_with("captions"):
        main = {r["image_id"]: r["caption"] for r in log.read_stage(k, "captions")}
        refined = {r["image_id"]: r["refined"] for r in log.read_stage(k, "refined")
                   if r["original"] == main.get(r["image_id"])} if log.has_stage(k, "refined") else {}
        main_by_round.append(main)
        row: dict[str, Any] = {"round": k}
        gone = sum(i not in by_id for i in main)
        if gone and records:
            notes.append(f"round {k}: {gone} of its {len(main)} images are no longer in {images.spec}: only "
                         "diversity counts their captions")
        if not log.has_stage(k, "refined"):
            notes.append(f"round {k}: no refined captions (the run stopped before its step): after = before")
        for side, captions in (("before", main), ("after", {**main, **refined})):
            recs = [by_id[i] for i in captions if i in by_id]
            texts = [captions[r.id] for r in recs]
            scores = text_scores(texts, recs, [m for m in metrics if m not in IMAGELESS], vocab)
            scores.update(text_scores(list(captions.values()), [], [m for m in metrics if m in IMAGELESS], vocab))
            if clip is not None:
                scores["clipscore"] = mean(_in_chunks(clip, recs, texts), skip_nan=True)
            if pick is not None:
                scores["pickscore"] = mean(_in_chunks(pick, recs, texts), skip_nan=True)
            row[side] = scores
        rounds.append(row)
    result: dict[str, Any] = {"run": log.root.name, "metrics": list(metrics), "rounds": rounds}
    result["notes"] = notes + [note for note, applies in (
        ("the run has no captioned round yet: nothing to score", not rounds),
        ("chair: no image of the run has annotated objects", "chair" in metrics and all(r.objects is None for r in records)),
        ("cider, bleu: no image of the run has reference captions",
         bool({"cider", "bleu"} & set(metrics)) and not any(r.references for r in records))) if applies]
    if "winrate" in metrics and len(main_by_round) < 2:
        result["winrate/note"] = "the win rate compares the last round with round 0: it needs 2 rounds or more"
    if "winrate" in metrics and len(main_by_round) > 1:
        from critics import make_critic
        from refine.config import Config, apply_dict

        config = apply_dict(Config(), cfg)
        critic = make_critic(config.critic, vocabulary=vocab, max_words=config.step.max_words)
        result.update(win_rate(critic, records, main_by_round[0], main_by_round[-1]))
    return result


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from refine.runs import fmt

    keys = sorted({k for row in result["rounds"] for side in ("before", "after") for k in row[side]})
    table = Table(title=escape(f"scores: {result['run']}  (before = student caption, after = refined)"))
    table.add_column("metric", no_wrap=True)
    for row in result["rounds"]:
        table.add_column(f"r{row['round']} before", justify="right")
        table.add_column(f"r{row['round']} after", justify="right")
    for key in keys:
        table.add_row(key, *[fmt(row[side].get(key)) for row in result["rounds"] for side in ("before", "after")])
    console = Console()
    console.print(table)
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}")
    if "winrate/note" in result:
        console.print(f"[yellow]{result['winrate/note']}[/]")
    if "winrate/last_vs_first" in result:
        console.print(f"critic win rate, last round vs round 0: {fmt(result['winrate/last_vs_first'])} "
                      f"over {result['winrate/judged']} images whose caption changed"
                      + (f"; {result['winrate/unchanged']} unchanged, not judged" if result.get("winrate/unchanged") else "")
                      + (f" ({result['winrate/failed']} judgements failed)" if result.get("winrate/failed") else ""))


def main(argv: list[str] | None = None) -> int:
    from refine.metrics.clip import DEFAULT_CLIP_MODEL, DEFAULT_PICKSCORE_MODEL, DEFAULT_PICKSCORE_PROCESSOR

    parser = argparse.ArgumentParser(prog="python -m refine.score", description="Score a run per round: the student's captions (before) and the refined ones (after).",
                                     epilog="Writes runs/<id>/scores.json.")
    parser.add_argument("run", help="run id (a folder of runs/) or a path")
    parser.add_argument("--runs-dir", default="runs", help="where runs live (default: runs)")
    parser.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)} (default: all that apply; "
                                          "a default CLIP model that cannot be loaded is then skipped with a note)")
    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIPScore model (hub id or dir)")
    parser.add_argument("--pick-model", default=DEFAULT_PICKSCORE_MODEL, help="PickScore model (hub id or dir)")
    parser.add_argument("--pick-processor", default=DEFAULT_PICKSCORE_PROCESSOR, help="PickScore processor")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in (args.metrics if args.metrics is not None else ",".join(METRICS)).split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        parser.error(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if not metrics:
        parser.error(f"--metrics names no metric; choose from {', '.join(METRICS)}")
    try:
        log = RunLog.open(args.run, args.runs_dir)
        named = {"clipscore": args.clip_model != DEFAULT_CLIP_MODEL,
                 "pickscore": (args.pick_model, args.pick_processor) != (DEFAULT_PICKSCORE_MODEL, DEFAULT_PICKSCORE_PROCESSOR)}
        chosen = metrics if args.metrics is not None else [m for m, given in named.items() if given]
        result = score_run(log, metrics, args.clip_model, args.pick_model, args.pick_processor, args.device, chosen)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(log.root / "scores.json", result)
    render(result)
    failed, judged = result.get("winrate/failed", 0), result.get("winrate/judged", 0)
    if failed > judged:  # the win rate of the few that answered is no result
        print(f"error: {failed} of {failed + judged} win-rate judgements failed (the first: "
              f"{result['winrate/first_error']}); fix the judge and score again (the judgements that answered "
              "are cached)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
