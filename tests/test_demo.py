"""The demo's claim in miniature, through the real loop: a few rounds cut hallucination on the trained
scenes while recall holds, and the swapped-pair control does not.

The student is a small toy recipe trained here in ~15 s, not the demo's ~3-minute one: scenes of 1-2
objects, and it sees less well (19% of its captions on these scenes hallucinate, the planted blue square
among them), which gives the loop plenty to fix. The update is stronger than the demo's (lr 1e-3, 10
epochs) so that two rounds on 32 scenes show the direction. CPU, so the check is the same everywhere.
"""

import json
from pathlib import Path

import pytest
import torch

from refine import loop
from refine.demo import DEMO_OVERRIDES, summary
from refine.demo import toy_student as toy
from refine.images import shapes

OBJECTS = (1, 2)
FAST = toy.ToyRecipe(train_scenes=3000, objects=OBJECTS, steps=600, batch_size=32, warmup_steps=30, lr=4e-3,
                     width=64, heads=2, mlp_width=128, encoder_layers=1, decoder_layers=2)
TEST_OVERRIDES = ["--update.lr=1e-3", "--update.epochs=10", "--student.device=cpu",
                  "--loop.use_regions=false"]  # no detector exists for shapes


@pytest.fixture(scope="module")
def biased_student(tmp_path_factory, gpt2_tokenizer_dir):
    out = tmp_path_factory.mktemp("fast-toy") / "student"
    toy.train(FAST, out, tokenizer_dir=gpt2_tokenizer_dir, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """32 training scenes of 1-2 objects as a JSONL manifest (image files, annotations, references)."""
    folder = tmp_path_factory.mktemp("scenes")
    lines = []
    for scene in shapes.make_scenes(32, "train", seed=0, objects=OBJECTS):
        scene.image.save(folder / f"{scene.id}.png")
        lines.append(json.dumps({"path": f"{scene.id}.png", "objects": scene.objects, "references": [scene.caption]}))
    (folder / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "scenes.jsonl"


def run_loop(student_dir, scenes, runs_dir, swap: bool) -> tuple[dict, dict]:
    """Before/after object metrics on the trained scenes themselves (the eval set is the training set)."""
    log = loop.run([
        "--images", str(scenes), f"--student.model={student_dir}", "--rounds=2", f"--loop.eval_images={scenes}",
        f"--loop.swap_pairs={swap}", f"--loop.runs_dir={runs_dir}", f"--loop.run_id={'swapped' if swap else 'refine'}",
        *DEMO_OVERRIDES, *TEST_OVERRIDES,
    ])
    result = summary(log)
    return result["before"], result["after"]


def direction_holds(before: dict, after: dict) -> bool:
    """Hallucination (CHAIR_s) at most half of what it was, object recall no lower."""
    return after["chair_s"] <= 0.5 * before["chair_s"] and after["recall"] >= before["recall"]


def test_loop_cuts_hallucination_and_swapped_pairs_do_not(biased_student, scenes, tmp_path):
    before, after = run_loop(biased_student, scenes, tmp_path, swap=False)
    assert before["chair_s"] >= 0.1, before  # something to fix
    assert direction_holds(before, after), (before, after)

    swapped_before, swapped_after = run_loop(biased_student, scenes, tmp_path, swap=True)
    assert swapped_before == before  # the same student on the same scenes (the demo's control relies on it)
    assert not direction_holds(swapped_before, swapped_after), (swapped_before, swapped_after)
    assert swapped_after["chair_s"] >= swapped_before["chair_s"], swapped_after  # it does not cut hallucination


def test_the_probe_reads_each_substituted_object_from_the_encoder(biased_student, tmp_path):
    """``refine.demo.probe`` on captions that name one present object as another of its colour (mistakes
    the encoder did not make): it finds each substitution, and its probe reads the true object there."""
    from refine.demo.probe import main, probe_substitutions
    from refine.stages.student import load_student

    scenes = shapes.make_scenes(120, "heldout", seed=0, objects=OBJECTS)
    captions = {}
    for scene in scenes:
        label = next(iter(scene.objects))
        colour, shape = label.split()
        other = f"{colour} {next(s for s in shapes.SHAPES if s != shape)}"
        if other not in scene.objects:
            captions[scene.id] = shapes.describe({other if k == label else k: n for k, n in scene.objects.items()})
    model = load_student(biased_student, device="cpu", precision="fp32").model.eval()
    result = probe_substitutions(model, captions, scenes, shapes.make_scenes(600, "train", seed=0, objects=OBJECTS))
    assert len(result["substitutions"]) == len(captions) >= 90
    assert result["probe_errors"] <= 0.1 * result["cells"], result["probe_errors"]
    assert result["probe_reads_the_truth"] >= 0.85 * len(captions) and result["probe_reads_the_caption"] <= 0.1 * len(captions)
    assert main([str(tmp_path)]) == 2  # not a run: one line, exit 2
    (tmp_path / "run" / "rounds" / "000").mkdir(parents=True)  # a run stopped before its student was saved
    (tmp_path / "run" / "rounds" / "000" / "eval.jsonl").write_text("")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"loop": {"eval_images": "shapes-val:8", "seed": 0},
                                                              "student": {"model": str(biased_student)}}))
    assert main([str(tmp_path / "run")]) == 2


