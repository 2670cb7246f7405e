"""One typed config tree: defaults, a config file, and dotted overrides (``refine.cli`` parses the
command line into them). The comment beside or above each field is its documentation: ``--help``
prints it.

Every config dataclass and every default lives here, and this module imports nothing heavy (no torch,
no transformers, no stage): the stages import their config from it, never the reverse.

Unknown sections or keys fail loudly with the closest valid name, and every value is checked (type,
choices, ranges) after all overrides are applied, so a bad setting is refused before a run directory
exists or a paid call is made. The resolved tree is saved first into every run as
``runs/<id>/config.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlparse

DEFAULT_STUDENT = "nlpconnect/vit-gpt2-image-captioning"
DEFAULT_OPENAI_MODEL = "gpt-4o"
DEFAULT_FLORENCE2_MODEL = "florence-community/Florence-2-base"
# Requests in flight at once (critiques, and textual steps). A round's wall time against a remote API
# is about (images / concurrency) x latency, so this is the knob that makes a run API-bound rather
# than loop-bound. 16 stays inside OpenAI's lowest paid tiers; raise it for vLLM, lower it for Ollama.
DEFAULT_MAX_CONCURRENCY = 16

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Backend = Literal["grounded", "openai", "florence2"]
LossType = Literal["sigmoid", "robust"]
UpdateMode = Literal["dpo", "sft", "sft+dpo"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
BACKENDS: tuple[str, ...] = get_args(Backend)
PAIR_SOURCES = ("refined", "ranked")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A setting that cannot be used. The message names the setting and what to write instead."""


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


