"""Section 5: the regions stage: how to batch YOLO over tiles, and the stage's share of a round.

Per image (ultralytics' ``bus.jpg``), ``yolov8n.yaml`` (random weights: the work does not depend on
the values) at ``imgsz`` 320 with torch at 2 threads, three ways over the same windows (the full image
plus the 2x2 and 3x3 tiles of ``RegionConfig``'s defaults):

- one ``predict`` call per tile;
- one batched call per tile size, which is what ``refine.stages.regions.detect`` does (measured by calling it);
- one batched call of all tiles (mixed sizes: ultralytics pads each to a full square).

ultralytics' first ``predict`` sets torch to ``min(8, cores - 1)`` threads (1 here) for the whole
process; it happens once, in the untimed warm-up, and the thread count is set back to 2 afterwards.

The stage's share of a round is measured on a real ``refine.loop`` round (10 images, the tiny student,
the grounded critic, regions on), and estimated for a real-size round from the other sections' times.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench.data import shipped_photo
from bench.loop_round import run_round, stage_seconds, write_images
from bench.measure import Row, ratios, timed

THREADS = 2


def _windows(image, config) -> list[tuple[float, float, float, float]]:
    from refine.stages.tiling import tile_boxes

    width, height = image.size
    boxes = [(0.0, 0.0, float(width), float(height))]
    for grid in config.grids:
        boxes += tile_boxes(width, height, grid, config.overlap)
    return boxes


def detector_timings(reps: int, imgsz: int) -> dict[str, Any]:
    import torch

    from refine.images.records import record_from_path
    from refine.infra.devices import preserved_torch_threads
    from refine.stages.regions import RegionConfig, detect, load_detector

    image = record_from_path(shipped_photo("bus")).image
    config = RegionConfig(model="yolov8n.yaml", imgsz=imgsz)
    kwargs = {"imgsz": config.imgsz, "conf": config.conf, "verbose": False}
    windows = _windows(image, config)

    def crops():
        return [image.crop(tuple(int(v) for v in box)) for box in windows]

    def per_tile():
        return [detector.predict([crop], **kwargs) for crop in crops()]

    def per_size():
        return detect(image, detector, config)

    def one_call():
        return detector.predict(crops(), **kwargs)

    variants = {"per-tile loop": per_tile, "one call per tile size (refine.stages.regions.detect)": per_size,
                "one call of all tiles": one_call}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    threads_seen = set()
    with preserved_torch_threads():
        detector = load_detector(config.model)
        detect(image, detector, config)  # warm-up: builds ultralytics' predictor, which sets torch's threads
        torch.set_num_threads(THREADS)
        for fn in variants.values():
            fn()  # warm-up of each batch shape
        order = list(variants)
        for rep in range(reps):
            for name in order[rep % 3:] + order[: rep % 3]:
                t, _ = timed(variants[name])
                seconds[name].append(t)
                threads_seen.add(torch.get_num_threads())
    return {"seconds": seconds, "threads": sorted(threads_seen), "windows": len(windows),
            "size": image.size, "grids": config.grids}


def run(reps: int, quick: bool, workdir: Path, tiny_student_dir: Path, estimate_from: dict[str, float]) -> list[Row]:
    section = "5 regions"
    imgsz = 160 if quick else 320
    timing = detector_timings(reps, imgsz)
    sec = timing["seconds"]
    loop_name, size_name, all_name = list(sec)
    setup = (f"bus.jpg {timing['size'][0]}x{timing['size'][1]}, {timing['windows']} windows (full + grids "
             f"{', '.join(f'{g}x{g}' for g in timing['grids'])}), yolov8n.yaml random weights, imgsz {imgsz}, "
             f"torch threads during timing: {timing['threads']}")
    earlier = {loop_name: "earlier: 386 ms", size_name: "earlier: 279 ms", all_name: "earlier: 361 ms"}
    rows = [Row(section, f"{name}, per image", "ms", [1000 * t for t in sec[name]], earlier=earlier[name],
                note=setup if i == 0 else "") for i, name in enumerate(sec)]
    rows.append(Row(section, "per-tile loop / one call per tile size (same rep)", "×", ratios(sec[loop_name], sec[size_name])))
    rows.append(Row(section, "one call of all tiles / one call per tile size (same rep)", "×",
                    ratios(sec[all_name], sec[size_name])))

    # The stage's share of a measured round: the tiny student makes every other stage cheap, so this is
    # the upper end of the share.
    n_images = 4 if quick else 10
    images = write_images(workdir / "round-images", n_images)
    shares, round_s = [], []
    for _ in range(reps):
        stages = stage_seconds(run_round(images, tiny_student_dir, workdir, "--critic.backend=grounded",
                                         "--regions.model=yolov8n.yaml", f"--regions.imgsz={imgsz}"))
        shares.append(100 * stages.get("regions", math.nan) / sum(stages.values()))
        round_s.append(sum(stages.values()))
    rows.append(Row(section, f"regions share of a measured round ({n_images} images, tiny student, grounded critic)",
                    "%", shares, note=f"measured: refine.loop's own stage timer; round median "
                                      f"{statistics.median(round_s):.2f} s"))

    needed = ("caption_s", "critic_round_s", "dpo_step_s", "dpo_reference_s")
    if all(estimate_from.get(k) for k in needed):
        # One estimate per repetition, from that repetition's measurement in each section.
        n = min(len(sec[size_name]), *(len(estimate_from[k]) for k in needed))
        estimates, parts = [], []
        for i in range(n):
            regions_10 = 10 * sec[size_name][i]
            caption = 3 * estimate_from["caption_s"][i]  # greedy + 2 sampled captions per image (loop default)
            update = 2.5 * (estimate_from["dpo_step_s"][i] + estimate_from["dpo_reference_s"][i])  # ~10 pairs, 4/step
            critic = estimate_from["critic_round_s"][i]
            estimates.append(100 * regions_10 / (caption + regions_10 + critic + update))
            parts.append((regions_10, caption, critic, update))
        r, c, k, u = (statistics.median(p[j] for p in parts) for j in range(4))
        rows.append(Row(section, "regions share of a real-size round, estimated (10 images)", "%", estimates,
                        note=(f"estimate from the other sections, per rep: regions 10×(one call per tile size) / "
                              f"(caption 3×greedy batch 10 + regions + critic round (section 1) + update "
                              f"2.5×(DPO step + reference pass)); medians {r:.1f} / ({c:.1f} + {r:.1f} + {k:.2f} + "
                              f"{u:.1f}) s")))
    return rows
