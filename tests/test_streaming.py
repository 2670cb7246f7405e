"""Stages that record their progress as they go: lazy pixels, partial files, a kill mid-stage, a pool of
requests with no barrier, and captions that do not depend on how the images were chunked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from refine.images import load_images
from refine.images.records import PIXELS
from refine.infra.atomic import read_jsonl
from refine.infra.concurrency import stream_concurrently
from refine.infra.runlog import RunLog
from refine.offline.devserver import FakeOpenAIServer, request_images, request_text
from refine.stages.critique import BudgetExhausted, Spend, TooManyFailures, run_requests


def _draw(i: int) -> Image.Image:
    image = Image.new("RGB", (64, 48), (255 - 9 * i % 256, 30 + 7 * i % 200, 90))
    ImageDraw.Draw(image).ellipse((4 + i % 20, 4, 30 + i % 20, 30), fill=(20 * i % 256, 0, 200))
    return image


@pytest.fixture
def folder(tmp_path) -> Path:
    """24 drawn images in nested folders, with annotations in a metadata-free manifest-less layout."""
    root = tmp_path / "images"
    for i in range(24):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        _draw(i).save(sub / f"img{i:02d}.png")
    return root


# --- lazy pixels --------------------------------------------------------------------------------------

def test_a_file_set_holds_no_pixels_and_decodes_on_demand(folder):
    images = load_images(str(folder / "**" / "*.png"))
    assert len(images.records) == 24
    assert all(callable(r.source) for r in images.records)  # nothing decoded is kept by the set
    before = PIXELS.decodes
    first = images.records[0].image
    assert first.size == (64, 48) and images.records[0].image is first  # cached while in use
    assert PIXELS.decodes == before + 1


def test_the_pixel_cache_stays_within_its_bytes():
    from refine.images.records import PixelCache

    cache = PixelCache(max_bytes=3 * 64 * 48 * 3)
    for i in range(10):
        cache.get((str(i), ""), lambda i=i: _draw(i))
    assert cache.bytes <= cache.max_bytes and len(cache._items) == 3
    assert cache.decodes == 10
    cache.get(("9", ""), lambda: _draw(9))
    assert cache.decodes == 10  # the most recent ones stay


def test_loading_a_set_again_reads_no_file(folder, monkeypatch):
    """The image index remembers each file's hash (and that it decodes) by path, size and mtime."""
    spec = str(folder / "**" / "*.png")
    first = [(r.id, r.sha256) for r in load_images(spec).records]
    import refine.images.records as records

    monkeypatch.setattr(records, "decode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again")))
    assert [(r.id, r.sha256) for r in load_images(spec).records] == first
    # a file that changes is read again
    path = next(folder.glob("part0/*.png"))
    _draw(99).save(path)
    monkeypatch.undo()
    assert [r.sha256 for r in load_images(spec).records] != [s for _, s in first]


def test_a_first_load_reads_new_files_several_at_once_in_order_with_the_same_notes(folder, monkeypatch):
    """A set's first load read, decoded and hashed its files one at a time, silently: 6-7 ms a file, about
    1.7 h at a million. Files new to the image index are now read several at once (with a progress bar when
    there are many); the records, their order and the notes are what one at a time gave."""
    import hashlib

    import refine.images.records as records

    (folder / "part1" / "img05b.png").write_bytes(b"not a png")
    real, active, most, lock = records.decode, [0], [0], threading.Lock()

    def decode(*args, **kwargs):  # the real decoder, made slow enough that overlapping calls show
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(records, "decode", decode)
    images = load_images(str(folder / "**" / "*.png"))
    assert most[0] > 1, "new files are read one at a time"
    files = sorted(p for p in folder.glob("**/*.png") if p.name != "img05b.png")
    assert [(r.id, r.sha256) for r in images.records] == [(p.stem, hashlib.sha256(p.read_bytes()).hexdigest())
                                                          for p in files]
    assert len(images.notes) == 1 and images.notes[0].startswith("skipped ") and "img05b.png" in images.notes[0]


