"""Devices, precision and threads: where and in what number format the models run.

Owns ``pick_device`` (a device this machine lacks is an error naming the setting), the precision
rules (``auto`` is fp16 on CUDA, fp32 on CPU), the autocast context, and keeping torch's thread count
safe from libraries that change it.
"""

from __future__ import annotations

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
