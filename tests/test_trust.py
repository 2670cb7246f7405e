"""Trust (issue 10): what the student learns from, stopping and resuming, results that must be right.

Each test drives the real loop (tiny student) against a local OpenAI-compatible server on 127.0.0.1,
the one fake at the true edge.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from test_loop import manifest  # noqa: F401  (fixture)

from refine import loop, runs
from refine.images import load_images
from refine.infra.atomic import read_jsonl
from refine.infra.interrupts import IN_FLIGHT_GRACE_S
from refine.infra.runlog import RunLog
from refine.offline.devserver import FakeOpenAIServer, Fault, request_images, request_text


def critique_reply(feedback="Name the bus and the people.", revision=None, score=None, missing=("bus",)):
    """A reply function: critiques (requests with images) get this critique; steps get a tagged caption."""

    def reply(body):
        if request_images(body):
            s = score if score is not None else round((len(request_text(body).split()) % 7) / 7, 3)
            return json.dumps({"score": s, "feedback": feedback, "hallucinated": [], "missing": list(missing),
                               "count_errors": {}, "revision": revision})
        return "<IMPROVED_VARIABLE>a bus and people on a street</IMPROVED_VARIABLE>"

    return reply


def _argv(images, student_dir, runs_dir, base_url, *extra):
    return ["--images", str(images), "--rounds", "1", f"--student.model={student_dir}", f"--loop.runs_dir={runs_dir}",
            "--loop.run_id=t", "--student.n_samples=1", "--student.max_new_tokens=6", "--loop.use_regions=false",
            "--critic.backend=openai", f"--critic.base_url={base_url}", "--critic.model=fake-model",
            "--critic.max_retries=0", *extra]


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there: every request is refused


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "REFINE_CACHE_DIR": str(tmp_path / "cache")}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_CACHE_DIR", str(tmp_path / "cache"))


# --- 1. what the student learns from ------------------------------------------------------------

STEP_REPLIES = ["I'm sorry, but I can't help with that.", "Sure! Here is the improved caption:",
                "A better caption would mention the bus and both people.", "x " * 500_000]


def test_step_replies_that_are_not_captions_become_no_pairs_and_are_counted(manifest, tiny_student_dir, tmp_path):  # noqa: F811
    def reply(body):
        if request_images(body):
            return critique_reply()(body)
        caption = request_text(body).split("<VARIABLE> ", 1)[1].split(" </VARIABLE>", 1)[0]
        return STEP_REPLIES[sum(map(ord, caption)) % len(STEP_REPLIES)]  # no tags: the old code "recovered" these

    allowed = "--loop.max_failure_share=1"  # every reply is rejected; by default that stops the run (below)
    with FakeOpenAIServer(reply=reply) as server:
        log = loop.run(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, allowed))
        steps_asked = sum(1 for b in server.requests if not request_images(b))
        log2 = loop.run(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, allowed, "--loop.run_id=t2"))
        steps_asked_again = sum(1 for b in server.requests if not request_images(b)) - steps_asked
    refined = log.read_stage(0, "refined")
    assert refined and all(r["refined"] == r["original"] and r["rejected"] in ("refusal", "meta", "too_long")
                           for r in refined)
    assert not [p for p in log.read_stage(0, "pairs") if p["source"] == "refined"]
    metrics = log.metrics()[0]
    assert metrics["step/rejected"] == len(refined)
    assert sum(v for k, v in metrics.items() if k.startswith("step/rejected/")) == len(refined)
    assert steps_asked_again == steps_asked, "rejected replies must not be served from the cache to the next run"
    # The same rows; of two captions that share a step prompt, whichever thread asks first pays (and records
    # the usage) and the other shares its reply, so only the rows' usage summed is the same in both runs.
    again = log2.read_stage(0, "refined")
    assert [{**r, "usage": None} for r in again] == [{**r, "usage": None} for r in refined]
    assert sum((Counter(r["usage"]) for r in again), Counter()) == sum((Counter(r["usage"]) for r in refined), Counter())


def _refusing_step(body):
    return critique_reply()(body) if request_images(body) else "I'm sorry, but I can't help with that."


def test_a_rejected_step_reply_is_asked_once_per_session_not_once_per_caption(manifest, tiny_student_dir, tmp_path):  # noqa: F811
    """Captions that share a step prompt (the same caption and feedback) share its reply, a rejected one
    too: a rejected reply is not cached, so each caption waiting on the first asked again (18 paid
    requests for one prompt in 3 rounds). A new session still asks again."""
    args = ["--student.n_samples=0", "--rounds=2", "--loop.max_failure_share=1", "--update.epochs=1"]
    with FakeOpenAIServer(reply=_refusing_step) as server:
        log = loop.run(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, *args))
        steps = Counter(json.dumps(b, sort_keys=True) for b in server.requests if not request_images(b))
        loop.run(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, *args, "--loop.run_id=t2"))
        again = Counter(json.dumps(b, sort_keys=True) for b in server.requests if not request_images(b)) - steps
    refined = [r for k in range(2) for r in log.read_stage(k, "refined")]
    assert len(refined) == 8 and all(r["rejected"] == "refusal" for r in refined)
    assert len(steps) < len(refined) and set(steps.values()) == {1}, "a step prompt was paid for twice"
    assert again == steps, "a rejected reply must not be served from the cache to the next session"


def test_a_step_model_that_never_answers_with_a_caption_stops_the_run(manifest, tiny_student_dir, tmp_path, capsys):  # noqa: F811
    """Rejected step replies are paid for like failed ones and count toward loop.max_failure_share: a step
    model that refuses every time (or answers in prose) stops the run. It paid for every round and
    ended "done, no pairs", exit 0."""
    with FakeOpenAIServer(reply=_refusing_step) as server:
        code = loop.main(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, "--rounds=2"))
    err = capsys.readouterr().err
    assert code == 1 and "textual steps" in err and "refusal" in err, err
    assert RunLog(tmp_path / "runs" / "t").status() == "stopped: too many failed requests (resumable)"


# --- 2. failed critiques stop the run, stay retryable, and a round that learned nothing says so --

def test_a_dead_critic_stops_the_run_nonzero_and_resume_asks_again(manifest, tiny_student_dir, tmp_path, capsys):  # noqa: F811
    runs_dir = tmp_path / "runs"
    dead = _closed_port_url()
    assert loop.main(_argv(manifest, tiny_student_dir, runs_dir, dead)) == 1
    err = capsys.readouterr().err
    assert "of 8 critiques failed" in err and "APIConnectionError" in err and "--resume" in err  # the first 5 of 8
    log = RunLog(runs_dir / "t")
    assert not log.has_stage(0, "critiques") and log.events()[-1]["event"] == "failure_stop"
    assert log.status() == "stopped: too many failed requests (resumable)"
    assert loop.main(["--resume", "t", f"--loop.runs_dir={runs_dir}"]) == 1  # still dead: still stopped

    with FakeOpenAIServer(reply=critique_reply()) as server:
        assert loop.main(["--resume", "t", f"--loop.runs_dir={runs_dir}", f"--critic.base_url={server.base_url}"]) == 0
        critiques = sum(1 for b in server.requests if request_images(b))
        alive = server.base_url
    assert critiques == len(log.read_stage(0, "critiques")) == 8, "every failed critique is asked again on resume"
    resume = [e for e in log.events() if e["event"] == "resume"][-1]
    assert resume["changes"] == {"critic.base_url": [dead, alive]}
    assert log.config["critic"]["base_url"] == alive and log.status() == "done"


def test_failures_under_the_share_are_recorded_and_the_round_goes_on(manifest, tiny_student_dir, tmp_path):  # noqa: F811
    def reply(body):  # every critique of zidane.png (the only 1280-px-wide image) fails
        if request_images(body) and _image_width(body) == 1280:
            return Fault.server_error()
        return critique_reply()(body)

    with FakeOpenAIServer(reply=reply) as server:
        log = loop.run(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url))
    failed = [r for r in log.read_stage(0, "critiques") if r["critique"]["error"]]
    assert 0 < len(failed) < 8 and log.status() == "done"
    assert log.metrics()[0]["critic/failures"] == len(failed)


def _image_width(body) -> int:
    return Image.open(io.BytesIO(request_images(body)[0][1])).width


def test_a_round_says_when_the_step_replies_were_rejected_or_every_critique_failed(manifest, tiny_student_dir,  # noqa: F811
                                                                                  tmp_path, capsys, monkeypatch):
    """A step that never answers with a caption, then a critic that always fails: each round says so under
    its table, and the table has the rejected count (both runs read "done" in runs list otherwise)."""
    monkeypatch.setattr(runs.console, "width", 250)

    def chatty(body):
        return critique_reply()(body) if request_images(body) else "Sure! Here is the improved caption:"

    with FakeOpenAIServer(reply=lambda body: Fault.server_error()) as server:  # first: nothing cached yet
        assert loop.main(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, "--loop.run_id=f",
                               "--loop.max_failure_share=1")) == 0
    err = capsys.readouterr().err
    assert "round 0: no preference pairs (all 8 critiques failed)" in err, err
    with FakeOpenAIServer(reply=chatty) as server:  # allowed to fail: by default the run stops (test below)
        assert loop.main(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url,
                               "--loop.max_failure_share=1")) == 0
    err = capsys.readouterr().err
    rejected = RunLog(tmp_path / "runs" / "t").metrics()[0]["step/rejected"]
    assert rejected > 0 and "step replies rejected" in err
    assert f"the textual step's reply was rejected for {rejected} caption(s) (" in err


def test_a_round_with_failed_steps_says_so_in_its_table_and_notes(manifest, tiny_student_dir, tmp_path, capsys,  # noqa: F811
                                                                  monkeypatch):
    """Failed step calls were counted (step/errors) but shown nowhere: the table said "critic failures 0"."""
    monkeypatch.setattr(runs.console, "width", 250)

    def reply(body):
        return critique_reply()(body) if request_images(body) else Fault.server_error()

    with FakeOpenAIServer(reply=reply) as server:
        assert loop.main(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url,
                               "--loop.max_failure_share=1")) == 0
    err = capsys.readouterr().err
    failed = RunLog(tmp_path / "runs" / "t").metrics()[0]["step/errors"]
    assert failed > 0 and f"step failures {failed}" in " ".join(err.replace("│", " ").split()), err
    assert f"round 0: {failed} textual step(s) failed" in err
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "show", "t"]) == 0
    assert "step failures" in capsys.readouterr().out


def test_a_run_without_pairs_says_so(manifest, tiny_student_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(runs.console, "width", 250)
    with FakeOpenAIServer(reply=critique_reply(feedback="", score=0.5, missing=())) as server:
        assert loop.main(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url)) == 0
    err = capsys.readouterr().err
    assert "no preference pairs" in err and "student is unchanged" in err
    log = RunLog(tmp_path / "runs" / "t")
    assert log.status() == "done, no pairs"
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "list"]) == 0
    assert "no pairs" in capsys.readouterr().out


# --- 3, 4, 8. image ids, 16-bit images, file names that are not UTF-8 ----------------------------

def test_two_files_with_one_stem_get_two_ids(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "green").save(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes((tmp_path / "b.png").read_bytes())
    images = load_images(str(tmp_path))
    records, notes = images.records, images.notes
    assert sorted(r.id for r in records) == ["a.jpg", "a.png", "b", "c"]
    assert notes == ["identical images: b, c have the same bytes (all kept)"]
    red, blue = (next(r for r in records if r.id == i) for i in ("a.jpg", "a.png"))
    assert red.image.getpixel((0, 0))[0] > 200 and blue.image.getpixel((0, 0))[2] > 200


def test_a_set_with_many_bad_or_identical_files_gets_a_few_notes_not_one_per_file(tmp_path):
    """The scale review's 5,000 photos held 1,800 identical pairs: every start, resume and score printed
    1,800 note lines (and score stored them). Many notes of a kind fold into one with the count and the
    first three; a few stay one each (above)."""
    for i in range(40):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"a{i:02d}.png")
        (tmp_path / f"b{i:02d}.png").write_bytes((tmp_path / f"a{i:02d}.png").read_bytes())
        (tmp_path / f"c{i:02d}.png").write_bytes(b"not an image")
    images = load_images(str(tmp_path))
    assert len(images.records) == 80 and len(images.notes) == 2, images.notes
    skipped, identical = images.notes
    assert skipped.startswith(f"skipped 40 images that could not be read, the first 3: {tmp_path / 'c00.png'}: ")
    assert identical == "identical images: 40 groups of files with the same bytes (all kept), the first 3: a00, b00; a01, b01; a02, b02"


def test_manifest_lines_without_ids_that_share_a_stem_get_two_ids(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x" / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "y" / "a.png")
    (tmp_path / "m.jsonl").write_text('{"path": "x/a.png"}\n{"path": "y/a.png"}\n')
    records = load_images(str(tmp_path / "m.jsonl")).records
    assert [r.id for r in records] == ["x/a.png", "y/a.png"]


def test_a_broken_link_in_an_image_folder_is_skipped_with_a_note(tmp_path):
    """It was left out without a word (an image the user meant to include)."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "moved-away.png")
    images = load_images(str(tmp_path))
    assert [r.id for r in images.records] == ["a"]
    assert len(images.notes) == 1 and images.notes[0].startswith(f"skipped {tmp_path / 'b.png'}: "), images.notes