def test_a_stop_while_a_set_loads_leaves_no_requests_to_wait_for(folder, monkeypatch):
    """A Ctrl-C while new files were read was followed by "Waiting up to 5 s for 6 critic call(s) in
    flight": the file reads it cut short were counted as requests whose answers a resume could use."""
    import refine.images.records as records
    from refine.infra.concurrency import finish_in_flight, in_flight

    real, calls = records.decode, [0]

    def decode(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(records, "decode", decode)
    try:
        with pytest.raises(KeyboardInterrupt):
            load_images(str(folder / "**" / "*.png"))
        assert in_flight() == 0
    finally:
        finish_in_flight(2.0)


# --- the request pool ---------------------------------------------------------------------------------

def test_the_pool_has_no_barrier_and_pulls_inputs_just_in_time():
    """A slow item does not hold back the others, and the producer is read only as workers free up."""
    produced, in_flight, most = [], 0, 0
    lock = threading.Lock()

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    def work(i):
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.5 if i == 0 else 0.01)
        with lock:
            in_flight -= 1
        return i * i

    order = []
    for i, result in stream_concurrently(work, items(), 4):
        assert result == i * i
        order.append(i)
        assert len(produced) <= len(order) + 4  # never more than the pool's width ahead
    assert sorted(order) == list(range(20)) and order[-1] == 0  # the slow first item finished last
    assert most == 4


def test_run_requests_stops_at_the_budget_after_recording_what_is_in_flight():
    sunk = []
    spend = Spend(limit=5)

    def ask(batch):
        time.sleep(0.01)
        return [{"job": j, "paid": True} for j in batch]

    with pytest.raises(BudgetExhausted):
        run_requests("critiques", range(20), ask, lambda r: r["paid"], lambda r: None, 20, spend,
                     concurrency=3, sink=sunk.extend)
    assert len(sunk) == 5 == spend.pending  # never more requests than the budget, all of them recorded


def test_run_requests_makes_no_request_past_the_budget():
    """Jobs are built lazily (a request decodes an image and finds its regions): none is built that the
    budget cannot send."""
    built = []

    def jobs():
        for j in range(10):
            built.append(j)
            yield j

    with pytest.raises(BudgetExhausted):
        run_requests("critiques", jobs(), lambda batch: [True for _ in batch], bool, lambda r: None, 10,
                     Spend(limit=3))
    assert built == [0, 1, 2]


def test_the_budget_counts_the_requests_a_job_can_make():
    """A textual step makes one request per critique of its caption (3 with critic.samples=3): with 7 calls
    left, two such jobs go (6 requests), the third would pass the budget."""
    sent = []

    def ask(batch):
        sent.extend(batch)
        return [3 for _ in batch]  # each job paid for 3 requests

    spend = Spend(limit=7)
    with pytest.raises(BudgetExhausted):
        run_requests("textual steps", range(5), ask, lambda r: r, lambda r: None, 5, spend, concurrency=4,
                     cost=lambda job: 3)
    assert sent == [0, 1] and spend.pending == 6


def test_requests_in_flight_when_a_stage_breaks_off_count_as_spent():
    """Ctrl-C or a crash abandons the requests in flight; they may have been paid for, so the budget
    counts them."""
    spend = Spend(limit=100)

    def ask(batch):
        if batch == [1]:
            raise KeyboardInterrupt
        time.sleep(0.5)  # job 0 is still in flight when job 1 breaks off the stage
        return [True]

    with pytest.raises(KeyboardInterrupt):
        run_requests("critiques", range(10), ask, bool, lambda r: None, 10, spend, concurrency=2)
    assert spend.pending == 2


