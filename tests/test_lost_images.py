"""Images lost mid-run (refine.stages.lost): a file deleted, broken or rewritten after the run read it.

One such image is left out of the rest of the round with its reason, and the run goes on; most of them
stop the run, resumable, instead of a round that pretends to be one. Each test drives the real loop
(tiny student) against a local OpenAI-compatible server on 127.0.0.1, the one fake at the true edge.
The pixel cache is made as small as it goes, as in a set far larger than it: every stage then reads the
file again, which is where a lost image shows.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_trust import _argv, critique_reply

from refine import loop
from refine.images import records
from refine.infra.atomic import read_jsonl
from refine.infra.runlog import RunLog
from refine.offline.devserver import FakeOpenAIServer, request_images

COLOURS = {"a": "red", "b": "blue", "c": "green", "d": "white"}


@pytest.fixture(autouse=True)
def small_pixel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(records.PIXELS, "max_bytes", 1)  # as REFINE_PIXEL_CACHE_MB=0: one image held at most
    records.PIXELS.clear()


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in COLOURS.items():
        Image.new("RGB", (16, 16), colour).save(photos / f"{name}.png")
    return photos


def lose(path, how):
    if how == "deleted":
        path.unlink()
    elif how == "broken":
        path.write_bytes(b"not an image any more")
    else:  # another picture under the same name: it decodes, but it is not what was captioned
        Image.new("RGB", (16, 16), "black").save(path)


def losing(folder, names, how):
    """A reply function that loses ``names`` when the critic gets its first request of round 0."""
    base = critique_reply(revision="a bus and people on a street")

    def reply(body):
        if request_images(body) and (folder / f"{names[0]}.png").exists() and not getattr(reply, "done", False):
            reply.done = True
            for name in names:
                lose(folder / f"{name}.png", how)
        return base(body)

    return reply


def losing_each_way(folder):
    """A reply function that, at the critic's first request of round 0, deletes b, breaks c and puts
    another picture under d's name."""
    base = critique_reply(revision="a bus and people on a street")

    def reply(body):
        if request_images(body) and not getattr(reply, "done", False):
            reply.done = True
            for name, how in (("b", "deleted"), ("c", "broken"), ("d", "rewritten")):
                lose(folder / f"{name}.png", how)
        return base(body)

    return reply


def test_images_lost_mid_run_are_left_out_and_the_run_finishes(folder, tmp_path, tiny_student_dir, capsys):
    for i in range(4):  # 3 of 7 lost: under loop.max_failure_share=0.5
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"x{i}.png")
    with FakeOpenAIServer(reply=losing_each_way(folder)) as server:
        code = loop.main(_argv(folder, tiny_student_dir, tmp_path / "runs", server.base_url, "--rounds=2"))
    err = capsys.readouterr().err
    assert code == 0, err
    log = RunLog(tmp_path / "runs" / "t")
    assert log.status() == "done"
    first, second = log.metrics()
    assert first["images/lost"] == 3 and second["images/lost"] == 3
    assert "round 0: 3 image(s) could no longer be read and were left out of the round" in " ".join(err.split())
    recorded = [row["image_id"] for row in read_jsonl(log.root / "rounds" / "000" / "pairs.jsonl")]
    assert {"b", "c", "d"} & set(recorded)  # made from critiques answered before the files were lost ...
    assert first["pairs/total"] == sum(i not in "bcd" for i in recorded)  # ... and left out of the update
    assert {row["image_id"] for row in log.read_stage(1, "captions")} == {"a", "x0", "x1", "x2", "x3"}
    assert not {"b", "c", "d"} & {row["image_id"] for row in log.read_stage(1, "critiques")}
    reasons = " ".join(m["images/lost_first"] for m in (first, second))
    assert "b.png" in reasons or "c.png" in reasons or "d.png" in reasons


