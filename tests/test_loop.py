"""The loop end to end: tiny student, grounded critic, 2 rounds on 4 images; resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refine import loop, runs
from refine.infra.atomic import read_jsonl
from refine.infra.runlog import RunLog
from refine.stages.step import Refinement
from refine.stages.student import load_student

STAGES = ("captions", "critiques", "refined", "pairs", "update")


@pytest.fixture
def manifest(tmp_path, photos, drawn_images):
    """4 images with COCO annotations, one a drawn one, as a JSONL manifest."""
    rows = []
    for name, image, objects in [
        ("bus", photos["bus"], {"bus": 1, "person": 4}),
        ("zidane", photos["zidane"], {"person": 2, "tie": 1}),
        ("grace_hopper", photos["grace_hopper"], {"person": 1, "tie": 1}),
        ("drawn", drawn_images["both"], {"sports ball": 1}),
    ]:
        path = tmp_path / f"{name}.png"
        image.save(path)
        rows.append(json.dumps({"path": path.name, "objects": objects, "references": [f"a photo of {name}"]}))
    path = tmp_path / "images.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def _args(manifest, student_dir, runs_dir, *extra):
    return ["--images", str(manifest), "--rounds", "2", f"--student.model={student_dir}",
            f"--loop.runs_dir={runs_dir}", "--loop.run_id=e2e", "--student.n_samples=1",
            "--student.max_new_tokens=6", "--update.lr=3e-3", "--update.epochs=2", "--regions.model=yolov8n.yaml",
            "--regions.imgsz=64", *extra]


def test_two_rounds_end_to_end(manifest, tiny_student_dir, tmp_path, capsys):
    log = loop.run(_args(manifest, tiny_student_dir, tmp_path / "runs"))
    root = log.root
    assert json.loads((root / "config.json").read_text())["loop"]["rounds"] == 2
    for k in range(2):
        for stage in STAGES:
            assert log.has_stage(k, stage), (k, stage)
        captions = log.read_stage(k, "captions")
        assert sorted(r["image_id"] for r in captions) == ["bus", "drawn", "grace_hopper", "zidane"]
        critiques = log.read_stage(k, "critiques")
        assert all(r["critique"]["error"] is None for r in critiques)
        assert log.read_stage(k, "pairs"), "the grounded critic's revisions must yield pairs"
        metrics = json.loads((log.round_dir(k) / "metrics.json").read_text())
        assert metrics["pairs/total"] == len(log.read_stage(k, "pairs"))
        assert 0.0 <= metrics["train/chair_s"] <= 1.0
    events = [e["event"] for e in log.events()]
    assert events[0] == "run_start" and events[-1] == "run_done" and events.count("round_done") == 2

    # The checkpoint loads with plain from_pretrained, and the student's parameters moved.
    from transformers import VisionEncoderDecoderModel

    trained = VisionEncoderDecoderModel.from_pretrained(root / "student" / "last")
    start = load_student(tiny_student_dir).model
    unchanged = [n for (n, p0), p1 in zip(start.decoder.named_parameters(), trained.decoder.parameters())
                 if torch.equal(p0, p1)]
    # Two rounds of a few steps: a LayerNorm gain whose gradient is ~1e-12 may not move in fp32 (1 + 1e-15 == 1);
    # test_dpo checks that every decoder parameter moves under longer training.
    assert len(unchanged) <= 0.1 * len(list(start.decoder.parameters())), unchanged
    assert "transformer.wte.weight" not in unchanged
    assert (root / "student" / "best" / "config.json").exists()

    # refine.runs show renders every round's caption and critique for an image, from the run dir alone.
    capsys.readouterr()
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "show", "e2e", "--image", "bus"]) == 0
    out = capsys.readouterr().out
    assert "round 0" in out and "round 1" in out and "critic mean score" in out
    assert "missing:" in out and "refined →" in out
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "list"]) == 0
    assert "e2e" in capsys.readouterr().out
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "show", "nope"]) == 2

    # `show RUN` renders its first images' histories reading each stage file once for all of them (it read
    # every file of every round once per image: 4.6 s for 8 images of a 5,000-image run)
    from collections import Counter

    reads, read_stage = Counter(), RunLog.read_stage

    def counted(self, k, name, *args, **kwargs):
        reads[k, name] += 1
        return read_stage(self, k, name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunLog, "read_stage", counted)
        capsys.readouterr()
        assert runs.main(["--runs-dir", str(tmp_path / "runs"), "show", "e2e"]) == 0
    out = capsys.readouterr().out
    assert all(f"[bold]{i}" not in out and i in out for i in ("bus", "zidane", "grace_hopper", "drawn"))
    assert reads and max(reads.values()) <= 2, reads  # round 0's captions: once for the list, once for the trees


def test_existing_run_is_not_overwritten(manifest, tiny_student_dir, tmp_path):
    args = _args(manifest, tiny_student_dir, tmp_path / "runs", "--rounds=0")
    loop.run(args)
    with pytest.raises(FileExistsError, match="--resume"):
        loop.run(args)


def test_unknown_config_key_fails_loudly(manifest):
    with pytest.raises(ValueError, match="did you mean 'update.beta'"):
        loop.run(["--images", str(manifest), "--update.betta=0.3"])


def kill_when_exists(args: list[str], env: dict[str, str], target: Path, sig: int = signal.SIGKILL,
                     timeout: float = 240) -> subprocess.CompletedProcess:
    """Start ``python -m refine.loop ARGS``, send it ``sig`` as soon as ``target`` exists; returns how it ended."""
    proc = subprocess.Popen([sys.executable, "-m", "refine.loop", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not target.exists():
        proc.kill()
        raise AssertionError(f"the loop never wrote {target}: " + proc.stderr.read().decode()[-2000:])
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, None, stderr.decode())


def test_kill_mid_round_then_resume(manifest, tiny_student_dir, tmp_path):
    """SIGKILL the loop once round 1's captions are recorded; --resume finishes with no duplicates."""
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "REFINE_CACHE_DIR": str(tmp_path / "cache")}
    args = _args(manifest, tiny_student_dir, runs_dir)
    kill_when_exists(args, env, runs_dir / "e2e" / "rounds" / "001" / "captions.jsonl")
    log = RunLog(runs_dir / "e2e")
    assert [e["event"] for e in log.events()].count("round_done") == 1
    done_before = {(e["round"], e["stage"]) for e in log.events() if e["event"] == "stage_done"}

    assert subprocess.run([sys.executable, "-m", "refine.loop", "--resume", "e2e", f"--loop.runs_dir={runs_dir}"],
                          env=env, capture_output=True).returncode == 0
    events = log.events()
    kinds = [e["event"] for e in events]
    assert kinds.count("round_done") == 2 and kinds[-1] == "run_done" and "resume" in kinds
    stage_done = [(e["round"], e["stage"]) for e in events if e["event"] == "stage_done"]
    assert len(stage_done) == len(set(stage_done)), "a stage was recorded twice"
    assert done_before <= set(stage_done)
    for k in range(2):
        ids = [r["image_id"] for r in read_jsonl(log.stage_path(k, "captions"))]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 4
    # Round 1's captions were recorded before the kill and must be the ones critiqued after it.
    captions = {r["caption"] for r in read_jsonl(log.stage_path(1, "captions"))}
    assert {r["caption"] for r in read_jsonl(log.stage_path(1, "critiques"))} >= captions
    assert json.loads((log.student_dir("last") / "refine_state.json").read_text())["round"] == 1


