"""An update stopped or crashed in its middle goes on from its saved progress and ends where an unbroken
update ends; a run stopped in its update resumes without training from the start."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_loop import _args, kill_when_exists, manifest  # noqa: F401  (fixture)

from refine.infra.atomic import new_file_mode
from refine.infra.interrupts import second_interrupt_exits
from refine.infra.runlog import RunLog
from refine.stages.dpo import UpdateConfig, update
from refine.stages.pairs import PreferencePair
from refine.stages.student import load_student
from refine.stages.update_state import UpdateSaves

# 4 pairs, one a step, 2 epochs: 8 steps, the reference pass is 4 batches before them
CONFIG = UpdateConfig(lr=3e-3, epochs=2, batch_size=1, seed=3)
REFERENCE_BATCHES = 4


def _student(path):
    return load_student(path, device="cpu", precision="fp32")


def _at_batch(student, n=0, then=None) -> list[int]:
    """Counts the batches of images the student turns into pixels (its own ``pixel_values`` does the
    work), and calls ``then()`` at the ``n``-th: a trigger at a known step."""
    real, seen = student.pixel_values, [0]

    def pixel_values(images):
        seen[0] += 1
        if seen[0] == n:
            then()
        return real(images)

    student.pixel_values = pixel_values
    return seen


def _weights(student):
    return [p.detach().clone() for p in student.model.parameters()]


def _unbroken(tiny_student_dir, pairs, images, config=CONFIG):
    trained, history = update(_student(tiny_student_dir), pairs, images, config, in_place=True)
    return _weights(trained), history


def _assert_same(student, history, expected):
    weights, rows = expected
    assert history == rows
    assert all(torch.equal(a, b) for a, b in zip(_weights(student), weights, strict=True))


def test_a_stop_mid_update_saves_its_progress_and_the_resume_ends_as_an_unbroken_update(
        tiny_student_dir, four_pairs, tmp_path, capsys):
    pairs, images = four_pairs
    expected = _unbroken(tiny_student_dir, pairs, images)
    saves = UpdateSaves(tmp_path / "update.progress.pt", save_minutes=0)  # saved on a stop only
    student = _student(tiny_student_dir)
    _at_batch(student, REFERENCE_BATCHES + 3, lambda: signal.raise_signal(signal.SIGINT))  # during step 3
    with second_interrupt_exits(), pytest.raises(KeyboardInterrupt):
        update(student, pairs, images, CONFIG, in_place=True, saves=saves)
    assert "at the update's next step boundary" in capsys.readouterr().err
    saved = torch.load(saves.path, weights_only=True)
    assert saved["history"] == expected[1][:3], "the step in progress finishes, and is saved with the two before"
    assert saves.path.stat().st_mode & 0o777 == new_file_mode(), "as readable as the run's other files"

    resumed, history = update(_student(tiny_student_dir), pairs, images, CONFIG, in_place=True, saves=saves)
    assert "continues from its saved progress: step 3 of 8" in capsys.readouterr().err
    _assert_same(resumed, history, expected)


def test_a_crash_mid_update_loses_only_the_steps_since_the_last_save(tiny_student_dir, four_pairs, tmp_path):
    pairs, images = four_pairs
    config = UpdateConfig(**{**vars(CONFIG), "mode": "sft+dpo", "sft_epochs": 1})  # 4 SFT steps, then 8 of DPO
    expected = _unbroken(tiny_student_dir, pairs, images, config)
    saves = UpdateSaves(tmp_path / "update.progress.pt", save_minutes=1e-9)  # due after every step
    student = _student(tiny_student_dir)

    def crash():
        raise RuntimeError("CUDA out of memory")

    # SFT's 4 steps, the reference pass's 4 batches, then DPO's steps: the crash is in DPO's 3rd
    _at_batch(student, 4 + REFERENCE_BATCHES + 3, crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        update(student, pairs, images, config, in_place=True, saves=saves)
    saved = torch.load(saves.path, weights_only=True)
    assert len(saved["history"]) == 6 and saved["reference"] is not None

    student = _student(tiny_student_dir)
    batches = _at_batch(student)
    resumed, history = update(student, pairs, images, config, in_place=True, saves=saves)
    assert batches[0] == 6, "the 6 saved steps and the reference pass are not computed again"
    _assert_same(resumed, history, expected)


def test_a_stop_in_the_reference_pass_keeps_the_sft_steps_before_it(tiny_student_dir, four_pairs, tmp_path):
    """sft+dpo: the DPO reference pass comes after the whole SFT phase; a stop there saved nothing (with
    update.save_minutes not yet due), and the resume trained SFT again."""
    pairs, images = four_pairs
    config = UpdateConfig(**{**vars(CONFIG), "mode": "sft+dpo", "sft_epochs": 1})
    expected = _unbroken(tiny_student_dir, pairs, images, config)
    saves = UpdateSaves(tmp_path / "update.progress.pt", save_minutes=0)
    student = _student(tiny_student_dir)
    _at_batch(student, 4 + 2, lambda: signal.raise_signal(signal.SIGINT))  # the reference pass's 2nd batch
    with second_interrupt_exits(), pytest.raises(KeyboardInterrupt):
        update(student, pairs, images, config, in_place=True, saves=saves)
    saved = torch.load(saves.path, weights_only=True)
    assert len(saved["history"]) == 4 and saved["reference"] is None
    resumed, history = update(_student(tiny_student_dir), pairs, images, config, in_place=True, saves=saves)
    _assert_same(resumed, history, expected)


def test_progress_saved_for_other_pairs_settings_or_none_at_all_is_not_used(tiny_student_dir, four_pairs,
                                                                            tmp_path, capsys, monkeypatch):
    pairs, images = four_pairs
    saves = UpdateSaves(tmp_path / "update.progress.pt", save_minutes=1e-9)
    student = _student(tiny_student_dir)
    _at_batch(student, REFERENCE_BATCHES + 2, lambda: signal.raise_signal(signal.SIGINT))
    with second_interrupt_exits(), pytest.raises(KeyboardInterrupt):
        update(student, pairs, images, CONFIG, in_place=True, saves=saves)
    saved = saves.path.read_bytes()
    other = [*pairs[:3], PreferencePair("gray", "a gray picture", "a dog on a bed", "ranked")]
    expected = _unbroken(tiny_student_dir, other, images)
    capsys.readouterr()
    trained, history = update(_student(tiny_student_dir), other, images, CONFIG, in_place=True, saves=saves)
    assert "is for other pairs; it starts from its first step" in capsys.readouterr().err
    _assert_same(trained, history, expected)

    # precision "auto" that resolves otherwise on resume (here accelerate's bf16; fp16 on a GPU crashed
    # restoring fp32's empty loss-scaler state, at every resume)
    saves.path.write_bytes(saved)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    _, history = update(_student(tiny_student_dir), pairs, images, CONFIG, in_place=True, saves=saves)
    assert "is for other settings (precision fp32 → bf16)" in capsys.readouterr().err and len(history) == 8
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")

    torch.save([1, 2], saves.path)  # a file of another kind
    _, history = update(_student(tiny_student_dir), pairs, images, CONFIG, in_place=True, saves=saves)
    assert "is not an update's progress" in capsys.readouterr().err and len(history) == 8


def test_a_save_that_cannot_be_written_is_a_warning(tiny_student_dir, four_pairs, tmp_path, capsys):
    pairs, images = four_pairs
    (tmp_path / "a-file").write_text("")
    saves = UpdateSaves(tmp_path / "a-file" / "update.progress.pt", save_minutes=1e-9)  # its folder is a file
    _, history = update(_student(tiny_student_dir), pairs, images, CONFIG, in_place=True, saves=saves)
    assert len(history) == 8 and capsys.readouterr().err.count("Could not save the update's progress") == 1


def test_a_stop_while_the_rounds_student_is_saved_waits_for_the_save(manifest, tiny_student_dir, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    """A Ctrl-C after the update's last step, while the round's student was being saved, broke the save
    after the update's rows were recorded: the resume was then refused (the student of a finished update
    missing). Now the save finishes, then the run stops, and the resume goes on without training again."""
    from refine import loop

    real = RunLog.save_student

    def save_student(self, student, tag, state):
        if tag == "last":
            signal.raise_signal(signal.SIGINT)
        return real(self, student, tag, state)

    monkeypatch.setattr(RunLog, "save_student", save_student)
    args = _args(manifest, tiny_student_dir, tmp_path / "runs", "--rounds=1", "--loop.use_regions=false")
    with second_interrupt_exits(), pytest.raises(loop.RunStopped) as stopped:
        loop.run(args)
    assert stopped.value.code == 130
    monkeypatch.undo()
    log = RunLog(tmp_path / "runs" / "e2e")
    assert log.events()[-1]["event"] == "interrupted" and log.student_state("last") == {"round": 0}
    loop.run(["--resume", "e2e", f"--loop.runs_dir={tmp_path / 'runs'}"])
    assert log.status() == "done" and [e["stage"] for e in log.events() if e["event"] == "stage_done"].count("update") == 1


def test_a_run_stopped_in_its_update_resumes_it_from_the_saved_progress(manifest, tiny_student_dir, tmp_path):  # noqa: F811
    """SIGTERM the loop once its update has saved progress: the step in progress finishes, the progress is
    saved, the run records the stop and exits 130; --resume goes on from the saved step, records the update
    once and removes the progress file. (A kill -9 leaves the last periodic save, as the crash test above.)"""
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "REFINE_CACHE_DIR": str(tmp_path / "cache")}
    args = _args(manifest, tiny_student_dir, runs_dir, "--rounds=1", "--loop.use_regions=false",
                 "--update.batch_size=1", "--update.save_minutes=1e-9", "--update.epochs=4")
    log = RunLog(runs_dir / "e2e")
    stopped = kill_when_exists(args, env, log.progress_path(0, "update"), signal.SIGTERM)
    assert not log.has_stage(0, "update")
    assert stopped.returncode == 130 and log.events()[-1]["event"] == "interrupted"
    assert "Stopping (SIGTERM) at the update's next step boundary" in stopped.stderr

    done = subprocess.run([sys.executable, "-m", "refine.loop", "--resume", "e2e", f"--loop.runs_dir={runs_dir}"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "The update continues from its saved progress: step" in done.stderr
    assert [e["round"] for e in log.events() if e["event"] == "stage_done" and e["stage"] == "update"] == [0]
    assert not list(log.round_dir(0).glob("*progress*")), "the progress file and any cut-short save are removed"
    assert len(log.read_stage(0, "update")) == 4 * len(log.read_stage(0, "pairs"))