@dataclass
class StudentConfig:
    model: str = DEFAULT_STUDENT  # hub id or local dir: VisionEncoderDecoderModel (ViT/CLIP + GPT-2/BERT), BLIP, GIT, BLIP-2
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: Precision = "auto"  # auto: fp16 autocast on CUDA, fp32 on CPU
    num_beams: int = 1  # for the main caption (1 = greedy)
    n_samples: int = 2  # extra sampled captions per image, ranked by the critic into best ≻ worst pairs
    temperature: float = 1.0  # sampling temperature of the sampled captions
    top_p: float = 1.0  # nucleus sampling of the sampled captions (1 = off)
    max_new_tokens: int = 20  # longest caption, in tokens
    batch_size: int = 16  # images per captioning batch
    static_cache: bool = False  # static KV cache; on CUDA, decoding compiled to CUDA graphs (see Student)

    def validate(self) -> None:
        _require(bool(self.model.strip()), "student.model", self.model, "name a hub id or a local directory")
        _require(bool(_DEVICE.match(self.device)), "student.device", self.device,
                 "use auto, cpu, cuda, cuda:N or mps")
        _require(self.num_beams >= 1, "student.num_beams", self.num_beams, "must be >= 1 (1 = greedy)")
        _require(self.n_samples >= 0, "student.n_samples", self.n_samples, "must be >= 0 (0 = no sampled captions)")
        _require(self.temperature > 0, "student.temperature", self.temperature, "must be > 0, e.g. 1.0")
        _require(0 < self.top_p <= 1, "student.top_p", self.top_p, "must be in (0, 1], e.g. 1.0")
        _require(self.max_new_tokens >= 1, "student.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _require(self.batch_size >= 1, "student.batch_size", self.batch_size, "must be >= 1 images per batch")


@dataclass
class RegionConfig:
    model: str = "yolov8n.pt"  # any ultralytics weights path or model yaml ("yolov8n.yaml": random, offline)
    grids: tuple[int, ...] = (2, 3)  # zoom levels: g x g sliding windows, besides the full image
    overlap: float = 0.2  # fraction of a tile shared with its neighbour (SAHI's default)
    imgsz: int = 320  # detector input size; small, since tiles are already zoomed in
    conf: float = 0.25  # detector confidence threshold (ultralytics' default)
    merge_iou: float = 0.5  # match threshold for merging boxes across tiles and zooms (SAHI's default)
    top_k_crops: int = 4  # object crops shown to the critic, most confident first
    crop_pad: float = 0.15  # context around a crop, as a fraction of the object's width / height
    max_tile_views: int = 2  # zoomed tiles shown to the critic
    device: str | None = None  # ultralytics device string; None lets ultralytics choose

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.grids = tuple(self.grids)
        _require(all(isinstance(g, int) and g >= 2 for g in self.grids), "regions.grids", self.grids,
                 "each zoom level must be an integer >= 2 (the full image is always searched); e.g. 2,3")
        _require(0 <= self.overlap < 1, "regions.overlap", self.overlap, "must be in [0, 1); e.g. 0.2")
        _require(self.imgsz >= 1, "regions.imgsz", self.imgsz, "must be >= 1 pixels")
        for name in ("top_k_crops", "max_tile_views"):
            _require(getattr(self, name) >= 0, f"regions.{name}", getattr(self, name), "must be >= 0")
        for name in ("conf", "merge_iou"):
            _require(0 <= getattr(self, name) <= 1, f"regions.{name}", getattr(self, name), "must be in [0, 1]")
        _require(self.crop_pad >= 0, "regions.crop_pad", self.crop_pad, "must be >= 0")

    def detection_params(self) -> dict[str, Any]:
        """What determines the raw detections (the cache key). Merging and views are redone on a hit."""
        return {"grids": list(self.grids), "overlap": self.overlap, "imgsz": self.imgsz, "conf": self.conf}


@dataclass
class CriticConfig:
    backend: Backend = "grounded"  # openai (any OpenAI-compatible VLM), florence2 (local), grounded (annotations)
    model: str = ""  # "" = the backend's default: gpt-4o (openai), florence-community/Florence-2-base
    base_url: str | None = None  # any OpenAI-compatible endpoint (vLLM, Ollama, ...)
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable that holds the API key
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY  # requests in flight (16 fits OpenAI's lowest paid tiers)
    max_retries: int = 4  # retries of a failed request, with backoff, before it counts as failed
    timeout: float = 60.0  # seconds per request attempt
    temperature: float = 0.0  # the critic's sampling temperature (> 0 for critic.samples > 1)
    max_views: int = 4  # crops/tiles attached besides the full image
    template: str = "critique"  # the prompt template in prompts/ (prompts/critique.txt)
    # Agreement (a defence against a wrong critic): critiques per caption. With more than one, a
    # refinement becomes a training pair only if more than loop.min_agreement of them agree on it (name
    # the same objects with the same counts, in any wording; loop.agree_by=object: on each object's count).
    # For the OpenAI critic each sample is its own request (use temperature > 0); for the grounded critic
    # each sample draws its own noise.
    samples: int = 1
    # The grounded critic's error rate per object and critique (a test harness for defences): it misses
    # hallucinations, flags present objects, miscounts, drops or swaps objects. 0 = perfect.
    noise: float = 0.0
    seed: int = 0  # seeds the grounded critic's noise (per image, caption and sample)

    def validate(self) -> None:
        _require(self.samples >= 1, "critic.samples", self.samples, "must be >= 1 critiques per caption")
        _require(0 <= self.noise < 1, "critic.noise", self.noise, "must be in [0, 1)")
        _require(self.noise == 0 or self.backend == "grounded", "critic.noise", self.noise,
                 "only the grounded critic can be made noisy; set it to 0 or use --critic.backend=grounded")
        if self.base_url is not None:
            url = urlparse(self.base_url)
            _require(url.scheme in ("http", "https") and bool(url.netloc), "critic.base_url", self.base_url,
                     "must be an http(s) URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1")
        _require(bool(self.api_key_env.strip()), "critic.api_key_env", self.api_key_env,
                 "name the environment variable that holds the API key")
        _require(self.max_concurrency >= 1, "critic.max_concurrency", self.max_concurrency, "must be >= 1")
        _require(self.max_retries >= 0, "critic.max_retries", self.max_retries, "must be >= 0")
        _require(self.timeout > 0, "critic.timeout", self.timeout, "must be > 0 seconds, e.g. 60")
        _require(0 <= self.temperature <= 2, "critic.temperature", self.temperature, "must be in [0, 2]")
        _require(self.max_views >= 0, "critic.max_views", self.max_views, "must be >= 0")
        _require(bool(self.template.strip()), "critic.template", self.template, "name a template in prompts/")


@dataclass
class StepConfig:
    max_words: int = 20  # a refined caption is one sentence of at most this many words (10% tolerance)
    # A caption the critic approves (no wrong, missing or miscounted object, full score) is kept as it is:
    # a rewrite of it would make a pair that teaches wording, not grounding. True revises it anyway.
    revise_approved: bool = False

    def validate(self) -> None:
        _require(self.max_words >= 1, "step.max_words", self.max_words, "must be >= 1")


@dataclass
class UpdateConfig:
    beta: float = 0.1  # DPO's β: how far the student may move from the reference, per unit of preference
    nll_weight: float = 0.5  # weight of the per-token NLL on the chosen caption
    lr: float = 1e-5  # RAdam's learning rate
    epochs: int = 1  # passes over the round's pairs
    batch_size: int = 8  # pairs per optimizer step
    max_grad_norm: float = 1.0  # gradient clipping
    # An update in progress saves its state (weights, optimizer, steps taken) this often and on a stop, so a
    # crash loses at most this much training and a resume goes on from there; 0 = on a stop only.
    save_minutes: float = 10.0
    precision: Precision = "auto"  # auto: fp16 + GradScaler on CUDA, fp32 on CPU (or what accelerate launch set)
    freeze_encoder: bool = False  # train only the decoder (and cross-attention)
    seed: int = 0  # seeds the update: initialisation of adapters, pair order, mDPO's corrupted images
    # Robust losses against flipped preferences (TRL's loss_type options): "sigmoid" with label_smoothing
    # is conservative DPO (Mitchell 2023); "robust" is Chowdhury et al. 2024's unbiased estimator.
    loss: LossType = "sigmoid"
    label_smoothing: float = 0.0  # the assumed share of flipped pairs, ε
    # mDPO (Wang et al. 2024): also prefer the chosen caption with its image over the same caption with
    # a corrupted image (a crop keeping 0-20% of it), plus the anchor that keeps the chosen reward > 0.
    image_negatives: bool = False
    # What the round trains: dpo (DPO + NLL against the round's starting student), sft (cross-entropy on
    # the chosen captions, `epochs` of it), or sft+dpo (`sft_epochs` of SFT, then DPO against the result).
    mode: UpdateMode = "dpo"
    sft_epochs: int = 1  # in sft+dpo: passes of SFT before the DPO epochs
    # LoRA (peft): r > 0 trains adapters only (--update.lora.r=16, or [update.lora] r = 16 in a TOML file, works
    # too); targets default per architecture.
    lora_r: int = 0
    lora_alpha: int = 32  # LoRA's scale: an adapter adds alpha / r x its output (no dropout in updates, as in TRL)
    lora_targets: str = ""  # comma-separated module names to adapt; empty = the architecture's default

    def validate(self) -> None:
        _require(0 < self.beta < math.inf, "update.beta", self.beta, "must be > 0 and finite, e.g. 0.1")
        _require(0 <= self.nll_weight < math.inf, "update.nll_weight", self.nll_weight, "must be >= 0 and finite")
        _require(0 < self.lr < math.inf, "update.lr", self.lr, "must be > 0 and finite, e.g. 1e-5")
        _require(self.lora_alpha > 0, "update.lora_alpha", self.lora_alpha, "must be > 0 (an adapter adds alpha / r x "
                 "its output: 0 trains nothing)")
        _require(self.epochs >= 0, "update.epochs", self.epochs, "must be >= 0")
        _require(self.sft_epochs >= 0, "update.sft_epochs", self.sft_epochs, "must be >= 0")
        _require(self.lora_r >= 0, "update.lora_r", self.lora_r, "must be >= 0 (0 = train the whole model)")
        _require(self.batch_size >= 1, "update.batch_size", self.batch_size, "must be >= 1 pairs per step")
        _require(0 < self.max_grad_norm < math.inf, "update.max_grad_norm", self.max_grad_norm, "must be > 0 and finite")
        _require(0 <= self.save_minutes < math.inf, "update.save_minutes", self.save_minutes,
                 "must be >= 0 and finite minutes (0 = save an update's progress only on a stop)")
        _require(0 <= self.label_smoothing < 0.5, "update.label_smoothing", self.label_smoothing,
                 "must be in [0, 0.5): the assumed share of flipped preferences")


@dataclass
class LoopConfig:
    # coco_val10, shapes[:N], shapes-val:N, shapes-heldout[:N], a folder, a glob, a .jsonl manifest, hf:DATASET[:split]
    images: str = ""
    rounds: int = 3  # caption → critique → step → update cycles
    seed: int = 0  # seeds the sampled captions and, with images_per_round, the order of the images
    runs_dir: str = "runs"  # where run directories go
    run_id: str = ""  # default: <timestamp>-<images>
    coco_root: str = ""  # local COCO dir for coco_val10 (val2017/, annotations/)
    max_critic_calls: int = 0  # 0 = unlimited; the run stops cleanly and stays resumable
    # A round whose critiques (or steps) fail more often than this stops the run (non-zero exit,
    # resumable); the failed requests are asked again on --resume. 1.0 never stops.
    max_failure_share: float = 0.5
    use_regions: bool = True  # run YOLO; skipped where the image set says it cannot help (shapes)
    pair_sources: str = "refined,ranked"  # which preference pairs to build
    refine_samples: bool = True  # apply the textual step to sampled captions too, not only the main one
    swap_pairs: bool = False  # control experiment: train on rejected ≻ chosen
    # held-out images (any --images spec), captioned greedily and scored; annotated, they rank student/best
    eval_images: str = ""
    eval_every: int = 1  # evaluate the student entering rounds 0, N, 2N, ... and always the final one (0: only it)
    # Images per round: 0 = the whole set every round; N = a fresh slice of N each round (one fixed shuffle
    # by loop.seed, wrapping around), for sets too large to caption whole every round.
    images_per_round: int = 0
    # Experiment trackers through accelerate: tensorboard, mlflow, wandb, a comma-separated list, or all.
    log_with: str = ""
    image_column: str = ""  # hf:DATASET sets: the column of the images (empty: found by name; refine.images.hf)
    caption_column: str = ""  # hf:DATASET sets: the column of the reference captions (empty: found by name)
    objects_column: str = ""  # hf:DATASET sets: the column of the object annotations (empty: found by name)
    # Defences against a wrong critic (see README, "A critic that is sometimes wrong"):
    verify_refinements: bool = False  # critique each refined caption too; its pair keeps what that confirms
    # How the refined caption's critique confirms it: score (it must score the rewrite above the original),
    # edits (it must not contradict the objects the rewrite removed, added or recounted; errors about
    # untouched objects do not count: cleaner pairs, but half as many at 25% noise, and a smaller cut),
    # or repair (the edits it contradicts are undone and the rest kept; README, "A critic that is
    # sometimes wrong"). A rewrite that changes no object is judged by score.
    verify_by: str = "score"
    min_agreement: float = 0.5  # with critic.samples > 1: a refinement needs more than this share of votes
    # What the critiques vote on: caption (a whole refinement needs the share: few pairs in dense scenes,
    # where critiques that err rarely name all the same objects) or object (each object's count needs it,
    # and the original is rewritten to the counts decided; an object without a majority stays as it was).
    agree_by: str = "caption"
    pair_gate: bool = False  # reject refinements that name no object or have under a third of the original's words

    def validate(self) -> None:
        _require(self.rounds >= 0, "loop.rounds", self.rounds, "must be >= 0")
        _require(self.eval_every >= 0, "loop.eval_every", self.eval_every, "must be >= 0 (0 = the final student only)")
        _require(self.images_per_round >= 0, "loop.images_per_round", self.images_per_round,
                 "must be >= 0 (0 = every image every round)")
        _require(self.max_critic_calls >= 0, "loop.max_critic_calls", self.max_critic_calls,
                 "must be >= 0 (0 = unlimited)")
        _require(self.verify_by in ("score", "edits", "repair"), "loop.verify_by", self.verify_by,
                 "must be score, edits or repair")
        _require(self.agree_by in ("caption", "object"), "loop.agree_by", self.agree_by, "must be caption or object")
        _require(0 <= self.min_agreement < 1, "loop.min_agreement", self.min_agreement,
                 "must be in [0, 1): a refinement needs more than this share of the critiques to agree")
        _require(0 <= self.max_failure_share <= 1, "loop.max_failure_share", self.max_failure_share,
                 "must be in [0, 1] (a share of a round's requests; 1 = never stop)")
        sources = [s.strip() for s in self.pair_sources.split(",") if s.strip()]
        _require(bool(sources) and set(sources) <= set(PAIR_SOURCES), "loop.pair_sources", self.pair_sources,
                 f"a comma-separated subset of {','.join(PAIR_SOURCES)}")
        _require(bool(self.runs_dir.strip()), "loop.runs_dir", self.runs_dir, "name a directory")
        _require(self.run_id == "" or (self.run_id.strip() == self.run_id and "/" not in self.run_id
                                       and self.run_id not in (".", "..")), "loop.run_id", self.run_id,
                 "must be a plain folder name (no '/', no surrounding spaces)")


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

    def validate(self) -> Config:
        """Check every section (types were checked as values were set); raises ``ConfigError``."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        return self


def _type_name(type_: Any) -> str:
    if get_origin(type_) is Literal:
        return " | ".join(map(str, get_args(type_)))
    return getattr(type_, "__name__", str(type_))


def coerce(value: Any, type_: Any, where: str) -> Any:
    """Convert a string (from the CLI) or JSON value to the field's declared type, or raise ``ConfigError``."""
    origin, args = get_origin(type_), get_args(type_)
    optional = type(None) in args
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: must not be null; give a value of type {_type_name(type_)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if origin is tuple or type_ is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list (or comma-separated values)")
        inner = args[0] if args else str
        return tuple(coerce(v, inner, where) for v in items)
    if optional:  # X | None
        type_ = next(a for a in args if a is not type(None))
    if type_ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
    elif type_ is int and not isinstance(value, (bool, float)):
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
    elif type_ is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif type_ is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}={value!r}: expected {_type_name(type_)}")


# Settings that earlier versions wrote into config.json: (the value that meant "off", why the key went).
# A saved config with the off value still loads (old runs resume and score); any other value, or the
# key on a command line, is refused with the reason.
RETIRED = {
    "student.quantize": ("none", "the loop merges each round's update into the weights, which 8/4 bits would "
                                 "round away; quantize where you serve: python -m refine.serve DIR --quantize 8bit"),
}


def set_value(config: Config, dotted: str, value: Any) -> None:
    if dotted in RETIRED:
        raise ConfigError(f"{dotted} is no longer a setting: {RETIRED[dotted][1]}")
    section, _, key = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(config)}
    if section not in sections or not key:
        hint = difflib.get_close_matches(section, sections, n=1)
        raise ConfigError(f"unknown config section {dotted!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                          + f" Sections: {', '.join(sorted(sections))}")
    node = getattr(config, section)
    hints = get_type_hints(type(node))
    if key not in hints:
        hint = difflib.get_close_matches(key, hints, n=1)
        raise ConfigError(f"unknown config key {dotted!r}" + (f"; did you mean '{section}.{hint[0]}'?" if hint else "")
                          + f" Keys of {section}: {', '.join(hints)}")
    setattr(node, key, coerce(value, hints[key], dotted))


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON or TOML file of ``{section: {key: value}}``; every error names the file."""
    if path.is_dir():
        raise ConfigError(f"--config {path}: a folder; give the JSON or TOML file in it")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot be read ({e})") from None
    if path.suffix.lower() == ".toml":
        if sys.version_info < (3, 11):
            raise ConfigError(f"--config {path}: TOML needs Python 3.11+; use JSON")
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a table of sections, "
                          f'{{"student": {{"batch_size": 8}}, ...}}, not a {type(data).__name__}')
    return data


# Settings that may be spelled as a sub-table: --update.lora.r=16, or r = 16 under [update.lora] in a
# TOML file, is update.lora_r.
SUBTABLES = ("update.lora",)


def canonical_key(dotted: str) -> str:
    """``"update.lora.r"`` -> ``"update.lora_r"``; any other key as it is."""
    for table in SUBTABLES:
        if dotted.startswith(table + "."):
            return table + "_" + dotted.removeprefix(table + ".")
    return dotted


def flatten(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``{section: {key: value}}`` as ``{"section.key": value}`` (a sub-table's keys through
    :func:`canonical_key`); ``source`` names the file in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a table of sections, not a {type(data).__name__}")
    out: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a table of keys, got {values!r}")
        for key, value in values.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]  # [update.lora] r = 16
            for sub, v in items:
                dotted = canonical_key(f"{section}.{key}" + (f".{sub}" if sub is not None else ""))
                if dotted in out and out[dotted] != v:
                    raise ConfigError(f"{source}: {dotted} is given twice ({out[dotted]!r} and {v!r}); give it once")
                out[dotted] = v
    return out


def file_overrides(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A config file's (or a saved config.json's) ``{section: {key: value}}`` as dotted overrides. A
    retired key at its off value is dropped (older versions saved it); any other value is refused."""
    out: dict[str, Any] = {}
    for key, value in flatten(data, source).items():
        if key in RETIRED:
            off, why = RETIRED[key]
            if value == off:
                continue
            raise ConfigError(f"{source}: {key}={value} is no longer a setting: {why}")
        out[key] = value
    return out


def apply_dict(config: Config, data: dict[str, Any], source: str = "config") -> Config:
    """Apply a nested ``{section: {key: value}}`` dict (a config file, or a saved config.json), then validate."""
    for key, value in file_overrides(data, source).items():
        set_value(config, key, value)
    return config.validate()


# Settings a resume may change: where and how requests go, the budget, how often it evaluates and how many
# rounds it runs (more go on from a finished run), the update's learning rate (an update that diverged is
# taken again lower; the rounds done keep theirs) and how often it saves its progress. Any other would make
# later rounds disagree with earlier.
RESUMABLE_KEYS = frozenset({
    "critic.base_url", "critic.api_key_env", "critic.max_concurrency", "critic.max_retries", "critic.timeout",
    "loop.max_critic_calls", "loop.max_failure_share", "loop.log_with", "loop.rounds", "loop.eval_every",
    "update.lr", "update.save_minutes",
})