def test_critic_call_budget_stops_cleanly_and_resumes(manifest, tiny_student_dir, tmp_path, monkeypatch):
    """The budget counts paid calls (critiques and textgrad steps that reached the API), each once over
    the whole run, resumes included: the events' sum (with the calls of rows recorded by a stage that
    stopped) is what the server received."""
    from test_trust import critique_reply

    from refine.offline.devserver import FakeOpenAIServer
    from refine.stages.critique import row_calls

    monkeypatch.setenv("REFINE_CACHE_DIR", str(tmp_path / "cache"))
    runs_dir = tmp_path / "runs"
    with FakeOpenAIServer(reply=critique_reply()) as server:
        openai = ["--critic.backend=openai", f"--critic.base_url={server.base_url}", "--critic.model=fake"]
        log = loop.run(_args(manifest, tiny_student_dir, runs_dir, "--loop.use_regions=false", "--max-critic-calls",
                             "3", *openai))
        events = log.events()
        assert events[-1]["event"] == "budget_stop" and log.critic_calls(row_calls) == 3 == server.request_count
        assert log.has_stage(0, "captions") and not log.has_stage(0, "critiques")
        assert len(list(log.partial_rows())) == 3  # the answers are recorded; a resume does not ask again
        assert runs.main(["--runs-dir", str(runs_dir), "list"]) == 0

        loop.run(["--resume", "e2e", f"--loop.runs_dir={runs_dir}", "--max-critic-calls", "100"])
        kinds = [e["event"] for e in log.events()]
        assert kinds.count("round_done") == 2 and kinds[-1] == "run_done"
        calls = sum(e.get("critic_calls", 0) for e in log.events())
        assert 3 < calls <= 100 and calls == server.request_count


