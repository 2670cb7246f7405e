"""Section 7, scale: one round on N and 10·N photo-sized images against the local API server.

Each round is ``python -m refine.loop`` in its own process (tiny student, the OpenAI-compatible critic
answered by ``bench.devserver`` at 300 ms per request, ``critic.max_concurrency`` 32, the textual step
through textgrad, no regions stage). Measured, all within this run:

- **memory**: the loop process's peak RSS on 10·N images over its peak on N (target ≤ 1.25×);
- **the loop's own overhead**: the round's wall time (from the run's ``run_start`` event to its
  ``round_done``: loading the student and the image index is outside) over the sum of the API floor
  (requests counted at the server × 300 ms / concurrency) and the student's compute measured alone in
  this process (captioning the same images; the update on the round's own pairs), target ≤ 1.3×;
- **sampling**: captioning with 2 samples per image, refine's ``Student.caption`` (``FastSampling``)
  against what the caption stage did before it (transformers' ``do_sample`` with ``top_k=0``: a
  multinomial over the whole vocabulary per token), target ≥ 2×;
- **a kill**: the 10·N round is started again and SIGKILLed at a random moment of its critique or step
  stage, then resumed: requests the server received twice (target ≤ the concurrency: only those in
  flight at the kill), and rows computed before the kill and again after it, per stage (target ≤ one
  chunk: a caption batch, or the requests in flight).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from bench.devserver import ServerProcess
from bench.measure import Row, Target, timed

LATENCY = 0.3
CONCURRENCY = 32
BATCH = 32  # student.batch_size: the caption stage's chunk
ROOT = Path(__file__).resolve().parents[1]


def write_photos(folder: Path, n: int) -> Path:
    """``n`` distinct 640×480 JPEGs (drawn, ~20 KB each) in nested folders; returns the folder."""
    for i in range(n):
        rng = random.Random(i)
        image = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(600), rng.randrange(440)
            draw.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        sub = folder / f"part{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"photo{i:06d}.jpg", quality=85)
    return folder


def loop_args(images: Path, student: Path, runs: Path, run_id: str, base_url: str) -> list[str]:
    return ["--images", str(images), "--rounds", "1", f"--student.model={student}", f"--loop.runs_dir={runs}",
            f"--loop.run_id={run_id}", "--student.n_samples=1", "--student.max_new_tokens=12",
            f"--student.batch_size={BATCH}", "--loop.refine_samples=false", "--loop.use_regions=false",
            "--critic.backend=openai", f"--critic.base_url={base_url}", "--critic.model=bench",
            f"--critic.max_concurrency={CONCURRENCY}", "--update.epochs=1", "--update.batch_size=32"]


# The loop in a child process that reports its own peak RSS (ru_maxrss of the process itself).
_CHILD = ("import resource, runpy, sys, json\n"
          "sys.argv = ['refine.loop'] + sys.argv[1:]\n"
          "try:\n    runpy.run_module('refine.loop', run_name='__main__')\n"
          "finally:\n    print('RSS ' + json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "
          "file=sys.stderr, flush=True)\n")


def run_loop(args: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """``(peak RSS bytes, process wall s, stderr)`` of one ``refine.loop`` process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"refine.loop failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    rss = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("RSS "))
    return rss, wall, proc.stderr


def round_seconds(run: Path) -> float:
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
    start = next(e["time"] for e in events if e["event"] in ("run_start", "resume"))
    end = next(e["time"] for e in events if e["event"] == "round_done")
    return end - start


def compute_alone(student_dir: Path, images: Path, run: Path) -> float:
    """Seconds the student needs for the round's captioning and its update, measured alone in-process."""
    from refine.config import StudentConfig, UpdateConfig
    from refine.images import load_images
    from refine.infra.runlog import RunLog
    from refine.stages.dpo import update
    from refine.stages.pairs import PreferencePair
    from refine.stages.student import caption, load_student

    image_set = load_images(str(images))
    student = load_student(student_dir, device="cpu", precision="fp32")
    cfg = StudentConfig(n_samples=1, max_new_tokens=12, batch_size=BATCH, device="cpu")
    caption_s, _ = timed(lambda: caption(student, image_set.records, cfg, seed=0))
    pairs = RunLog(run).read_stage(0, "pairs", PreferencePair)
    update_s, _ = timed(lambda: update(student, pairs, image_set.pixels(), UpdateConfig(epochs=1, batch_size=32)))
    return caption_s + update_s


