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

"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Iterable
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


def load_template(name: str, given: Iterable[str] | None = None) -> Template:
    """Read ``<prompts dir>/<name>.txt`` (``name`` may include the ``.txt``). Read on every call, so edits show.
    ``given``: the variables its caller renders it with; a placeholder outside them fails here, at load."""
    filename = name if name.endswith(".txt") else f"{name}.txt"
    directory = prompts_dir()
    path = directory / filename
    if not path.is_file():
        available = sorted(p.name for p in directory.iterdir() if p.name.endswith(".txt"))
        raise TemplateError(f"no template {filename!r} in {directory}; available: {', '.join(available) or 'none'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    template = Template(name=filename.removesuffix(".txt"), text=text, source=str(path))
    variables = template.variables  # parse now, so a bad '$' fails at load with the file named
    unknown = sorted(variables - set(given)) if given is not None else []
    if unknown:
        raise TemplateError(f"{path}: unknown placeholder(s) {', '.join('$' + v for v in unknown)}; this template is "
                            f"rendered with {', '.join('$' + v for v in sorted(given))} (write $$ for a dollar sign)")
    return template


def constraint_lines(text: str) -> list[str]:
    """The non-empty lines of a rendered constraints template (e.g. ``step.txt``), one constraint each."""
    return [line.strip() for line in text.splitlines() if line.strip()]