def test_a_local_critic_spends_no_budget(manifest, tiny_student_dir, tmp_path):
    """The grounded critic costs nothing: a budget never stops it, so a resumed run always finishes."""
    log = loop.run(_args(manifest, tiny_student_dir, tmp_path / "runs", "--loop.use_regions=false",
                         "--max-critic-calls", "1"))
    assert log.status() == "done" and sum(e.get("critic_calls", 0) for e in log.events()) == 0


def test_a_run_written_before_the_package_layout_resumes(tmp_path, tiny_student_dir, bus_path, zidane_path):
    """tests/data/run_before_packages: a run by the code before refine/ was split into packages (and
    before the refinement records had source/rejected/error), SIGKILLed in round 1 after its pairs.
    The student checkpoints are left out of the fixture (no weights in git): the tiny student stands in
    for round 0's. Everything recorded loads; only round 1's update runs."""
    import shutil

    from PIL import Image

    fixture = Path(__file__).parent / "data" / "run_before_packages"
    for name, path in (("bus", bus_path), ("zidane", zidane_path)):
        Image.open(path).convert("RGB").resize((64, 48)).save(tmp_path / f"{name}.png")
    (tmp_path / "images.jsonl").write_text(
        '{"path": "bus.png", "objects": {"bus": 1, "person": 4}, "references": ["a photo of bus"]}\n'
        '{"path": "zidane.png", "objects": {"person": 2, "tie": 1}, "references": ["a photo of zidane"]}\n')
    root = tmp_path / "runs" / "old"
    shutil.copytree(fixture, root)
    shutil.copytree(tiny_student_dir, root / "student" / "last")
    (root / "student" / "last" / "refine_state.json").write_text('{"round": 0}')
    config = json.loads((root / "config.json").read_text())
    config["loop"].update(images=str(tmp_path / "images.jsonl"), runs_dir=str(tmp_path / "runs"))
    config["student"]["model"] = str(tiny_student_dir)
    (root / "config.json").write_text(json.dumps(config))
    recorded = {p.relative_to(root): p.read_bytes() for p in (root / "rounds").rglob("*.jsonl")}

    log = loop.run(["--resume", "old", f"--loop.runs_dir={tmp_path / 'runs'}"])
    assert log.status() == "done" and log.completed_rounds() == 2
    assert all((root / p).read_bytes() == data for p, data in recorded.items()), "a recorded stage was rewritten"
    new_stages = [(e["round"], e["stage"]) for e in log.events() if e["event"] == "stage_done"][len(
        [e for e in read_jsonl(fixture / "events.jsonl") if e["event"] == "stage_done"]):]
    assert new_stages == [(1, "update")]
    refined = log.read_stage(1, "refined", Refinement)
    assert refined and all(r.source == "" and r.rejected is None for r in refined)  # old rows: new fields empty
    assert json.loads((log.round_dir(1) / "metrics.json").read_text())["pairs/total"] == len(log.read_stage(1, "pairs"))


