"""Prompt templates: plain files in the top-level ``prompts/`` dir, rendered with named placeholders.

Placeholders are ``string.Template``'s ``$name`` / ``${name}``, so the JSON braces that every
output-format section is full of need no escaping (``str.format`` would need ``{{``); a literal
dollar sign is written ``$$``. Rendering with a missing variable raises ``TemplateError`` naming every
missing variable and the file. The template's sha256 goes into each record and, through the rendered
text, into every cache key: editing a template re-asks only what it changes.

Where templates are found, first match wins:

1. ``$REFINE_PROMPTS_DIR``, when set (it must exist);
2. the repository's ``prompts/`` (a clone or an editable install);
3. the installed wheel's package ``refine._prompts`` (pyproject maps ``prompts/`` there).

This module also formats the object-centric context the critique template carries: the detector's
objects, the views attached to the request, and known annotations.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

PROMPTS_DIR_ENV = "REFINE_PROMPTS_DIR"


class TemplateError(ValueError):
    """A template that cannot be found, parsed or rendered; the message names the file."""


@dataclass(frozen=True)
class Template:
    """One prompt template. ``source`` says where the text came from (a path), for error messages."""

    name: str
    text: str
    source: str

    @cached_property
    def sha256(self) -> str:
        """sha256 of the template text (UTF-8): recorded with every rendered prompt."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    @cached_property
    def variables(self) -> frozenset[str]:
        """The placeholder names the template uses. Raises ``TemplateError`` on a bad ``$`` sequence."""
        names = set()
        for match in string.Template.pattern.finditer(self.text):
            if match.group("invalid") is not None:
                line = self.text.count("\n", 0, match.start("invalid")) + 1
                raise TemplateError(
                    f"{self.source}:{line}: a '$' that is not a placeholder; write '$$' for a literal dollar sign"
                )
            name = match.group("named") or match.group("braced")
            if name:
                names.add(name)
        return frozenset(names)

    def render(self, **variables: Any) -> str:
        """Substitute every placeholder. Extra variables are ignored (a template may use fewer)."""
        missing = sorted(self.variables - variables.keys())
        if missing:
            raise TemplateError(
                f"template {self.name!r} ({self.source}) needs variable(s) {', '.join(missing)} "
                f"that were not given; given: {', '.join(sorted(variables)) or 'none'}"
            )
        return string.Template(self.text).substitute({k: str(v) for k, v in variables.items()})


def prompts_dir() -> Path | resources.abc.Traversable:
    """The directory templates are read from (see the module docstring for the order)."""
    override = os.environ.get(PROMPTS_DIR_ENV)
    if override:
        path = Path(override)
        if not path.is_dir():
            raise TemplateError(f"${PROMPTS_DIR_ENV}={override!r} is not a directory; unset it or point it at a prompts dir")
        return path
    import refine

    repo_prompts = Path(refine.__file__).resolve().parents[1] / "prompts"
    if repo_prompts.is_dir():
        return repo_prompts
    try:
        return resources.files("refine._prompts")
    except ModuleNotFoundError as e:
        raise TemplateError(
            f"no prompts directory: set ${PROMPTS_DIR_ENV}, run from a clone, or reinstall refine (the wheel "
            "ships prompts/ as refine._prompts)"
        ) from e


def load_template(name: str) -> Template:
    """Read ``<prompts dir>/<name>.txt`` (``name`` may include the ``.txt``). Read on every call, so edits show."""
    filename = name if name.endswith(".txt") else f"{name}.txt"
    directory = prompts_dir()
    path = directory / filename
    if not path.is_file():
        available = sorted(p.name for p in directory.iterdir() if p.name.endswith(".txt"))
        raise TemplateError(f"no template {filename!r} in {directory}; available: {', '.join(available) or 'none'}")
    template = Template(name=filename.removesuffix(".txt"), text=path.read_text(encoding="utf-8"), source=str(path))
    template.variables  # noqa: B018 (parse now, so a bad '$' fails at load with the file named)
    return template


# --- object-centric context for the critique template ---------------------------------------------


def format_objects(regions: Any) -> str:
    """The detector's classes and counts as prompt text (``refine.regions.format_objects``);
    ``regions=None`` says detection was skipped."""
    if regions is None:
        return "no object detection was run for this image"
    from refine.regions import format_objects as regions_format_objects

    return regions_format_objects(regions)


def _box_text(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{round(v)}" for v in box) + ")"


def describe_views(full_size: tuple[int, int], views: Iterable[Any]) -> str:
    """Numbered lines naming each attached image, in the order they are attached.

    Image 1 is always the full image; ``views`` are the extra ``refine.regions.View``s sent after it.
    Boxes are ``(x0, y0, x1, y1)`` in full-image pixels.
    """
    width, height = full_size
    lines = [f"Image 1: the full image ({width}x{height} pixels)."]
    for i, view in enumerate(views, start=2):
        if view.kind == "crop":
            what = f"a crop around a detected {view.label}" if view.label else "a crop"
        elif view.kind == "tile":
            what = "a zoomed-in tile"
        else:
            what = f"a {view.kind} view"
        lines.append(f"Image {i}: {what} at box {_box_text(view.box)} of the full image.")
    return "\n".join(lines)


def format_annotations(objects: Mapping[str, int] | None) -> str:
    """Ground-truth label counts, when the image set has them."""
    if not objects:
        return "No annotations are available for this image."
    listed = ", ".join(f"{label}: {count}" for label, count in sorted(objects.items()))
    return f"Human annotations list these objects (label: count): {listed}."


def constraint_lines(text: str) -> list[str]:
    """The non-empty lines of a rendered constraints template (e.g. ``step.txt``), one constraint each."""
    return [line.strip() for line in text.splitlines() if line.strip()]