def test_most_images_lost_mid_run_stop_the_run_and_a_resume_finishes_it(folder, tmp_path, tiny_student_dir, capsys):
    """A drive unmounted, say: the round cannot be one, so the run stops (exit 1), resumable; with the
    files back, the resume finishes it, and the critiques answered before are not asked again."""
    saved = {name: (folder / f"{name}.png").read_bytes() for name in COLOURS}
    with FakeOpenAIServer(reply=losing(folder, ["a", "b", "c"], "deleted")) as server:
        assert loop.main(_argv(folder, tiny_student_dir, tmp_path / "runs", server.base_url, "--rounds=2")) == 1
        out = " ".join(capsys.readouterr().err.split())
        assert "Stopped: " in out and "failed; the first error: " in out and "can no longer be read" in out, out
        log = RunLog(tmp_path / "runs" / "t")
        assert log.events()[-1]["event"] == "failure_stop" and not log.is_done()
        asked = server.request_count
        for name, data in saved.items():
            (folder / f"{name}.png").write_bytes(data)
        assert loop.main(["--resume", "t", f"--loop.runs_dir={tmp_path / 'runs'}"]) == 0
    assert log.status() == "done"
    assert all("images/lost" not in m for m in log.metrics())
    critiques = log.read_stage(0, "critiques")
    assert {row["image_id"] for row in critiques} == set(COLOURS)
    assert server.request_count - asked < 2 * len(critiques), "the answered critiques are not asked again"


def test_a_resume_goes_on_without_a_few_images_gone_and_refuses_when_most_are(folder, tmp_path, tiny_student_dir, capsys):
    runs = tmp_path / "runs"
    with FakeOpenAIServer(reply=critique_reply()) as server:
        assert loop.main(_argv(folder, tiny_student_dir, runs, server.base_url, "--rounds=3",
                               "--max-critic-calls=2")) == 0  # stops at the budget in round 0
        (folder / "b.png").unlink()
        capsys.readouterr()
        assert loop.main(["--resume", "t", f"--loop.runs_dir={runs}", "--max-critic-calls=24", "--rounds=3"]) == 0
        out = " ".join(capsys.readouterr().err.split())
        assert "note: 1 of round 0's 4 images are no longer in" in out and "the run goes on without them" in out
        log = RunLog(runs / "t")
        assert log.events()[-1]["event"] == "budget_stop" and log.completed_rounds() >= 1, log.events()
        assert log.metrics()[0]["images/lost"] == 1
        for name in ("a", "c"):
            (folder / f"{name}.png").unlink()
        events = (log.root / "events.jsonl").read_bytes()
        assert loop.main(["--resume", "t", f"--loop.runs_dir={runs}", "--max-critic-calls=100"]) == 2
        err = capsys.readouterr().err
        assert "3 of round 0's 4 images are no longer in" in err and "more than loop.max_failure_share=0.5" in err, err
        assert len(err.strip().splitlines()) == 1 and (log.root / "events.jsonl").read_bytes() == events


def test_the_metrics_say_when_held_out_images_were_lost(folder, tmp_path, tiny_student_dir, capsys):
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    for name, colour in COLOURS.items():
        Image.new("RGB", (16, 16), colour).save(held_out / f"{name}.png")
    manifest = held_out / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"{n}.png", "objects": {"dog": 1}}) + "\n" for n in COLOURS))
    with FakeOpenAIServer(reply=losing(held_out, ["c"], "deleted")) as server:
        assert loop.main(_argv(folder, tiny_student_dir, tmp_path / "runs", server.base_url, "--rounds=1",
                               f"--loop.eval_images={manifest}")) == 0
    out = " ".join(capsys.readouterr().err.split())
    assert "1 held-out image(s) could not be read and are not in these metrics" in out, out