def test_a_finished_run_goes_on_for_more_rounds_as_if_it_had_run_them(manifest, tiny_student_dir, tmp_path, capsys):
    """``--resume RUN --rounds N`` continues a finished run from its last student: its rounds and held-out
    captions equal those of a run made with N rounds; fewer rounds than it completed are refused, and an
    extension cut short is not reported done."""
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "REFINE_CACHE_DIR": str(tmp_path / "cache")}
    held_out = f"--loop.eval_images={manifest}"
    loop.run(_args(manifest, tiny_student_dir, runs_dir, "--rounds=1", held_out))
    assert loop.main(["--resume", "e2e", f"--loop.runs_dir={runs_dir}", "--rounds=2"]) == 0
    whole = loop.run(_args(manifest, tiny_student_dir, runs_dir, held_out, "--loop.run_id=whole"))
    log = RunLog(runs_dir / "e2e")
    assert log.status() == "done" and log.completed_rounds() == 2 and log.config["loop"]["rounds"] == 2
    assert [e["changes"] for e in log.events() if e["event"] == "resume"] == [{"loop.rounds": [1, 2]}]
    for k in range(2):
        for stage in ("eval", "captions", "pairs"):
            assert log.read_stage(k, stage) == whole.read_stage(k, stage), (k, stage)
    final = [r["caption"] for r in log.read_stage(2, "eval")]
    assert final == [r["caption"] for r in whole.read_stage(2, "eval")]
    for a, b in zip(load_student(log.student_dir("last")).model.parameters(),
                    load_student(whole.student_dir("last")).model.parameters(), strict=True):
        assert torch.equal(a, b)

    capsys.readouterr()
    events = len(log.events())
    assert loop.main(["--resume", "e2e", f"--loop.runs_dir={runs_dir}", "--rounds=1"]) == 2
    assert "loop.rounds 1 is fewer than the 2 round(s) the run has completed" in capsys.readouterr().err
    assert len(log.events()) == events and log.config["loop"]["rounds"] == 2

    # An extension killed in its first new round is not done, and a resume finishes it.
    kill_when_exists(["--resume", "e2e", f"--loop.runs_dir={runs_dir}", "--rounds=3"], env,
                     runs_dir / "e2e" / "rounds" / "002" / "captions.jsonl")
    assert log.status() == "incomplete (resumable)" and not log.is_done()
    assert subprocess.run([sys.executable, "-m", "refine.loop", "--resume", "e2e", f"--loop.runs_dir={runs_dir}"],
                          env=env, capture_output=True).returncode == 0
    assert log.status() == "done" and log.completed_rounds() == 3 and log.has_stage(3, "eval")

    # An extension killed in its first new round and then cut back: its rows of that round stay on disk
    # (their critiques are paid for, and cached), but they are not the run's: the views leave them out.
    kill_when_exists(["--resume", "e2e", f"--loop.runs_dir={runs_dir}", "--rounds=4"], env,
                     runs_dir / "e2e" / "rounds" / "003" / "captions.jsonl")
    assert loop.main(["--resume", "e2e", f"--loop.runs_dir={runs_dir}", "--rounds=3"]) == 0
    assert log.status() == "done" and log.has_stage(3, "captions") and log.rounds_with("captions") == [0, 1, 2]
    assert log.rounds_with("eval") == [0, 1, 2, 3]
    capsys.readouterr()
    assert runs.main(["--runs-dir", str(runs_dir), "show", "e2e", "--image", "bus"]) == 0
    out = capsys.readouterr().out
    assert "round 2: " in out and "round 3: " not in out


