"""Section 9, serve: 200 concurrent requests against ``python -m refine.serve`` on 127.0.0.1, tiny student.

The service runs in its own process (uvicorn), once with dynamic batching (``--max-batch 16
--max-wait-ms 5``) and once without (``--max-batch 1``). A load generator (httpx, asyncio) sends 200
``POST /caption`` requests at once, each a different 96×96 PNG, and measures each request's latency
from send to answer. Reported per mode: errors (target 0), throughput, P50 and P95 latency; and the
throughput ratio batched / unbatched, with the batch sizes the service saw (from its /metrics).
"""

from __future__ import annotations

import asyncio
import io
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from bench.measure import Row, Target, ratios

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 200


def _png(i: int) -> bytes:
    image = Image.new("RGB", (96, 96), (i * 37 % 256, i * 91 % 256, 128))
    ImageDraw.Draw(image).ellipse((i % 40, 10, 40 + i % 50, 60), fill=(255 - i % 256, 20, 20))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, student_dir: Path, max_batch: int):
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "refine.serve", str(student_dir), "--port", str(self.port),
                                      "--device", "cpu", "--max-batch", str(max_batch), "--max-wait-ms", "5"],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Service:
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"refine.serve exited: {self.proc.stderr.read().decode()[-1500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("refine.serve did not answer /health within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def _load(url: str, bodies: list[bytes]) -> tuple[list[float], int, float]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def one(body: bytes) -> tuple[float, bool]:
            start = time.perf_counter()
            response = await client.post("/caption", files={"file": ("x.png", body, "image/png")})
            return time.perf_counter() - start, response.status_code == 200 and "caption" in response.json()

        start = time.perf_counter()
        results = await asyncio.gather(*[one(b) for b in bodies], return_exceptions=True)
        wall = time.perf_counter() - start
    latencies = [r[0] for r in results if isinstance(r, tuple)]
    errors = sum(1 for r in results if not (isinstance(r, tuple) and r[1]))
    return latencies, errors, wall


def _batch_sizes(url: str) -> str:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("refine_caption_batch_size_") and not line.startswith("#")}
    count, total = values.get("refine_caption_batch_size_count", 0), values.get("refine_caption_batch_size_sum", 0)
    return f"{int(total)} images in {int(count)} batches (mean {total / max(count, 1):.1f})"


def run(reps: int, quick: bool, tiny_student: Path) -> list[Row]:
    n = 40 if quick else REQUESTS
    bodies = [_png(i) for i in range(n)]
    section = "9 serve"
    measured: dict[str, dict[str, list[float]]] = {}
    notes = {}
    for mode, max_batch in (("batched", 16), ("batch size 1", 1)):
        stats = measured.setdefault(mode, {"throughput": [], "p50": [], "p95": [], "errors": []})
        with Service(tiny_student, max_batch) as service:
            asyncio.run(_load(service.url, bodies[:8]))  # warm-up
            for _ in range(reps):
                latencies, errors, wall = asyncio.run(_load(service.url, bodies))
                stats["throughput"].append(n / wall)
                stats["p50"].append(statistics.median(latencies) * 1000)
                stats["p95"].append(statistics.quantiles(latencies, n=20)[-1] * 1000)
                stats["errors"].append(errors)
            notes[mode] = _batch_sizes(service.url)
    rows = []
    for mode, stats in measured.items():
        rows += [
            Row(section, f"{n} concurrent requests, {mode}: errors", "requests", stats["errors"], Target("==", 0, on="all")),
            Row(section, f"{mode}: throughput", "req/s", stats["throughput"], note=notes[mode]),
            Row(section, f"{mode}: P50 latency", "ms", stats["p50"]),
            Row(section, f"{mode}: P95 latency", "ms", stats["p95"]),
        ]
    rows.append(Row(section, "throughput, batched / batch size 1", "×",
                    ratios(measured["batched"]["throughput"], measured["batch size 1"]["throughput"]),
                    note="a batch closes at 16 images or 5 ms after its first"))
    return rows
