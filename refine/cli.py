"""The loop's command line: ``--images``, ``--config FILE``, ``--resume RUN``, the shorthands, and any
setting as ``--section.key=value`` (or ``--section.key value``), parsed into a validated ``Config``.

``--help`` lists every setting with its default and its meaning. The meanings are the comments beside
and above each field in ``refine/config.py`` (read from its source, as simple-parsing reads dataclass
field docs), so a setting is documented in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from functools import cache
from pathlib import Path
from typing import Any

from refine.config import (
    RESUMABLE_KEYS,
    Config,
    ConfigError,
    canonical_key,
    file_overrides,
    read_config_file,
    set_value,
)

_FIELD = re.compile(r"^\s+(\w+)\s*:")


def _trailing_comment(line: str) -> str:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return ""
    return next((t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT), "")


@cache
def setting_docs(cls: type) -> dict[str, str]:
    """``{field: meaning}`` for a config dataclass: the comment block above a field and the comment
    beside it, joined. Empty when the source cannot be read (a frozen app, say)."""
    try:
        lines = inspect.getsource(cls).splitlines()[1:]
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    block: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in names:
            docs[match.group(1)] = " ".join(filter(None, [*block, _trailing_comment(line)]))
        block = []
    return docs


def config_reference(config: Config | None = None, width: int = 100) -> str:
    """Every setting as ``--section.key=default`` with its meaning, one group per section (for --help)."""
    config = config or Config()
    lines = []
    for section in dataclasses.fields(config):
        node = getattr(config, section.name)
        docs = setting_docs(type(node))
        lines.append(f"  {section.name}:")
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            flag = f"    --{section.name}.{f.name}={','.join(map(str, value)) if isinstance(value, tuple) else value}"
            doc = docs.get(f.name, "")
            if not doc:
                lines.append(flag)
            elif len(flag) <= 38:
                lines.extend(textwrap.wrap(doc, width, initial_indent=flag.ljust(40), subsequent_indent=" " * 40))
            else:
                lines.append(flag)
                lines.extend(textwrap.wrap(doc, width, initial_indent=" " * 40, subsequent_indent=" " * 40))
    return "\n".join(lines)


class UsageError(ValueError):
    """A command line that cannot run (argparse's own errors exit through it instead of SystemExit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump; the caller exits with 2
        raise UsageError(f"{message} (see python -m refine.loop --help)")


def build_parser() -> argparse.ArgumentParser:
    return _Parser(
        prog="python -m refine.loop",
        description="Caption images with the student, critique them, apply the critique (the textual step), "
                    "and update the student with DPO on the resulting preference pairs, round after round. "
                    "Every round is recorded under runs/<id>/ (see python -m refine.runs).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Override any setting as --section.key=value (or --section.key value). Settings, defaults and what "
            "they do:\n" + config_reference() + "\n\n"
            "Examples:\n"
            "  python -m refine.loop --images coco_val10 --critic.backend=openai --rounds 3\n"
            "  python -m refine.loop --images photos/ --critic.backend=openai --critic.base_url=http://localhost:8000/v1 "
            "--critic.model=Qwen/Qwen2.5-VL-7B-Instruct\n"
            "  python -m refine.loop --resume RUN --max-critic-calls 500 --critic.base_url=http://other:8000/v1\n\n"
            "On --resume, only settings that do not change what the rounds already run compute may change: "
            + ", ".join(sorted(RESUMABLE_KEYS)) + "."
        ),
    )


