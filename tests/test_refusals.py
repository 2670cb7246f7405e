"""What refine refuses: every bad input gets one line naming it, exit code 2, no traceback, no run
directory, and no request to the critic. docs/refusals.md lists the same cases with their messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refine import loop
from refine.offline.devserver import FakeOpenAIServer


def _template(tmp_path: Path, edit) -> str:
    """The repository's critique template, edited by ``edit(text) -> bytes``, as a --critic.template path."""
    path = tmp_path / "edited-critique.txt"
    path.write_bytes(edit((Path(__file__).parents[1] / "prompts" / "critique.txt").read_text()))
    return str(path)


def _manifest(tmp_path: Path, lines: list[str]) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "img.png")
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = '{"path": "img.png", "objects": {"dog": 1}}'
# (case id, extra argv given tmp_path and a base_url, a fragment of the expected message)
CASES = [
    ("manifest line is an array", lambda t, u: ["--images", str(_manifest(t, [GOOD, "[1, 2]"]))],
     "m.jsonl:2: each line must be a JSON object"),
    ("manifest line is null", lambda t, u: ["--images", str(_manifest(t, ["null"]))],
     "m.jsonl:1: each line must be a JSON object"),
    ("manifest path is a number", lambda t, u: ["--images", str(_manifest(t, ['{"path": 123}']))],
     "'path' must be a non-empty string"),
    ("manifest objects is a string", lambda t, u: ["--images", str(_manifest(t, ['{"path": "img.png", "objects": "dog"}']))],
     "'objects' must map object labels to counts"),
    ("manifest references is a string",
     lambda t, u: ["--images", str(_manifest(t, ['{"path": "img.png", "references": "a dog"}']))],
     "'references' must be a list of caption strings"),
    ("manifest line is not JSON", lambda t, u: ["--images", str(_manifest(t, ['{"path": ']))], "m.jsonl:1: not valid JSON"),
    ("manifest repeats an id",
     lambda t, u: ["--images", str(_manifest(t, ['{"path": "img.png", "id": "a"}', '{"path": "img.png", "id": "a"}']))],
     "m.jsonl:2: id 'a' is already used at"),
    ("config file is a list", lambda t, u: ["--config", str(_file(t, "c.json", "[1]"))],
     "the top level must be a table of sections"),
    ("config value is null", lambda t, u: ["--config", str(_file(t, "c.json", '{"student": {"batch_size": null}}'))],
     "student.batch_size: must not be null"),
    ("config file is invalid TOML", lambda t, u: ["--config", str(_file(t, "c.toml", "[student\nbatch_size = 2"))],
     "c.toml: not valid TOML"),
    ("config section is not a table", lambda t, u: ["--config", str(_file(t, "c.json", '{"student": 3}'))],
     "section 'student' must be a table of keys"),
    ("unknown key", lambda t, u: ["--update.betta=0.3"], "did you mean 'update.beta'"),
    ("unknown key, value apart", lambda t, u: ["--update.betta", "0.3"], "did you mean 'update.beta'"),
    ("setting without a value", lambda t, u: ["--update.beta"], "--update.beta needs a value: --update.beta=VALUE"),
    ("setting followed by another", lambda t, u: ["--update.beta", "--rounds=1"], "--update.beta needs a value"),
    ("stray word", lambda t, u: ["0.3"], "unrecognized argument '0.3'"),
    ("a shorthand and its setting disagree", lambda t, u: ["--rounds", "2", "--loop.rounds=9"],
     "--rounds 2 and --loop.rounds=9 set the same setting; give it once"),
    ("evaluation interval without held-out images", lambda t, u: ["--loop.eval_every=2"],
     "loop.eval_every=2: there is nothing to evaluate; give the held-out images as --loop.eval_images=SET too"),
    ("two spellings of one setting disagree", lambda t, u: ["--update.lora.r", "4", "--update.lora_r=8"],
     "--update.lora.r=4 and --update.lora_r=8 set the same setting; give it once"),
    ("LoRA's scale without adapters", lambda t, u: ["--update.lora_alpha=8"],
     "update.lora_alpha=8: it does nothing here: there are no LoRA adapters (update.lora_r is 0)"),
    ("LoRA targets only inside a frozen encoder",
     lambda t, u: ["--update.lora.r=4", "--update.lora_targets=q_proj,v_proj", "--update.freeze_encoder=true"],
     "every one of them is inside the vision encoder, which update.freeze_encoder=true freezes"),
    ("a DPO setting in SFT mode", lambda t, u: ["--update.mode=sft", "--update.image_negatives=true"],
     "update.image_negatives=True: it does nothing here: update.mode=sft trains no DPO"),
    ("a verification setting without verification", lambda t, u: ["--loop.verify_by=edits"],
     "loop.verify_by=edits: it does nothing here: it says how verification judges a refinement, and there is none"),
    ("an agreement share with one critique", lambda t, u: ["--loop.min_agreement=0.3"],
     "loop.min_agreement=0.3: it does nothing here"),
    ("what agreement votes on, with one critique", lambda t, u: ["--loop.agree_by=object"],
     "loop.agree_by=object: it does nothing here: it says what critic.samples' critiques vote on"),
    ("agreement by something else", lambda t, u: ["--critic.samples=3", "--loop.agree_by=words"],
     "loop.agree_by='words': must be caption or object"),
    ("a temperature for the grounded critic", lambda t, u: ["--critic.temperature=0.5"],
     "critic.temperature=0.5: it does nothing here: only the openai critic samples"),
    ("a sampling temperature with no samples", lambda t, u: ["--student.n_samples=0", "--student.temperature=0.7"],
     "student.temperature=0.7: it does nothing here: it shapes the sampled captions"),
    ("an infinite learning rate", lambda t, u: ["--update.lr=inf"], "update.lr=inf: must be > 0 and finite"),
    ("value of the wrong type", lambda t, u: ["--student.batch_size=many"], "student.batch_size='many': expected int"),
    ("student batch size 0", lambda t, u: ["--student.batch_size=0"], "student.batch_size=0: must be >= 1"),
    ("update batch size 0", lambda t, u: ["--update.batch_size=0"], "update.batch_size=0: must be >= 1"),
    ("negative samples", lambda t, u: ["--student.n_samples=-1"], "student.n_samples=-1: must be >= 0"),
    ("negative rounds", lambda t, u: ["--rounds", "-1"], "loop.rounds=-1: must be >= 0"),
    ("negative budget", lambda t, u: ["--loop.max_critic_calls=-1"], "loop.max_critic_calls=-1: must be >= 0"),
    ("base_url not a URL", lambda t, u: ["--critic.backend=openai", "--critic.base_url=not a url"],
     "critic.base_url='not a url': must be an http(s) URL"),
    ("negative timeout", lambda t, u: ["--critic.backend=openai", f"--critic.base_url={u}", "--critic.timeout=-5"],
     "critic.timeout=-5.0: must be > 0"),
    ("overlap out of range", lambda t, u: ["--regions.overlap=1.5"], "regions.overlap=1.5: must be in [0, 1)"),
    ("grid of 1", lambda t, u: ["--regions.grids=1"], "regions.grids=(1,): each zoom level must be an integer >= 2"),
    ("confidence out of range", lambda t, u: ["--regions.conf=7"], "regions.conf=7.0: must be in [0, 1]"),
    ("unknown precision", lambda t, u: ["--student.precision=fp64"], "student.precision='fp64': choose one of"),
    ("unknown backend", lambda t, u: ["--critic.backend=gpt5"], "critic.backend='gpt5': choose one of"),
    ("failure share out of range", lambda t, u: ["--loop.max_failure_share=2"], "loop.max_failure_share=2.0"),
    ("pair source unknown", lambda t, u: ["--loop.pair_sources=best"], "loop.pair_sources='best'"),
    ("run id with a slash", lambda t, u: ["--loop.run_id=a/b"], "loop.run_id='a/b': must be a plain folder name"),
    ("runs dir inside a file", lambda t, u: [f"--loop.runs_dir={t / 'work' / 'img.png' / 'runs'}"],
     "img.png is not a directory this process can write to; choose another --loop.runs_dir"),
    ("image set that does not exist", lambda t, u: ["--images", str(t / "nowhere")], "not a named set"),
    ("folder without images", lambda t, u: ["--images", str(t / "empty")], "no image files"),
    ("student that does not exist", lambda t, u: [f"--student.model={t / 'no-student'}"], "could not load the student"),
    ("detector weights not on disk", lambda t, u: ["--loop.use_regions=true", "--regions.model=missing-detector.pt"],
     "detector weights 'missing-detector.pt' are not on disk"),
    ("API key not set", lambda t, u: ["--critic.backend=openai", "--critic.api_key_env=REFINE_TEST_NO_SUCH_KEY"],
     "$REFINE_TEST_NO_SUCH_KEY is not set"),
    ("critique template missing", lambda t, u: ["--critic.backend=openai", f"--critic.base_url={u}",
                                                "--critic.template=nope"], "no template 'nope.txt'"),
    ("critique template with an unknown placeholder",
     lambda t, u: ["--critic.backend=openai", f"--critic.base_url={u}",
                   f"--critic.template={_template(t, lambda s: s.replace('Caption under review:', 'Caption under review ($lang):', 1).encode())}"],
     "edited-critique.txt:"),
    ("critique template not UTF-8",
     lambda t, u: ["--critic.backend=openai", f"--critic.base_url={u}",
                   f"--critic.template={_template(t, lambda s: s.encode('utf-16'))}"],
     "edited-critique.txt: not UTF-8 text"),
    ("config file that is a folder", lambda t, u: ["--config", str(t / "empty")], "empty: a folder; give the JSON or TOML file"),
    ("resume a run that does not exist", lambda t, u: ["--resume", "no-such-run"], "no run 'no-such-run'"),
    ("more tokens than the decoder holds", lambda t, u: ["--student.max_new_tokens=5000"],
     "student.max_new_tokens=5000: the student's decoder holds 64 tokens"),
    ("detector that is not a model", lambda t, u: ["--loop.use_regions=true", f"--regions.model={t / 'work' / 'img.png'}"],
     "is not a detector ultralytics can run"),
    ("empty image set", lambda t, u: ["--images", "shapes:0"], "--images shapes:0: the image set is empty"),
    ("grounded critic, no annotations, no detector", lambda t, u: ["--images", str(_manifest(t, ['{"path": "img.png"}']))],
     "no image has annotations, and without them (or the regions stage's detections"),
    ("empty held-out set", lambda t, u: ["--loop.eval_images=shapes-heldout:0"],
     "--loop.eval_images shapes-heldout:0: the image set is empty"),
    ("held-out set that does not exist", lambda t, u: [f"--loop.eval_images={t / 'nowhere'}"],
     "--loop.eval_images '"),
]
if not torch.cuda.is_available():
    CASES.append(("CUDA without a GPU", lambda t, u: ["--student.device=cuda"], "student.device='cuda': no such CUDA device"))


