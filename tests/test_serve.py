"""refine.serve: the captioning service on a tiny student, through FastAPI's own ASGI transport (httpx)."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from refine.serve import create_app


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def app(tiny_student_dir):
    return create_app(str(tiny_student_dir), device="cpu", max_batch=8, max_wait_ms=50, max_bytes=200_000,
                      max_pixels=1_000_000, default_max_tokens=6)


def run(coro):
    return asyncio.run(coro)


async def post(app, **kwargs):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post("/caption", **kwargs)


def test_health_and_a_caption_as_a_file_or_as_base64(app, tiny_student, drawn_images):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            health = (await client.get("/health")).json()
            by_file = await client.post("/caption", files={"file": ("a.png", png(drawn_images["both"]), "image/png")})
            by_json = await client.post("/caption", json={"image": base64.b64encode(png(drawn_images["both"])).decode(),
                                                          "beams": 2, "max_tokens": 5})
            return health, by_file, by_json

    health, by_file, by_json = run(go())
    assert health["status"] == "ok" and health["kind"] == "vision-encoder-decoder"
    assert by_file.status_code == 200 and by_json.status_code == 200
    expected = tiny_student.caption([drawn_images["both"]], max_new_tokens=6)[0][0]
    assert by_file.json()["caption"] == expected
    assert by_json.json()["caption"] == tiny_student.caption([drawn_images["both"]], num_beams=2, max_new_tokens=5)[0][0]


async def _chunked(size: int):
    """A JSON body sent in chunks, with no Content-Length (Transfer-Encoding: chunked)."""
    yield b'{"image": "'
    for _ in range(size // 65536):
        yield b"A" * 65536
    yield b'"}'


@pytest.mark.parametrize("request_kwargs, status, words", [
    (dict(files={"file": ("a.png", b"", "image/png")}), 400, "empty"),
    (dict(files={"file": ("a.txt", b"hello, not an image", "text/plain")}), 415, "not an image"),
    (dict(files={"file": ("big.bmp", b"BM" + b"\0" * 300_000, "image/bmp")}), 413, "over the limit of 200000"),
    (dict(json={"image": "%%% not base64"}), 400, "not valid base64"),
    (dict(json={"picture": "abc"}), 400, "no image"),
    (dict(content=b"raw bytes", headers={"content-type": "image/png"}), 415, "multipart/form-data"),
    (dict(json={"image": "", "beams": 0}), 422, "beams must be an integer from 1"),
    (dict(json={"image": "", "max_tokens": "many"}), 422, "max_tokens must be an integer"),
    (dict(content=b'{"image": "", "max_tokens": 1e999}', headers={"content-type": "application/json"}), 422,
     "max_tokens must be an integer"),  # JSON's 1e999 is inf
    (dict(files={"file": ("a.png", b"x", "image/png")}, data={"beams": "1e999"}), 422, "beams must be an integer"),
    (dict(json={"image": "", "beam": 3, "maxtokens": 2}), 422, "unknown option(s) beam, maxtokens; the options are "
                                                                "beams, max_tokens"),  # were ignored silently
    # read whole before the limit was checked (only a declared Content-Length was): 2.2 GB for 236 MB sent
    (dict(content=_chunked(1_000_000), headers={"content-type": "application/json"}), 413,
     "over 400000 bytes; images may be 200000 bytes at most"),
    (dict(json={"image": "", "max_tokens": 100}), 422, "max_tokens must be an integer from 1 to 63"),  # was a 500
    (dict(content=b'{"image": "", "beam": 3}', headers={"content-type": "Application/JSON"}), 422,
     "unknown option(s) beam"),  # a media type is case-insensitive: this was a 415
    # Starlette's own {"detail": ...}, not counted in /metrics
    (dict(content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data"}), 400,
     "the multipart body cannot be read"),
])
def test_bad_input_gets_a_4xx_that_names_the_problem(app, request_kwargs, status, words):
    response = run(post(app, **request_kwargs))
    assert response.status_code == status and words in response.json()["error"], response.json()


def test_an_exif_rotated_photo_is_captioned_upright(tiny_student):
    """A phone's portrait JPEG stores landscape pixels and an EXIF orientation; the loop's images are
    turned upright on loading, so the service does the same."""
    from refine.serve import read_image

    upright = Image.new("RGB", (40, 80), (200, 30, 30))
    upright.paste((30, 30, 200), (0, 0, 40, 20))  # blue on top
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", exif=exif, quality=95)
    image = read_image(buf.getvalue(), 1_000_000, 1_000_000)
    assert image.size == (40, 80) and image.getpixel((20, 5))[2] > 150


def test_a_decompression_bomb_is_refused_before_it_is_decoded(app):
    bomb = png(Image.new("1", (2000, 1000)))  # 2 megapixels in a few hundred bytes; the limit here is 1
    assert len(bomb) < 10_000
    response = run(post(app, files={"file": ("bomb.png", bomb, "image/png")}))
    assert response.status_code == 413 and "decompression bomb" in response.json()["error"]


def test_requests_that_arrive_together_are_batched_and_captioned_as_alone(app, tiny_student, drawn_images):
    images = [drawn_images[k] for k in ("red-circle", "blue-square", "both", "gray")] * 4

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            replies = await asyncio.gather(*[client.post("/caption", files={"file": ("x.png", png(im), "image/png")})
                                             for im in images])
            return replies, (await client.get("/metrics")).text

    replies, metrics = run(go())
    assert all(r.status_code == 200 for r in replies)
    alone = [c[0] for c in tiny_student.caption(images, max_new_tokens=6, batch_size=1)]
    assert [r.json()["caption"] for r in replies] == alone
    batches = app.state.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    total = next(s.value for s in batches if s.name.endswith("_sum"))
    assert total >= 16 and count < total  # fewer batches than images: some held several
    assert 'refine_caption_requests_total{status="200"}' in metrics and "refine_caption_latency_seconds_bucket" in metrics


@pytest.mark.parametrize("flags, words", [
    (["--port", "99999"], "--port 99999: a port is 0 to 65535"),  # a traceback after loading the model
    (["--max-bytes", "0"], "--max-bytes 0: must be > 0"),  # every request got 413
    (["--max-pixels", "-5"], "--max-pixels -5: must be > 0"),
    (["--max-wait-ms", "nan"], "--max-wait-ms nan: must be >= 0 and finite"),
])
def test_the_server_refuses_flags_it_cannot_serve_with_before_loading(tiny_student_dir, flags, words, capsys,
                                                                      monkeypatch):
    import uvicorn

    from refine.serve import main

    def serve(*args, **kwargs):  # the network edge: a check that let these through would serve forever here
        raise AssertionError(f"served with {flags}")

    monkeypatch.setattr(uvicorn.Server, "run", serve)
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny_student_dir), *flags])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_serving_a_run_directory_names_its_student(tmp_path, capsys):
    from refine.serve import main

    (tmp_path / "run" / "student" / "last").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run")])
    assert f"is a run; serve one of its students: {tmp_path / 'run' / 'student' / 'last'}" in capsys.readouterr().err


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys):
    """It was a traceback from uvicorn after the student had loaded (minutes for a real one). The student
    named here does not exist: the port is found busy before it is looked for."""
    import socket

    from refine.serve import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main([str(tmp_path / "no-student"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --host 127.0.0.1 --port {port}: is in use (another server?); stop it or choose another --port\n"


def test_the_server_answers_on_its_port_and_stops_on_ctrl_c(tiny_student_dir, drawn_images, tmp_path):
    """`python -m refine.serve STUDENT --port N` end to end, over a real socket."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "refine.serve", str(tiny_student_dir), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.time() < deadline, "the server did not answer within 120 s"
                time.sleep(0.2)
        image = png(drawn_images["red-circle"])
        reply = httpx.post(f"http://127.0.0.1:{port}/caption", files={"file": ("a.png", image)}, timeout=60)
        assert reply.status_code == 200 and isinstance(reply.json()["caption"], str), reply.text
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out
