"""Where a demo student's substitutions come from: its encoder (it does not see the shape) or its decoder
(it sees it and names another).

A linear probe (logistic regression) reads each grid cell's object from the encoder's token for that cell
(the toy ViT has one patch per cell), trained on training scenes of the student's pretraining seed. For
each substitution in a run's evaluated captions (``ObjectDiff.substitutions``: a present object named as
another it resembles), it says what the probe reads at the true object's cells: the true label means the
encoder holds what the caption got wrong. A probe is a lower bound on what the encoder holds (the
decoder reads it through attention, not a linear map), so "probe wrong" does not prove an encoder error.

    python -m refine.demo.probe runs/demo-shapes-seed2-val            # the final student
    python -m refine.demo.probe runs/demo-shapes-seed2-val --before   # the toy student it started from
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from refine.images import shapes

EMPTY = "empty"
PROBE_STEPS = 600


def cell_tokens(model, scenes: Sequence[shapes.Scene], batch_size: int = 128) -> torch.Tensor:
    """``[N, 9, C]``: the encoder's last hidden state per grid cell (the CLS token dropped)."""
    from refine.demo.toy_student import normalise, pixel_array

    out = []
    with torch.no_grad():
        for i in range(0, len(scenes), batch_size):
            pixels = normalise(torch.from_numpy(pixel_array(scenes[i:i + batch_size])))
            out.append(model.encoder(pixel_values=pixels).last_hidden_state[:, 1:, :])
    return torch.cat(out)


def cell_labels(scenes: Sequence[shapes.Scene]) -> list[list[str]]:
    """Per scene, the label in each of the 9 cells (``EMPTY`` where none)."""
    labels = [[EMPTY] * shapes.GRID ** 2 for _ in scenes]
    for row, scene in zip(labels, scenes, strict=True):
        for colour, shape, cell in scene.items:
            row[cell] = f"{colour} {shape}"
    return labels


def fit_probe(features: torch.Tensor, labels: Sequence[str], classes: Sequence[str], seed: int = 0):
    """A linear classifier of ``features`` ``[M, C]`` into ``classes`` (standardised inputs, full-batch
    Adam); returns ``predict(features) -> list[str]``."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    target = torch.tensor([classes.index(label) for label in labels])
    with torch.random.fork_rng():  # seeded, without touching the caller's random state
        torch.manual_seed(seed)
        linear = torch.nn.Linear(features.shape[1], len(classes))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear((features - mean) / std), target).backward()
        optimizer.step()

    def predict(x: torch.Tensor) -> list[str]:
        with torch.no_grad():
            return [classes[i] for i in linear((x - mean) / std).argmax(-1).tolist()]

    return predict


def probe_substitutions(model, captions: dict[str, str], scenes: Sequence[shapes.Scene],
                        train_scenes: Sequence[shapes.Scene]) -> dict[str, Any]:
    """For each substitution in ``captions`` (image id -> caption) of ``scenes``, what a probe trained on
    ``train_scenes`` reads at the true object's cells. Returns the occupied cells of ``scenes``, how many
    the probe misreads, and per substitution ``{image_id, said, true, probe}`` with the two tallies."""
    from refine.objects import compare

    classes, cells = [EMPTY, *shapes.LABELS], shapes.GRID ** 2
    train_labels = [label for row in cell_labels(train_scenes) for label in row]
    predict = fit_probe(cell_tokens(model, train_scenes).flatten(0, 1), train_labels, classes)
    flat = predict(cell_tokens(model, scenes).flatten(0, 1))
    read = [flat[i:i + cells] for i in range(0, len(flat), cells)]  # per scene, per cell
    truth = cell_labels(scenes)
    occupied = [(r, t) for reads, truths in zip(read, truth) for r, t in zip(reads, truths) if t != EMPTY]
    vocab = shapes.vocabulary()
    found = []
    for scene, reads, truths in zip(scenes, read, truth):
        if scene.id in captions:
            for said, true in compare(captions[scene.id], scene.objects, vocab).substitutions:
                probe = [r for r, t in zip(reads, truths) if t == true]
                found.append({"image_id": scene.id, "said": said, "true": true, "probe": probe})
    return {
        "cells": len(occupied),
        "probe_errors": sum(r != t for r, t in occupied),
        "substitutions": found,
        "probe_reads_the_truth": sum(all(p == s["true"] for p in s["probe"]) for s in found),
        "probe_reads_the_caption": sum(s["said"] in s["probe"] for s in found),
    }


def main(argv: Sequence[str] | None = None) -> int:
    from refine.infra.atomic import read_jsonl
    from refine.offline import set_offline_env
    from refine.stages.student import load_student

    set_offline_env()
    parser = argparse.ArgumentParser(prog="python -m refine.demo.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a demo run's folder (runs/demo-shapes-seed2-val)")
    parser.add_argument("--before", action="store_true", help="probe the student the run started from, on its round-0 captions")
    parser.add_argument("--train", type=int, default=4000, help="training scenes to fit the probe on (default: 4000)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)

    run = Path(args.run)
    if not (run / "config.json").is_file():
        print(f"error: {args.run}: not a run folder (no config.json); give a demo run, e.g. runs/demo-shapes-seed0",
              file=sys.stderr)
        return 2
    config = json.loads((run / "config.json").read_text())
    spec = config["loop"]["eval_images"]
    evaluated = sorted(int(p.parent.name) for p in (run / "rounds").glob("*/eval.jsonl"))
    if not spec.startswith("shapes") or not evaluated:
        print(f"error: {args.run}: no evaluated shapes scenes (loop.eval_images={spec!r}); probe a demo run", file=sys.stderr)
        return 2
    k = evaluated[0] if args.before else evaluated[-1]
    student_dir = config["student"]["model"] if args.before else run / "student" / "last"
    if not Path(student_dir, "config.json").is_file():
        print(f"error: {args.run}: its {'starting' if args.before else 'final'} student {student_dir} is not there "
              f"({'rebuild the toy student with the demo' if args.before else 'finish the run first'})", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    model = load_student(student_dir, device="cpu", precision="fp32").model.eval()
    split, n, scene_seed = shapes.parse_spec(spec)
    captions = {row["image_id"]: row["caption"] for row in read_jsonl(run / "rounds" / f"{k:03d}" / "eval.jsonl")}
    seed = config["loop"]["seed"]  # the demo's --seed: the toy student's pretraining seed too
    result = probe_substitutions(model, captions, shapes.make_scenes(n, split, seed=scene_seed),
                                 shapes.make_scenes(args.train, "train", seed=seed))
    print(f"{'before' if args.before else 'after'} ({student_dir}, round {k} captions): probe errors "
          f"{result['probe_errors']} of {result['cells']} occupied cells")
    for s in result["substitutions"]:
        print(f"  {s['image_id']}: said {s['said']!r} for {s['true']!r}; the probe reads {', '.join(s['probe'])}")
    print(f"substitutions {len(result['substitutions'])}: the probe reads the true object in "
          f"{result['probe_reads_the_truth']}, the caption's in {result['probe_reads_the_caption']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