def test_run_requests_stops_as_soon_as_the_stage_cannot_succeed():
    asked = []

    def ask(batch):
        asked.extend(batch)
        return [{"error": "boom"} for _ in batch]

    with pytest.raises(TooManyFailures, match="of the first .* of 40 critiques failed"):
        run_requests("critiques", range(40), ask, lambda r: False, lambda r: r["error"], 40,
                     max_failure_share=0.25, concurrency=2)
    assert len(asked) < 20


# --- the run log's partial files ----------------------------------------------------------------------

def test_a_streamed_stage_resumes_from_its_partial_file_and_survives_a_torn_line(tmp_path):
    log = RunLog(tmp_path / "run")
    calls = []

    def compute(done, sink, fail_after=None):
        have = {r["i"] for r in done}
        rows = list(done)
        for i in range(10):
            if i in have:
                continue
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt
            calls.append(i)
            row = {"i": i}
            sink([row])
            rows.append(row)
        return sorted(rows, key=lambda r: r["i"])

    with pytest.raises(KeyboardInterrupt):
        log.stream(0, "captions", lambda done, sink: compute(done, sink, fail_after=6))
    partial = log.partial_path(0, "captions")
    with open(partial, "ab") as f:
        f.write(b'{"i": 6, "torn')  # a kill in the middle of an append
    assert not log.has_stage(0, "captions")
    calls.clear()
    rows = log.stream(0, "captions", compute)
    assert calls == [6, 7, 8, 9] and [r["i"] for r in rows] == list(range(10))
    assert not partial.exists() and log.has_stage(0, "captions")
    done = [e for e in log.events() if e["event"] == "stage_done"][-1]
    assert done["resumed_rows"] == 6 and done["rows"] == 10


def test_a_stage_resumed_after_a_stop_counts_the_time_of_every_session(tmp_path):
    """The round summary's time/<stage> of a stage stopped and resumed is the time of both sessions, not
    only the one that finished it; a stage in a run that was not stopped counts once."""
    log = RunLog(tmp_path / "run")

    def first(done, sink):
        sink([{"i": 0}])
        time.sleep(0.4)
        raise KeyboardInterrupt

    def second(done, sink):
        time.sleep(0.2)
        sink([{"i": 1}])
        return [*done, {"i": 1}]

    with pytest.raises(KeyboardInterrupt):
        log.stream(0, "captions", first)
    assert log.status() == "incomplete (resumable)"  # the stop's own record is not the run's last word
    log.stream(0, "captions", second)
    log.stream(1, "captions", lambda done, sink: [])
    seconds = log.stage_seconds(0)["captions"]
    assert 0.6 <= seconds < 2.0, seconds
    assert log.stage_seconds(1)["captions"] < 0.2


def test_captions_do_not_depend_on_how_the_stage_was_cut(tiny_student, folder):
    """A resumed caption stage (a kill after some batches) writes what an uninterrupted one writes."""
    from refine.config import StudentConfig
    from refine.stages.student import caption

    records = load_images(str(folder / "**" / "*.png")).records
    cfg = StudentConfig(n_samples=2, max_new_tokens=6, batch_size=8, temperature=1.5)
    whole = caption(tiny_student, records, cfg, seed=3)
    first_part = []
    with pytest.raises(KeyboardInterrupt):
        def sink(rows):
            first_part.extend(rows)
            if len(first_part) >= 16:
                raise KeyboardInterrupt
        caption(tiny_student, records, cfg, seed=3, sink=sink)
    resumed = caption(tiny_student, records, cfg, seed=3, done=first_part)
    assert resumed == whole
    assert caption(tiny_student, records[::-1], cfg, seed=3)[::-1] == whole  # order does not matter either


# --- a kill in the middle of a paid stage ---------------------------------------------------------------

def reply(body):
    if request_images(body):
        return json.dumps({"score": 0.5, "feedback": "Name the ball.", "hallucinated": [], "missing": ["ball"],
                           "count_errors": {}, "revision": "a ball " + str(len(request_text(body)) % 5)})
    return "<IMPROVED_VARIABLE>a ball</IMPROVED_VARIABLE>"


