"""Checkpoints that resume exactly, written atomically; and early stopping.

One file holds the model, optimizer, scheduler, warm-up, EMA, epoch/step, metric, your
extras and the RNG states (Python, NumPy, torch), and loads with
``torch.load(weights_only=True)``. Files are written to a temporary name and renamed, so a
process killed mid-write never leaves a truncated checkpoint.

    ckpt = CheckpointManager("runs/exp1", keep_best=3, mode="min")
    ckpt.save(val_loss, epoch=epoch, model=model, optimizer=opt, scheduler=sched)
    state = load_checkpoint(ckpt.best(), model=model, optimizer=opt, scheduler=sched)
"""

from __future__ import annotations

import collections
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FerrotorchTypeError, FerrotorchValueError

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointManager", "EarlyStopping"]

_FORMAT = "ferrotorch-checkpoint-1"
_STATEFUL = ("model", "optimizer", "scheduler", "warmup", "ema", "scaler", "early_stopping")


def _plain(obj: Any) -> Any:
    """Makes a state loadable with weights_only=True (Counters become tagged dicts)."""
    if isinstance(obj, collections.Counter):
        return {"__counter__": {k: v for k, v in obj.items()}}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def _restore(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__counter__"}:
            return collections.Counter(obj["__counter__"])
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_restore(v) for v in obj)
    return obj


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: the old file or the new one, never half
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: str | os.PathLike[str], *, epoch: int | None = None, step: int | None = None, metric: float | None = None, extra: dict[str, Any] | None = None, **objects: Any) -> Path:
    """Writes ``objects`` (any of model, optimizer, scheduler, warmup, ema, scaler,
    early_stopping: things with ``state_dict()``) plus counters and RNG states to ``path``.

        save_checkpoint("last.pt", epoch=epoch, model=model, optimizer=opt, scheduler=sched)
    """
    unknown = set(objects) - set(_STATEFUL)
    if unknown:
        raise FerrotorchTypeError(f"save_checkpoint: unknown objects {sorted(unknown)}; expected some of {list(_STATEFUL)}")
    payload: dict[str, Any] = {"format": _FORMAT, "epoch": epoch, "step": step, "metric": metric, "extra": extra or {}, "rng": _rng_state()}
    for name, obj in objects.items():
        if obj is None:
            continue
        if not hasattr(obj, "state_dict"):
            raise FerrotorchTypeError(f"save_checkpoint: {name} has no state_dict() (got {type(obj).__name__})")
        payload[name] = _plain(obj.state_dict())
    path = Path(path)
    _atomic_save(payload, path)
    return path