@pytest.mark.parametrize("make_args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(make_args, expected, tmp_path, tiny_student_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "work").mkdir()
    images = _manifest(tmp_path / "work", [GOOD])
    runs = tmp_path / "runs"
    with FakeOpenAIServer() as server:
        extra = make_args(tmp_path, server.base_url)
        argv = ["--images", str(images), f"--student.model={tiny_student_dir}", f"--loop.runs_dir={runs}",
                "--loop.use_regions=false", "--rounds=1", *extra]
        capsys.readouterr()
        code = loop.main(argv)
        err = capsys.readouterr().err
        assert server.request_count == 0, "a bad input must fail before any paid call"
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in lines[0], lines[0]
    assert not runs.exists() or not any(runs.iterdir()), f"a run directory was left: {list(runs.iterdir())}"


def test_a_bad_input_prints_no_traceback_from_the_shell(tmp_path):
    result = subprocess.run([sys.executable, "-m", "refine.loop", "--images", "shapes:4", "--update.batch_size=0"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_the_corrected_command_runs_with_the_same_run_id(tmp_path, tiny_student_dir):
    images = _manifest(tmp_path, [GOOD])
    argv = ["--images", str(images), f"--student.model={tiny_student_dir}", f"--loop.runs_dir={tmp_path / 'runs'}",
            "--loop.run_id=fixed", "--loop.use_regions=false", "--rounds=1", "--student.n_samples=0",
            "--student.max_new_tokens=4"]
    assert loop.main([*argv, "--update.batch_size=0"]) == 2
    assert not (tmp_path / "runs" / "fixed").exists()
    assert loop.main(argv) == 0
    assert json.loads((tmp_path / "runs" / "fixed" / "config.json").read_text())["loop"]["run_id"] == "fixed"
