"""The learning-rate range test (Smith 2017; the fast.ai / torch-lr-finder procedure).

The lr ramps from ``start_lr`` to ``end_lr`` over ``num_iter`` mini-batches (exponentially
or linearly), the loss is smoothed, the test stops when it diverges, and model and optimizer
are restored afterwards. The ramp, smoothing, divergence test and suggestion are computed
in Rust; the lr history equals torch-lr-finder's for the same arguments.

    finder = LRFinder(model, optimizer, torch.nn.CrossEntropyLoss())
    lrs, losses = finder.range_test(train_loader, end_lr=1, num_iter=100)
    print(finder.suggestion()); finder.plot()
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import _native
from ..errors import FerrotorchRuntimeError, FerrotorchTypeError, FerrotorchValueError

__all__ = ["LRFinder"]


class LRFinder:
    """LR range test for any ``nn.Module``, optimizer (torch.optim or ferrotorch) and loss.

    Args:
        model: the model to train.
        optimizer: its optimizer; its param groups' lrs are ramped during the test.
        criterion: ``loss = criterion(model(inputs), labels)``.
        device: where batches and the model go during the test (default: the model's).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable[..., torch.Tensor], device: str | torch.device | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise FerrotorchTypeError(f"LRFinder: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise FerrotorchTypeError(f"LRFinder: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(criterion):
            raise FerrotorchTypeError(f"LRFinder: criterion must be callable, got {type(criterion).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        params = list(model.parameters())
        self.model_device = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device) if device is not None else self.model_device
        self.history: dict[str, list[float]] = {"lr": [], "loss": []}
        self.best_loss: float | None = None
        self._saved: tuple[dict[str, Any], dict[str, Any]] | None = None

    # -- state ---------------------------------------------------------------------------------
    def _save(self) -> None:
        self._saved = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    def reset(self) -> None:
        """Restores the model and optimizer to their state before the range test."""
        if self._saved is None:
            return
        model_state, opt_state = self._saved
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(opt_state)
        self.model.to(self.model_device)

    # -- the test ------------------------------------------------------------------------------
    def range_test(
        self,
        train_loader: Any,
        val_loader: Any = None,
        start_lr: float | None = None,
        end_lr: float = 10.0,
        num_iter: int = 100,
        step_mode: str = "exp",
        smooth_f: float = 0.05,
        diverge_th: float = 5.0,
        accumulation_steps: int = 1,
        progress: bool = True,
        restore: bool = True,
    ) -> tuple[list[float], list[float]]:
        """Runs the test; returns ``(lrs, losses)`` (also in ``self.history``).

        ``start_lr`` defaults to the optimizer's current lr. With ``val_loader`` the loss is
        the validation loss after each step. ``restore=False`` leaves the trained weights.
        """
        if any("initial_lr" in g for g in self.optimizer.param_groups):
            raise FerrotorchRuntimeError("Optimizer already has a scheduler attached to it")
        if not isinstance(num_iter, int) or num_iter <= 1:
            raise FerrotorchValueError(f"`num_iter` must be an int larger than 1, got {num_iter!r}")
        if not 0 <= smooth_f < 1:
            raise FerrotorchValueError("smooth_f is outside the range [0, 1[")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise FerrotorchValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
        if diverge_th <= 0:
            raise FerrotorchValueError(f"diverge_th must be positive, got {diverge_th!r}")
        _native.range_test_lr(step_mode, 1.0, 1.0, 0, num_iter)  # validates step_mode
        self._save()
        self.history = {"lr": [], "loss": []}
        self.best_loss = None
        self.model.to(self.device)
        if start_lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = start_lr
        base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        train_iter = _Cycle(train_loader)
        bar = _progress(num_iter, progress)
        try:
            for i in range(num_iter):
                lrs = [_native.range_test_lr(step_mode, b, end_lr, i, num_iter) for b in base_lrs]
                for g, lr in zip(self.optimizer.param_groups, lrs):
                    g["lr"] = lr
                loss = self._train_batch(train_iter, accumulation_steps)
                if val_loader is not None:
                    loss = self._validate(val_loader)
                prev = self.history["loss"][-1] if self.history["loss"] else 0.0
                loss, best, diverged = _native.range_test_update(
                    i == 0, loss, prev, loss if self.best_loss is None else self.best_loss, smooth_f, diverge_th
                )
                self.best_loss = best
                self.history["lr"].append(lrs[0])
                self.history["loss"].append(loss)
                bar.update(1)
                bar.set_postfix(lr=f"{lrs[0]:.2e}", loss=f"{loss:.4f}")
                if diverged:
                    break
        finally:
            bar.close()
            if restore:
                self.reset()
        return list(self.history["lr"]), list(self.history["loss"])

    def _train_batch(self, train_iter: _Cycle, accumulation_steps: int) -> float:
        self.model.train()
        self.optimizer.zero_grad()
        total = 0.0
        for _ in range(accumulation_steps):
            inputs, labels = _to(next(train_iter), self.device)
            loss = self.criterion(self.model(inputs), labels) / accumulation_steps
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        return total

    def _validate(self, val_loader: Any) -> float:
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in val_loader:
                inputs, labels = _to(batch, self.device)
                total += self.criterion(self.model(inputs), labels).item() * len(labels)
                count += len(labels)
        if count == 0:
            raise FerrotorchValueError("LRFinder: val_loader yielded no samples")
        return total / count

    # -- results -------------------------------------------------------------------------------
    def suggestion(self, skip_start: int = 10, skip_end: int = 5) -> float:
        """The lr at the steepest descent of the (trimmed) loss curve."""
        lrs, losses = self._trimmed(skip_start, skip_end)
        if len(losses) < 2:
            raise FerrotorchRuntimeError(
                f"Need at least {skip_start + skip_end + 2} iterations to suggest a learning rate. Got {len(self.history['lr'])}"
            )
        return lrs[_native.steepest_descent(losses)]

    def _trimmed(self, skip_start: int, skip_end: int) -> tuple[list[float], list[float]]:
        if skip_start < 0 or skip_end < 0:
            raise FerrotorchValueError("skip_start and skip_end cannot be negative")
        end = len(self.history["lr"]) - skip_end
        return self.history["lr"][skip_start:end], self.history["loss"][skip_start:end]

    def plot(self, skip_start: int = 10, skip_end: int = 5, log_lr: bool = True, suggest_lr: bool = True, ax: Any = None, path: str | None = None) -> Any:
        """Plots loss against lr with matplotlib (and marks the suggestion); returns the axes.
        ``path`` saves the figure as an image."""
        # No matplotlib.use(): switching the backend would turn off a notebook's inline plots;
        # savefig works under any backend (headless machines fall back to Agg by themselves).
        import matplotlib.pyplot as plt

        lrs, losses = self._trimmed(skip_start, skip_end)
        fig = None
        if ax is None:
            fig, ax = plt.subplots()
        ax.plot(lrs, losses)
        if suggest_lr and len(losses) >= 2:
            i = _native.steepest_descent(losses)
            ax.scatter(lrs[i], losses[i], s=75, marker="o", color="red", zorder=3, label=f"steepest gradient ({lrs[i]:.2e})")
            ax.legend()
        if log_lr:
            ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        ax.set_ylabel("Loss")
        if path is not None:
            (fig or ax.figure).savefig(path, dpi=100)
        return ax


class _Cycle:
    """Endless iteration over a DataLoader (a new epoch when one ends)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.it: Iterator[Any] = iter(loader)

    def __next__(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def _to(batch: Any, device: torch.device) -> tuple[Any, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise FerrotorchTypeError("LRFinder: each batch must be an (inputs, labels) pair")
    inputs, labels = batch[0], batch[1]
    return inputs.to(device), labels.to(device)


class _Quiet:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _Quiet()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Quiet()
    return tqdm(total=total, desc="LR range test", unit="batch")
