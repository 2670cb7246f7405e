"""Section 6: GPU figures, measured only where ``torch.cuda.is_available()``.

- caption latency per image at batch 1, fp16 autocast (``load_student(precision="auto")`` on CUDA),
  greedy, 16 new tokens: P50 and P95 over ``N_CALLS`` calls per repetition (target: P95 ≤ 50 ms),
  with the default dynamic KV cache (eager: one kernel launch per op per token, so the host's dispatch
  speed sets the latency) and with ``static_cache=True`` (transformers compiles the decoder step into
  CUDA graphs; its one-time compile is reported too);
- one DPO step of ``refine.stages.dpo.update`` at 16 pairs (fp16 autocast + GradScaler), time and peak GPU
  memory (``torch.cuda.max_memory_allocated``), in a fresh subprocess as in section 3;
- images/s of a whole ``refine.loop`` round on the GPU, with the critic answered by the local server.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.data import bench_records
from bench.devserver import ServerProcess
from bench.dpo_step import interleaved
from bench.loop_round import run_round, stage_seconds, write_images
from bench.measure import Row, Target

SECTION = "6 GPU"
N_CALLS = 50
GB = 1e9


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def caption_latency(model_dir: Path, reps: int, n_calls: int, static_cache: bool = False):
    """``(p50s, p95s, warm-up seconds)``: per-repetition percentiles over ``n_calls`` batch-1 captions."""
    import torch

    from refine.stages.student import load_student

    student = load_student(model_dir, device="cuda", precision="auto", static_cache=static_cache)
    images = [r.image for r in bench_records(10)]
    gen = {"max_new_tokens": 16, "min_new_tokens": 16}
    start = time.perf_counter()
    for image in images[:5]:  # warm-up: CUDA context, kernels, allocator (and the compile, if static)
        student.caption([image], **gen)
    torch.cuda.synchronize()
    warmup = time.perf_counter() - start
    p50, p95 = [], []
    for _ in range(reps):
        latencies = []
        for i in range(n_calls):
            torch.cuda.synchronize()
            start = time.perf_counter()
            student.caption([images[i % len(images)]], **gen)
            torch.cuda.synchronize()
            latencies.append(1000 * (time.perf_counter() - start))
        p50.append(percentile(latencies, 50))
        p95.append(percentile(latencies, 95))
    return p50, p95, warmup


def run(model_dir: Path, reps: int, quick: bool, workdir: Path) -> list[Row]:
    import torch

    if not torch.cuda.is_available():
        return [Row(SECTION, "GPU section", "", skipped="skipped: no GPU (torch.cuda.is_available() is False)")]
    name = torch.cuda.get_device_name(0)
    n_calls = 5 if quick else N_CALLS
    p50, p95, _ = caption_latency(model_dir, reps, n_calls)
    static_p50, static_p95, compile_s = caption_latency(model_dir, reps, n_calls, static_cache=True)
    torch.cuda.empty_cache()  # give the cached blocks back before the DPO subprocess needs the GPU
    rows = [
        Row(SECTION, "caption latency per image, batch 1, fp16, default dynamic cache, P50", "ms", p50, note=name),
        Row(SECTION, "caption latency per image, batch 1, fp16, default dynamic cache, P95", "ms", p95,
            note="eager decoding: ~550 kernel launches per token; the host's dispatch speed sets the latency"),
        Row(SECTION, "caption latency per image, batch 1, fp16, static_cache=True, P50", "ms", static_p50),
        Row(SECTION, "caption latency per image, batch 1, fp16, static_cache=True, P95", "ms", static_p95,
            Target("<=", 50), note="--student.static_cache=true: the decoder step compiled into CUDA graphs"),
        Row(SECTION, "static_cache=True: first 5 captions (one-time compile)", "s", [compile_s]),
    ]
    n_pairs = 4 if quick else 16
    dpo = interleaved(("dpo",), model_dir, reps, n_pairs=n_pairs, device="cuda")["dpo"]
    rows += [
        Row(SECTION, f"DPO step at {n_pairs} pairs (refine.stages.dpo.update, fp16 autocast)", "s",
            [s["step"] for s in dpo["steps"]], note=f"reference pass median "
            f"{statistics.median(s['reference'] for s in dpo['steps']):.3f} s"),
        Row(SECTION, f"DPO step at {n_pairs} pairs: peak GPU memory", "GB", [b / GB for b in dpo["gpu_peak"]]),
    ]
    n_images = 4 if quick else 10
    images = write_images(workdir / "gpu-round-images", n_images)
    rates, per_stage = [], []
    with ServerProcess(latency=0.3) as server:
        for _ in range(reps):
            stages = stage_seconds(run_round(
                images, model_dir, workdir, "--critic.backend=openai", f"--critic.base_url={server.base_url}",
                "--critic.model=gpt-4o", "--critic.api_key_env=REFINE_BENCH_API_KEY", "--regions.model=yolov8n.yaml",
                "--student.device=cuda", "--regions.device=0"))
            rates.append(n_images / sum(stages.values()))
            per_stage.append(stages)
    split = ", ".join(f"{k} {statistics.median(s[k] for s in per_stage):.2f} s" for k in per_stage[0])
    rows.append(Row(SECTION, f"whole loop round, {n_images} images, critic = local server (300 ms)", "img/s", rates,
                    note=f"refine.loop's stage timer, a fresh process per round (first-call costs included); "
                         f"ViT-GPT2 random weights on the GPU; median stage seconds: {split}"))
    return rows