def test_the_headline_gives_the_table_in_one_line():
    from refine.demo.driver import headline

    before = {"chair_s": 0.1, "recall": 0.97, "substitutions": 4, "additions": 40}
    results = {"refine": {"before": before, "after": {"chair_s": 0.02, "recall": 0.965, "substitutions": 2,
                                                      "additions": 9}, "chair_s_change": -0.8},
               "swapped control": {"before": before, "after": {}, "chair_s_change": 0.45}}
    assert headline(results) == ("Headline: CHAIR_s 0.100 → 0.020 (-80%), recall -0.5 points, substitutions 4 → 2, "
                                 "additions 40 → 9; the swapped control: CHAIR_s +45%")


def test_the_demo_names_the_machine_its_toy_student_was_trained_on():
    from refine.demo.driver import machine_line
    from refine.infra.devices import cpu_name, numerics

    line = machine_line("abc", numerics())
    assert line.startswith(f"Toy student abc trained on {cpu_name()}, torch {torch.__version__} with "
                           f"{torch.backends.cpu.get_cpu_capability()} kernels.")
    assert "model" in cpu_name() or not Path("/proc/cpuinfo").exists()  # the generation, not only the brand
    assert machine_line("abc", None).startswith("Toy student abc trained on an unrecorded machine.")


def test_the_demo_resumes_a_run_made_before_a_setting_existed_or_with_fewer_rounds_and_refuses_other_settings(tmp_path):
    """A run whose config.json predates a setting (no loop.verify_by) is resumed, as ``--resume`` would
    read it (the default), and taken on with more rounds; one made with another value of a setting, or
    that completed more rounds than asked, is refused with the key named."""
    import argparse

    from refine.cli import load_config
    from refine.demo.driver import loop_args
    from refine.loop import absolute_paths

    args = argparse.Namespace(runs_dir=str(tmp_path), train=300, rounds=5, eval_set="heldout", heldout=480, seed=0,
                              noise=0.25, defences=[], set=[])
    fresh = loop_args(args, tmp_path / "student", "run", swap=False)
    assert "--resume" not in fresh and "--loop.eval_every=1" in fresh
    # the control evaluates its final student only (its opening evaluation is the real run's)
    assert "--loop.eval_every=0" in loop_args(args, tmp_path / "student", "control", swap=True)
    config = load_config(fresh)[0]
    absolute_paths(config)
    stored = json.loads(json.dumps(config.to_json()))
    del stored["loop"]["verify_by"]  # an older run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(stored))
    assert loop_args(args, tmp_path / "student", "run", swap=False)[:2] == ["--resume", "run"]
    # more rounds go on from the run's last round; fewer than it completed are refused
    args.rounds = 6
    assert loop_args(args, tmp_path / "student", "run", swap=False)[2:] == [f"--loop.runs_dir={tmp_path}", "--loop.rounds=6"]
    (tmp_path / "run" / "events.jsonl").write_text("".join(
        json.dumps({"time": 0, "event": "round_done", "round": k}) + "\n" for k in range(5)))
    args.rounds = 4
    with pytest.raises(ValueError, match="has completed 5 rounds, more than --rounds 4"):
        loop_args(args, tmp_path / "student", "run", swap=False)
    args.rounds = 5
    stored["update"]["beta"] = 0.5
    (tmp_path / "run" / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"update\.beta: 0\.5 \(wanted 0\.2\)"):
        loop_args(args, tmp_path / "student", "run", swap=False)


