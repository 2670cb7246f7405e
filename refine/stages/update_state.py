"""An update in progress, saved so that a stop or a crash in its middle loses minutes of training, not all of it.

At a step boundary, every ``update.save_minutes`` and when the run is asked to stop, :class:`UpdateSaves`
writes ``rounds/<k>/update.progress.pt``: the trainable weights, the optimizer's and the loss scaler's
state, the reference log-probs and the rows of the steps taken. A resume of the same update (the same
pairs, settings and trainable parameters) loads it and skips the steps taken, drawing the batches as an
unbroken update does, so it ends with the weights that one would have ended with (dropout is off in
updates, and mDPO's corrupted images are pure functions of the pair). The file is removed once the
round's student is saved (:meth:`refine.infra.runlog.RunLog.checkpoint`); one saved for other pairs or
settings is ignored, with a note.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from refine.infra.progress import console


def settings(config: Any, precision: str) -> dict[str, Any]:
    """The update's settings that its result depends on (how often it saves is not one), with the precision
    it trains in (``auto`` resolves differently on another machine)."""
    return {**{k: v for k, v in asdict(config).items() if k != "save_minutes"}, "precision": precision}


def fingerprint(pairs: Sequence[Any], config: Any, params: Sequence[torch.nn.Parameter], precision: str) -> str:
    """What a saved update must match to be continued: its pairs in order, its settings and precision, the
    shapes of its trainable parameters."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.image_id, p.chosen, p.rejected, p.weight]).encode())
    h.update(json.dumps(settings(config, precision), sort_keys=True, default=str).encode())
    h.update(json.dumps([list(p.shape) for p in params]).encode())
    return h.hexdigest()


class UpdateSaves:
    """Where an update keeps its progress (``path``; None: nowhere, the update cannot be continued). Only
    the ``writer`` (the main process) writes; every process reads, since each trains on."""

    def __init__(self, path: Path | None, save_minutes: float = 10.0, writer: bool = True):
        self.path, self.every_s, self.writer = (Path(path) if path else None), save_minutes * 60, writer
        self.last = time.monotonic()
        self.warned = False

    def due(self) -> bool:
        """Time to save again (this process's clock: data-parallel callers agree on the decision first)."""
        return self.path is not None and self.every_s > 0 and time.monotonic() - self.last >= self.every_s

    def resume(self, run) -> None:
        """Continue ``run`` (an update's :class:`refine.stages.dpo._Training`, before its first step) from
        its saved progress, if there is one for it."""
        if self.path is None:  # nothing to continue from, and nothing will be saved
            return
        run.settings = settings(run.config, run.policy.precision)
        run.key = fingerprint(run.pairs, run.config, run.params, run.policy.precision)
        saved = self._load(run.key, run.settings)
        if saved is None:
            return
        with torch.no_grad():
            for p, value in zip(run.params, saved["params"], strict=True):
                p.copy_(value)
        run.optimizer.load_state_dict(saved["optimizer"])
        run.scaler.load_state_dict(saved["scaler"])
        run.history, run.done = saved["history"], len(saved["history"])
        if saved["reference"] is not None:
            run.reference = tuple(None if t is None else t.to(run.policy.device) for t in saved["reference"])
        console.print(f"The update continues from its saved progress: step {run.done} of {run.total}.")

    def _load(self, key: str, now: dict[str, Any]) -> dict[str, Any] | None:
        """The saved progress of this update (``key`` from :func:`fingerprint`), or None with a note."""
        if self.path is None or not self.path.exists():
            return None
        why = None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if not (isinstance(state, dict) and {"key", "history", "params", "optimizer", "scaler", "reference"}
                    <= set(state)):
                why = "is not an update's progress"
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: train from the start
            why = f"could not be read ({type(e).__name__})"
        if why is None and state["key"] != key:
            then = state.get("settings") or {}
            changed = [f"{k} {then[k]} → {v}" for k, v in now.items() if k in then and then[k] != v]
            why = f"is for other settings ({', '.join(changed)})" if changed else "is for other pairs"
        if why is None:
            return state
        console.print(f"[yellow]The update's saved progress ({self.path}) {why}; it starts from its first step.[/]",
                      soft_wrap=True)
        return None

    def save(self, run, announce: bool = False) -> None:
        """Write ``run``'s progress atomically (the old file or the whole new one, never a part). A failed
        write (a full disk, a folder that cannot be written) is a warning, not a stop: the update goes on,
        and only this insurance is lost. ``announce``: say so (a stop's save)."""
        from refine.infra.atomic import new_file_mode

        self.last = time.monotonic()
        if self.path is None or not self.writer:
            return
        reference = None if run.reference is None else [None if t is None else t.cpu() for t in run.reference]
        state = {"key": run.key, "settings": run.settings, "history": run.history,
                 "params": [p.detach().cpu() for p in run.params], "optimizer": run.optimizer.state_dict(),
                 "scaler": run.scaler.state_dict(), "reference": reference}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            os.fchmod(fd, new_file_mode())
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            if not self.warned:
                console.print(f"[yellow]Could not save the update's progress to {self.path} ({e}); it trains on, "
                              "but a stop now would start it again.[/]", soft_wrap=True)
            self.warned = True
            return
        if announce:
            console.print(f"The update's progress is saved: step {len(run.history)} of {run.total}.")
