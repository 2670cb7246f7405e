"""Devices, precision and threads: where and in what number format the models run.

Owns ``pick_device`` (a device this machine lacks is an error naming the setting), the precision
rules (``auto`` is fp16 on CUDA, fp32 on CPU; ``training_precision``: the update's, with what
``accelerate launch`` asked for), the autocast context, keeping torch's thread count
safe from libraries that change it, and ``numerics``: what besides the code and the seed decides
fp32 results on this machine.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from refine.config import PRECISIONS


def pick_device(device: str | None = None, setting: str = "device") -> torch.device:
    """``None`` or ``"auto"`` means CUDA when present, else CPU. A device that this machine lacks is a
    ``ValueError`` naming ``setting`` (the config key it came from)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"{setting}={device!r} is not a device name; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{setting}={device!r}: no such CUDA device here ({torch.cuda.device_count()} found); "
                         "use auto or cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{setting}={device!r}: MPS is not available here; use auto or cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is fp16 autocast on CUDA and fp32 on CPU.

    CPU autocast works but is very slow on small machines: one real-size bf16 DPO step took ~272 s
    against 7.4 s in fp32 on our 2-core CI box, so mixed precision is only a GPU default.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


@contextmanager
def preserved_torch_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count on exit: ultralytics' predict sets it to 1 for the process."""
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def numerics() -> dict[str, str]:
    """What besides the code, the seed and the thread count decides fp32 results on this machine: the CPU,
    the vector instructions torch's kernels use on it (``AVX512``, ``AVX2``, ...) and the torch build.

    One machine trains the same weights from the same seed bit for bit; a CPU with other vector
    instructions sums in another order and, over a thousand steps, trains a different model (seen with
    the demo's toy student: the same seed gave CHAIR_s 0.071 before the loop with AVX-512 kernels and
    0.062 with AVX2 kernels on one machine, 0.085 on another).
    """
    return {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def cpu_name() -> str:
    """``/proc/cpuinfo``'s model name with its family and model numbers (``Intel(R) Xeon(R) Processor
    (family 6, model 207)``: the name alone does not tell CPU generations apart); elsewhere, ``platform``'s."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def _accelerate_mixed_precision(accelerator=None) -> tuple[str, str]:
    """``(mixed precision, where it comes from)`` as accelerate sees it before ``update`` makes its own
    Accelerator: the one passed, the process-wide state an earlier Accelerator left when it casts, or
    the ``ACCELERATE_MIXED_PRECISION`` variable that ``accelerate launch --mixed_precision`` sets. A
    state that does not cast is the one ``update`` itself left in an earlier round: it says nothing, so
    every round reads the variable alike."""
    import os

    from accelerate.state import AcceleratorState

    if accelerator is not None:
        return str(accelerator.mixed_precision), "the Accelerator passed to update()"
    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != "no":
        return str(AcceleratorState().mixed_precision), "an Accelerator made earlier in this process"
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower(), "ACCELERATE_MIXED_PRECISION"


def training_precision(precision: str, device: torch.device, accelerator=None) -> str:
    """The precision ``update`` trains in: ``update.precision``, or for ``auto`` what ``accelerate launch
    --mixed_precision`` asked for, else fp16 on CUDA and fp32 on CPU.

    refine applies mixed precision itself (autocast, and a GradScaler for fp16); accelerate's own is
    left off, or every forward would be cast twice and fp16 losses scaled twice. An accelerate state
    that already applies mixed precision (a passed Accelerator, or one made earlier in this process,
    since accelerate's state is process-wide) would silently override ``update.precision``: that is an
    error naming both.
    """
    mixed, source = _accelerate_mixed_precision(accelerator)
    if accelerator is not None or source != "ACCELERATE_MIXED_PRECISION":
        if mixed != "no":
            raise ValueError(
                f"update.precision={precision}, but accelerate already applies mixed_precision={mixed} ({source}); "
                "refine applies precision itself: make that Accelerator with mixed_precision='no' and set "
                f"update.precision={mixed} instead")
        return resolve_precision(precision, device)
    if precision == "auto" and mixed in ("fp16", "bf16"):
        return mixed
    return resolve_precision(precision, device)


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device (an unindexed device means the current one)."""
    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" else 0

    return a.type == b.type and index(a) == index(b)