def test_eval_every_evaluates_the_rounds_due_and_always_the_final_student(manifest, tiny_student_dir, tmp_path,
                                                                          drawn_images, capsys):
    """``loop.eval_every=2`` over 3 rounds: the students entering rounds 0 and 2, and the final one, whose
    held-out metrics the run prints, records with ``run_done`` and ``refine.runs show`` lists."""
    held_out = tmp_path / "held-out" / "images.jsonl"
    held_out.parent.mkdir()
    drawn_images["red-circle"].save(held_out.parent / "circle.png")
    held_out.write_text('{"path": "circle.png", "id": "held-circle", "objects": {"sports ball": 1}}\n'
                        + json.dumps({"path": str(manifest.parent / "bus.png"), "id": "held-bus"}) + "\n")
    log = loop.run(_args(manifest, tiny_student_dir, tmp_path / "runs", "--rounds=3", "--loop.eval_every=2",
                         f"--loop.eval_images={held_out}"))
    assert "held-out, the final student: CHAIR_s" in capsys.readouterr().err
    assert [k for k in range(4) if log.has_stage(k, "eval")] == [0, 2, 3]
    assert ["eval/chair_s" in json.loads((log.round_dir(k) / "metrics.json").read_text()) for k in range(3)] == [
        True, False, True]
    final = loop.run(_args(manifest, tiny_student_dir, tmp_path / "runs", "--rounds=0", "--loop.eval_every=0",
                           f"--loop.eval_images={held_out}", "--loop.run_id=none",
                           f"--student.model={log.student_dir('last')}"))
    assert final.read_stage(0, "eval") == log.read_stage(3, "eval")  # the final student's, as a fresh run sees it
    def held_out(run):
        return {k: v for k, v in run.final_eval().items() if k.startswith("eval/")}

    assert held_out(log) == held_out(final) and "eval/recall" in held_out(log)
    assert (log.final_eval()["round"], final.final_eval()["round"]) == (3, 0)
    capsys.readouterr()
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "show", "e2e"]) == 0
    assert "round 3 (final)" in capsys.readouterr().out
    # A held-out image: its caption by each evaluated student, the final one last.
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "show", "e2e", "--image", "held-circle"]) == 0
    out = capsys.readouterr().out
    captions = [r["caption"] for k in (0, 2, 3) for r in log.read_stage(k, "eval") if r["image_id"] == "held-circle"]
    assert "held-out" in out and "annotated: sports ball" in out and len(captions) == 3
    assert out.index("round 0") < out.index("round 2") < out.index("the final student")
    assert all(c in out for c in captions)
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "show", "e2e", "--image", "nowhere"]) == 2
    assert "neither trained on nor held out" in capsys.readouterr().err

    # student/best: ranked by held-out exact match, among the evaluated students, the final one included
    rounds = log.metrics()
    exact = {-1: rounds[0]["eval/exact"], 1: rounds[2]["eval/exact"], 2: held_out(log)["eval/exact"]}
    best = log.student_state("best")
    assert best["by"] == "eval/exact" and best["eval/exact"] == max(exact.values())
    assert best["round"] == min(r for r, v in exact.items() if v == best["eval/exact"])

    # Taken on for a fourth round: round 3's evaluation (not due by eval_every) is the one recorded as
    # the final student's, read back once, not made again.
    assert loop.main(["--resume", "e2e", f"--loop.runs_dir={tmp_path / 'runs'}", "--rounds=4"]) == 0
    assert "3 of 4 round(s) done; loop.rounds 3 → 4" in capsys.readouterr().err
    assert [k for k in range(5) if log.has_stage(k, "eval")] == [0, 2, 3, 4]
    assert "eval/chair_s" in json.loads((log.round_dir(3) / "metrics.json").read_text())
    evals = [e["round"] for e in log.events() if e["event"] == "stage_done" and e["stage"] == "eval"]
    assert evals == [0, 2, 3, 4]


def test_the_run_tables_print_a_small_value_as_itself_not_as_zero():
    """A reward margin of 1e-5 after a round is a fact about the update; "0.000" hid it."""
    assert [runs.fmt(v) for v in (1e-5, -2.5e-4, 0.0, 0.1234, -0.5, 12345.6, None, 3)] == [
        "1e-05", "-0.00025", "0.000", "0.123", "-0.500", "12,346", "–", "3"]


def test_show_finds_an_image_that_only_a_later_round_took(manifest, tiny_student_dir, tmp_path, capsys):
    """With ``loop.images_per_round``, round 0 holds some images and round 1 others; ``show --image``
    looks in every round, not only round 0."""
    log = loop.run(_args(manifest, tiny_student_dir, tmp_path / "runs", "--loop.images_per_round=2",
                         "--student.n_samples=0", "--update.epochs=1"))
    first = {r["image_id"] for r in log.read_stage(0, "captions")}
    later = next(r["image_id"] for r in log.read_stage(1, "captions") if r["image_id"] not in first)
    capsys.readouterr()
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "show", "e2e", "--image", later]) == 0
    out = capsys.readouterr().out
    assert "round 1: " in out and "round 0: " not in out


