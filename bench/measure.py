"""What every section shares: repeated timing, figures with targets, the machine record, the table.

A ``Row`` is one measured quantity: its values over the repetitions (median, min and max are derived),
an optional target and what was measured earlier. A target is checked against the median, or against
every repetition for counts that must always hold (``on="all"``, e.g. "0 requests"). Missed targets
are printed as ``MISSED``; nothing is dropped from the table.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, "==": operator.eq}
_OP_TEXT = {">=": "≥", "<=": "≤", "==": "="}


@dataclass
class Target:
    """``value <op> threshold``, checked on the median (``on="median"``) or on every repetition (``"all"``)."""

    op: str
    threshold: float
    on: str = "median"

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"target op {self.op!r}: use one of {', '.join(_OPS)}")
        if self.on not in ("median", "all"):
            raise ValueError(f"target on={self.on!r}: use 'median' or 'all'")

    def met(self, values: list[float]) -> bool:
        checked = values if self.on == "all" else [statistics.median(values)]
        return all(_OPS[self.op](v, self.threshold) for v in checked)

    def text(self, unit: str) -> str:
        scope = " (every rep)" if self.on == "all" else ""
        return f"{_OP_TEXT[self.op]} {fmt(self.threshold)} {unit}".strip() + scope


@dataclass
class Row:
    section: str
    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    target: Target | None = None
    earlier: str = ""  # what was measured before this benchmark existed, for comparison
    note: str = ""
    error: str | None = None  # the measurement itself failed (not a missed target)
    skipped: str | None = None  # why it was not measured here (e.g. no GPU)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "ERROR"
        if self.skipped is not None:
            return self.skipped
        if not self.values or any(math.isnan(v) for v in self.values):
            return "no data" if self.target is None else "MISSED (no data)"
        if self.target is None:
            return ""
        return "met" if self.target.met(self.values) else "MISSED"

    def summary(self) -> dict[str, float | int | None]:
        if not self.values:
            return {"median": None, "min": None, "max": None, "n": 0}
        return {"median": statistics.median(self.values), "min": min(self.values), "max": max(self.values),
                "n": len(self.values)}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = None if self.target is None else {**asdict(self.target), "text": self.target.text(self.unit)}
        d.update(self.summary())
        d["status"] = self.status
        d["spread"] = spread(self.values)
        return d


NOISY_SPREAD = 1.5  # max / min across repetitions beyond which a figure is flagged as noisy


def spread(values: list[float]) -> float | None:
    """``max / min`` of positive values (None when undefined): how much the repetitions disagree."""
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) < 2 or min(finite) <= 0:
        return None
    return max(finite) / min(finite)


def error_row(section: str, name: str, error: BaseException) -> Row:
    return Row(section, name, "", error=f"{type(error).__name__}: {error}")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(wall seconds, result)`` of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def fmt(value: float | None) -> str:
    """Three significant figures, no exponent for the ranges we report."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Per-repetition ratios of paired measurements (same repetition, so machine drift mostly cancels)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators: pair them per repetition")
    return [n / d if d else float("nan") for n, d in zip(numerators, denominators)]


# --- the machine ---------------------------------------------------------------------------------


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


@dataclass(frozen=True)
class CPUSnapshot:
    """Machine-wide busy CPU seconds (``/proc/stat``) and this process tree's own CPU seconds (``os.times``:
    self plus waited-for children), at one instant. Two snapshots tell how much CPU *other* processes took."""

    wall: float
    busy: float | None
    ours: float

    @classmethod
    def take(cls) -> CPUSnapshot:
        t = os.times()
        return cls(time.perf_counter(), _machine_busy_seconds(), t.user + t.system + t.children_user + t.children_system)

    def others_share(self, later: CPUSnapshot, cores: int) -> float | None:
        """Fraction of the machine's CPU capacity that other processes used between the two snapshots."""
        if self.busy is None or later.busy is None or later.wall <= self.wall:
            return None
        others = (later.busy - self.busy) - (later.ours - self.ours)
        return max(0.0, others) / ((later.wall - self.wall) * max(1, cores))


def _machine_busy_seconds() -> float | None:
    """All CPUs' non-idle time since boot, from the first line of ``/proc/stat`` (None off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return busy / os.sysconf("SC_CLK_TCK")


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "ultralytics", "textgrad", "openai", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    import torch

    from refine.infra.devices import cpu_name

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_name(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "versions": versions(),
    }


# --- memory ----------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``); 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def max_rss_bytes() -> int:
    """Peak RSS of this process over its lifetime (``getrusage``; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RSSPeak:
    """The highest RSS seen while the block runs, sampled every ``interval`` seconds in a thread.

    ``getrusage`` only gives the lifetime peak; sampling gives one peak per repetition. A 10 ms period
    cannot miss a buffer that lives through a multi-second training step.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[RSSPeak]:
        self.peak = rss_bytes()
        self._stop.clear()
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, rss_bytes())


# --- the table ------------------------------------------------------------------------------------


def markdown_table(rows: list[Row]) -> str:
    header = "| section | measure | median | min | max | n | unit | target | status | measured earlier / notes |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        s = row.summary()
        ratio = spread(row.values)
        noisy = f"noisy: max/min {ratio:.1f}" if ratio is not None and ratio > NOISY_SPREAD else ""
        notes = "; ".join(x for x in (noisy, row.earlier, row.note, row.error or "") if x)
        target = row.target.text(row.unit) if row.target else ""
        status = f"**{row.status}**" if row.status.startswith(("MISSED", "ERROR")) else row.status
        cells = [row.section, row.name, fmt(s["median"]), fmt(s["min"]), fmt(s["max"]), str(s["n"]), row.unit,
                 target, status, notes]
        lines.append("| " + " | ".join(" ".join(c.split()).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
