"""refine.score on a real (tiny) run: per-round before/after scores with tiny CLIP models."""

import json

import pytest
from test_loop import _args, manifest  # noqa: F401  (fixture)
from test_metrics import _save_tiny_clip

from refine import loop, score
from refine.metrics.summary import object_metrics
from refine.objects import coco_vocabulary


@pytest.fixture
def scored_run(manifest, tiny_student_dir, tmp_path):  # noqa: F811
    loop.run(_args(manifest, tiny_student_dir, tmp_path / "runs", "--loop.use_regions=false"))
    clip = _save_tiny_clip(tmp_path / "clip", logit_scale=2.0)
    pick_model = _save_tiny_clip(tmp_path / "pick", logit_scale=3.0, processor_dir=tmp_path / "pick-proc")
    argv = ["e2e", "--runs-dir", str(tmp_path / "runs"), "--clip-model", str(clip), "--pick-model", str(pick_model),
            "--pick-processor", str(tmp_path / "pick-proc"), "--device", "cpu"]
    return tmp_path / "runs" / "e2e", argv


def test_score_writes_per_round_before_and_after(scored_run, capsys):
    root, argv = scored_run
    assert score.main(argv) == 0
    result = json.loads((root / "scores.json").read_text())
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    for row in result["rounds"]:
        for side in ("before", "after"):
            s = row[side]
            assert 0.0 <= s["clipscore"] <= 2.5  # w * max(cos, 0) with w = 2.5
            assert {"pickscore", "chair/chair_s", "chair/recall", "bleu_4", "cider_d", "diversity/distinct_1"} <= set(s)
    # CHAIR in scores.json is the grounded matcher on the recorded captions, recomputed here independently.
    captions = [json.loads(line) for line in (root / "rounds" / "000" / "captions.jsonl").read_text().splitlines()]
    truths = {"bus": {"bus": 1, "person": 4}, "zidane": {"person": 2, "tie": 1},
              "grace_hopper": {"person": 1, "tie": 1}, "drawn": {"sports ball": 1}}
    by_hand = object_metrics([c["caption"] for c in captions], [truths[c["image_id"]] for c in captions],
                             coco_vocabulary())
    assert result["rounds"][0]["before"]["chair/recall"] == pytest.approx(by_hand["recall"])
    # The grounded critic's revisions add every missing object, so "after" recalls everything.
    assert result["rounds"][0]["after"]["chair/recall"] == pytest.approx(1.0)
    # the win rate judges only the images whose caption changed between round 0 and the last round
    last = {c["image_id"]: c["caption"] for c in map(json.loads, (root / "rounds" / "001" / "captions.jsonl").open())}
    same = sum(c["caption"].strip() == last[c["image_id"]].strip() for c in captions)
    assert (result["winrate/unchanged"], result["winrate/judged"]) == (same, 4 - same)
    assert "clipscore" in capsys.readouterr().out


def test_score_rejects_unknown_metric(scored_run):
    _, argv = scored_run
    with pytest.raises(SystemExit):
        score.main([*argv, "--metrics", "clipscore,meteor"])