def test_best_is_the_student_with_the_highest_score_by_one_measure(tiny_student_dir, tmp_path):
    """``RunLog.keep_best``: a higher score replaces the best, a lower or NaN one does not, and a score by
    another measure replaces one it cannot be compared with."""
    log = RunLog.create(tmp_path / "runs", "best", {})
    student = load_student(tiny_student_dir)

    def offer(k, by, score):
        log.keep_best(k, student, by, score)
        state = log.student_state("best")
        return state and (state["round"], state["by"], state[state["by"]])

    assert offer(0, "critic/mean_score", float("nan")) is None  # every critique failed: no score
    assert offer(1, "critic/mean_score", 0.5) == (0, "critic/mean_score", 0.5)
    assert offer(2, "critic/mean_score", 0.4) == (0, "critic/mean_score", 0.5)
    assert offer(3, "critic/mean_score", 0.6) == (2, "critic/mean_score", 0.6)
    assert offer(4, "eval/exact", 0.1) == (3, "eval/exact", 0.1)
    assert offer(5, "eval/exact", float("nan")) == (3, "eval/exact", 0.1)
    assert (log.student_dir("best") / "config.json").exists()


def test_best_by_held_out_exact_match_includes_the_final_student(tmp_path, tiny_student_dir, drawn_images):
    """``Parts.keep_best`` with annotated held-out images ranks the evaluated students by exact match, the
    final one (offered after the last round) included; critic scores then play no part. A run whose best
    predates the rule (its state has no ``by``) counts the exact matches its rounds recorded."""
    from refine.config import Config
    from refine.images import load_images

    drawn_images["red-circle"].save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "id": "a", "objects": {"sports ball": 1}}\n')
    images = load_images(str(tmp_path / "m.jsonl"))
    parts = loop.Parts(images, images, None, None, None, None, Config())
    student = load_student(tiny_student_dir)
    log = RunLog.create(tmp_path / "runs", "r", {"loop": {"rounds": 2}})

    def offer(k, caption, critiques=()):
        evaluation = [{"image_id": "a", "caption": caption, "objects": {"sports ball": 1}}] if caption else []
        parts.keep_best(log, k, student, list(critiques), evaluation)
        state = log.student_state("best")
        return state and (state["round"], state.get("by"))

    assert offer(0, "a dog") == (-1, "eval/exact")
    assert offer(1, "") == (-1, "eval/exact")  # not evaluated: no offer, whatever the critic said
    assert offer(2, "a sports ball") == (1, "eval/exact")  # the final student, exact: best
    assert offer(3, "a dog") == (1, "eval/exact")

    log = RunLog.create(tmp_path / "runs", "old", {"loop": {"rounds": 3}})
    log.save_student(student, "best", {"round": -1, "critic/mean_score": 0.9})  # saved before the rule
    for k in (0, 1):
        log.finish_round(k, {"round": k, "eval/exact": 0.0})
    assert offer(2, "a dog") == (-1, None)  # no better than the rounds recorded before it: kept as it was
    assert offer(3, "a sports ball") == (2, "eval/exact")


def test_round_notes_say_why_a_round_made_no_pairs():
    base = {"round": 2, "pairs/total": 0, "critic/critiques": 8, "critic/failures": 0, "step/changed": 0}
    why = [runs.round_notes({**base, **extra})[-1] for extra in (
        {"critic/failures": 8}, {"step/rejected": 5}, {}, {"step/changed": 4, "pairs/unverified": 4},
        {"step/changed": 4})]
    assert [w.split("(", 1)[1].split(")")[0] for w in why] == [
        "all 8 critiques failed", "every step reply was rejected", "no critique led to a different caption",
        "verification confirmed none of the 4 refinements", "no refinement made a pair"]
    assert runs.round_notes({**base, "pairs/total": 3}) == []