def sampling_speedup(student_dir: Path, images: Path, n: int) -> float:
    """How much faster refine samples 2 captions per image than transformers' full multinomial."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    from refine.images import load_images
    from refine.stages.student import load_student

    records = load_images(str(images)).records[:n]
    student = load_student(student_dir, device="cpu", precision="fp32")
    pics = [r.image for r in records]
    ours, _ = timed(lambda: student.caption(pics, n=2, sample=True, max_new_tokens=12, batch_size=BATCH,
                                            seeds=list(range(len(pics)))))

    def before():  # the caption stage before FastSampling: generate(do_sample=True, top_k=0)
        with torch.no_grad():
            for i in range(0, len(pics), BATCH):
                pixels = student.pixel_values(pics[i : i + BATCH])
                states = student.model.encoder(pixel_values=pixels).last_hidden_state.repeat_interleave(2, dim=0)
                student.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), do_sample=True,
                                       top_k=0, max_new_tokens=12)

    theirs, _ = timed(before)
    return theirs / ours


def kill_and_resume(images: Path, student: Path, work: Path, env: dict[str, str], seed: int) -> dict[str, Any]:
    """Start the round, SIGKILL it at a random moment of its critique or step stage, resume it."""
    runs = work / "runs"
    with ServerProcess(latency=LATENCY) as server:
        args = loop_args(images, student, runs, "killed", server.base_url)
        proc = subprocess.Popen([sys.executable, "-m", "refine.loop", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stage_dir = runs / "killed" / "rounds" / "000"
        while not (stage_dir / "captions.jsonl").exists() and proc.poll() is None:  # wait for the paid stages
            time.sleep(0.05)
        time.sleep(random.Random(seed).uniform(1.0, 20.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # rows of the stage in progress at the kill (its partial file), by stage
        recorded_before = {p.name.split(".")[0]: len(p.read_text().splitlines())
                           for p in stage_dir.glob("*.partial.jsonl")}
        resumed = subprocess.run([sys.executable, "-m", "refine.loop", "--resume", "killed",
                                  f"--loop.runs_dir={runs}"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=3600)
        if resumed.returncode != 0:
            raise RuntimeError(f"resume failed (exit {resumed.returncode}): {resumed.stderr[-2000:]}")
        repeated = server.stats()["repeated"]
    events = [json.loads(line) for line in (runs / "killed" / "events.jsonl").read_text().splitlines() if line]
    resumed_at = max(i for i, e in enumerate(events) if e["event"] == "resume")
    redone = {}
    for e in events[resumed_at:]:  # the stages the resumed session finished
        if e["event"] == "stage_done" and e.get("resumed_rows") is not None and e["stage"] in recorded_before:
            # rows recorded before the kill that the resume did not take from the partial file
            redone[e["stage"]] = recorded_before[e["stage"]] - e["resumed_rows"]
    return {"repeated_requests": repeated, "redone_rows": redone, "recorded_before": recorded_before}


def run(reps: int, quick: bool, workdir: Path, tiny_student: Path) -> list[Row]:
    small, large = (50, 500) if quick else (500, 5000)
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=workdir))
    photos = write_photos(work / "photos", large)
    subset = work / "subset"  # the first `small` photos, by link
    for path in sorted(photos.rglob("*.jpg"))[:small]:
        (subset / path.parent.name).mkdir(parents=True, exist_ok=True)
        (subset / path.parent.name / path.name).symlink_to(path)
    env = {**os.environ}
    rss_ratio, overhead, speedup, repeats, redone_rows = [], [], [], [], []
    for rep in range(reps):
        peaks, rounds = {}, {}
        for name, images in (("small", subset), ("large", photos)):
            with ServerProcess(latency=LATENCY) as server:
                runs = work / f"runs-{rep}-{name}"
                rss, _, _ = run_loop(loop_args(images, tiny_student, runs, "r", server.base_url), env)
                requests = server.stats()["requests"]
            peaks[name] = rss
            rounds[name] = (round_seconds(runs / "r"), requests * LATENCY / CONCURRENCY, runs / "r")
        rss_ratio.append(peaks["large"] / peaks["small"])
        wall, floor, run_dir = rounds["large"]
        overhead.append(wall / (floor + compute_alone(tiny_student, photos, run_dir)))
        speedup.append(sampling_speedup(tiny_student, photos, min(large, 320)))
        killed = kill_and_resume(photos, tiny_student, work / f"kill-{rep}", env, seed=rep)
        repeats.append(killed["repeated_requests"])
        redone_rows.append(max(killed["redone_rows"].values(), default=0))
    section = "7 scale"
    return [
        Row(section, f"peak RSS, one round on {large} images / on {small}", "×", rss_ratio, Target("<=", 1.25)),
        Row(section, f"round wall / (API floor + student compute alone), {large} images", "×", overhead,
            Target("<=", 1.3), note=f"API floor: requests × {LATENCY} s / {CONCURRENCY}"),
        Row(section, "sampling 2 captions per image: transformers do_sample (top_k=0) / refine", "×", speedup,
            Target(">=", 2.0)),
        Row(section, f"kill -9 mid-round then --resume: requests sent twice ({large} images)", "requests", repeats,
            Target("<=", CONCURRENCY, on="all"), note="only those in flight at the kill may repeat"),
        Row(section, "kill -9 mid-round: recorded rows computed again, worst stage", "rows", redone_rows,
            Target("<=", max(BATCH, CONCURRENCY), on="all")),
    ]

