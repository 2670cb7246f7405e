"""A run, its cache and its inputs damaged or changed between two sessions (a deleted folder, a cut
file, a corrupt cache, an image rewritten): the resume refuses in one line naming what to restore, or
goes on and says what it did; it never quietly trains on from the wrong state. From a new user's review."""

import shutil

import pytest
from test_loop import manifest  # noqa: F401  (fixture)

from refine import loop
from refine.infra.cache import NAMESPACES
from refine.infra.runlog import RunLog


def _args(manifest, student_dir, runs_dir, *extra):  # noqa: F811
    return ["--images", str(manifest), "--rounds", "1", f"--student.model={student_dir}",
            f"--loop.runs_dir={runs_dir}", "--loop.run_id=d", "--student.n_samples=1", "--student.max_new_tokens=6",
            "--update.epochs=1", "--loop.use_regions=false", *extra]


@pytest.fixture
def trained_run(manifest, tiny_student_dir, tmp_path):  # noqa: F811
    """A finished one-round run of the grounded critic: round 0's update saved ``student/last``."""
    assert loop.main(_args(manifest, tiny_student_dir, tmp_path / "runs")) == 0
    log = RunLog(tmp_path / "runs" / "d")
    assert log.student_state("last") == {"round": 0}
    return log


def _resume(log, capsys, *extra):
    before = (log.root / "events.jsonl").read_bytes()
    capsys.readouterr()
    code = loop.main(["--resume", str(log.root), "--rounds", "2", *extra])
    err = capsys.readouterr().err
    return code, err, (log.root / "events.jsonl").read_bytes() == before


@pytest.mark.parametrize("gone", ["student", "student/last"])
def test_a_resume_whose_trained_student_is_gone_is_refused(trained_run, capsys, gone):
    """It trained on from the base model (student.model) without a word: round 0's training was lost and
    the next student was saved as the run's latest."""
    shutil.rmtree(trained_run.root / gone)
    code, err, untouched = _resume(trained_run, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "student/last" in err and "round 0" in err and untouched, err


def test_a_resume_whose_trained_student_is_cut_short_is_one_line(trained_run, capsys):
    """A truncated checkpoint (a full disk, a copy interrupted): a traceback from safetensors."""
    weights = trained_run.student_dir("last") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err, untouched = _resume(trained_run, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "student/last" in err and "cannot be loaded" in err and untouched, err


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_damaged_cache_store_is_refused_before_the_run_in_one_line(manifest, tiny_student_dir, tmp_path, capsys,  # noqa: F811
                                                                    monkeypatch, namespace):
    """A store that is not a database: the image index's was a traceback, the critiques' and the LLM's a
    traceback per request (328 lines) after the run had begun."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("REFINE_CACHE_DIR", str(cache))
    (cache / namespace).mkdir(parents=True)
    (cache / namespace / "cache.db").write_bytes(bytes(range(256)) * 12)
    capsys.readouterr()
    assert loop.main(_args(manifest, tiny_student_dir, tmp_path / "runs")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"the cache {cache / namespace} cannot be used" in err and "REFINE_CACHE_DIR" in err, err
    assert not (tmp_path / "runs" / "d").exists()


def test_a_cache_folder_that_is_a_file_is_named_not_blamed_on_the_images(manifest, tiny_student_dir, tmp_path,  # noqa: F811
                                                                         capsys, monkeypatch):
    """It said "no readable images (4 skipped)", each skip naming the cache."""
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("REFINE_CACHE_DIR", str(tmp_path / "cache"))
    capsys.readouterr()
    assert loop.main(_args(manifest, tiny_student_dir, tmp_path / "runs")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the cache {tmp_path / 'cache' / 'image-index'} cannot be used"), err
    assert "images" not in err.split("cannot be used")[0] and not (tmp_path / "runs" / "d").exists()


@pytest.mark.parametrize("cut", ["mid-line", "whole lines"])
def test_a_finished_stage_file_cut_short_is_refused_not_read_as_fewer_rows(trained_run, capsys, cut):
    """A finished stage's file is written whole, so a line that is not a row, or fewer rows than its
    stage_done event counted, is damage. It was read as a smaller round (3 of 6 images), silently."""
    path = trained_run.stage_path(0, "captions")
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    path.write_bytes(data[: len(data) // 2] if cut == "mid-line" else b"".join(lines[:-1]))
    code, err, untouched = _resume(trained_run, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{path}: damaged" in err and "delete it" in err and untouched, err


def test_a_resume_given_the_same_relative_paths_as_the_run_is_no_change(manifest, tiny_student_dir, tmp_path,  # noqa: F811
                                                                        capsys, monkeypatch):
    """The run's command again with --resume added: the run stores its paths absolute, and the relative
    --images was refused as a change of loop.images."""
    monkeypatch.chdir(manifest.parent)
    relative = ["--images", manifest.name, "--rounds", "1", f"--student.model={tiny_student_dir}", "--loop.runs_dir=runs",
                "--loop.run_id=d", "--student.n_samples=0", "--student.max_new_tokens=4", "--update.epochs=1",
                "--loop.use_regions=false"]
    assert loop.main(relative) == 0
    capsys.readouterr()
    assert loop.main([*relative, "--resume", "d"]) == 0, capsys.readouterr().err
    assert loop.main([*relative[2:], "--images", "elsewhere.jsonl", "--resume", "d"]) == 2
    assert "loop.images cannot change" in capsys.readouterr().err
