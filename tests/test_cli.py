"""The command lines: both spellings of a setting, --help's meanings, a setting that would do nothing, and
what refine.runs and refine.report say about runs that are not there or are damaged."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

from refine import loop, report, runs
from refine.cli import config_reference, load_config, setting_docs
from refine.config import Config


def test_a_setting_and_its_value_may_be_two_words():
    apart = ["--images", "shapes", "--update.beta", "0.3", "--update.lora.r", "4", "--loop.eval_images",
             "shapes-heldout:8", "--loop.eval_every", "2", "--rounds", "2", "--critic.noise", "0.25"]
    joined = ["--images=shapes", "--update.beta=0.3", "--update.lora.r=4", "--loop.eval_images=shapes-heldout:8",
              "--loop.eval_every=2", "--rounds=2", "--critic.noise=0.25"]
    (a, a_args), (b, b_args) = load_config(apart), load_config(joined)
    assert a.to_json() == b.to_json() and a_args.overrides == b_args.overrides
    assert (a.update.beta, a.update.lora_r, a.loop.eval_every, a.critic.noise) == (0.3, 4, 2, 0.25)
    assert a.to_json() != Config().to_json()


def test_the_lora_sub_table_is_one_setting_on_the_command_line_and_in_a_file(tmp_path):
    """``[update.lora] r = 4`` in a TOML file is update.lora_r, as --update.lora.r=4 is (the file refused it);
    the two spellings with different values are refused (the last won silently)."""
    import pytest

    from refine.cli import UsageError

    (tmp_path / "c.toml").write_text('[update]\nbeta = 0.3\n[update.lora]\nr = 4\nalpha = 8\n')
    config, _ = load_config(["--images", "shapes", "--config", str(tmp_path / "c.toml")])
    assert (config.update.beta, config.update.lora_r, config.update.lora_alpha) == (0.3, 4, 8)
    (tmp_path / "C.TOML").write_text((tmp_path / "c.toml").read_text())  # read as JSON, it failed
    assert load_config(["--images", "shapes", "--config", str(tmp_path / "C.TOML")])[0].to_json() == config.to_json()
    with pytest.raises(UsageError, match="--update.lora.r=4 and --update.lora_r=8 set the same setting"):
        load_config(["--images", "shapes", "--update.lora.r", "4", "--update.lora_r", "8"])
    assert load_config(["--images", "shapes", "--update.lora.r", "4", "--update.lora_r=4"])[0].update.lora_r == 4
    with pytest.raises(UsageError, match="--update.lora_r=16 and --update.lora.r=8 set the same setting"):
        load_config(["--images", "shapes", "--update.lora_r=16", "--update.lora.r=16", "--update.lora.r=8"])
    assert load_config(["--images", "shapes", "--update.beta=0.3", "--update.beta=0.4"])[0].update.beta == 0.4


def test_help_gives_every_setting_its_default_and_meaning():
    config = Config()
    undocumented = [f"{section.name}.{f.name}" for section in dataclasses.fields(config)
                    for f in dataclasses.fields(getattr(config, section.name))
                    if not setting_docs(type(getattr(config, section.name))).get(f.name)]
    assert not undocumented, f"give these a comment in refine/config.py (it is their --help): {undocumented}"
    text = config_reference()
    # the comment beside the field, and a comment block above one
    assert "--update.nll_weight=0.5" in text and "weight of the per-token NLL on the chosen caption" in text
    lines = text.splitlines()
    noise = next(i for i, line in enumerate(lines) if line.strip().startswith("--critic.noise=0.0"))
    assert "error rate per object and critique" in " ".join(lines[noise:noise + 3])


def test_an_evaluation_interval_is_refused_on_a_resume_of_a_run_with_no_held_out_images(tmp_path, tiny_student_dir,
                                                                                         photos, capsys):
    photos["bus"].resize((64, 48)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "objects": {"bus": 1}}\n')
    runs = tmp_path / "runs"
    common = [f"--loop.runs_dir={runs}"]
    assert loop.main(["--images", str(tmp_path / "m.jsonl"), f"--student.model={tiny_student_dir}", *common,
                      "--loop.run_id=r", "--loop.use_regions=false", "--rounds=0"]) == 0
    assert "is the training set" not in capsys.readouterr().err
    assert loop.main(["--images", str(tmp_path / "m.jsonl"), f"--student.model={tiny_student_dir}", *common,
                      "--loop.run_id=same", "--loop.use_regions=false", "--rounds=0",
                      f"--loop.eval_images={tmp_path / 'm.jsonl'}"]) == 0
    assert "note: --loop.eval_images is the training set" in capsys.readouterr().err
    # a held-out set that shares images with the training set (the same bytes under another name) says so
    (tmp_path / "a copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    photos["zidane"].resize((64, 48)).save(tmp_path / "b.png")
    (tmp_path / "held.jsonl").write_text('{"path": "a copy.png"}\n{"path": "b.png"}\n')
    assert loop.main(["--images", str(tmp_path / "m.jsonl"), f"--student.model={tiny_student_dir}", *common,
                      "--loop.run_id=overlap", "--loop.use_regions=false", "--rounds=0",
                      f"--loop.eval_images={tmp_path / 'held.jsonl'}"]) == 0
    assert "note: --loop.eval_images: 1 of its 2 images are training images too" in capsys.readouterr().err
    assert loop.main(["--resume", "r", *common, "--rounds=1", "--loop.eval_every", "2"]) == 2
    err = capsys.readouterr().err
    assert "loop.eval_every=2: there is nothing to evaluate; run r has no held-out images" in err, err
    assert err.count("\n") == 1, err
    assert loop.main(["--resume", "r", *common, "--rounds=1", "--student.n_samples=0"]) == 2  # not resumable
    # the run's own config.json starts another run with its settings, as one of an older version (which
    # holds a retired setting at its off value) does
    saved = json.loads((runs / "r" / "config.json").read_text())
    (tmp_path / "old.json").write_text(json.dumps({**saved, "student": {**saved["student"], "quantize": "none"}}))
    for path in (runs / "r" / "config.json", tmp_path / "old.json"):
        again, _ = load_config(["--config", str(path), "--loop.run_id=r2"])
        assert {**again.to_json()["loop"], "run_id": "r"} == saved["loop"] and again.to_json()["update"] == saved["update"]
    # a message is one line when piped (rich cut them at 80 columns)
    done = subprocess.run([sys.executable, "-m", "refine.loop", "--resume", str(runs / "r")], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "is complete; nothing to resume (--rounds N takes it on for more rounds)." in \
        done.stderr and done.stderr.count("\n") == 1 and len(done.stderr) > 80, done.stderr


def test_runs_and_report_on_runs_that_are_not_there_or_are_damaged(tmp_path, tiny_student_dir, photos, capsys):
    photos["bus"].resize((64, 48)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "objects": {"bus": 1}}\n')
    runs_dir = tmp_path / "runs"
    base = ["--images", str(tmp_path / "m.jsonl"), f"--student.model={tiny_student_dir}", "--loop.use_regions=false",
            "--rounds=1", "--student.n_samples=0", "--student.max_new_tokens=4"]
    for run_id in ("a", "b"):
        assert loop.main([*base, f"--loop.runs_dir={runs_dir}", f"--loop.run_id={run_id}",
                          f"--loop.eval_images={tmp_path / 'm.jsonl'}"]) == 0
    capsys.readouterr()
    # --runs-dir after the command, as report and score take it; diff shows the final students too
    assert runs.main(["diff", "a", "b", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("round 1 (final)") == 2
    assert "config: a and b have the same settings (run_id aside)" in out  # an empty table was printed
    # an unknown image: one line, and no table printed before it
    assert runs.main(["show", "a", "--image", "nope", "--runs-dir", str(runs_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "neither trained on nor held out" in err
    # a run stopped before its round's critiques were done says so under the caption (it printed nothing)
    for stage in ("critiques", "refined", "pairs", "update"):
        (runs_dir / "b" / "rounds" / "000" / f"{stage}.jsonl").unlink()
    assert runs.main(["show", "b", "--image", "a", "--runs-dir", str(runs_dir)]) == 0
    assert "not critiqued: the run stopped before this round's critiques were done" in capsys.readouterr().out
    # a damaged config.json: one line naming the file, from every command
    (runs_dir / "b" / "config.json").write_text('{"loop": ')
    assert runs.main(["show", "b", "--runs-dir", str(runs_dir)]) == 2
    assert report.main(["b", "--runs-dir", str(runs_dir)]) == 2
    assert loop.main(["--resume", "b", f"--loop.runs_dir={runs_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("config.json: damaged, not valid JSON") == 3 and "Traceback" not in err, err
    # a run that exists, and a runs dir that is a file: one line each, nothing made
    assert loop.main([*base, f"--loop.runs_dir={runs_dir}", "--loop.run_id=a"]) == 2
    assert f"continue it with --resume {runs_dir / 'a'}" in capsys.readouterr().err
    assert loop.main([*base, f"--loop.runs_dir={tmp_path / 'm.jsonl' / 'runs'}"]) == 2
    assert "is not a directory this process can write to" in capsys.readouterr().err


def test_a_runs_own_config_file_starts_a_new_run_with_the_same_settings(tmp_path):
    """A saved config.json holds every setting, defaults included (eval_every 1 without held-out images):
    as --config it must load, and equal the config it was saved from."""
    config, _ = load_config(["--images", "shapes:4", "--rounds", "2", "--update.beta", "0.3"])
    (tmp_path / "config.json").write_text(json.dumps(config.to_json()))
    again, _ = load_config(["--config", str(tmp_path / "config.json")])
    assert again.to_json() == config.to_json()
    # the command line wins over the file, a shorthand as well as a setting
    over, _ = load_config(["--config", str(tmp_path / "config.json"), "--rounds", "5", "--update.beta=0.2"])
    assert (over.loop.rounds, over.update.beta, over.loop.images) == (5, 0.2, "shapes:4")


def test_a_setting_the_rest_of_the_config_makes_a_no_op_is_refused(tmp_path):
    """LoRA's scale or targets without adapters, the SFT epochs of another mode, DPO's settings in SFT mode:
    each ran a whole (paid) run that ignored it. A config file that gives one setting twice is refused."""
    import pytest

    from refine.cli import load_config
    from refine.config import ConfigError

    base = ["--images", "shapes"]
    for flags, message in [
        (["--update.lora_alpha=8"], "update.lora_alpha=8: it does nothing here: there are no LoRA adapters"),
        (["--update.lora_targets=q_proj"], "update.lora_targets=q_proj: it does nothing here"),
        (["--update.sft_epochs=5"], "update.sft_epochs=5: it does nothing here: it counts the SFT epochs"),
        (["--update.mode=sft", "--update.image_negatives=true"], "update.image_negatives=True: it does nothing here: "
                                                                 "update.mode=sft trains no DPO"),
        (["--update.mode=sft", "--update.beta=0.5"], "update.beta=0.5: it does nothing here"),
        (["--update.mode=sft", "--update.nll_weight=1"], "update.nll_weight=1.0: it does nothing here"),
        (["--update.lora_alpha=0", "--update.lora_r=4"], "update.lora_alpha=0: must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config([*base, *flags])
    # used, they pass; at their defaults, or given by a saved config.json, they pass
    assert load_config([*base, "--update.lora_r=4", "--update.lora_alpha=8"])[0].update.lora_alpha == 8
    assert load_config([*base, "--update.mode=sft+dpo", "--update.sft_epochs=2"])[0].update.sft_epochs == 2
    assert load_config([*base, "--update.mode=sft", "--update.beta=0.1"])[0].update.mode == "sft"
    (tmp_path / "c.toml").write_text("[update]\nlora_r = 4\n[update.lora]\nr = 8\n")
    with pytest.raises(ConfigError, match=r"update\.lora_r is given twice \(4 and 8\)"):
        load_config([*base, "--config", str(tmp_path / "c.toml")])
