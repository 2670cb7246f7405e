"""LoRA for the update (peft): adapters on a student's attention (and MLP) layers, trained instead of the
whole model, then merged back.

:func:`lora_model` wraps the student's model in fresh adapters for one round (targets per
architecture, ``Student.lora_targets``, unless ``update.lora_targets`` names them). The DPO reference is
the same model under :func:`adapters_disabled`, so no second copy is held. :func:`merge_lora` folds the
trained adapters into the weights, so the student saved as ``student/last`` loads with plain
``from_pretrained`` and no peft, and keeps the adapter itself (``Student.adapter``), which
``Student.save`` writes to ``adapter/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from refine.config import UpdateConfig
from refine.students import Student
from refine.students.base import vision_encoder


def targets(student: Student, config: UpdateConfig) -> list[str]:
    """The modules LoRA wraps, by full name: the linear layers named by ``update.lora_targets``
    (comma-separated; each must exist), else by the architecture's defaults that this model has, less
    those inside the vision encoder when ``update.freeze_encoder`` freezes it (an adapter there would
    never train). The loop calls it before the first round, so a wrong name fails before any critic call."""
    named = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
    wanted = named or list(student.lora_targets)
    what = f"update.lora_targets={','.join(wanted)}" if named else \
        f"LoRA's default targets for {student.kind} ({', '.join(wanted)}; set update.lora_targets)"
    linear = [(name, module) for name, module in student.model.named_modules()
              if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"]
    names = {name.rsplit(".", 1)[-1] for name, _ in linear}
    missing = [t for t in wanted if t not in names]
    if (named and missing) or len(missing) == len(wanted):
        raise ValueError(f"{what}: no linear layer named {', '.join(missing)} in this {student.kind} student; its "
                         f"linear layers are named {', '.join(sorted(names)[:16])}")
    encoder = vision_encoder(student.model) if config.freeze_encoder else None
    frozen = set(encoder.modules()) if encoder is not None else set()
    found = [name for name, module in linear if name.rsplit(".", 1)[-1] in wanted and module not in frozen]
    if not found:
        raise ValueError(f"{what}: every one of them is inside the vision encoder, which "
                         "update.freeze_encoder=true freezes; name decoder layers, or unfreeze the encoder")
    return found


def lora_model(student: Student, config: UpdateConfig) -> nn.Module:
    """``student.model`` with fresh LoRA adapters (peft); only the adapters require gradients."""
    import warnings

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=targets(student, config))
    with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself and says so
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        return get_peft_model(student.model, lora)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, disabled: bool = True) -> Iterator[None]:
    """The model without its adapters' contribution (the DPO reference), when ``disabled`` and it has any."""
    if disabled and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


def merge_lora(student: Student, model: nn.Module) -> nn.Module:
    """Fold the trained adapters into the weights; keep them on ``student.adapter`` for saving."""
    import copy

    from peft import get_peft_model_state_dict

    # The adapter applies to the student the round started from, which is a run directory's
    # student/<k>/, not the hub id peft recorded: leave the base unnamed rather than name a wrong one.
    config = copy.copy(model.peft_config["default"])
    config.base_model_name_or_path = None
    student.adapter = (config, {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
    merged = model.merge_and_unload()
    merged.eval()
    return merged
