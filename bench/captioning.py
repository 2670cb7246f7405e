"""Section 4: the student's captioning throughput at the real size (random weights, CPU fp32).

``Student.caption`` on distinct images, greedy and beam 4, at batch 10 and batch 1, with exactly 16
new tokens (``min_new_tokens=16``: random weights would otherwise stop at a random EOS and time less
work). One untimed warm-up call first. Batch 1 runs over ``n_single`` images to keep the benchmark
inside its time budget; images/s is comparable either way.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.data import bench_records
from bench.measure import Row, timed

NEW_TOKENS = 16


def run(model_dir: Path, reps: int, quick: bool, size: str) -> list[Row]:
    import torch

    from refine.stages.student import load_student

    student = load_student(model_dir, device="cpu", precision="auto")
    n_batch, n_single = (4, 2) if quick else (10, 5)
    images = [r.image for r in bench_records(n_batch)]
    gen = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    # Warm-up (first-call allocations, kernel selection), checking that generation makes exactly 16 tokens.
    ids = student.model.generate(pixel_values=student.pixel_values(images[:2]), num_beams=1, **gen)
    new_tokens = ids.shape[1] - 1  # the decoder-start token, then the generated ones
    if new_tokens != NEW_TOKENS:
        raise RuntimeError(f"generate made {new_tokens} new tokens, expected {NEW_TOKENS}")

    variants = [  # (name, beams, batch size, images)
        (f"greedy, batch {n_batch}", 1, n_batch, images),
        (f"beam 4, batch {n_batch}", 4, n_batch, images),
        ("greedy, batch 1", 1, 1, images[:n_single]),
        ("beam 4, batch 1", 4, 1, images[:n_single]),
    ]
    seconds: dict[str, list[float]] = {name: [] for name, *_ in variants}
    for rep in range(reps):
        for name, beams, batch, imgs in variants[rep % len(variants):] + variants[: rep % len(variants)]:
            t, _ = timed(lambda: student.caption(imgs, num_beams=beams, batch_size=batch, **gen))
            seconds[name].append(t)

    section = "4 student captioning"
    setup = (f"ViT-GPT2 {size}, random weights, CPU fp32, {torch.get_num_threads()} torch threads, {NEW_TOKENS} new tokens "
             f"(min_new_tokens={NEW_TOKENS}, checked on the warm-up call)")
    earlier = {f"greedy, batch {n_batch}": "earlier: 10 images greedy in 5.2–6.8 s",
               f"beam 4, batch {n_batch}": "earlier: 10 images beam 4 in 11.5–12.5 s"}
    rows = []
    for name, _, _, imgs in variants:
        rows.append(Row(section, f"{name}: images/s", "img/s", [len(imgs) / t for t in seconds[name]],
                        note=f"{len(imgs)} images per call, median {statistics.median(seconds[name]):.2f} s"
                             + (f"; {setup}" if not rows else "")))
        if name in earlier:
            rows.append(Row(section, f"{name}: wall time for {len(imgs)} images", "s", seconds[name],
                            earlier=earlier[name]))
    return rows
