"""One real round of ``python -m refine.loop`` in a subprocess, and its per-stage wall times.

The loop times its own stages (``refine.progress.RoundTimer``) into the round's ``metrics.json`` as
``time/<stage>``; those are what we read, so process start-up and imports are not counted. Each call
gets its own runs dir and cache dir, so nothing is answered from an earlier round's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.data import bench_records

# Annotations for the manifest: the grounded critic then compares captions with these (and writes its
# own revision), as it does on COCO. Drawn scenes get a COCO label, as tests/test_loop.py does.
OBJECTS = {"bus": {"bus": 1, "person": 4}, "zidane": {"person": 2, "tie": 1}, "grace_hopper": {"person": 1, "tie": 1}}


def write_images(folder: Path, n: int) -> Path:
    """``n`` benchmark images as files in ``folder`` plus a JSONL manifest with annotations; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(bench_records(n)):
        record.image.save(folder / f"{record.id}.png")
        objects = OBJECTS.get(record.id, {"sports ball": i % 3 + 1})
        lines.append(json.dumps({"path": f"{record.id}.png", "objects": objects}))
    manifest = folder / "images.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run_round(images: Path, student_dir: Path, workdir: Path, *overrides: str, timeout: float = 600) -> dict[str, Any]:
    """Run one round; return its ``metrics.json`` (``time/caption``, ``time/regions``, ...)."""
    root = Path(tempfile.mkdtemp(prefix="loop-round-", dir=workdir))
    env = {**os.environ, "REFINE_CACHE_DIR": str(root / "cache")}
    cmd = [sys.executable, "-m", "refine.loop", "--images", str(images), "--rounds", "1",
           f"--student.model={student_dir}", f"--loop.runs_dir={root / 'runs'}", "--loop.run_id=bench", *overrides]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=timeout)
    metrics = root / "runs" / "bench" / "rounds" / "000" / "metrics.json"
    if proc.returncode != 0 or not metrics.is_file():
        raise RuntimeError(f"refine.loop round failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(metrics.read_text())


def stage_seconds(metrics: dict[str, Any]) -> dict[str, float]:
    """``{stage: seconds}`` from a round's metrics."""
    return {k.removeprefix("time/"): float(v) for k, v in metrics.items() if k.startswith("time/")}