def test_the_demo_in_sft_mode_leaves_out_dpo_settings(tmp_path):
    """``--set update.mode=sft`` was refused over the demo's own --update.beta (a no-op in SFT mode)."""
    import argparse

    from refine.cli import load_config
    from refine.demo.driver import loop_args

    args = argparse.Namespace(runs_dir=str(tmp_path), train=300, rounds=5, eval_set="val", heldout=480, seed=0,
                              noise=0.0, defences=[], set=["update.mode=sft"])
    config = load_config(loop_args(args, tmp_path / "student", "run", swap=False))[0]
    assert config.update.mode == "sft" and config.update.lr == 1e-4  # the demo's other settings stay


def test_a_demo_refused_for_other_settings_leaves_nothing_behind(tmp_path):
    """``python -m refine.demo --control`` over a run made with other settings is refused before the toy
    student is trained or the control is started: no control run, no log, no student."""
    from refine.cli import load_config
    from refine.demo import driver
    from refine.demo.toy_student import ToyRecipe, toy_student_dir
    from refine.loop import absolute_paths

    args = driver.argparse.Namespace(runs_dir=str(tmp_path), train=300, rounds=5, eval_set="heldout", heldout=480,
                                     seed=7, noise=0.0, defences=[], set=[])
    config = load_config(driver.loop_args(args, toy_student_dir(ToyRecipe(seed=7)), "demo-shapes-seed7", False))[0]
    absolute_paths(config)
    config.update.beta = 0.5
    (tmp_path / "demo-shapes-seed7").mkdir()
    (tmp_path / "demo-shapes-seed7" / "config.json").write_text(json.dumps(config.to_json()))
    with pytest.raises(ValueError, match=r"update\.beta: 0\.5"):
        driver.main(["--seed", "7", "--control", "--runs-dir", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-shapes-seed7"]
    assert not toy_student_dir(ToyRecipe(seed=7)).exists()


def test_the_control_takes_its_opening_evaluation_from_the_real_run(tmp_path):
    """A run that evaluated only its final student (the demo's control, ``loop.eval_every=0``) is
    summarised against the opening evaluation it is given; without one it is refused."""
    from refine.demo.driver import eval_rows, summary
    from refine.infra.atomic import write_jsonl
    from refine.infra.runlog import RunLog

    def row(caption):
        return {"image_id": "s0", "caption": caption, "objects": {"red circle": 1}}

    real = RunLog.create(tmp_path, "real", {"loop": {"eval_images": "shapes-heldout:1"}})
    control = RunLog.create(tmp_path, "control", {"loop": {"eval_images": "shapes-heldout:1"}})
    for k, caption in ((0, "a red circle and a blue square"), (2, "a red circle")):
        write_jsonl(real.stage_path(k, "eval"), [row(caption)])
    write_jsonl(control.stage_path(2, "eval"), [row("a red circle and a blue square and a blue circle")])
    result = summary(control, start=eval_rows(real)[0])
    assert result["before"] == summary(real)["before"] and result["before"]["chair_s"] == 1.0
    assert result["per_round"][1] is None and result["after"]["hallucinated_mentions"] == 2
    with pytest.raises(ValueError, match="starting student was not evaluated"):
        summary(control)


def test_the_control_process_waits_for_the_toy_student_then_runs_the_loop(tmp_path):
    """The control starts before the toy student exists and runs ``refine.loop`` once it does; it gives
    up if the demo that started it is gone."""
    import os
    import threading
    import time

    from refine.demo.driver import control_when_ready

    student, codes, seen = tmp_path / "student", [], []

    def train_the_student():
        time.sleep(2)
        seen.append(list(codes))  # still waiting?
        student.mkdir()
        (student / "train_log.json").write_text("{}")

    trainer = threading.Thread(target=train_the_student)
    trainer.start()
    codes.append(control_when_ready(os.getppid(), str(student), []))  # the main thread: the loop sets signals
    trainer.join()
    assert seen == [[]] and codes == [2]  # it waited, then refine.loop ran (no arguments: "--images is required")
    assert control_when_ready(os.getppid() + 1_000_000, str(tmp_path / "never"), []) == 1  # the demo is gone


def _wait_until(condition, seconds, what):
    import time

    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, what()
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "kill-9"])
def test_a_stopped_demo_says_how_to_continue_and_that_command_finishes_both_runs(biased_student, tmp_path, how):
    """SIGTERM (``docker stop``: to the demo only) or Ctrl-C (a terminal's SIGINT to its whole process group)
    mid-run: both runs stop recorded, exit 130 with one line giving the demo's own command, which resumes
    them to the end. It printed a traceback ending in the loop's ``--resume``, which does not print the
    demo's table, and SIGTERM left the control running. A demo that dies (kill -9, its terminal closed)
    takes its control with it, stopped as by Ctrl-C: it ran on alone."""
    import os
    import shlex
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from refine.demo.toy_student import ToyRecipe, toy_student_dir
    from refine.infra.runlog import RunLog

    cache, runs = tmp_path / "cache", tmp_path / "runs"
    shutil.copytree(biased_student, toy_student_dir(ToyRecipe(seed=11), cache))  # stands in for the demo's student
    env = {**os.environ, "REFINE_CACHE_DIR": str(cache), "COLUMNS": "300"}  # no line breaks to search across
    argv = ["--seed", "11", "--rounds", "2", "--train", "8", "--heldout", "8", "--control", "--runs-dir", str(runs)]
    command = [sys.executable, "-m", "refine.demo", *argv]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # a process group of its own, as a shell gives a command
    deadline = time.time() + 120
    while not all((runs / run / "rounds" / "000" / "captions.jsonl").exists()
                  for run in ("demo-shapes-seed11", "demo-shapes-seed11-swapped")):
        assert proc.poll() is None and time.time() < deadline, "the demo ended or stalled before both runs captioned"
        time.sleep(0.05)
    if how == "kill-9":
        proc.kill()
        proc.communicate(timeout=60)
        control = RunLog(runs / "demo-shapes-seed11-swapped", writer=False)
        _wait_until(lambda: control.events()[-1]["event"] == "interrupted", 60, control.events)
        assert control.completed_rounds() < 2
        return
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out, out
    assert f"Continue with: python -m refine.demo {shlex.join(argv)}" in out, out
    assert RunLog(runs / "demo-shapes-seed11", writer=False).completed_rounds() < 2
    control = RunLog(runs / "demo-shapes-seed11-swapped", writer=False)
    assert control.events()[-1]["event"] == "interrupted", control.events()  # stopped with the run, not orphaned
    if how == "ctrl-c":
        return  # the resume is the same

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Headline: CHAIR_s" in done.stdout and "resuming" in done.stderr
    for run in ("demo-shapes-seed11", "demo-shapes-seed11-swapped"):
        assert RunLog(runs / run, writer=False).status() == "done", run
