"""``python -m bench.run`` (``make bench``): every benchmark section, one markdown table, ``results.json``.

Sections (see bench/README.md): 1 critic stage against textgrad, 2 warm cache, 3 DPO step against an
SFT step, 4 student captioning throughput, 5 regions, 6 GPU (skipped without CUDA), 7 scale (5,000
images in bounded memory, the loop's overhead over the API floor, a kill -9 and resume), 8 students (a
DPO step against an SFT step for ViT-GPT2, BLIP and GIT; LoRA's memory), 9 serve (200 concurrent requests,
dynamic batching against batch size 1).

Every figure is measured over ``--reps`` repetitions (3 by default) and reported as median, min and
max. Comparisons are ratios within one repetition of this run, never against numbers from another
run or machine: shared machines drift. The load average is recorded at the start, before each
section and at the end, and printed with the table.

``--quick`` runs every section once at tiny sizes (a smoke test of the benchmark itself; its numbers
mean nothing) and writes to ``.cache/bench/results-quick.json`` unless ``--out`` says otherwise. The
GPT-2 tokenizer files, rebuilt offline from litellm's copy of tiktoken's ranks, are kept in ``.cache/bench``.
A failing section is recorded as an ERROR row and the others still run; the exit code is 1 then.
Missed targets are marked MISSED and do not change the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.measure import CPUSnapshot, Row, error_row, load_average, machine, markdown_table

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR.parent / ".cache" / "bench"  # the project's scratch dir (git-ignored, `make clean` empties it)
SECTIONS = ("critic", "dpo", "caption", "regions", "gpu", "scale", "students", "serve")


def setup_environment(workdir: Path) -> None:
    """Offline, and every library's files (caches, logs, settings) inside ``workdir``, not in $HOME or cwd."""
    from refine.offline import set_offline_env

    set_offline_env(log_dir=workdir / "textgrad-logs")
    # Importing ultralytics sets OMP_NUM_THREADS=1 when it is unset, and every subprocess we start (DPO
    # workers, loop rounds) would inherit it and run torch on one thread. Pin it to torch's own default.
    if not os.environ.get("OMP_NUM_THREADS"):
        import torch

        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    os.environ["YOLO_VERBOSE"] = "False"  # ultralytics' banners would land in the middle of the table
    for var, sub in (("XDG_CACHE_HOME", "xdg-cache"), ("REFINE_CACHE_DIR", "refine-cache"),
                     ("YOLO_CONFIG_DIR", "ultralytics"), ("MPLCONFIGDIR", "matplotlib")):
        os.environ[var] = str(workdir / sub)


def build_models(workdir: Path, quick: bool) -> tuple[Path, Path, str]:
    """``(real-size or, in quick mode, tiny model dir, tiny model dir, size name)``: random ViT-GPT2s."""
    from refine.offline.models import build_vit_gpt2
    from refine.offline.tokenizer import write_gpt2_tokenizer_files

    tokenizer = CACHE_DIR / "gpt2-tokenizer"
    if not (tokenizer / "merges.txt").is_file():  # rebuilding GPT-2's BPE files takes a few seconds: keep them
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="gpt2-tokenizer-", dir=tokenizer.parent))  # same filesystem
        write_gpt2_tokenizer_files(staging)
        shutil.rmtree(tokenizer, ignore_errors=True)
        staging.rename(tokenizer)  # atomic: a killed run never leaves half the files behind
    tiny = build_vit_gpt2(workdir / "vit-gpt2-tiny", size="tiny", tokenizer_cache=str(tokenizer))
    if quick:
        return tiny, tiny, "tiny"
    return build_vit_gpt2(workdir / "vit-gpt2-base", size="base", tokenizer_cache=str(tokenizer)), tiny, "base"


def _values(rows: list[Row], section_prefix: str, name_prefix: str) -> list[float]:
    for row in rows:
        if row.section.startswith(section_prefix) and row.name.startswith(name_prefix) and row.error is None:
            return list(row.values)
    return []


