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
import copy
import math
import os
import random
import re
import socket
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


_HOST = socket.gethostname()
# ``.<name>.tmp-<pid>@<host>`` (older versions: ``.<name>.tmp-<pid>``)
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:@(?P<host>[^/]+))?$")


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}@{_HOST}")
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
    states; returns ``{"epoch", "step", "metric", "extra"}``. All or nothing: if any
    ``load_state_dict`` raises (torch's error), every object and the RNG states are put back
    as they were.

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
    if restore_rng and "rng" not in payload:
        raise FerrotorchValueError(f"{path} holds no RNG states; pass restore_rng=False")
    todo = [(name, obj) for name, obj in objects.items() if obj is not None]
    for name, obj in todo:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise FerrotorchTypeError(f"load_checkpoint: {name} has no state_dict()/load_state_dict() (got {type(obj).__name__})")
    # All or nothing: on any error every object (and the RNG) gets its old state back.
    snapshots = [_snapshot(obj) for _, obj in todo]
    rng = _rng_state()
    done = 0
    try:
        for name, obj in todo:
            done += 1
            obj.load_state_dict(_restore(payload[name]))
        if restore_rng:
            _set_rng_state(payload["rng"])
    except BaseException as e:
        for (name, obj), snap in reversed(list(zip(todo[:done], snapshots))):
            try:
                obj.load_state_dict(snap)
            except Exception as r:  # noqa: BLE001 - reported with the original error
                e.add_note(f"ferrotorch: could not restore {name} after the failed load: {r!r}")
        _set_rng_state(rng)
        raise
    return {k: payload.get(k) for k in ("epoch", "step", "metric", "extra")}


def _snapshot(obj: Any) -> Any:
    """A deep copy of ``obj.state_dict()``; accelerator tensors are copied to the CPU."""
    state = obj.state_dict()
    memo: dict[int, Any] = {}

    def offload(x: Any) -> None:
        if type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type not in ("cpu", "meta"):
            memo[id(x)] = x.detach().to("cpu", copy=True)
        elif isinstance(x, dict):
            for v in x.values():
                offload(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                offload(v)

    offload(state)
    return copy.deepcopy(state, memo)


class CheckpointManager:
    """Keeps ``last.pt`` and the ``keep_best`` best checkpoints of a run in ``directory``.

    A new manager on an existing directory carries on from its checkpoints (best ranking,
    numbering) and deletes temporary files left by its killed saves.

        mgr = CheckpointManager("runs/exp", keep_best=3, mode="min")
        mgr.save(val_loss, epoch=epoch, model=model, optimizer=opt)
    """

    _NAME = re.compile(r"^best-(\d+)\.pt$")

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
        self._recover()

    def _owns(self, name: str) -> bool:
        return name == "last.pt" or self._NAME.match(name) is not None

    def _recover(self) -> None:
        """Removes stale temporary files of this manager's checkpoints; ranks the existing
        ``best-N.pt`` by their metric (ties: older first, as in one run)."""
        found = []
        for entry in os.scandir(self.directory):
            tmp = _TMP.match(entry.name)
            if tmp and self._owns(tmp["name"]):
                best = self._NAME.match(tmp["name"])
                if best:  # a live writer may still rename it: never reuse its number
                    self._counter = max(self._counter, int(best[1]))
                if _stale_tmp(entry, int(tmp["pid"]), tmp["host"]):
                    Path(entry.path).unlink(missing_ok=True)
                continue
            best = self._NAME.match(entry.name)
            if best and entry.is_file():
                n = int(best[1])
                self._counter = max(self._counter, n)
                metric = _saved_metric(Path(entry.path))
                if metric is not None:
                    found.append((n, metric, Path(entry.path)))
        found.sort(key=lambda t: (t[1] if self.mode == "min" else -t[1], t[0]))
        self._best = [(metric, path) for _, metric, path in found]

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
        worst = self._best[self.keep_best - 1][0] if len(self._best) >= self.keep_best else None
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
        kept = self.kept()
        return kept[0] if kept else None

    def kept(self) -> list[Path]:
        """The best checkpoints, best first."""
        return [p for _, p in self._best[: self.keep_best]]

    def last(self) -> Path | None:
        """``last.pt``, the latest save (None before any)."""
        path = self.directory / "last.pt"
        return path if path.is_file() else None


def _saved_metric(path: Path) -> float | None:
    """The metric a ferrotorch checkpoint was saved with (None for any other file)."""
    try:
        try:  # mmap: tensors are not read
            payload = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError:  # not the zip format
            payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - not a readable checkpoint: not ranked, left alone
        return None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        return None
    metric = payload.get("metric")
    if isinstance(metric, bool) or not isinstance(metric, (int, float)) or math.isnan(metric):
        return None
    return float(metric)


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc tells."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _stale_tmp(entry: os.DirEntry, pid: int, host: str | None) -> bool:
    """A temporary file whose writer is gone: written on this host by a process that is no
    longer running (or whose pid now belongs to a process started after the file's last
    write)."""
    if host is not None and host != _HOST:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    except OSError:
        return False
    started = _process_start(pid)
    try:
        written = entry.stat().st_mtime
    except OSError:
        return False
    return started is not None and started > written + 2.0  # (btime has 1 s resolution)


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
        keys = ("patience", "min_delta", "mode", "best", "num_bad_epochs", "should_stop")
        for k in keys:  # all checked before any is set
            if k not in state:
                raise FerrotorchValueError(f"EarlyStopping.load_state_dict: missing '{k}'")
        for k in keys:
            setattr(self, k, state[k])
        self.check_finite = state.get("check_finite", True)  # absent from older checkpoints
