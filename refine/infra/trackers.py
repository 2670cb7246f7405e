"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) through accelerate's tracker classes.

``--loop.log_with=tensorboard`` (or ``mlflow``, ``wandb``, a comma-separated list, or ``all``: every one
of the three that is installed) logs each optimizer step of the update under TRL's names
(``train/loss``, ``train/rewards/chosen``, ``train/rewards/margins``, ``train/logps/chosen``, ...) at
the run's cumulative optimizer step, and each round's metrics under ``round/<name>`` at the round's
index. TensorBoard and MLflow keep a step per series. W&B keeps one step for all and drops a value
logged below the highest it has seen, so there each series carries its axis as a value
(``train/step``, ``round/index``) and ``define_metric`` plots it against that. The config goes in as
hyperparameters. TensorBoard writes into
``runs/<id>/trackers/``; MLflow (experiment ``refine``) and W&B (project ``refine``) name the run after
the run directory and go where their own settings say (``MLFLOW_TRACKING_URI``, ``WANDB_MODE``, ...).
Only the main process logs.

The trackers are used directly, not through an ``Accelerator``: accelerate's state is process-wide,
and an Accelerator made here would fix the mixed precision that the update chooses itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> the package it needs


def parse(log_with: str) -> list[str]:
    """``"tensorboard,mlflow"`` -> the names; ``"all"`` -> those installed. A name that is unknown or not
    installed is a ``ValueError`` that says what to install."""
    names = [n.strip() for n in log_with.split(",") if n.strip()]
    if names == ["all"]:
        return [n for n, package in TRACKERS.items() if importlib.util.find_spec(package) is not None]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"loop.log_with={log_with}: unknown tracker {name!r}; choose from "
                             f"{', '.join(TRACKERS)} or all")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"loop.log_with={log_with}: {name} is not installed; pip install {TRACKERS[name]} "
                             "(or pip install 'refine[track]' for TensorBoard)")
    return names


class Trackers:
    """The run's trackers; every method is a no-op without any."""

    def __init__(self, names: list[str], run_name: str, run_dir: Path, config: dict[str, Any]):
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        self.trackers = []
        for name in names:
            if name == "tensorboard":
                tracker = TensorBoardTracker(run_name, run_dir / "trackers")
            elif name == "mlflow":
                tracker = MLflowTracker(experiment_name="refine", run_name=run_name, logging_dir=str(run_dir / "trackers"))
            else:
                tracker = WandBTracker("refine", name=run_name)
            tracker.start()
            if name == "wandb":
                for axis, series in (("train/step", "train/*"), ("round/index", "round/*")):
                    tracker.run.define_metric(axis)
                    tracker.run.define_metric(series, step_metric=axis)
            self.trackers.append(tracker)
        flat = {f"{section}.{key}": value if isinstance(value, int | float | str | bool) else str(value)
                for section, values in config.items() for key, value in values.items()}
        for tracker in self.trackers:
            tracker.store_init_configuration(flat)

    def log_round(self, k: int, metrics: dict[str, Any], history: list[dict[str, Any]], first_step: int) -> None:
        """Round ``k``'s optimizer steps (from ``first_step`` on) and its metrics (at ``k``)."""
        if not self.trackers:
            return
        for step, row in enumerate(history, first_step):
            phase = row.get("phase", "dpo")
            prefix = "train/" if phase == "dpo" else f"train/{phase}/"
            self._log({f"{prefix}{key}": v for key, v in row.items() if isinstance(v, int | float)}, "train/step", step)
        values = {f"round/{key}": v for key, v in metrics.items() if isinstance(v, int | float) and key != "round"}
        self._log(values, "round/index", k)

    def _log(self, values: dict[str, float], axis: str, step: int) -> None:
        for tracker in self.trackers:
            if tracker.name == "wandb":  # its own step counter; the axis travels as a value
                tracker.log({**values, axis: step})
            else:
                tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
