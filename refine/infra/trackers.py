"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) through accelerate's tracker classes.

``--loop.log_with=tensorboard`` (or ``mlflow``, ``wandb``, a comma-separated list, or ``all``: every one
of the three that is installed) logs each round's metrics under ``round/<name>`` with the round as the
step, each optimizer step of the update under TRL's names (``train/loss``, ``train/rewards/chosen``,
``train/rewards/margins``, ``train/logps/chosen``, ...) with the run's cumulative optimizer step, and
the config as hyperparameters. TensorBoard writes into ``runs/<id>/trackers/``; MLflow and W&B go where
their own settings say (``MLFLOW_TRACKING_URI``, ``WANDB_MODE``, ...). Only the main process logs.

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
                tracker = MLflowTracker(experiment_name=run_name, logging_dir=str(run_dir / "trackers"))
            else:
                tracker = WandBTracker(run_name)
            tracker.start()
            self.trackers.append(tracker)
        flat = {f"{section}.{key}": value if isinstance(value, int | float | str | bool) else str(value)
                for section, values in config.items() for key, value in values.items()}
        for tracker in self.trackers:
            tracker.store_init_configuration(flat)

    def log_round(self, k: int, metrics: dict[str, Any], history: list[dict[str, Any]], first_step: int) -> None:
        """A round's metrics (step = round) and its update's optimizer steps (step = cumulative step)."""
        if not self.trackers:
            return
        values = {f"round/{key}": v for key, v in metrics.items() if isinstance(v, int | float) and key != "round"}
        for step, row in enumerate(history, first_step):
            phase = row.get("phase", "dpo")
            prefix = "train/" if phase == "dpo" else f"train/{phase}/"
            self._log({f"{prefix}{key}": v for key, v in row.items() if isinstance(v, int | float)}, step)
        self._log(values, k)

    def _log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
