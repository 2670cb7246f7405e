"""One typed config tree: defaults, a config file, and ``--section.key=value`` overrides.

Unknown sections or keys fail loudly with the closest valid name. The resolved tree is saved first
into every run as ``runs/<id>/config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from critics.openai_vlm import DEFAULT_MAX_CONCURRENCY
from refine.dpo import UpdateConfig
from refine.regions import RegionConfig
from refine.student import DEFAULT_STUDENT


@dataclass
class StudentConfig:
    model: str = DEFAULT_STUDENT  # hub id or local dir of a VisionEncoderDecoderModel
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: str = "auto"  # auto: fp16 autocast on CUDA, fp32 on CPU
    num_beams: int = 1  # for the main caption (1 = greedy)
    n_samples: int = 2  # extra sampled captions per image, ranked by the critic into best ≻ worst pairs
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 20
    batch_size: int = 16
    static_cache: bool = False  # static KV cache; on CUDA, decoding compiled to CUDA graphs (see Student)


@dataclass
class CriticConfig:
    backend: str = "grounded"  # grounded | openai | florence2
    model: str = ""  # "" = the backend's default: gpt-4o (openai), florence-community/Florence-2-base
    base_url: str | None = None  # any OpenAI-compatible endpoint (vLLM, Ollama, ...)
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    max_retries: int = 4
    timeout: float = 60.0
    temperature: float = 0.0
    max_views: int = 4  # crops/tiles attached besides the full image
    template: str = "critique"


@dataclass
class StepConfig:
    max_words: int = 20  # TGD constraint: one sentence, at most this many words


@dataclass
class LoopConfig:
    images: str = ""  # named set, folder, glob or JSONL manifest
    rounds: int = 3
    seed: int = 0
    runs_dir: str = "runs"
    run_id: str = ""  # default: <timestamp>-<images>
    coco_root: str = ""  # local COCO dir for coco_val10 (val2017/, annotations/)
    max_critic_calls: int = 0  # 0 = unlimited; the run stops cleanly and stays resumable
    use_regions: bool = True  # run YOLO; skipped automatically where it cannot help (shapes)
    pair_sources: str = "refined,ranked"  # which preference pairs to build
    refine_samples: bool = True  # apply the textual step to sampled captions too, not only the main one
    swap_pairs: bool = False  # control experiment: train on rejected ≻ chosen
    eval_images: str = ""  # optional held-out set, captioned greedily after every round


@dataclass
class Config:
    loop: LoopConfig = field(default_factory=LoopConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    regions: RegionConfig = field(default_factory=RegionConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    step: StepConfig = field(default_factory=StepConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, type_: Any, where: str) -> Any:
    """Convert a string (from the CLI) or JSON value to the field's declared type."""
    origin = getattr(type_, "__origin__", None)
    args = [a for a in getattr(type_, "__args__", ()) if a is not type(None)]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in getattr(type_, "__args__", ())):
        return None
    if origin is tuple or type_ is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        return tuple(_coerce(v, inner, where) for v in items)
    if args and type_ not in (bool, int, float, str):  # Optional[X] / X | None
        type_ = args[0]
    try:
        if type_ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return type_(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r}: expected {getattr(type_, '__name__', type_)}") from None


def _set(config: Config, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(config)}
    if section not in sections or not key:
        hint = difflib.get_close_matches(section, sections, n=1)
        raise ValueError(f"unknown config section {dotted!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" Sections: {', '.join(sorted(sections))}")
    node = getattr(config, section)
    hints = get_type_hints(type(node))
    if key not in hints:
        hint = difflib.get_close_matches(key, hints, n=1)
        raise ValueError(f"unknown config key {dotted!r}" + (f"; did you mean '{section}.{hint[0]}'?" if hint else "")
                         + f" Keys of {section}: {', '.join(hints)}")
    setattr(node, key, _coerce(value, hints[key], dotted))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    if path.suffix == ".toml":
        if sys.version_info < (3, 11):
            raise ValueError(f"--config {path}: TOML needs Python 3.11+; use JSON")
        import tomllib

        return tomllib.loads(path.read_text())
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from e


def apply_dict(config: Config, data: dict[str, Any]) -> Config:
    """Apply a nested ``{section: {key: value}}`` dict (a config file, or a saved config.json)."""
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a table of keys, got {values!r}")
        for key, value in values.items():
            _set(config, f"{section}.{key}", value)
    return config


def config_reference(config: Config | None = None) -> str:
    """Every setting as ``--section.key=default``, one section per line group (for --help)."""
    config = config or Config()
    lines = []
    for section in dataclasses.fields(config):
        node = getattr(config, section.name)
        def show(value: Any) -> str:
            return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

        items = [f"--{section.name}.{f.name}={show(getattr(node, f.name))}" for f in dataclasses.fields(node)]
        lines.append(f"  {section.name}:")
        line = "   "
        for item in items:
            if len(line) + len(item) > 100:
                lines.append(line)
                line = "   "
            line += " " + item
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m refine.loop",
        description="Caption images with the student, critique them, apply the critique (the textual step), "
                    "and update the student with DPO on the resulting preference pairs, round after round. "
                    "Every round is recorded under runs/<id>/ (see python -m refine.runs).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Override any setting as --section.key=value. Settings and defaults:\n" + config_reference() + "\n\n"
            "Examples:\n"
            "  python -m refine.loop --images coco_val10 --critic.backend=openai --rounds 3\n"
            "  python -m refine.loop --images photos/ --critic.backend=openai --critic.base_url=http://localhost:8000/v1 "
            "--critic.model=Qwen/Qwen2.5-VL-7B-Instruct\n"
            "  python -m refine.loop --resume RUN --max-critic-calls 500"
        ),
    )


def load_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the CLI: ``--images``, ``--config FILE``, ``--resume RUN`` and dotted overrides."""
    parser = build_parser()
    parser.add_argument("--images", help="coco_val10 | shapes[:N] | shapes-heldout[:N] | a folder | a glob | a .jsonl manifest")
    parser.add_argument("--config", type=Path, help="a JSON (or TOML) file of {section: {key: value}}")
    parser.add_argument("--resume", metavar="RUN", help="continue runs/RUN (or a run dir path) after a crash or a budget stop")
    parser.add_argument("--rounds", type=int, help="shorthand for --loop.rounds")
    parser.add_argument("--coco-root", help="shorthand for --loop.coco_root")
    parser.add_argument("--max-critic-calls", type=int, help="shorthand for --loop.max_critic_calls")
    args, rest = parser.parse_known_args(argv)
    config = Config()
    if args.config:
        apply_dict(config, _read_file(args.config))
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognized argument {item!r}; overrides look like --section.key=value")
        _set(config, *item[2:].split("=", 1))
    for name, dotted in (("images", "loop.images"), ("rounds", "loop.rounds"), ("coco_root", "loop.coco_root"),
                         ("max_critic_calls", "loop.max_critic_calls")):
        if getattr(args, name) is not None:
            _set(config, dotted, getattr(args, name))
    if not config.loop.images and not args.resume:
        parser.error("--images is required (e.g. --images shapes, --images coco_val10, --images path/to/folder)")
    return config, args