def test_score_says_what_it_could_not_score(manifest, tiny_student_dir, tmp_path, capsys):  # noqa: F811
    """A table with nothing in it came with no word of why: no annotations, no references, no round."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"  # the same images, without objects or references
    bare.write_text("".join(json.dumps({"path": r["path"]}) + "\n" for r in rows))
    runs_dir = tmp_path / "runs"
    loop.run(_args(bare, tiny_student_dir, runs_dir, "--rounds=1", "--loop.max_failure_share=1"))  # detector on
    loop.run(_args(manifest, tiny_student_dir, runs_dir, "--rounds=0", "--loop.run_id=none"))
    capsys.readouterr()
    assert score.main(["e2e", "--runs-dir", str(runs_dir), "--metrics", "chair,cider,diversity"]) == 0
    out = capsys.readouterr().out
    assert "chair: no image of the run has annotated objects" in out and "no image of the run has reference" in out
    assert "diversity/distinct_1" in json.loads((runs_dir / "e2e" / "scores.json").read_text())["rounds"][0]["before"]
    assert score.main(["none", "--runs-dir", str(runs_dir), "--metrics", "chair"]) == 0
    assert "the run has no captioned round yet" in capsys.readouterr().out


def test_score_by_default_skips_a_model_it_cannot_load_and_scores_what_is_left(scored_run, tmp_path, capsys,
                                                                             tiny_student_dir):
    """Offline, the default CLIP models cannot load: the default set scored nothing (exit 2, one line);
    it now skips them with a note. Asked for by name, a model that cannot load is still an error. An
    image gone from the set is said, not silently dropped; with the whole set gone, diversity (text
    only) still scores; --metrics naming nothing is refused."""

    root, argv = scored_run
    assert score.main(["e2e", "--runs-dir", str(root.parent)]) == 0  # the default metrics, the default models
    result, out = json.loads((root / "scores.json").read_text()), capsys.readouterr().out
    assert "clipscore: skipped (could not load the CLIP-style model" in out and "clipscore" not in result["metrics"]
    assert "chair/chair_s" in result["rounds"][0]["before"]
    assert score.main(["e2e", "--runs-dir", str(root.parent), "--metrics", "clipscore,chair"]) == 2
    assert "could not load the CLIP-style model" in capsys.readouterr().err
    # a model named on the command line is chosen too: a mistyped one is an error, not a note
    assert score.main(["e2e", "--runs-dir", str(root.parent), "--clip-model", str(tmp_path / "typo")]) == 2
    assert "could not load the CLIP-style model" in capsys.readouterr().err
    # a checkpoint that is not a CLIP model: one line too (it was a traceback)
    assert score.main(["e2e", "--runs-dir", str(root.parent), "--metrics", "clipscore", "--clip-model",
                       str(tiny_student_dir)]) == 2
    assert "could not load the CLIP-style model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        score.main([*argv, "--metrics", ","])
    (tmp_path / "drawn.png").unlink()  # an image of the run's manifest is gone
    assert score.main([*argv, "--metrics", "chair,diversity"]) == 0
    result, out = json.loads((root / "scores.json").read_text()), capsys.readouterr().out
    assert "round 0: 1 of its 4 images are no longer in" in out and "skipped" in out  # the loader's own note too
    assert result["rounds"][0]["before"]["chair/captions"] == 3 and "diversity/distinct_1" in result["rounds"][0]["before"]
    (tmp_path / "images.jsonl").unlink()  # the whole set is gone
    assert score.main([*argv, "--metrics", "chair"]) == 2
    assert "--metrics diversity scores without them" in capsys.readouterr().err
    assert score.main([*argv, "--metrics", "diversity"]) == 0


def test_clip_scores_hold_a_chunk_of_decoded_images_not_the_round(scored_run, monkeypatch):
    """The scale review saw `--metrics clipscore` peak at 7.0 GB on 5,000 photos: every decoded image of a
    round was held at once. With one image a chunk (and a pixel cache of one), no more than two decoded
    images may be alive at a time; the scores are those of the whole round at once."""
    import gc
    import weakref

    from refine.images import records

    root, argv = scored_run
    assert score.main([*argv, "--metrics", "clipscore,pickscore"]) == 0
    whole = json.loads((root / "scores.json").read_text())["rounds"]
    alive: list[weakref.ref] = []
    most = 0
    real = records.decode

    def decode(data, name="<bytes>"):  # the real decoder, watched: how many of its images are still alive
        nonlocal most
        image = real(data, name)
        gc.collect()
        alive[:] = [ref for ref in alive if ref() is not None] + [weakref.ref(image)]
        most = max(most, len(alive))
        return image

    monkeypatch.setattr(records, "decode", decode)
    monkeypatch.setattr(records.PIXELS, "max_bytes", 1)
    monkeypatch.setattr(score, "IMAGES_AT_ONCE", 1)
    records.PIXELS.clear()
    assert score.main([*argv, "--metrics", "clipscore,pickscore"]) == 0
    chunked = json.loads((root / "scores.json").read_text())["rounds"]
    assert 0 < most <= 2, most
    for a, b in zip(whole, chunked, strict=True):
        for side in ("before", "after"):
            for key in ("clipscore", "pickscore"):
                assert b[side][key] == pytest.approx(a[side][key], rel=1e-5)