def test_notes_on_the_held_out_set_and_before_a_refusal_are_printed(manifest, tiny_student_dir, tmp_path, capsys):  # noqa: F811
    """A held-out image that cannot be read was dropped without a word (only --images' notes were
    printed), and notes were printed after every check passed, so the one explaining a refusal was lost."""
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    Image.new("RGB", (8, 8), "red").save(held_out / "a.png")
    (held_out / "b.png").write_text("not an image")
    args = _argv(manifest, tiny_student_dir, tmp_path / "runs", "http://127.0.0.1:9/v1", "--rounds=0",
                 f"--loop.eval_images={held_out}")
    capsys.readouterr()
    assert loop.main([*args, "--loop.images_per_round=8", "--loop.run_id=n"]) == 0
    err = capsys.readouterr().err
    assert f"note: --loop.eval_images: skipped {held_out / 'b.png'}: not a readable image" in err
    assert "note: loop.images_per_round=8: the set has 4 image(s), so every round takes all of them" in err
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.new("RGB", (8, 8), "red").save(bare / "a.png")
    (bare / "b.png").write_text("not an image")
    assert loop.main(["--images", str(bare), f"--student.model={tiny_student_dir}", "--loop.use_regions=false",
                      f"--loop.runs_dir={tmp_path / 'runs'}", "--rounds=1"]) == 2  # the grounded critic, no annotations
    err = capsys.readouterr().err
    assert err.index(f"note: skipped {bare / 'b.png'}") < err.index("error: --images"), err