def test_an_image_rewritten_between_sessions_is_left_out_of_the_round_it_was_captioned_in(
        folder, tmp_path, tiny_student_dir, capsys):
    """Round 0 stops at the budget with its captions recorded; b.png is then another picture. The resume
    must not judge or train b's old captions against the new pixels: b is left out of round 0, and round 1
    captions the new picture."""
    runs = tmp_path / "runs"
    with FakeOpenAIServer(reply=critique_reply(revision="a bus and people on a street")) as server:
        assert loop.main(_argv(folder, tiny_student_dir, runs, server.base_url, "--rounds=2",
                               "--max-critic-calls=1")) == 0
        log = RunLog(runs / "t")
        assert {row["image_id"] for row in log.read_stage(0, "captions")} == set(COLOURS)
        lose(folder / "b.png", "rewritten")
        capsys.readouterr()
        assert loop.main(["--resume", "t", f"--loop.runs_dir={runs}", "--max-critic-calls=100"]) == 0
    assert log.status() == "done"
    first, second = log.metrics()
    assert first["images/lost"] == 1 and "b: its bytes changed after the run captioned it" in first["images/lost_first"]
    assert "b" not in {row["image_id"] for row in log.read_stage(0, "critiques")}
    assert "b" not in {row["image_id"] for row in log.read_stage(0, "pairs")}
    assert "images/lost" not in second and "b" in {row["image_id"] for row in log.read_stage(1, "critiques")}


@pytest.mark.parametrize("how, words", [("deleted", "b.png: can no longer be read (No such file or directory)"),
                                        ("broken", "b.png: not a readable image"),
                                        ("rewritten", "b.png: its bytes changed after the run loaded it")])
def test_a_lost_file_says_how_it_was_lost(folder, how, words):
    record = records.record_from_path(folder / "b.png")
    assert records.readable(record) is not None
    records.PIXELS.clear()
    lose(folder / "b.png", how)
    lost = {}
    assert records.readable(record, lost) is None and words in lost["b"], lost


def test_the_check_before_the_update_reads_no_unchanged_file(folder):
    """Before the update the pairs' images are checked: one stat each, not a read (the scale review timed a
    read-and-decode pass at 26 s a round for 5,000 photos, 1.5 h for a million). A file that changed is
    read, and dropped only if it is lost."""
    from refine.stages.lost import readable_pairs
    from refine.stages.pairs import PreferencePair
    from refine.stages.student import CaptionSet

    recs = [records.record_from_path(folder / f"{name}.png") for name in COLOURS]
    pairs = [PreferencePair(r.id, "a red circle", "a blue square", "refined") for r in recs]
    captions = [CaptionSet(r.id, "a blue square") for r in recs]
    records.PIXELS.clear()
    before = records.PIXELS.decodes
    assert readable_pairs(pairs, recs, captions, {}, 0.5) == pairs
    assert records.PIXELS.decodes == before
    path = folder / "a.png"
    stamp = path.stat()
    path.touch()  # changed as far as a stat can tell, the same bytes: read, and kept
    lose(folder / "b.png", "rewritten")
    lost = {}
    kept = readable_pairs(pairs, recs, captions, lost, 0.5)
    assert [p.image_id for p in kept] == ["a", "c", "d"] and list(lost) == ["b"]
    # a decoded (b's read failed its sha256, which the count leaves out)
    assert records.PIXELS.decodes == before + 1 and path.stat().st_mtime_ns != stamp.st_mtime_ns


def test_a_critic_that_reads_no_pixels_gets_no_image_decoded_and_still_meets_a_lost_one(folder):
    """The grounded critic reads annotations only, yet the critique stage decoded each image for it: once
    per caption in a set larger than the pixel cache (~5 ms each, hours at a million). A file gone since
    the set was loaded is still a failed critique naming it, asked of no critic."""
    from critics.grounded import GroundedCritic
    from refine.images import load_images
    from refine.stages.critique import critique
    from refine.stages.student import CaptionSet

    (folder / "m.jsonl").write_text("".join(json.dumps({"path": f"{n}.png", "objects": {"cup": 1}}) + "\n"
                                            for n in COLOURS))
    images = load_images(str(folder / "m.jsonl"))
    captions = [CaptionSet(r.id, "a cup", ["two cups"]) for r in images.records]
    (folder / "d.png").unlink()
    decodes = records.PIXELS.decodes
    rows = critique(GroundedCritic(), images.records, captions, max_failure_share=1.0)
    assert records.PIXELS.decodes == decodes, "an image was decoded for a critic that reads no pixels"
    assert [r.critique.ok for r in rows] == [True] * 6 + [False] * 2
    assert all("image lost: " in r.critique.error and "d.png" in r.critique.error for r in rows[6:])
