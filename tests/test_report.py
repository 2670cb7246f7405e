"""The HTML report (python -m refine.report) and the experiment trackers (--loop.log_with)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from test_loop import _args, manifest  # noqa: F401  (fixture)

from refine import loop, report


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_student_dir, bus_path, zidane_path):
    """A 2-round run on 4 annotated images with the regions stage (a random YOLO), TensorBoard logging."""
    tmp = tmp_path_factory.mktemp("report")
    rows = []
    from conftest import draw_scene
    from PIL import Image

    for name, image, objects in [("bus", Image.open(bus_path), {"bus": 1, "person": 4}),
                                 ("zidane", Image.open(zidane_path), {"person": 2, "tie": 1}),
                                 ("drawn", draw_scene([("circle", "red", (10, 10, 40, 40))]), {"sports ball": 1})]:
        image.convert("RGB").save(tmp / f"{name}.png")
        rows.append(json.dumps({"path": f"{name}.png", "objects": objects}))
    (tmp / "images.jsonl").write_text("\n".join(rows) + "\n")
    return loop.run(_args(tmp / "images.jsonl", tiny_student_dir, tmp / "runs", "--loop.log_with=tensorboard"))


def page_data(page: str) -> list:
    """The cards embedded in a report page, parsed as strictly as the browser's JSON.parse does."""
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON: JSON.parse would throw and the page show no card")

    return json.loads(blob.replace("<\\/", "</"), parse_constant=refuse)


def test_a_failed_critique_leaves_the_page_readable(tmp_path, tiny_student_dir, drawn_images):
    """One image with no annotations (the grounded critic, no detector, cannot judge it): its critique fails
    and its score is NaN in the run's files; the page's data must still parse, that card flagged failed."""
    drawn_images["red-circle"].save(tmp_path / "a.png")
    drawn_images["blue-square"].save(tmp_path / "b.png")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "objects": {"sports ball": 1}}\n{"path": "b.png"}\n')
    log = loop.run(_args(tmp_path / "m.jsonl", tiny_student_dir, tmp_path / "runs", "--rounds=1",
                         "--loop.use_regions=false", "--loop.max_failure_share=1"))
    assert any(r["critique"]["score"] != r["critique"]["score"] for r in log.read_stage(0, "critiques"))  # NaN
    assert report.main([str(log.root)]) == 0
    cards = {c["id"]: c for c in page_data((log.root / "report.html").read_text())}
    assert cards["b"]["failed"] and cards["b"]["rounds"][0]["score"] is None and not cards["a"]["failed"]