def run_sections(sections: tuple[str, ...], reps: int, quick: bool, workdir: Path,
                 model_dir: Path | None) -> tuple[list[Row], dict[str, Any]]:
    from bench import captioning, critic_stage, dpo_step, gpu, regions_stage, scale, serve, students

    rows: list[Row] = []
    log: dict[str, Any] = {}
    models: dict[str, Any] = {}

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def section(name: str, fn) -> None:
        start, load = CPUSnapshot.take(), load_average()
        print(f"[bench] {name} (load average {load})", file=sys.stderr, flush=True)
        try:
            rows.extend(fn())
        except Exception as e:  # one broken section must not hide the others' results
            traceback.print_exc()
            rows.append(error_row(name, "section failed", e))
        end = CPUSnapshot.take()
        share = start.others_share(end, cores)
        log[name] = {"load_average_before": load, "wall_s": round(end.wall - start.wall, 1),
                     "others_cpu_share": None if share is None else round(share, 3)}

    def models_ready() -> list[Row]:
        if model_dir is not None:
            models.update(main=model_dir, size="given", tiny=build_models(workdir, quick=True)[1])
        else:
            models["main"], models["tiny"], models["size"] = build_models(workdir, quick)
        return []

    if "critic" in sections:
        section("1+2 critic stage, warm cache", lambda: critic_stage.run(reps, quick, workdir))
    if {"dpo", "caption", "regions", "gpu", "scale", "students", "serve"} & set(sections):
        section("build random ViT-GPT2 models", models_ready)
    if "dpo" in sections and models:
        section("3 DPO vs SFT step", lambda: dpo_step.run(models["main"], reps, models["size"]))
    if "caption" in sections and models:
        section("4 student captioning", lambda: captioning.run(models["main"], reps, quick, models["size"]))
    if "regions" in sections and models:
        estimate_from = {
            "caption_s": _values(rows, "4", "greedy, batch 10: wall time"),
            "critic_round_s": _values(rows, "1", "refine: critique_many"),
            "dpo_step_s": _values(rows, "3", "DPO step: "),
            "dpo_reference_s": _values(rows, "3", "DPO reference pass"),
        }
        section("5 regions", lambda: regions_stage.run(reps, quick, workdir, models["tiny"], estimate_from))
    if "gpu" in sections and models:
        section("6 GPU", lambda: gpu.run(models["main"], reps, quick, workdir))
    if "scale" in sections and models:
        section("7 scale", lambda: scale.run(1, quick, workdir, models["tiny"]))  # one rep: minutes each
    if "students" in sections:
        section("8 students", lambda: students.run(reps, quick, workdir, str(CACHE_DIR / "gpt2-tokenizer")))
    if "serve" in sections and models:
        section("9 serve", lambda: serve.run(reps, quick, models["tiny"]))
    return rows, log


BUSY_SHARE = 0.1  # other processes using more than this fraction of the CPU make the numbers suspect


def busy_warning(record: dict[str, Any]) -> str:
    """A warning when other processes used more than ``BUSY_SHARE`` of the CPU during the run or a section."""
    shares = {name: s.get("others_cpu_share") for name, s in record["load_average"]["sections"].items()}
    shares["whole run"] = record.get("others_cpu_share")
    busy = {name: v for name, v in shares.items() if v is not None and v > BUSY_SHARE}
    if not busy:
        return ""
    worst = ", ".join(f"{name} {100 * v:.0f}%" for name, v in busy.items())
    return (f"WARNING: other processes used this share of the machine's CPU while the benchmark ran: {worst}. "
            "Absolute times are inflated (with torch at 2 threads on 2 cores, one busy neighbour can slow "
            "small kernels several-fold), and rows marked 'noisy' disagree between repetitions. Re-run on a "
            "quiet machine before trusting them.")


def _percent(share: float | None) -> str:
    return "an unknown share" if share is None else f"{100 * share:.0f}%"


def report_header(record: dict[str, Any]) -> str:
    m = record["machine"]
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    load = record["load_average"]
    warning = busy_warning(record)
    return "\n".join([
        f"# refine benchmarks{' (--quick: smoke test, numbers mean nothing)' if record['quick'] else ''}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']} (OMP_NUM_THREADS={m['omp_num_threads']}), GPU: {m['cuda'] or 'none'}. {v}.",
        f"Load average (1, 5, 15 min) at start {load['start']}, at end {load['end']} (it counts this benchmark's own "
        f"threads too); other processes used {_percent(record['others_cpu_share'])} of the machine's CPU during "
        "the run. The machine is shared: absolute times drift, so targets compare ratios taken within the same "
        "repetition.",
        f"{record['reps']} repetition(s) per figure; targets are checked on the median unless marked "
        f"'every rep'. Wall time {record['wall_s']:.0f} s.",
        *([warning] if warning else []),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, tiny sizes: a smoke test")
    parser.add_argument("--reps", type=int, help="repetitions per figure (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results.json; "
                                                 ".cache/bench/results-quick.json with --quick)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--model-dir", type=Path, help="reuse a saved ViT-GPT2 instead of building a random one")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (models, runs, caches)")
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    reps = args.reps or (1 if args.quick else 3)
    if reps < 1:
        parser.error(f"--reps {reps}: must be at least 1")
    out = args.out or (CACHE_DIR / "results-quick.json" if args.quick else BENCH_DIR / "results.json")

    workdir = Path(tempfile.mkdtemp(prefix="refine-bench-"))
    setup_environment(workdir)
    start, load_start, cpu_start = time.perf_counter(), load_average(), CPUSnapshot.take()
    try:
        info = machine()
        rows, log = run_sections(sections, reps, args.quick, workdir, args.model_dir)
    finally:
        if args.keep:
            print(f"[bench] scratch kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    record = {
        "quick": args.quick, "reps": reps, "sections": list(sections), "machine": info,
        "load_average": {"start": load_start, "end": load_average(), "sections": log},
        "wall_s": time.perf_counter() - start, "rows": [row.to_json() for row in rows],
        "others_cpu_share": cpu_start.others_share(CPUSnapshot.take(), info["cores"] or 1),
    }
    print(report_header(record))
    print(markdown_table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwritten: {out}")
    return 1 if any(row.error is not None for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