def dotted_overrides(rest: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``--section.key=value`` and ``--section.key value`` items as ``{"section.key": value}``."""
    overrides: dict[str, str] = {}
    spelled: dict[str, dict[str, str]] = {}  # canonical key -> {spelling: its last value}
    items = iter(rest)
    for item in items:
        if not item.startswith("--"):
            parser.error(f"unrecognized argument {item!r}; overrides look like --section.key=value")
        if "=" in item:
            key, value = item[2:].split("=", 1)
        else:
            key, value = item[2:], next(items, None)
            if "." not in key:
                parser.error(f"unrecognized argument {item!r}; overrides look like --section.key=value")
            if value is None or value.startswith("--"):
                parser.error(f"{item} needs a value: {item}=VALUE")
        canonical = canonical_key(key)  # --update.lora.r=16 is --update.lora_r=16
        spellings = spelled.setdefault(canonical, {})
        other = next(((k, v) for k, v in spellings.items() if k != key and v != value), None)
        if other is not None:  # one spelling given twice takes the last, as argparse does; two may not disagree
            parser.error(f"--{other[0]}={other[1]} and --{key}={value} set the same setting; give it once")
        spellings[key] = overrides[canonical] = value
    return overrides


_NO_LORA = "there are no LoRA adapters (update.lora_r is 0); give --update.lora_r=N too, or leave it out"
_NO_DPO = "update.mode=sft trains no DPO; use --update.mode=dpo or sft+dpo, or leave it out"
# Settings that do nothing unless the rest of the config uses them: (key, whether it is used, why not).
_NO_OPS = [
    ("update.lora_alpha", lambda c: c.update.lora_r > 0, _NO_LORA),
    ("update.lora_targets", lambda c: c.update.lora_r > 0, _NO_LORA),
    ("update.sft_epochs", lambda c: c.update.mode == "sft+dpo", "it counts the SFT epochs of update.mode=sft+dpo; "
                                                                 "in another mode update.epochs counts them"),
    *[(key, lambda c: c.update.mode != "sft", _NO_DPO)
      for key in ("update.beta", "update.nll_weight", "update.loss", "update.label_smoothing",
                  "update.image_negatives")],
    ("loop.verify_by", lambda c: c.loop.verify_refinements, "it says how verification judges a refinement, and "
                                                            "there is none: add --loop.verify_refinements=true"),
    ("loop.min_agreement", lambda c: c.critic.samples > 1, "it is the share of critic.samples that must agree, and "
                                                           "critic.samples=1 asks one critique"),
    ("loop.agree_by", lambda c: c.critic.samples > 1, "it says what critic.samples' critiques vote on, and "
                                                      "critic.samples=1 asks one critique"),
    ("critic.temperature", lambda c: c.critic.backend == "openai", "only the openai critic samples"),
    *[(key, lambda c: c.student.n_samples > 0, "it shapes the sampled captions, and student.n_samples=0 draws none")
      for key in ("student.temperature", "student.top_p")],
]


def check_effect(config: Config, overrides: dict[str, Any], resume: str | None = None) -> None:
    """Refuse a setting given a value other than its default that the rest of the config makes a no-op
    (a saved config.json, which holds every default, passes)."""
    default = type(config.loop).eval_every
    if "loop.eval_every" in overrides and config.loop.eval_every != default and not config.loop.eval_images:
        raise ConfigError(f"loop.eval_every={config.loop.eval_every}: there is nothing to evaluate; " + (
            f"run {resume} has no held-out images (loop.eval_images), and a resume cannot add them" if resume
            else "give the held-out images as --loop.eval_images=SET too"))
    defaults = Config()
    for key, used, why in _NO_OPS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if key in overrides and value != getattr(getattr(defaults, section), name) and not used(config):
            raise ConfigError(f"{key}={value}: it does nothing here: {why}")


def load_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the CLI: ``--images``, ``--config FILE``, ``--resume RUN`` and dotted overrides.

    Returns the validated config and the parsed flags; ``args.overrides`` holds every dotted key that
    the command line or the config file set (a resume checks them against ``RESUMABLE_KEYS``).
    """
    parser = build_parser()
    parser.add_argument("--images", help="coco_val10 | shapes[:N] | shapes-val:N | shapes-heldout[:N] | a folder | a glob | "
                                         "a .jsonl manifest | hf:DATASET[:split]")
    parser.add_argument("--config", type=Path, help="a JSON (or TOML) file of {section: {key: value}}")
    parser.add_argument("--resume", metavar="RUN", help="continue runs/RUN (or a run dir path) after a crash, a stop or Ctrl-C, or a finished run with more --rounds")
    parser.add_argument("--rounds", help="shorthand for --loop.rounds")
    parser.add_argument("--coco-root", help="shorthand for --loop.coco_root")
    parser.add_argument("--max-critic-calls", help="shorthand for --loop.max_critic_calls")
    args, rest = parser.parse_known_args(argv)
    config = Config()
    overrides = file_overrides(read_config_file(args.config), f"--config {args.config}") if args.config else {}
    given = dotted_overrides(rest, parser)
    for name, dotted in (("images", "loop.images"), ("rounds", "loop.rounds"), ("coco_root", "loop.coco_root"),
                         ("max_critic_calls", "loop.max_critic_calls")):
        if getattr(args, name) is not None:
            if dotted in given and str(given[dotted]) != str(getattr(args, name)):
                parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} and --{dotted}={given[dotted]} set "
                             "the same setting; give it once")
            given[dotted] = getattr(args, name)
    overrides.update(given)  # the command line over the config file
    for key, value in overrides.items():
        set_value(config, key, value)
    if not config.loop.images and not args.resume:
        parser.error("--images is required (e.g. --images shapes, --images coco_val10, --images path/to/folder)")
    args.overrides = overrides
    config.validate()
    if not args.resume:  # a resume checks the run's own config, once merged (loop._reopen)
        check_effect(config, overrides)
    return config, args


def absolute_paths(config: Config) -> None:
    """Store file paths absolute, so a resume or a score from another directory finds the same files."""
    def absolute(value: str) -> str:
        from refine.images import world_of

        if not value or world_of(value) or value == "coco_val10":
            return value
        if value.startswith("hf:"):  # a saved dataset or imagefolder path; a hub name stays as it is
            from refine.images.hf import parse

            name, split = parse(value)
            return "hf:" + absolute(name) + (f":{split}" if split else "")
        if Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        if any(ch in value for ch in "*?[") and not Path(value).is_absolute():  # a glob
            return str(Path.cwd() / value)
        return value  # a hub id, or a name ultralytics resolves

    loop = config.loop
    loop.images, loop.eval_images = absolute(loop.images), absolute(loop.eval_images)
    loop.coco_root = absolute(loop.coco_root)
    config.student.model, config.regions.model = absolute(config.student.model), absolute(config.regions.model)
    loop.runs_dir = str(Path(loop.runs_dir).expanduser().resolve())


def default_run_id(images: str) -> str:
    """A new run's id when none is given: the time, then the image set's name made a plain folder name
    (a glob's ``*.jpg`` or an ``hf:`` spec would make an awkward one)."""
    from datetime import datetime

    name = re.sub(r"[^\w.-]+", "-", Path(images).name).strip("-.") or "images"
    return f"{datetime.now():%Y%m%d-%H%M%S}-{name}"