def test_a_kill_mid_critiques_loses_only_the_requests_in_flight(folder, tiny_student_dir, tmp_path):
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "REFINE_CACHE_DIR": str(tmp_path / "cache")}
    with FakeOpenAIServer(reply=reply, latency=0.1) as server:
        args = ["--images", str(folder / "**" / "*.png"), "--rounds", "1", f"--student.model={tiny_student_dir}",
                f"--loop.runs_dir={runs_dir}", "--loop.run_id=k", "--student.n_samples=1",
                "--student.max_new_tokens=6", "--update.epochs=1", "--loop.use_regions=false",
                "--critic.backend=openai", f"--critic.base_url={server.base_url}", "--critic.model=fake",
                "--critic.max_concurrency=4"]
        proc = subprocess.Popen([sys.executable, "-m", "refine.loop", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        partial = runs_dir / "k" / "rounds" / "000" / "critiques.partial.jsonl"
        deadline = time.time() + 240
        while (not partial.exists() or len(read_jsonl(partial)) < 12) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recorded = len(read_jsonl(partial))
        asked_before = [json.dumps(b, sort_keys=True) for b in server.requests]
        resumed = subprocess.run([sys.executable, "-m", "refine.loop", "--resume", "k", f"--loop.runs_dir={runs_dir}"],
                                 env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        bodies = [json.dumps(b, sort_keys=True) for b in server.requests]

    log = RunLog(runs_dir / "k")
    assert log.status() == "done" and not partial.exists()
    done = next(e for e in log.events() if e["event"] == "stage_done" and e["stage"] == "critiques")
    assert done["resumed_rows"] == recorded >= 12
    # Only requests in flight at the kill (at most max_concurrency = 4) can reach the server again: an
    # answer the client had received is recorded or cached. Nothing else is asked twice.
    repeated = [b for b, n in Counter(bodies).items() if n > 1]
    assert len(repeated) <= 4 and set(repeated) <= set(asked_before)
    critiques = sum(1 for b in bodies if request_images(json.loads(b)))
    assert critiques <= len(log.read_stage(0, "critiques")) + 4
    # Every call is counted once, except those answered but unrecorded at the kill (then served free
    # from the cache), which no one can count after a kill -9.
    assert len(bodies) - (len(asked_before) - recorded) <= log.critic_calls() <= len(bodies)


# --- Hugging Face datasets -------------------------------------------------------------------------------

def test_a_saved_dataset_is_an_image_set(tmp_path):
    import datasets

    rows = {"image": [_draw(i) for i in range(5)], "caption": [f"picture {i}" for i in range(5)],
            "objects": [["ball"] * (i + 1) for i in range(5)], "image_id": [100 + i for i in range(5)]}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "objects": datasets.Sequence(datasets.Value("string")),
                                  "image_id": datasets.Value("int64")})
    whole = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": whole, "validation": whole.select([0, 1])}).save_to_disk(tmp_path / "saved")

    images = load_images(f"hf:{tmp_path / 'saved'}:validation")
    assert [r.id for r in images.records] == ["100", "101"]
    assert images.records[1].references == ["picture 1"] and images.records[1].objects == {"ball": 2}
    assert callable(images.records[0].source)
    assert images.records[0].image.tobytes() == _draw(0).tobytes()
    assert len(load_images(f"hf:{tmp_path / 'saved'}").records) == 5  # train by default
    with pytest.raises(ValueError, match="name one of train, validation|no split 'test'"):
        load_images(f"hf:{tmp_path / 'saved'}:test")
    with pytest.raises(ValueError, match="no column 'alt'"):
        from refine.images.hf import Columns

        load_images(f"hf:{tmp_path / 'saved'}", columns=Columns(caption="alt"))


def test_a_detection_datasets_objects_column_is_ignored_unless_named(tmp_path):
    """A hub detection set's "objects" holds boxes and category ids: found by name, it is left out with one
    note (not every row skipped); named, it is refused."""
    import datasets

    from refine.images.hf import Columns, load_dataset_records

    boxes = [{"bbox": [[1.0, 2.0, 10.0, 10.0]] * (i + 1), "category": [3] * (i + 1)} for i in range(3)]
    datasets.Dataset.from_dict({"image": [_draw(i) for i in range(3)], "objects": boxes}).cast_column(
        "image", datasets.Image()).save_to_disk(tmp_path / "det")
    records, notes = load_dataset_records(f"hf:{tmp_path / 'det'}")
    assert len(records) == 3 and all(r.objects is None for r in records)
    assert len(notes) == 1 and "the column 'objects' is not {label: count}" in notes[0]
    with pytest.raises(ValueError, match="loop.objects_column=objects: objects .* expected {label: count}"):
        load_dataset_records(f"hf:{tmp_path / 'det'}", Columns(objects="objects"))


def test_an_imagefolder_with_metadata_is_an_image_set(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    lines = []
    for i in range(3):
        _draw(i).save(root / f"img{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png", "caption": f"drawing {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    images = load_images(f"hf:{root}")
    assert [r.references for r in images.records] == [["drawing 0"], ["drawing 1"], ["drawing 2"]]
    assert [r.image.tobytes() for r in images.records] == [_draw(i).tobytes() for i in range(3)]


def test_an_imagefolder_of_images_alone_is_an_image_set(tmp_path):
    """No metadata.jsonl (or a dataset of one image column): it loaded as an empty set."""
    root = tmp_path / "folder"
    root.mkdir()
    for i in range(2):
        _draw(i).save(root / f"img{i}.png")
    images = load_images(f"hf:{root}")
    assert [r.id for r in images.records] == ["train-000000", "train-000001"]
    assert [r.image.tobytes() for r in images.records] == [_draw(i).tobytes() for i in range(2)]


def test_a_dataset_row_without_an_image_or_with_its_file_gone_is_skipped_with_a_note(tmp_path):
    """One bad row of a set is skipped, as a bad file of a folder is: a row with no image was a traceback,
    and an imagefolder file named in metadata.jsonl but deleted refused the whole set."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [_draw(0), None, _draw(2)], "caption": ["a", "b", "c"]},
                               features=features).save_to_disk(tmp_path / "saved")
    images = load_images(f"hf:{tmp_path / 'saved'}")
    assert [r.references for r in images.records] == [["a"], ["c"]]
    assert images.notes == [f"skipped hf:{tmp_path / 'saved'} row 1: the row has no image"], images.notes

    root = tmp_path / "folder"
    root.mkdir()
    for i in range(3):
        _draw(i).save(root / f"img{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png", "caption": f"d{i}"}) + "\n"
                                                 for i in range(3)))
    (root / "img1.png").unlink()
    images = load_images(f"hf:{root}")
    assert [r.references for r in images.records] == [["d0"], ["d2"]]
    assert len(images.notes) == 1 and images.notes[0].startswith(f"skipped hf:{root} row 1: "), images.notes
    _draw(1).save(root / "img1.png")  # put back: read again, not remembered as bad
    assert len(load_images(f"hf:{root}").records) == 3


def test_a_loop_runs_on_a_dataset(tmp_path, tiny_student_dir):
    import datasets

    from refine import loop

    rows = {"image": [_draw(i) for i in range(4)], "objects": [{"ball": 1}, {"ball": 2}, {"cup": 1}, {"ball": 1}]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "ds")
    log = loop.run(["--images", f"hf:{tmp_path / 'ds'}", "--rounds", "1", f"--student.model={tiny_student_dir}",
                    f"--loop.runs_dir={tmp_path / 'runs'}", "--loop.run_id=hf", "--student.n_samples=1",
                    "--student.max_new_tokens=6", "--loop.use_regions=false"])
    assert log.status() in ("done", "done, no pairs")
    assert [r["image_id"] for r in log.read_stage(0, "captions")] == [f"train-{i:06d}" for i in range(4)]


def test_a_dataset_without_annotations_is_told_how_a_dataset_gives_them(tmp_path, tiny_student_dir, capsys):
    """The grounded critic's refusal said to annotate "a manifest's objects", which an hf: set has not."""
    import datasets

    from refine import loop

    datasets.Dataset.from_dict({"image": [_draw(0)]}).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "ds")
    capsys.readouterr()
    assert loop.main(["--images", f"hf:{tmp_path / 'ds'}", f"--student.model={tiny_student_dir}",
                      f"--loop.runs_dir={tmp_path / 'runs'}", "--loop.use_regions=false"]) == 2
    err = capsys.readouterr().err
    assert "annotate them (a column of {label: count} or labels, named by loop.objects_column)" in err, err


def test_rounds_take_fresh_slices_of_a_large_set():
    from refine.images import round_images

    records = list(range(10))
    assert round_images(records, 0, 0, 3) == records
    rounds = [round_images(records, 4, 0, k) for k in range(3)]
    assert all(len(r) == 4 for r in rounds)
    assert set(rounds[0]).isdisjoint(rounds[1]) and len(set(rounds[0]) | set(rounds[1]) | set(rounds[2])) == 10
    assert rounds == [round_images(records, 4, 0, k) for k in range(3)]  # the same on a resume
    assert round_images(records, 4, 1, 0) != rounds[0]  # another seed, another shuffle


def test_a_resumed_round_keeps_its_slice_of_a_set_that_grew(tmp_path, tiny_student_dir, monkeypatch):
    """Round 0 takes 3 of 6 images and stops at the budget; 3 files are added before the resume. The
    round keeps its recorded slice (a slice recomputed over 9 images would be another one)."""
    from test_trust import critique_reply

    from refine import loop

    monkeypatch.setenv("REFINE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "folder"
    root.mkdir()
    for i in range(6):
        _draw(i).save(root / f"img{i}.png")
    runs_dir = tmp_path / "runs"
    with FakeOpenAIServer(reply=critique_reply()) as server:
        args = ["--rounds", "1", f"--student.model={tiny_student_dir}", f"--loop.runs_dir={runs_dir}",
                "--student.n_samples=1", "--student.max_new_tokens=6", "--loop.use_regions=false",
                "--critic.backend=openai", f"--critic.base_url={server.base_url}", "--critic.model=fake"]
        log = loop.run(["--images", str(root), "--loop.run_id=grow", "--loop.images_per_round=3",
                        "--max-critic-calls", "1", *args])
        assert log.events()[-1]["event"] == "budget_stop"
        picked = [r["image_id"] for r in log.read_stage(0, "captions")]
        assert len(picked) == 3
        for i in range(6, 9):
            _draw(i).save(root / f"img{i}.png")
        # most of the round's slice gone is an input error, found before anything runs
        gone = [root / f"{i}.png" for i in picked[1:]]
        data, events = [p.read_bytes() for p in gone], len(log.events())
        for p in gone:
            p.unlink()
        with pytest.raises(ValueError, match=f"2 of round 0's 3 images are no longer in .*{picked[1]}"):
            loop.run(["--resume", "grow", f"--loop.runs_dir={runs_dir}", "--max-critic-calls", "100"])
        assert len(log.events()) == events
        for p, d in zip(gone, data):
            p.write_bytes(d)
        loop.run(["--resume", "grow", f"--loop.runs_dir={runs_dir}", "--max-critic-calls", "100"])
    assert log.status().startswith("done")
    assert {r["image_id"] for r in log.read_stage(0, "critiques")} == set(picked)
    assert [r["image_id"] for r in log.read_stage(0, "images")] == picked
    assert "images" not in {e.get("stage") for e in log.events()}  # an input record, not a timed stage
