"""Section 8, students: a DPO step against an SFT step for each architecture, and LoRA's memory.

For ViT-GPT2, BLIP and GIT at their hub sizes (random weights, CPU fp32; on a GPU, fp16 too): one
optimizer step of ``refine.stages.dpo.update`` in ``dpo`` mode against one in ``sft`` mode (cross-entropy
on the chosen captions), both through the same code, 4 pairs of 16-token captions, ``in_place=True`` as
the loop calls it. Each (architecture, variant) runs in a fresh process (``python -m bench.students``):
one untimed warm-up step, then ``reps`` timed ones; its peak RSS is sampled every 10 ms during each step
(GPU: ``max_memory_allocated``). DPO's reference pass (once per update, whatever the number of epochs) is timed apart, as in section 3.
Targets: DPO ≤ 1.2× the SFT step's time and ≤ 1.1× its peak memory. Then ViT-GPT2 with LoRA r = 16
against full fine-tuning, DPO both: peak memory ≤ 0.6×.

The processes run one after another, so the ratios compare steps a few seconds apart, not interleaved
as section 3 does; the load-average record says how busy the machine was.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.measure import Row, RSSPeak, Target, max_rss_bytes, ratios

GB = 1e9
ARCHS = ("vit-gpt2", "blip", "git")


def build(arch: str, workdir: Path, size: str, tokenizer_cache: str) -> Path:
    from refine.offline.models import build_vit_gpt2
    from refine.offline.students import build_blip, build_git

    out = workdir / f"student-{arch}-{size}"
    if arch == "vit-gpt2":
        return build_vit_gpt2(out, size=size, tokenizer_cache=tokenizer_cache)
    return (build_blip if arch == "blip" else build_git)(out, size=size)


def inputs(student, n_pairs: int = 4, n_tokens: int = 16):
    """Pairs of ``n_tokens``-token captions over ``n_pairs`` distinct drawn images."""
    from bench.data import bench_records
    from refine.offline.students import WORDS
    from refine.stages.pairs import PreferencePair

    records = bench_records(n_pairs)
    words = [w for w in WORDS if len(student.tokenizer(" " + w, add_special_tokens=False).input_ids) == 1]

    def caption(i: int) -> str:
        return " ".join(words[(i + j) % len(words)] for j in range(n_tokens))

    pairs = [PreferencePair(r.id, caption(i), caption(i + 7), "refined") for i, r in enumerate(records)]
    for p in pairs[:1]:
        got = len(student.tokenizer(p.chosen, add_special_tokens=False).input_ids)
        if got != n_tokens:
            raise RuntimeError(f"caption {p.chosen!r} is {got} tokens, not {n_tokens}")
    return pairs, {r.id: r.image for r in records}


def worker(model_dir: str, variant: str, reps: int, device: str) -> dict[str, Any]:
    import torch

    import refine.stages.dpo as dpo
    from refine.config import UpdateConfig
    from refine.stages.dpo import update
    from refine.students import load_student

    # Observe, not modify: the reference pass (once per update, whatever the epochs) is timed apart, as
    # in section 3, and the step is the rest.
    reference_seconds = []
    real_reference_logps = dpo.reference_logps

    def timed_reference_logps(*args, **kwargs):
        start = time.perf_counter()
        out = real_reference_logps(*args, **kwargs)
        reference_seconds.append(time.perf_counter() - start)
        return out

    dpo.reference_logps = timed_reference_logps

    torch.manual_seed(0)
    student = load_student(model_dir, device=device, precision="auto")
    pairs, images = inputs(student)
    mode = "sft" if variant == "sft" else "dpo"
    config = UpdateConfig(epochs=1, batch_size=len(pairs), mode=mode, lora_r=16 if variant == "lora" else 0)
    cuda = student.device.type == "cuda"
    sampler, steps, peaks, gpu = RSSPeak(), [], [], []
    for rep in range(reps + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        reference_seconds.clear()
        with sampler():
            start = time.perf_counter()
            student, history = update(student, pairs, images, config, in_place=True)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start - sum(reference_seconds)
            gc.collect()
        if len(history) != 1:
            raise RuntimeError(f"expected one optimizer step, got {len(history)}")
        if rep:  # the first is the warm-up
            steps.append(seconds)
            peaks.append(sampler.peak)
            if cuda:
                gpu.append(torch.cuda.max_memory_allocated())
    return {"arch": student.kind, "params": sum(p.numel() for p in student.model.parameters()), "steps": steps,
            "rss_peak": peaks, "gpu_peak": gpu, "max_rss": max_rss_bytes(), "precision": student.precision}


def run_worker(model_dir: Path, variant: str, reps: int, device: str = "cpu") -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.students", "--model-dir", str(model_dir), "--variant", variant,
                           "--reps", str(reps), "--device", device], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.students {variant} {model_dir.name} failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(reps: int, quick: bool, workdir: Path, tokenizer_cache: str) -> list[Row]:
    import torch

    size = "tiny" if quick else "base"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[Row] = []
    section = "8 students"
    for arch in ARCHS:
        model_dir = build(arch, workdir, size, tokenizer_cache)
        for device in devices:
            dpo, sft = run_worker(model_dir, "dpo", reps, device), run_worker(model_dir, "sft", reps, device)
            memory = "gpu_peak" if device == "cuda" else "rss_peak"
            label = f"{arch} {size} ({dpo['params'] / 1e6:.0f}M params), {device} {dpo['precision']}"
            rows += [
                Row(section, f"{label}: DPO step", "s", dpo["steps"]),
                Row(section, f"{label}: SFT step", "s", sft["steps"]),
                Row(section, f"{label}: DPO step / SFT step", "×", ratios(dpo["steps"], sft["steps"]), Target("<=", 1.2),
                    note="excl. DPO's reference pass (once per update)"),
                Row(section, f"{label}: peak memory, DPO / SFT", "×", ratios(dpo[memory], sft[memory]),
                    Target("<=", 1.1), note=f"medians {statistics.median(dpo[memory]) / GB:.2f} vs "
                                            f"{statistics.median(sft[memory]) / GB:.2f} GB"),
            ]
            if arch == "vit-gpt2":
                lora = run_worker(model_dir, "lora", reps, device)
                rows.append(Row(section, f"{label}: peak memory of a DPO step, LoRA r=16 / full fine-tuning", "×",
                                ratios(lora[memory], dpo[memory]), Target("<=", 0.6),
                                note=f"medians {statistics.median(lora[memory]) / GB:.2f} vs "
                                     f"{statistics.median(dpo[memory]) / GB:.2f} GB"))
    if len(devices) == 1:
        rows.append(Row(section, "the same rows in fp16 on a GPU", "", skipped="skipped: no GPU"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.students", description="one worker of benchmark section 8")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--variant", choices=("dpo", "sft", "lora"), required=True)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(worker(args.model_dir, args.variant, args.reps, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