def test_the_report_is_one_self_contained_page_with_every_image(finished_run, capsys):
    assert report.main(["--runs-dir", str(finished_run.root.parent), finished_run.root.name]) == 0
    page = (finished_run.root / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched
    data = page_data(page)
    assert sorted(c["id"] for c in data) == ["bus", "drawn", "zidane"]
    for card in data:
        assert [r["round"] for r in card["rounds"]] == [0, 1]
        assert card["thumb"].startswith("data:image/jpeg;base64,")
        assert all(r["score"] is not None for r in card["rounds"])
    assert sum(len(r["pairs"]) for c in data for r in c["rounds"]) == sum(
        len(finished_run.read_stage(k, "pairs")) for k in range(2))
    assert page.count("<svg") >= 4 and "critic mean score" in page and "seconds per stage" in page
    assert '&quot;loop&quot;' in page and "caption changed" in page and "hallucinations rose" in page


def test_an_image_that_no_longer_decodes_loses_only_its_thumbnail(finished_run, tmp_path, capsys):
    """Bit rot after the run (same size and time, so the image index still trusts the file): that card has
    no thumbnail, the page is still written. An --out that cannot be written is one line, exit 2."""
    import os

    from refine.images.records import PIXELS

    bus = finished_run.root.parents[1] / "bus.png"
    data, stat = bus.read_bytes(), bus.stat()
    try:
        bus.write_bytes(b"\0" * len(data))
        os.utime(bus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        PIXELS.clear()  # as in a new process: this one decoded the images during the run
        out = tmp_path / "page.html"
        assert report.main(["--runs-dir", str(finished_run.root.parent), finished_run.root.name, "--out", str(out)]) == 0
    finally:
        bus.write_bytes(data)
        os.utime(bus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', out.read_text(), re.S)
                      .group(1).replace("<\\/", "</"))
    assert {c["id"]: bool(c["thumb"]) for c in data} == {"bus": False, "drawn": True, "zidane": True}

    capsys.readouterr()
    assert report.main(["--runs-dir", str(finished_run.root.parent), finished_run.root.name,
                        "--out", str(out / "page.html")]) == 2  # out is a file, not a folder
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the report to") and err.count("\n") == 1
    missing = tmp_path / "no such folder" / "page.html"  # it was made, and the report written there
    assert report.main(["--runs-dir", str(finished_run.root.parent), finished_run.root.name, "--out", str(missing)]) == 2
    assert "no such folder does not exist" in capsys.readouterr().err and not missing.parent.exists()
    # "student caption changed" is the student's caption across rounds, not the step's refinement: the tiny
    # student says the same in both rounds, and the step rewrote its caption
    same = [c for c in data if c["rounds"][0]["caption"] == c["rounds"][1]["caption"]]
    assert same and any(r["refined"] not in (None, r["caption"]) for c in same for r in c["rounds"])
    assert not any(c["changed"] for c in same)


def test_the_report_shows_detections_from_the_recorded_regions_stage(finished_run):
    regions = finished_run.read_stage(0, "regions")
    assert sorted(r["image_id"] for r in regions) == ["bus", "drawn", "zidane"]
    cards = {c["id"]: c for c in report.cards(finished_run, {})}
    for row in regions:
        assert len(cards[row["image_id"]]["detections"]) == len(row["detections"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_report_renders_in_a_real_browser(finished_run, tmp_path):
    """Headless Chromium runs the page's script: the cards are drawn into the DOM, and the filters work."""
    page = finished_run.root / "report.html"
    report.main(["--runs-dir", str(finished_run.root.parent), finished_run.root.name])
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count('<div class="card"><img') == 3 and "page 1 of 1 (3 images)" in dom


def test_trackers_log_rounds_and_steps_under_trl_names(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((finished_run.root / "trackers").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"round/critic/mean_score", "round/pairs/total", "train/loss", "train/rewards/margins",
            "train/logps/chosen"} <= scalars
    assert [e.step for e in events.Scalars("round/pairs/total")] == [0, 1]
    recorded = sum(len(finished_run.read_stage(k, "update")) for k in range(2))
    assert [e.step for e in events.Scalars("train/loss")] == list(range(recorded))
    assert events.Scalars("train/loss")[0].value == pytest.approx(finished_run.read_stage(0, "update")[0]["loss"], rel=1e-5)


def test_an_unknown_or_missing_tracker_is_refused_before_the_run(tmp_path, tiny_student_dir, capsys):
    code = loop.main(["--images", "shapes:2", f"--student.model={tiny_student_dir}", f"--loop.runs_dir={tmp_path}",
                      "--loop.log_with=tensorboard,neptune"])
    assert code == 2 and "unknown tracker 'neptune'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_final_students_point_is_labelled_final_as_in_runs_show():
    """The held-out row of the final student (after the last round's update) was plotted as one more round."""
    metrics = [{"round": 0, "eval/chair_s": 0.10}, {"round": 2, "eval/chair_s": 0.06},
               {"round": 3, "eval/chair_s": 0.04, "final": True}]
    (chart,) = [svg for svg in report.plots(metrics) if "eval/chair_s" in svg]
    assert "eval/chair_s round 3 (final): 0.04<" in chart and ">3 (final)</text>" in chart
    assert "round 2 (final)" not in chart and "eval/chair_s round 2: 0.06<" in chart


def test_a_page_holds_at_most_max_images_cards_the_flagged_first_and_counts_every_image(tmp_path, tiny_student_dir,
                                                                                         drawn_images, capsys):
    """A run of thousands of images made one page of every card (89 MB at 5,000 images, too big for a browser
    at 16,000): the page holds --max-images cards, those the filters flag first (here the one image whose
    critique failed: it has no annotations), and its summary still counts every image of the run."""
    names = ["a", "b", "c", "d"]
    for name, image in zip(names, drawn_images.values()):
        image.save(tmp_path / f"{name}.png")
    (tmp_path / "m.jsonl").write_text("".join(
        json.dumps({"path": f"{n}.png", **({} if n == "c" else {"objects": {"sports ball": 1}})}) + "\n" for n in names))
    log = loop.run(_args(tmp_path / "m.jsonl", tiny_student_dir, tmp_path / "runs", "--rounds=1",
                         "--loop.use_regions=false", "--loop.max_failure_share=1"))
    assert report.main([str(log.root), "--out", str(tmp_path / "all.html"), "--max-images", "0"]) == 0
    every = {c["id"]: c for c in page_data((tmp_path / "all.html").read_text())}
    assert sorted(every) == names and [i for i, c in every.items() if c["failed"]] == ["c"]

    for keep in (1, 3):
        assert report.main([str(log.root), "--out", str(tmp_path / "page.html"), "--max-images", str(keep)]) == 0
        page = (tmp_path / "page.html").read_text()
        shown = page_data(page)
        assert len(shown) == keep and "c" in {c["id"] for c in shown}
        assert all(c == every[c["id"]] for c in shown), "a card shown is the whole card"
        assert "4 images, 1 round(s)" in page and "1 with a failed critique" in page
        assert f"This page shows {keep} of them" in page

    capsys.readouterr()
    assert report.main([str(log.root), "--max-images", "-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
