"""Prompt templates: where they are found, hashing, rendering errors, and the object-centric context."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

import refine
from critics.context import describe_views, format_annotations, format_objects
from refine.infra.prompts import (
    PROMPTS_DIR_ENV,
    Template,
    TemplateError,
    constraint_lines,
    load_template,
    prompts_dir,
)
from refine.stages.regions import ObjectSummary, Regions, View

REPO_PROMPTS = Path(__file__).resolve().parents[1] / "prompts"


@pytest.fixture(autouse=True)
def _no_prompts_override(monkeypatch):
    monkeypatch.delenv(PROMPTS_DIR_ENV, raising=False)


def test_repo_templates_are_found_and_hashed():
    assert Path(str(prompts_dir())) == REPO_PROMPTS
    for name in ("critique", "step", "judge"):
        template = load_template(name)
        text = (REPO_PROMPTS / f"{name}.txt").read_text()
        assert template.text == text
        assert template.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert load_template("critique").variables == {"caption", "views", "objects", "annotations", "max_words"}
    assert load_template("judge.txt").variables == {"caption_a", "caption_b"}
    assert load_template("step").variables == {"max_words"}


def test_missing_variables_are_all_named_with_the_file():
    template = load_template("critique")
    with pytest.raises(TemplateError) as info:
        template.render(caption="a dog", objects="1 dog")
    message = str(info.value)
    for name in ("annotations", "max_words", "views"):
        assert name in message
    assert str(REPO_PROMPTS / "critique.txt") in message
    assert "caption, objects" in message  # what was given, to spot a typo


def test_json_braces_need_no_escaping_and_dollars_do():
    template = Template("t", 'Say {"score": $score, "cost": "$$5"} for ${who}s.', "inline")
    assert template.render(score=0.5, who="dog", unused="ignored") == 'Say {"score": 0.5, "cost": "$5"} for dogs.'
    rendered = load_template("critique").render(
        caption="a dog", views="Image 1", objects="1 dog", annotations="none", max_words=7
    )
    assert '"count_errors": {"<label>": [<count the caption says>, <true count>], ...}' in rendered
    assert "at most 7 words" in rendered and "$" not in rendered


def test_a_stray_dollar_is_an_error_naming_the_line(tmp_path, monkeypatch):
    (tmp_path / "bad.txt").write_text("line one\ncosts $5\n")
    monkeypatch.setenv(PROMPTS_DIR_ENV, str(tmp_path))
    with pytest.raises(TemplateError, match=r"bad\.txt:2: .*'\$\$'"):
        load_template("bad")


def test_env_override_and_its_errors(tmp_path, monkeypatch):
    edited = tmp_path / "prompts"
    shutil.copytree(REPO_PROMPTS, edited)
    path = edited / "critique.txt"
    path.write_text(path.read_text().replace("Judge it against", "Compare it with"))
    monkeypatch.setenv(PROMPTS_DIR_ENV, str(edited))
    template = load_template("critique")
    assert "Compare it with" in template.text and template.source == str(path)
    monkeypatch.delenv(PROMPTS_DIR_ENV)
    assert load_template("critique").sha256 != template.sha256

    monkeypatch.setenv(PROMPTS_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(TemplateError, match="REFINE_PROMPTS_DIR"):
        load_template("critique")
    monkeypatch.setenv(PROMPTS_DIR_ENV, str(edited))
    with pytest.raises(TemplateError, match=r"no template 'critiqe\.txt'.*critique\.txt"):
        load_template("critiqe")


def test_installed_wheel_layout_is_read_through_importlib_resources(tmp_path, monkeypatch):
    """No clone around: the templates come from the package ``refine._prompts``, as pyproject installs them."""
    site = tmp_path / "site" / "refine"
    (site / "_prompts").mkdir(parents=True)
    (site / "_prompts" / "critique.txt").write_text("wheel copy: $caption")
    monkeypatch.setattr(refine, "__file__", str(site / "__init__.py"))
    monkeypatch.setattr(refine, "__path__", [*refine.__path__, str(site)])
    monkeypatch.delitem(sys.modules, "refine._prompts", raising=False)
    try:
        template = load_template("critique")
        assert template.render(caption="x") == "wheel copy: x"
    finally:
        sys.modules.pop("refine._prompts", None)


def test_step_template_gives_one_constraint_per_line():
    lines = constraint_lines(load_template("step").render(max_words=12))
    assert len(lines) == 5
    assert lines[0] == "The caption must be a single sentence of at most 12 words."


def test_object_context_text():
    crop = Image.new("RGB", (30, 40))
    views = [View("crop", (10.4, 20, 40, 60), crop, label="person"), View("tile", (0, 0, 405, 540), crop, grid=2)]
    assert describe_views((810, 1080), views) == (
        "Image 1: the full image (810x1080 pixels).\n"
        "Image 2: a crop around a detected person at box (10, 20, 40, 60) of the full image.\n"
        "Image 3: a zoomed-in tile at box (0, 0, 405, 540) of the full image."
    )
    assert format_annotations({"person": 4, "bus": 1}) == (
        "Human annotations list these objects (label: count): bus: 1, person: 4."
    )
    assert format_annotations(None) == "No annotations are available for this image."
    regions = Regions("bus", 810, 1080, objects=[ObjectSummary("person", 4, 0.8, []), ObjectSummary("bus", 1, 0.9, [])])
    text = format_objects(regions)
    assert "4 person" in text and "1 bus" in text
    assert format_objects(None) == "no object detection was run for this image"