def load_checkpoint(path: str | os.PathLike[str], *, restore_rng: bool = True, **objects: Any) -> dict[str, Any]:
    """Loads a checkpoint into ``objects`` (same names as when saved) and restores the RNG
    states; returns ``{"epoch", "step", "metric", "extra"}``. Nothing is changed unless the
    file reads as a ferrotorch checkpoint holding every requested object.

        info = load_checkpoint("last.pt", model=model, optimizer=opt, scheduler=sched)
        start_epoch = info["epoch"] + 1
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise FerrotorchValueError(f"{path} is not a readable checkpoint (corrupted or truncated?): {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise FerrotorchValueError(f"{path} is not a ferrotorch checkpoint (no '{_FORMAT}' marker); for a bare state_dict use model.load_state_dict(torch.load(...))")
    missing = [name for name, obj in objects.items() if obj is not None and name not in payload]
    if missing:
        raise FerrotorchValueError(f"{path} holds no {missing}; it has {[k for k in payload if k in _STATEFUL]}")
    for name, obj in objects.items():
        if obj is not None:
            obj.load_state_dict(_restore(payload[name]))
    if restore_rng:
        _set_rng_state(payload["rng"])
    return {k: payload.get(k) for k in ("epoch", "step", "metric", "extra")}


class CheckpointManager:
    """Keeps ``last.pt`` and the ``keep_best`` best checkpoints of a run in ``directory``.

        mgr = CheckpointManager("runs/exp", keep_best=3, mode="min")
        mgr.save(val_loss, epoch=epoch, model=model, optimizer=opt)
    """

    _NAME = re.compile(r"best-(\d+)\.pt$")

    def __init__(self, directory: str | os.PathLike[str], keep_best: int = 3, mode: str = "min") -> None:
        if not isinstance(keep_best, int) or keep_best < 0:
            raise FerrotorchValueError(f"CheckpointManager: keep_best must be a non-negative int, got {keep_best!r}")
        if mode not in ("min", "max"):
            raise FerrotorchValueError(f"CheckpointManager: mode must be 'min' or 'max', got {mode!r}")
        self.directory = Path(directory)
        self.keep_best = keep_best
        self.mode = mode
        self.directory.mkdir(parents=True, exist_ok=True)
        self._best: list[tuple[float, Path]] = []
        self._counter = 0

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def save(self, metric: float, **kwargs: Any) -> Path:
        """Writes ``last.pt`` and, if ``metric`` ranks among the best, a ``best-N.pt``."""
        metric = float(metric)
        if math.isnan(metric):
            raise FerrotorchValueError("CheckpointManager.save: metric is NaN")
        last = save_checkpoint(self.directory / "last.pt", metric=metric, **kwargs)
        if self.keep_best == 0:
            return last
        worst = self._best[-1][0] if len(self._best) >= self.keep_best else None
        if worst is not None and not self._better(metric, worst):
            return last
        self._counter += 1
        path = save_checkpoint(self.directory / f"best-{self._counter}.pt", metric=metric, **kwargs)
        self._best.append((metric, path))
        self._best.sort(key=lambda t: t[0], reverse=self.mode == "max")
        for _, old in self._best[self.keep_best :]:
            old.unlink(missing_ok=True)
        self._best = self._best[: self.keep_best]
        return path

    def best(self) -> Path | None:
        """The best checkpoint so far (None before any)."""
        return self._best[0][1] if self._best else None

    def kept(self) -> list[Path]:
        return [p for _, p in self._best]


class EarlyStopping:
    """Stops training once a metric has gone ``patience`` epochs in a row without improving
    by more than ``min_delta`` (Lightning's and Keras's rule), or at once on a NaN/inf metric
    (``check_finite``, as Lightning).

        stopper = EarlyStopping(patience=5, mode="min")
        if stopper.step(val_loss): break
    """

    def __init__(self, patience: int = 5, min_delta: float = 0.0, mode: str = "min", check_finite: bool = True) -> None:
        if not isinstance(patience, int) or patience < 0:
            raise FerrotorchValueError(f"EarlyStopping: patience must be a non-negative int, got {patience!r}")
        if min_delta < 0:
            raise FerrotorchValueError(f"EarlyStopping: min_delta must be >= 0, got {min_delta!r}")
        if mode not in ("min", "max"):
            raise FerrotorchValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode
        self.check_finite = check_finite
        self.best: float | None = None
        self.num_bad_epochs = 0
        self.should_stop = False

    def step(self, metric: float) -> bool:
        """Records ``metric``; returns True once training should stop."""
        metric = float(metric)
        if self.check_finite and not math.isfinite(metric):
            self.should_stop = True
            return True
        improved = self.best is None or (
            metric < self.best - self.min_delta if self.mode == "min" else metric > self.best + self.min_delta
        )
        if improved:
            self.best = metric
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        self.should_stop = not improved and self.num_bad_epochs >= self.patience
        return self.should_stop

    @property
    def improved(self) -> bool:
        """Whether the last ``step`` set a new best."""
        return self.num_bad_epochs == 0 and self.best is not None

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
            "check_finite": self.check_finite,
            "best": self.best,
            "num_bad_epochs": self.num_bad_epochs,
            "should_stop": self.should_stop,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("patience", "min_delta", "mode", "best", "num_bad_epochs", "should_stop"):
            if k not in state:
                raise FerrotorchValueError(f"EarlyStopping.load_state_dict: missing '{k}'")
            setattr(self, k, state[k])
        self.check_finite = state.get("check_finite", True)  # absent from older checkpoints
