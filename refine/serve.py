"""``python -m refine.serve DIR``: an HTTP captioning service for a student directory (FastAPI + uvicorn).

Any student ``load_student`` reads (e.g. ``runs/<id>/student/last``). Endpoints:

- ``POST /caption``: an image as a multipart file (``file``) or as JSON ``{"image": "<base64>"}``;
  options ``beams`` (1 = greedy) and ``max_tokens``. Returns ``{"caption": ..., "seconds": ...}``.
- ``GET /health``: ``{"status": "ok", "student": DIR, "kind": ...}``.
- ``GET /metrics``: Prometheus text format: requests by status, latency and batch-size histograms.

Requests that arrive together are captioned together: a batch closes at ``--max-batch`` images or
``--max-wait-ms`` after its first image, whichever comes first, and runs on one worker thread (the
model is not shared between threads). Requests with different options go to different batches.

Bad input is a 4xx whose message names the problem: no image (400), an empty upload (400), not an
image PIL can read (415), over ``--max-bytes`` (413), more pixels than ``--max-pixels`` (413: a
decompression bomb is refused before it is decoded), options out of range (422).
"""


import argparse
import asyncio
import base64
import binascii
import errno
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

DEFAULT_MAX_BYTES = 20 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 8000 x 5000; PIL's own bomb limit is 89M
MAX_TOKENS_LIMIT = 128
MAX_BEAMS = 8