def test_a_run_of_a_glob_gets_a_plain_folder_name(tmp_path, tiny_student_dir):
    """Its id was the time and the glob's last part: a run folder named '20261202-005545-*.png'."""
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "photos" / "a.png")
    (tmp_path / "photos" / "m.jsonl").write_text('{"path": "a.png", "objects": {"dog": 1}}\n')
    assert loop.main(["--images", str(tmp_path / "photos" / "*.png"), "--rounds=0", f"--student.model={tiny_student_dir}",
                      f"--loop.runs_dir={tmp_path / 'runs'}", "--loop.use_regions=false", "--critic.backend=openai",
                      "--critic.base_url=http://127.0.0.1:9/v1"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-png", run.name), run.name


def test_16_bit_greyscale_keeps_its_grey_levels(tmp_path):
    levels = np.array([[60, 120, 200]], dtype=np.uint16) * 257
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    (record,) = load_images(str(tmp_path)).records
    assert [record.image.getpixel((x, 0)) for x in range(3)] == [(60,) * 3, (120,) * 3, (200,) * 3]


def test_a_file_name_that_is_not_utf8_runs_and_leaves_no_temp_files(tmp_path, tiny_student_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9 [copy].png")  # Latin-1 bytes: not UTF-8
    Image.new("RGB", (16, 16), "red").save(folder / name)
    Image.new("RGB", (16, 16), "blue").save(folder / "plain.png")
    args = ["--images", str(folder), "--rounds", "1", f"--student.model={tiny_student_dir}",
            f"--loop.runs_dir={tmp_path / 'runs'}", "--loop.run_id=u", "--student.n_samples=0",
            "--student.max_new_tokens=4", "--regions.model=yolov8n.yaml", "--regions.imgsz=32", "--regions.grids=2"]
    assert loop.main(args) == 0
    log = RunLog(tmp_path / "runs" / "u")
    assert {r["image_id"] for r in log.read_stage(0, "captions")} == {"caf\\xe9 [copy]", "plain"}
    assert not [p for p in (log.root / "rounds").rglob(".*")], "a temp file was left behind"


# --- 5. Ctrl-C ------------------------------------------------------------------------------------

def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "refine.loop", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_within_seconds_and_the_run_resumes_without_repeats(manifest, tiny_student_dir, tmp_path, env,  # noqa: F811
                                                                         sig):
    """SIGTERM (docker stop, a scheduler) stops the run as Ctrl-C does: it used to kill it with no event."""
    hanging = threading.Event()
    hanging.set()

    def reply(body):
        if request_images(body) and hanging.is_set():
            return Fault.hang(120)  # the critic hangs past any patience
        return critique_reply()(body)

    runs_dir = tmp_path / "runs"
    with FakeOpenAIServer(reply=reply) as server:
        args = _argv(manifest, tiny_student_dir, runs_dir, server.base_url, "--critic.timeout=60",
                     "--critic.max_retries=4", "--critic.max_concurrency=2")
        proc = _start(args, env)
        _wait_for(lambda: server.request_count >= 2)
        time.sleep(0.5)
        sent = time.perf_counter()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        stopped_in = time.perf_counter() - sent
        assert proc.returncode == 130, err
        # the requests in flight get IN_FLIGHT_GRACE_S to answer; these hang past it
        assert stopped_in < IN_FLIGHT_GRACE_S + 5, f"Ctrl-C took {stopped_in:.1f} s"
        assert "Traceback" not in err and "--resume" in err and "abandoned (a resume asks them again)" in err, err
        log = RunLog(runs_dir / "t")
        assert not log.has_stage(0, "critiques") and log.events()[-1]["event"] == "interrupted"
        assert log.status() == "interrupted (resumable)"

        hanging.clear()
        answered_before = len(server.responses)
        asked_before = [json.dumps(b, sort_keys=True) for b in server.requests]
        resumed = subprocess.run([sys.executable, "-m", "refine.loop", "--resume", "t", f"--loop.runs_dir={runs_dir}"],
                                 env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        asked_after = [json.dumps(b, sort_keys=True) for b in server.requests[len(asked_before):]]
    assert answered_before == 0  # everything in flight hung: nothing had been answered
    assert not [b for b, n in Counter(asked_after).items() if n > 1], "a request was sent twice after the resume"
    assert log.status() == "done"


def _show(fd, until: threading.Event):
    """A terminal: reads what the program writes until ``until`` is set."""
    import select

    while not until.is_set():
        if select.select([fd], [], [], 0.05)[0]:
            os.read(fd, 65536)


@pytest.mark.parametrize("hangup", [True, False], ids=["sighup", "disowned"])
def test_a_closed_terminal_stops_the_run_recorded(manifest, tiny_student_dir, tmp_path, env, hangup):  # noqa: F811
    """Closing the terminal makes every write to it fail (EIO), then the shell sends SIGHUP. The run
    stops as on Ctrl-C, recorded and resumable; a run the shell was told to leave alone (``disown``: no
    SIGHUP) finishes. The first failed write crashed the run (its stop message raised again and it
    waited for its hanging requests), and SIGHUP killed it with no event."""
    import pty

    def reply(body):
        if request_images(body):
            return Fault.hang(120 if hangup else 2)
        return critique_reply()(body)

    runs_dir = tmp_path / "runs"
    master, terminal = pty.openpty()
    with FakeOpenAIServer(reply=reply) as server:
        args = _argv(manifest, tiny_student_dir, runs_dir, server.base_url, "--critic.timeout=60",
                     "--critic.max_concurrency=2")
        proc = subprocess.Popen([sys.executable, "-m", "refine.loop", *args], env=env, stdin=terminal,
                                stdout=terminal, stderr=terminal)
        os.close(terminal)
        closed = threading.Event()
        shown = threading.Thread(target=_show, args=(master, closed))
        shown.start()
        _wait_for(lambda: server.request_count >= 2)
        closed.set()
        shown.join()
        os.close(master)  # the terminal is gone: writes to it fail with EIO from now on
        time.sleep(1)  # the shell's SIGHUP comes after the writes began to fail
        if hangup:
            proc.send_signal(signal.SIGHUP)
        proc.wait(timeout=60)
    log = RunLog(runs_dir / "t")
    if hangup:
        assert proc.returncode == 130
        assert log.events()[-1]["event"] == "interrupted" and log.status() == "interrupted (resumable)"
    else:
        assert proc.returncode == 0 and log.status() == "done", log.events()[-1]


def test_a_stop_for_failures_does_not_wait_out_the_requests_left_hanging(manifest, tiny_student_dir, tmp_path, env):  # noqa: F811
    """Too many failed critiques stop the run while others are still in flight. After the grace the process
    exits; it waited at exit for each abandoned request's thread, up to the critic's whole timeout."""
    asked = Counter()
    lock = threading.Lock()

    def reply(body):
        if not request_images(body):
            return critique_reply()(body)
        with lock:
            asked["n"] += 1
            n = asked["n"]
        return Fault.server_error() if n <= 2 else Fault.hang(120)

    runs_dir = tmp_path / "runs"
    with FakeOpenAIServer(reply=reply) as server:
        args = _argv(manifest, tiny_student_dir, runs_dir, server.base_url, "--critic.timeout=90",
                     "--critic.max_concurrency=3", "--loop.max_failure_share=0.1")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "refine.loop", *args], env=env, capture_output=True, text=True,
                              timeout=180)
        took = time.perf_counter() - started
    assert done.returncode == 1 and "abandoned (a resume asks them again)" in done.stderr, done.stderr[-2000:]
    assert took < 60, f"the stop took {took:.0f} s: it waited for the hanging requests"
    assert RunLog(runs_dir / "t").status() == "stopped: too many failed requests (resumable)"


def test_a_request_in_flight_at_ctrl_c_that_answers_within_the_grace_is_cached_and_not_paid_again(
        manifest, tiny_student_dir, tmp_path, env):  # noqa: F811
    """The requests in flight when the run is stopped get a few seconds to answer; an answer that arrives is
    cached, so the resume does not send that request again. It was abandoned, and asked (paid) twice."""
    slow = threading.Event()
    slow.set()

    def reply(body):
        if request_images(body) and slow.is_set():
            return Fault.hang(3)  # a critique answers 3 s after it is asked (within the grace), the default critique
        return critique_reply()(body)

    runs_dir = tmp_path / "runs"
    with FakeOpenAIServer(reply=reply) as server:
        args = _argv(manifest, tiny_student_dir, runs_dir, server.base_url, "--critic.timeout=60",
                     "--critic.max_concurrency=2")
        proc = _start(args, env)
        _wait_for(lambda: server.request_count >= 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "2 of 2 finished." in err, err
        slow.clear()  # the resume's requests answer at once: what they are, not how fast, is the point
        asked_before = {json.dumps(b, sort_keys=True) for b in server.requests}
        resumed = subprocess.run([sys.executable, "-m", "refine.loop", "--resume", "t", f"--loop.runs_dir={runs_dir}"],
                                 env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        asked_after = {json.dumps(b, sort_keys=True) for b in server.requests[len(asked_before):]}
    assert len(asked_before) == 2 and not asked_before & asked_after, "a request in flight at the stop was sent again"
    assert RunLog(runs_dir / "t").status() == "done"


def test_a_second_ctrl_c_exits_at_once(manifest, tiny_student_dir, tmp_path, env):  # noqa: F811
    with FakeOpenAIServer(reply=lambda body: Fault.hang(120)) as server:
        proc = _start(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, "--critic.timeout=60"), env)
        _wait_for(lambda: server.request_count >= 1)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
    assert proc.returncode == 130


def test_a_ctrl_c_after_the_run_is_over_exits_quietly():
    """Once the run has returned, Ctrl-C has nothing to stop: the process ends with the run's exit code
    and no traceback (it used to raise KeyboardInterrupt from the still-installed handler)."""
    code = ("import os, signal, time\n"
            "from refine.infra.interrupts import second_interrupt_exits\n"
            "with second_interrupt_exits() as over:\n"
            "    over(0)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "    print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "not reached" not in done.stdout, done.stderr


# --- 6. resume overrides --------------------------------------------------------------------------

def test_resume_refuses_an_override_that_changes_the_run(manifest, tiny_student_dir, tmp_path, capsys):  # noqa: F811
    runs_dir = tmp_path / "runs"
    with FakeOpenAIServer(reply=critique_reply()) as server:
        argv = _argv(manifest, tiny_student_dir, runs_dir, server.base_url, "--max-critic-calls=2")
        assert loop.main(argv) == 0 and RunLog(runs_dir / "t").status() == "budget stop (resumable)"
        before = (runs_dir / "t" / "config.json").read_text()
        capsys.readouterr()
        assert loop.main(["--resume", "t", f"--loop.runs_dir={runs_dir}", "--update.beta=1"]) == 2
        assert "update.beta cannot change when a run is resumed" in capsys.readouterr().err
        assert loop.main(["--resume", "t", f"--loop.runs_dir={runs_dir}", "--student.n_samples=3"]) == 2
        assert (runs_dir / "t" / "config.json").read_text() == before
        asked = server.request_count
        assert loop.main(["--resume", "t", f"--loop.runs_dir={runs_dir}", "--max-critic-calls=100",
                          "--critic.max_concurrency=3", f"--images={manifest}",  # same --images: no change
                          "--loop.log_with=tensorboard"]) == 0  # trackers may start on a resume
    log = RunLog(runs_dir / "t")
    assert server.request_count > asked and log.status() == "done"
    changes = [e for e in log.events() if e["event"] == "resume"][-1]["changes"]
    assert changes == {"loop.max_critic_calls": [2, 100], "critic.max_concurrency": [16, 3],
                       "loop.log_with": ["", "tensorboard"]}
    assert any((runs_dir / "t" / "trackers").rglob("events.out.tfevents.*"))
    assert log.config["loop"]["max_critic_calls"] == 100


# --- 7. a torn last line of events.jsonl ---------------------------------------------------------

def test_a_torn_event_line_is_repaired_and_the_budget_still_counts(manifest, tiny_student_dir, tmp_path, capsys):  # noqa: F811
    runs_dir = tmp_path / "runs"
    with FakeOpenAIServer(reply=critique_reply()) as server:
        assert loop.main(_argv(manifest, tiny_student_dir, runs_dir, server.base_url, "--max-critic-calls=3")) == 0
        events = runs_dir / "t" / "events.jsonl"
        with open(events, "ab") as f:
            f.write(b'{"time": 1.0, "event": "stage_do')  # power cut mid-append
        log = RunLog(runs_dir / "t")
        log.event("probe")  # an append after the torn line must not be swallowed by it
        assert log.events()[-1]["event"] == "probe"
        capsys.readouterr()
        assert loop.main(["--resume", "t", f"--loop.runs_dir={runs_dir}", "--max-critic-calls=100"]) == 0
        assert "dropped 1 torn line" in capsys.readouterr().err
    assert log.status() == "done"
    assert sum(e.get("critic_calls", 0) for e in log.events()) == server.request_count  # critiques and steps
    assert all(isinstance(row, dict) for row in read_jsonl(events))
    assert b"stage_do\n" not in events.read_bytes()


# --- 11. data is never markup ---------------------------------------------------------------------

def test_brackets_in_feedback_and_file_names_print_as_written(tmp_path, tiny_student_dir, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "holiday [copy].png")
    (folder / "m.jsonl").write_text('{"path": "holiday [copy].png", "objects": {"dog": 1}}\n')
    feedback = "The [dog] is not there [/] and [bold]nothing[/bold] else."
    with FakeOpenAIServer(reply=critique_reply(feedback=feedback)) as server:
        argv = _argv(folder / "m.jsonl", tiny_student_dir, tmp_path / "runs", server.base_url)
        assert loop.main(argv) == 0
    capsys.readouterr()
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "show", "t"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "holiday [copy]" in out and feedback in out


# --- 12. scoring a run of the OpenAI critic -------------------------------------------------------

def test_score_judges_an_openai_run_and_survives_a_failed_judgement(manifest, tiny_student_dir, tmp_path):  # noqa: F811
    from refine import score

    def reply(body):
        text = request_text(body)
        if "Caption A:" in text:  # the pairwise judge
            if _image_width(body) == 1280:
                return "no JSON here"  # a judgement that cannot be parsed
            return json.dumps({"winner": "B", "reason": "more accurate"})
        return critique_reply()(body)

    with FakeOpenAIServer(reply=reply) as server:
        assert loop.main(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, "--rounds=2")) == 0
        judged_before = sum("Caption A:" in request_text(b) for b in server.requests)
        # the tiny student says the same in both rounds, and an unchanged caption is not judged: give the last
        # round captions of its own
        last = tmp_path / "runs" / "t" / "rounds" / "001" / "captions.jsonl"
        last.write_text("".join(json.dumps({**row, "caption": row["caption"] + " on a street"}) + "\n"
                                for row in read_jsonl(last)))
        assert score.main(["t", "--runs-dir", str(tmp_path / "runs"), "--metrics", "winrate,chair"]) == 0
        judge_requests = [b for b in server.requests if "Caption A:" in request_text(b)]
    result = json.loads((tmp_path / "runs" / "t" / "scores.json").read_text())
    assert judged_before == 0 and len(judge_requests) == 4
    assert (result["winrate/judged"], result["winrate/failed"]) == (3, 1)
    assert 0.0 <= result["winrate/last_vs_first"] <= 1.0
    # The judge saw each image itself: the four requests carry the four pictures' pixels.
    assert sorted(_image_width(b) for b in judge_requests) == [96, 512, 810, 1280]


def test_score_whose_judgements_mostly_fail_exits_nonzero(manifest, tiny_student_dir, tmp_path, capsys):  # noqa: F811
    """Every judgement failing printed "nan over 0 images (4 judgements failed)" and exited 0."""
    from refine import score

    def reply(body):
        return "no JSON here" if "Caption A:" in request_text(body) else critique_reply()(body)

    with FakeOpenAIServer(reply=reply) as server:
        assert loop.main(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, "--rounds=2")) == 0
        last = tmp_path / "runs" / "t" / "rounds" / "001" / "captions.jsonl"
        last.write_text("".join(json.dumps({**row, "caption": row["caption"] + " on a street"}) + "\n"
                                for row in read_jsonl(last)))
        capsys.readouterr()
        assert score.main(["t", "--runs-dir", str(tmp_path / "runs"), "--metrics", "winrate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 4 of 4 win-rate judgements failed (the first: ") and len(err.splitlines()) == 1, err


# --- errors mid-run, and runs used from elsewhere -------------------------------------------------

def test_a_resume_whose_images_mostly_vanished_is_refused_before_anything(tmp_path, tiny_student_dir, capsys):
    """More of a round's images gone than loop.max_failure_share (a few are left out: test_lost_images)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (16, 16), colour).save(folder / f"{name}.png")
    args = ["--images", str(folder), "--rounds", "2", f"--student.model={tiny_student_dir}", "--loop.run_id=v",
            f"--loop.runs_dir={tmp_path / 'runs'}", "--student.n_samples=0", "--student.max_new_tokens=4",
            "--loop.use_regions=false", "--critic.backend=openai", "--critic.base_url=http://127.0.0.1:9/v1",
            "--loop.max_failure_share=1.0", "--critic.max_retries=0", "--critic.timeout=1"]
    assert loop.main(args) == 0  # every critique fails (nothing listens on port 9), and that share is allowed
    (folder / "b.png").unlink()
    events = (tmp_path / "runs" / "v" / "events.jsonl").read_bytes()
    capsys.readouterr()
    assert loop.main(["--resume", "v", f"--loop.runs_dir={tmp_path / 'runs'}"]) == 0  # a done run: nothing to do
    log = RunLog(tmp_path / "runs" / "v")
    with open(log.root / "events.jsonl", "rb+") as f:  # make it unfinished again
        f.truncate(len(events) - len(events.splitlines(keepends=True)[-1]))
    before = (log.root / "events.jsonl").read_bytes()
    capsys.readouterr()
    assert loop.main(["--resume", "v", f"--loop.runs_dir={tmp_path / 'runs'}", "--loop.max_failure_share=0.4"]) == 2
    assert "1 of round 0's 2 images are no longer in" in capsys.readouterr().err
    assert (log.root / "events.jsonl").read_bytes() == before, "a refused resume must write nothing"


def test_a_second_session_of_a_run_is_refused_while_the_first_holds_it(manifest, tiny_student_dir, tmp_path, capsys):  # noqa: F811
    with FakeOpenAIServer(reply=critique_reply()) as server:
        assert loop.main(_argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url, "--max-critic-calls=2")) == 0
        log = RunLog(tmp_path / "runs" / "t")
        with log.lock():  # another process holding the run, as far as this one can tell
            capsys.readouterr()
            assert loop.main(["--resume", "t", f"--loop.runs_dir={tmp_path / 'runs'}"]) == 2
            assert "is in use by another refine process" in capsys.readouterr().err
        assert loop.main(["--resume", "t", f"--loop.runs_dir={tmp_path / 'runs'}", "--max-critic-calls=100"]) == 0
    assert log.status() == "done"


def test_an_error_mid_run_is_a_recorded_stop_with_its_traceback(manifest, tiny_student_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A full disk while round 0's summary is written: exit 1 (not 2: the input was fine), a "crashed"
    event, the traceback in crash.log, and the run resumes once the disk has room again."""
    from refine.infra import runlog

    real = runlog.RunLog.finish_round

    def disk_full(self, k, metrics):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runlog.RunLog, "finish_round", disk_full)
    with FakeOpenAIServer(reply=critique_reply()) as server:
        argv = _argv(manifest, tiny_student_dir, tmp_path / "runs", server.base_url)
        assert loop.main(argv) == 1
        err = capsys.readouterr().err
        log = RunLog(tmp_path / "runs" / "t")
        assert "No space left on device" in err and "--resume" in err and "crash.log" in err
        assert log.events()[-1]["event"] == "crashed" and "No space left" in (log.root / "crash.log").read_text()
        assert log.status() == "stopped by an error (resumable)"
        monkeypatch.setattr(runlog.RunLog, "finish_round", real)
        asked = server.request_count
        assert loop.main(["--resume", "t", f"--loop.runs_dir={tmp_path / 'runs'}"]) == 0
        assert server.request_count == asked, "the recorded stages are not asked again"
    assert log.status() == "done"


def test_a_run_resumes_and_scores_from_another_directory(tmp_path, tiny_student_dir, monkeypatch):
    from refine import score

    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(work / "photos" / "a.png")
    (work / "photos" / "m.jsonl").write_text('{"path": "a.png", "objects": {"dog": 1}, "references": ["a dog"]}\n')
    monkeypatch.chdir(work)
    args = ["--images", "photos/m.jsonl", "--rounds", "2", f"--student.model={tiny_student_dir}", "--loop.run_id=r",
            "--loop.runs_dir=runs", "--student.n_samples=0", "--student.max_new_tokens=4", "--loop.use_regions=false",
            "--max-critic-calls=1", "--critic.backend=openai", "--critic.model=fake"]
    with FakeOpenAIServer(reply=critique_reply()) as server:
        assert loop.main([*args, f"--critic.base_url={server.base_url}"]) == 0  # stops at the budget
        monkeypatch.chdir(tmp_path)
        assert loop.main(["--resume", str(work / "runs" / "r"), "--max-critic-calls=100"]) == 0
    assert RunLog(work / "runs" / "r").status() == "done"
    assert score.main([str(work / "runs" / "r"), "--metrics", "chair,diversity"]) == 0


def test_files_the_run_writes_are_readable_like_any_other(tmp_path):
    """Atomic writes go through mkstemp, which makes files 0600; the run's files (and the report) must
    follow the umask instead, or a team cannot read each other's runs."""
    from refine.infra.atomic import atomic_write_text

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
