"""Students of every architecture behind one interface (:class:`Student`); :func:`load_student` picks the
architecture from the checkpoint's config, so ``--student.model=ID_OR_DIR`` is the only switch."""

from __future__ import annotations

import os

from refine.config import DEFAULT_STUDENT
from refine.infra.devices import pick_device, resolve_precision
from refine.infra.hub import load_failure
from refine.students.base import (
    CaptionScorer,
    FastSampling,
    SpecialTokens,
    Student,
    TokenizedCaptions,
    image_seed,
    image_uniforms,
)

# model_type in the checkpoint's config.json -> the module that loads it
ARCHITECTURES = {
    "vision-encoder-decoder": "refine.students.ved",
    "blip": "refine.students.blip",
    "git": "refine.students.git",
    "blip-2": "refine.students.blip2",
}
QUANTIZE = ("none", "8bit", "4bit")
# How the loop's messages name load_student's arguments; refine.serve passes its own flags.
STUDENT_FLAGS = {"model": "student.model", "device": "student.device", "quantize": "quantize"}


def architecture(name: str, flag: str = "student.model") -> str:
    """The checkpoint's ``model_type``, refused with the supported ones named if refine has no student for it."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError) as e:
        raise load_failure("student", name, e, flag) from e
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{flag}={name}: a {model_type!r} model; refine's students are "
                         f"{', '.join(ARCHITECTURES)} (VisionEncoderDecoderModel, BLIP, GIT, BLIP-2)")
    return model_type


def load_student(
    name_or_dir: str | os.PathLike = DEFAULT_STUDENT,
    device: str | None = None,
    precision: str = "auto",
    static_cache: bool = False,
    quantize: str = "none",
    flags: dict[str, str] = STUDENT_FLAGS,
) -> Student:
    """Load a student (model, processor, tokenizer) from a hub id or a local directory.

    Weights stay in fp32 (they are the optimizer's master copy) unless ``quantize`` is ``8bit`` or
    ``4bit`` (bitsandbytes, CUDA only): for captioning and serving, not for the loop, whose rounds merge
    small updates into the weights. ``precision`` sets autocast; ``static_cache``: see :class:`Student`.
    ``flags`` names the arguments in error messages as the caller's user knows them.
    """
    import importlib

    dev = pick_device(device, flags["device"])  # before loading anything: a missing GPU fails at once
    name = str(name_or_dir)
    model_kwargs = _quantization(quantize, dev, flags["quantize"])
    module = importlib.import_module(ARCHITECTURES[architecture(name, flags["model"])])
    from safetensors import SafetensorError

    try:
        student = module.load(name, model_kwargs)
    except (OSError, SafetensorError) as e:  # SafetensorError: a weights file cut short
        raise load_failure("student", name, e, flags["model"]) from e
    if not model_kwargs:
        student.model.to(dev)
    student.device, student.precision, student.static_cache = dev, resolve_precision(precision, dev), static_cache
    return student


def _quantization(quantize: str, device, flag: str) -> dict:
    if quantize not in QUANTIZE:
        raise ValueError(f"{flag}={quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if quantize == "none":
        return {}
    if device.type != "cuda":
        raise ValueError(f"{flag}={quantize}: 8- and 4-bit weights need a CUDA device (bitsandbytes); "
                         f"this student loads on {device}. Use {flag}=none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"{flag}={quantize}: bitsandbytes is not installed; pip install bitsandbytes, "
                         f"or use {flag}=none") from None
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True) if quantize == "8bit" else BitsAndBytesConfig(load_in_4bit=True)
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


__all__ = ["ARCHITECTURES", "CaptionScorer", "FastSampling", "SpecialTokens", "Student", "TokenizedCaptions",
           "STUDENT_FLAGS", "architecture", "image_seed", "image_uniforms", "load_student"]