class BadImage(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode an uploaded image, or raise ``BadImage`` with the HTTP status and what is wrong."""
    if not data:
        raise BadImage(400, "the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise BadImage(413, f"the image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(413, f"a decompression bomb: {e}") from None
    except Exception:
        raise BadImage(415, "not an image PIL can read (send JPEG, PNG, WebP, BMP, GIF or TIFF)") from None
    width, height = image.size  # from the header: nothing is decoded yet
    if width * height > max_pixels:
        raise BadImage(413, f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                            "(a decompression bomb, or an image to downscale first)")
    from refine.images.records import decode

    try:  # as the loop loads images: upright (a phone's portrait JPEG), 8-bit RGB
        return decode(data, "the image")
    except ValueError as e:
        raise BadImage(415, str(e)) from None


@dataclass
class _Job:
    image: Image.Image
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects requests into batches per option set and captions them on one worker thread."""

    def __init__(self, student, max_batch: int = 16, max_wait: float = 0.005, metrics=None):
        self.student, self.max_batch, self.max_wait, self.metrics = student, max_batch, max_wait, metrics
        self.queues: dict[tuple[int, int], asyncio.Queue] = {}
        self.tasks: list[asyncio.Task] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    async def caption(self, image: Image.Image, beams: int, max_tokens: int) -> str:
        if self.loop is not asyncio.get_running_loop():  # queues and the lock belong to one event loop
            self.loop, self.queues, self.tasks = asyncio.get_running_loop(), {}, []
            self.lock = asyncio.Lock()  # one batch on the model at a time
        key = (beams, max_tokens)
        if key not in self.queues:
            self.queues[key] = asyncio.Queue()
            self.tasks.append(asyncio.create_task(self._run(key)))
        job = _Job(image, asyncio.get_running_loop().create_future())
        await self.queues[key].put(job)
        return await job.future

    async def _run(self, key: tuple[int, int]) -> None:
        queue = self.queues[key]
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            deadline = loop.time() + self.max_wait
            while len(jobs) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            async with self.lock:
                try:
                    captions = await asyncio.to_thread(self._caption, [j.image for j in jobs], *key)
                except Exception as e:  # the batch fails, the service goes on
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(jobs))
            for job, text in zip(jobs, captions):
                if not job.future.done():
                    job.future.set_result(text)

    def _caption(self, images: list[Image.Image], beams: int, max_tokens: int) -> list[str]:
        out = self.student.caption(images, num_beams=beams, max_new_tokens=max_tokens, batch_size=len(images))
        return [c[0] for c in out]


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps in one process stay apart)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("refine_caption_requests", "POST /caption requests by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("refine_caption_latency_seconds", "POST /caption latency, seconds",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_size = Histogram("refine_caption_batch_size", "images per batch on the model",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)


def _integer(value: Any) -> int | None:
    try:
        return int(value) if not isinstance(value, bool) and float(value) == int(value) else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: "1e999"
        return None


OPTIONS = {"beams", "max_tokens"}  # what a request may set, in its query, form fields or JSON body

async def _read_body(request, most: int) -> bool:
    """Read the request body, up to ``most`` bytes; False, having read no more, when it is longer. The body
    is kept where ``request.json()`` and ``request.form()`` read it (Starlette's ``_body``)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > most:
            return False
        chunks.append(chunk)
    request._body = b"".join(chunks)
    return True


# How load_student's errors name this command's arguments.
FLAGS = {"model": "STUDENT", "device": "--device", "quantize": "--quantize"}


def create_app(student_dir: str, device: str | None = None, max_batch: int = 16, max_wait_ms: float = 5.0,
               max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS, default_max_tokens: int = 20,
               quantize: str = "none"):
    """The FastAPI app for a student directory (loaded now: a bad directory fails before serving)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from refine.students import load_student

    student = load_student(student_dir, device=device, quantize=quantize, flags=FLAGS)
    metrics = Metrics()
    batcher = Batcher(student, max_batch, max_wait_ms / 1000, metrics)
    most_tokens = min(MAX_TOKENS_LIMIT, student.caption_limit or MAX_TOKENS_LIMIT)  # what its text model holds
    app = FastAPI(title="refine captioner", description=f"captions images with the student in {student_dir}")

    def error(status: int, message: str) -> JSONResponse:
        metrics.requests.labels(str(status)).inc()
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "student": str(student_dir), "kind": student.kind, "device": str(student.device)}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/caption")
    async def caption(request: Request):
        start = time.perf_counter()
        options: dict[str, Any] = dict(request.query_params)
        kind = request.headers.get("content-type", "").lower()  # a media type is case-insensitive
        declared = _integer(request.headers.get("content-length"))
        if declared is not None and declared > 2 * max_bytes:  # base64 and multipart add a third at most
            return error(413, f"the request is {declared} bytes; images may be {max_bytes} bytes at most")
        if not await _read_body(request, 2 * max_bytes):  # chunked, or more than it declared: read no further
            return error(413, f"the request is over {2 * max_bytes} bytes; images may be {max_bytes} bytes at most")
        if kind.startswith("multipart/form-data"):
            try:
                form = await request.form()
            except Exception as e:  # Starlette's MultiPartException and HTTPException: a body that is not multipart
                return error(400, f"the multipart body cannot be read ({getattr(e, 'detail', None) or e}); send the "
                                  "image as the field 'file'")
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return error(400, "no image: send it as the multipart field 'file'")
            data = await upload.read()
            options.update({k: v for k, v in form.items() if k != "file"})
        elif kind.startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                return error(400, "the body is not valid JSON; send {\"image\": \"<base64>\"}")
            if not isinstance(body, dict) or not isinstance(body.get("image"), str):
                return error(400, "no image: send {\"image\": \"<base64>\"} (and optionally beams, max_tokens)")
            try:
                data = base64.b64decode(body["image"], validate=True)
            except (binascii.Error, ValueError):
                return error(400, "'image' is not valid base64")
            options.update({k: v for k, v in body.items() if k != "image"})
        else:
            return error(415, "send the image as multipart/form-data (field 'file') or JSON {\"image\": \"<base64>\"}")
        unknown = sorted(set(options) - OPTIONS)
        if unknown:  # a misspelt option would be ignored silently
            return error(422, f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(OPTIONS))}")
        beams, max_tokens = _integer(options.get("beams", 1)), _integer(options.get("max_tokens", default_max_tokens))
        if beams is None or not 1 <= beams <= MAX_BEAMS:
            return error(422, f"beams must be an integer from 1 to {MAX_BEAMS}")
        if max_tokens is None or not 1 <= max_tokens <= most_tokens:
            return error(422, f"max_tokens must be an integer from 1 to {most_tokens}")
        try:
            image = read_image(data, max_bytes, max_pixels)
        except BadImage as e:
            return error(e.status, str(e))
        try:
            text = await batcher.caption(image, beams, max_tokens)
        except Exception as e:
            return error(500, f"captioning failed: {type(e).__name__}: {e}")
        seconds = time.perf_counter() - start
        metrics.requests.labels("200").inc()
        metrics.latency.observe(seconds)
        return {"caption": text, "seconds": round(seconds, 4)}

    app.state.batcher, app.state.metrics = batcher, metrics
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refine.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("student", metavar="STUDENT", help="a student directory (e.g. runs/<id>/student/last) or a hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--max-batch", type=int, default=16, help="images per batch at most (1: no batching; default: 16)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill, in ms (default: 5)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help=f"largest upload accepted, in bytes (default {DEFAULT_MAX_BYTES:,}); larger: 413")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"largest image accepted, width x height read from its header before decoding "
                             f"(default {DEFAULT_MAX_PIXELS:,}); larger: 413")
    parser.add_argument("--quantize", default="none", choices=("none", "8bit", "4bit"),
                        help="8- or 4-bit weights (bitsandbytes, CUDA only)")
    args = parser.parse_args(argv)
    for ok, rule in ((args.max_batch >= 1, "--max-batch must be at least 1"),
                     (0 <= args.port <= 65535, f"--port {args.port}: a port is 0 to 65535"),
                     (0 <= args.max_wait_ms < math.inf, f"--max-wait-ms {args.max_wait_ms}: must be >= 0 and finite"),
                     (args.max_bytes > 0, f"--max-bytes {args.max_bytes}: must be > 0"),
                     (args.max_pixels > 0, f"--max-pixels {args.max_pixels}: must be > 0")):
        if not ok:
            parser.error(rule)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"error: serving needs {e.name}: pip install 'refine[serve]'", file=sys.stderr)
        return 2
    if (Path(args.student) / "config.json").is_file() and (Path(args.student) / "student").is_dir():
        parser.error(f"{args.student} is a run; serve one of its students: {Path(args.student) / 'student' / 'last'}")
    try:
        sock = listen(args.host, args.port)  # before the model loads: a port in use costs no wait
        app = create_app(args.student, args.device, args.max_batch, args.max_wait_ms, args.max_bytes, args.max_pixels,
                         quantize=args.quantize)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down; as uvicorn.run, no traceback
        pass
    return 0


def listen(host: str, port: int):
    """A socket bound to ``host:port`` for the server, or ``OSError`` that names them and says what to do."""
    import socket

    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
        sock.bind(address)
    except OSError as e:
        if sock is not None:
            sock.close()
        why = {errno.EADDRINUSE: "is in use (another server?); stop it or choose another --port",
               errno.EACCES: "needs privileges (ports below 1024); choose a --port of 1024 or more",
               errno.EADDRNOTAVAIL: "is not an address of this machine; use 127.0.0.1 or 0.0.0.0"}.get(
            e.errno, f"cannot be listened on ({e.strerror or e})")
        raise OSError(f"--host {host} --port {port}: {why}") from None
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())
