"""The learning-rate range test (Smith 2017; the fast.ai / torch-lr-finder procedure).

The lr ramps from ``start_lr`` to ``end_lr`` over ``num_iter`` mini-batches (exponentially
or linearly), the loss is smoothed, the test stops when it diverges, and ``plot`` shows the
curve with the steepest-descent suggestion. The ramp, smoothing, divergence test and
suggestion are computed in Rust; the lr and loss histories equal torch-lr-finder's for the
same arguments.

It takes torch-lr-finder 0.2.2's API (``from torch_lr_finder import LRFinder`` →
``from ferrotorch.train import LRFinder``): the constructor's ``memory_cache``,
``cache_dir``, ``amp_backend``, ``amp_config``, ``grad_scaler``; ``range_test``'s
``non_blocking_transfer`` and per-group ``start_lr`` lists; ``plot(skip_start, skip_end,
log_lr, show_lr, ax, suggest_lr)`` returning ``(ax, suggested_lr)``; ``reset()``;
``TrainDataLoaderIter`` / ``ValDataLoaderIter`` for batches that are not ``(inputs, labels,
*extras)``; inputs and labels may be tensors or tuples, lists or dicts of them.

    finder = LRFinder(model, optimizer, torch.nn.CrossEntropyLoss())
    lrs, losses = finder.range_test(train_loader, end_lr=1, num_iter=100)
    ax, lr = finder.plot()

Differences from torch-lr-finder (all documented on the methods):

* ``range_test`` restores the model and optimizer when it ends (``restore=True``; also when
  it is interrupted), so ``reset()`` is not needed; ``restore=False`` keeps the trained
  weights as torch-lr-finder does until ``reset()``.
* ``range_test`` returns ``(lrs, losses)``; ``progress=False`` turns off the tqdm bar and
  the messages.
* ``plot(path=...)`` saves the figure (and does not call ``plt.show()``);
  ``suggestion()`` returns the steepest-descent lr without plotting.
* a bad argument (``num_iter``, ``step_mode``, ``smooth_f``, ``accumulation_steps``,
  ``diverge_th``, the loaders' types) is reported before the optimizer is touched.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from .. import _native
from ..errors import FerrotorchRuntimeError, FerrotorchTypeError, FerrotorchValueError

__all__ = ["LRFinder", "DataLoaderIter", "TrainDataLoaderIter", "ValDataLoaderIter"]


# ---- batch iterators (torch-lr-finder's protocol) -----------------------------------------


class DataLoaderIter:
    """Iterates a data loader, turning each batch into ``(inputs, labels)`` with
    :meth:`inputs_labels_from_batch`; override that method for other batch layouts.

        class DictIter(TrainDataLoaderIter):
            def inputs_labels_from_batch(self, batch):
                return batch["image"], batch["label"]
    """

    def __init__(self, data_loader: Any) -> None:
        self.data_loader = data_loader
        self._iterator: Iterator[Any] = iter(data_loader)

    @property
    def dataset(self) -> Any:
        return self.data_loader.dataset

    def inputs_labels_from_batch(self, batch_data: Any) -> tuple[Any, Any]:
        """``(inputs, labels)`` of a batch ``(inputs, labels, *extras)``."""
        if not isinstance(batch_data, (list, tuple)):
            raise FerrotorchValueError(
                f"Your batch type is not supported: {type(batch_data)}. Please inherit from "
                "`TrainDataLoaderIter` or `ValDataLoaderIter` and override the "
                "`inputs_labels_from_batch` method."
            )
        if len(batch_data) < 2:
            raise FerrotorchValueError(
                f"A batch must hold at least (inputs, labels), got {len(batch_data)} element(s). Please inherit "
                "from `TrainDataLoaderIter` or `ValDataLoaderIter` and override `inputs_labels_from_batch`."
            )
        return batch_data[0], batch_data[1]

    def __iter__(self) -> DataLoaderIter:
        return self

    def __next__(self) -> tuple[Any, Any]:
        return self.inputs_labels_from_batch(next(self._iterator))


class TrainDataLoaderIter(DataLoaderIter):
    """Training batches; starts a new epoch of the loader when one runs out
    (``auto_reset=False``: raises ``StopIteration`` instead)."""

    def __init__(self, data_loader: Any, auto_reset: bool = True) -> None:
        super().__init__(data_loader)
        self.auto_reset = auto_reset

    def __next__(self) -> tuple[Any, Any]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            if not self.auto_reset:
                raise
            self._iterator = iter(self.data_loader)
            batch = next(self._iterator)
        return self.inputs_labels_from_batch(batch)


class ValDataLoaderIter(DataLoaderIter):
    """Validation batches: one pass over the loader per ``for`` loop. Like a DataLoader,
    it starts over only when ``iter()`` is called on it after a full pass."""

    def __init__(self, data_loader: Any) -> None:
        super().__init__(data_loader)
        self.run_limit = len(self.data_loader)
        self.run_counter = 0

    def __iter__(self) -> ValDataLoaderIter:
        if self.run_counter >= self.run_limit:
            self._iterator = iter(self.data_loader)
            self.run_counter = 0
        return self

    def __next__(self) -> tuple[Any, Any]:
        self.run_counter += 1
        return super().__next__()


def _is_loader_iter(obj: Any, name: str) -> bool:
    """``obj`` is one of our iterator classes ``name``, or torch-lr-finder's (when a script
    already imported torch_lr_finder and subclassed its iterators)."""
    if isinstance(obj, globals()[name]):
        return True
    mod = sys.modules.get("torch_lr_finder.lr_finder")
    cls = getattr(mod, name, None) if mod is not None else None
    return cls is not None and isinstance(obj, cls)


# ---- model / optimizer state cache ----------------------------------------------------------


class _StateCacher:
    """Keeps state dicts in memory (deep copies) or in ``torch.save`` files under
    ``cache_dir`` (the system temp dir by default), removed when the finder is deleted."""

    def __init__(self, in_memory: bool, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.in_memory = in_memory
        if cache_dir is None:
            cache_dir = tempfile.gettempdir()
        elif not os.path.isdir(cache_dir):
            raise FerrotorchValueError("Given `cache_dir` is not a valid directory.")
        self.cache_dir = os.fspath(cache_dir)
        self.cached: dict[str, Any] = {}

    def store(self, key: str, state_dict: dict[str, Any]) -> None:
        if self.in_memory:
            self.cached[key] = copy.deepcopy(state_dict)
        else:
            fn = os.path.join(self.cache_dir, f"state_{key}_{id(self)}.pt")
            self.cached[key] = fn
            torch.save(state_dict, fn)

    def retrieve(self, key: str) -> dict[str, Any]:
        if key not in self.cached:
            raise KeyError(f"Target {key} was not cached.")
        if self.in_memory:
            # A copy, so a second reset() still has the original.
            return copy.deepcopy(self.cached[key])
        fn = self.cached[key]
        if not os.path.exists(fn):
            raise FerrotorchRuntimeError(f"Failed to load state in {fn}. File doesn't exist anymore.")
        # Our own file from this process; optimizer state may hold any picklable value.
        return torch.load(fn, map_location="cpu", weights_only=False)

    def __del__(self) -> None:
        if getattr(self, "in_memory", True):
            return
        for fn in getattr(self, "cached", {}).values():
            try:
                os.remove(fn)
            except OSError:
                pass


# ---- the finder -------------------------------------------------------------------------------


def _amp_backends() -> list[str]:
    backends = ["torch"]
    try:
        import apex.amp  # type: ignore[import-not-found]  # noqa: F401

        backends.append("apex")
    except ImportError:
        pass
    return backends


class LRFinder:
    """LR range test for any ``nn.Module``, optimizer (torch.optim or ferrotorch) and loss.

    Args:
        model: the model to train.
        optimizer: its optimizer; its lr is the start of the ramp unless ``start_lr`` is given.
        criterion: ``loss = criterion(model(inputs), labels)``.
        device: where batches and the model go during the test (default: the model's).
        memory_cache: keep the saved model/optimizer state in memory (default) or in files.
        cache_dir: the directory of those files (default: the system temp dir).
        amp_backend: ``"torch"`` (``torch.amp.autocast(**amp_config)`` and ``grad_scaler``)
            or ``"apex"`` (an optimizer from ``apex.amp.initialize``); default off.
        amp_config: ``torch.amp.autocast``'s arguments (``device_type`` defaults to the
            device's type).
        grad_scaler: a ``torch.amp.GradScaler``; required with ``amp_backend="torch"``.

    The model's and optimizer's states are saved here, as in torch-lr-finder; ``reset()``
    (and ``range_test(restore=True)``, the default) puts them back.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Callable[..., torch.Tensor],
        device: str | torch.device | None = None,
        memory_cache: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        amp_backend: str | None = None,
        amp_config: dict[str, Any] | None = None,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise FerrotorchTypeError(f"LRFinder: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise FerrotorchTypeError(f"LRFinder: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(criterion):
            raise FerrotorchTypeError(f"LRFinder: criterion must be callable, got {type(criterion).__name__}")
        self.optimizer = optimizer
        self._check_for_scheduler()
        self.model = model
        self.criterion = criterion
        self.history: dict[str, list[float]] = {"lr": [], "loss": []}
        self.best_loss: float | None = None
        self.memory_cache = memory_cache
        self.cache_dir = cache_dir

        if amp_backend and amp_backend not in _amp_backends():
            raise FerrotorchValueError(f"Unknown amp backend: {amp_backend}")
        if amp_backend == "torch" and grad_scaler is None:
            raise FerrotorchValueError("`grad_scaler` is required when using `torch.amp`")
        self.amp_backend = amp_backend
        self.amp_config = amp_config
        self.grad_scaler = grad_scaler

        params = list(model.parameters())
        self.model_device = params[0].device if params else torch.device("cpu")
        self.state_cacher = _StateCacher(memory_cache, cache_dir=cache_dir)
        self.state_cacher.store("model", self.model.state_dict())
        self.state_cacher.store("optimizer", self.optimizer.state_dict())
        self.device = torch.device(device) if device else self.model_device

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Restores the model and optimizer to their states when the finder was made."""
        self.model.load_state_dict(self.state_cacher.retrieve("model"))
        self.optimizer.load_state_dict(self.state_cacher.retrieve("optimizer"))
        self.model.to(self.model_device)

    def _check_for_scheduler(self) -> None:
        if any("initial_lr" in g for g in self.optimizer.param_groups):
            raise FerrotorchRuntimeError("Optimizer already has a scheduler attached to it")

    def _set_learning_rate(self, new_lrs: Any) -> None:
        groups = self.optimizer.param_groups
        if not isinstance(new_lrs, (list, tuple)):
            new_lrs = [new_lrs] * len(groups)
        if len(new_lrs) != len(groups):
            raise FerrotorchValueError(
                "Length of `new_lrs` is not equal to the number of parameter groups in the given optimizer"
            )
        for g, lr in zip(groups, new_lrs):
            g["lr"] = lr

    # -- the test ------------------------------------------------------------------------------
    def range_test(
        self,
        train_loader: Any,
        val_loader: Any = None,
        start_lr: float | list[float] | None = None,
        end_lr: float = 10.0,
        num_iter: int = 100,
        step_mode: str = "exp",
        smooth_f: float = 0.05,
        diverge_th: float = 5.0,
        accumulation_steps: int = 1,
        non_blocking_transfer: bool = True,
        progress: bool = True,
        restore: bool = True,
    ) -> tuple[list[float], list[float]]:
        """Runs the test; returns ``(lrs, losses)`` (also in ``self.history``).

        Args:
            train_loader: a ``DataLoader`` of ``(inputs, labels, *extras)`` batches, or a
                ``TrainDataLoaderIter`` (subclass one for other batch layouts).
            val_loader: ``None`` (the loss is the smoothed training loss) or a
                ``DataLoader`` / ``ValDataLoaderIter``: the loss is the validation loss
                after each step.
            start_lr: the first lr, one for all groups or a list with one per param group
                (default: the optimizer's lrs).
            end_lr, num_iter, step_mode (``"exp"`` or ``"linear"``): the ramp.
            smooth_f: exponential smoothing of the loss, in ``[0, 1)``.
            diverge_th: stop when the loss exceeds ``diverge_th * best_loss``.
            accumulation_steps: batches per optimizer step (the loss is averaged).
            non_blocking_transfer: ``tensor.to(device, non_blocking=...)`` for the batches.
            progress: a tqdm bar and torch-lr-finder's messages (``False``: silent).
            restore: put the model and optimizer back afterwards (torch-lr-finder leaves
                them trained until ``reset()``; pass ``False`` for that).
        """
        if not isinstance(num_iter, int) or isinstance(num_iter, bool) or num_iter <= 1:
            raise FerrotorchValueError(f"`num_iter` must be an int larger than 1, got {num_iter!r}")
        if not isinstance(step_mode, str):
            raise FerrotorchValueError(f"expected one of (exp, linear), got {step_mode!r}")
        step_mode = step_mode.lower()
        _native.range_test_lr(step_mode, 1.0, 1.0, 0, num_iter)  # validates step_mode
        if not 0 <= smooth_f < 1:
            raise FerrotorchValueError("smooth_f is outside the range [0, 1[")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise FerrotorchValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
        if diverge_th <= 0:
            raise FerrotorchValueError(f"diverge_th must be positive, got {diverge_th!r}")
        if isinstance(train_loader, DataLoader):
            train_iter: Any = TrainDataLoaderIter(train_loader)
        elif _is_loader_iter(train_loader, "TrainDataLoaderIter"):
            train_iter = train_loader
        else:
            raise FerrotorchValueError(
                f"`train_loader` has unsupported type: {type(train_loader)}. Expected types are "
                "`torch.utils.data.DataLoader` or child of `TrainDataLoaderIter` "
                "(ferrotorch.train.TrainDataLoaderIter(iterable) wraps any iterable of batches)."
            )
        val_iter: Any = None
        if val_loader is not None:
            if isinstance(val_loader, DataLoader):
                val_iter = ValDataLoaderIter(val_loader)
            elif _is_loader_iter(val_loader, "ValDataLoaderIter"):
                val_iter = val_loader
            else:
                raise FerrotorchValueError(
                    f"`val_loader` has unsupported type: {type(val_loader)}. Expected types are "
                    "`torch.utils.data.DataLoader` or child of `ValDataLoaderIter`."
                )
        self._check_for_scheduler()

        self.history = {"lr": [], "loss": []}
        self.best_loss = None
        self.model.to(self.device)
        try:
            if start_lr:
                self._set_learning_rate(start_lr)
            base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
            bar = _progress(num_iter, progress)
            try:
                for i in range(num_iter):
                    lrs = [_native.range_test_lr(step_mode, b, end_lr, i, num_iter) for b in base_lrs]
                    for g, lr in zip(self.optimizer.param_groups, lrs):
                        g["lr"] = lr
                    loss = self._train_batch(train_iter, accumulation_steps, non_blocking_transfer)
                    if val_iter is not None:
                        loss = self._validate(val_iter, non_blocking_transfer)
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
                        if progress:
                            print("Stopping early, the loss has diverged")
                        break
            finally:
                bar.close()
        finally:
            if restore:
                self.reset()
        if progress:
            print("Learning rate search finished. See the graph with LRFinder.plot()")
        return list(self.history["lr"]), list(self.history["loss"])

    def _train_batch(self, train_iter: Any, accumulation_steps: int, non_blocking_transfer: bool = True) -> float:
        self.model.train()
        total: torch.Tensor | None = None
        self.optimizer.zero_grad()
        for _ in range(accumulation_steps):
            inputs, labels = next(train_iter)
            inputs, labels = self._move_to_device(inputs, labels, non_blocking=non_blocking_transfer)
            if self.amp_backend == "torch":
                with torch.amp.autocast(**self._autocast_kwargs()):
                    loss = self.criterion(self.model(inputs), labels)
            else:
                loss = self.criterion(self.model(inputs), labels)
            loss = loss / accumulation_steps
            if self.amp_backend == "torch":
                self.grad_scaler.scale(loss).backward()
            elif self.amp_backend == "apex" and hasattr(self.optimizer, "_amp_stash"):
                import apex.amp  # type: ignore[import-not-found]

                with apex.amp.scale_loss(loss, self.optimizer) as scaled_loss:
                    scaled_loss.backward()
            else:
                loss.backward()
            # Summed as a tensor in the loss's dtype, as torch-lr-finder does.
            total = loss.detach() if total is None else total + loss.detach()
        if self.amp_backend == "torch":
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        assert total is not None
        return total.item()

    def _autocast_kwargs(self) -> dict[str, Any]:
        kw = dict(self.amp_config or {})
        kw.setdefault("device_type", torch.device(self.device).type)
        return kw

    def _move_to_device(self, inputs: Any, labels: Any, non_blocking: bool = True) -> tuple[Any, Any]:
        device = self.device

        def move(obj: Any) -> Any:
            if hasattr(obj, "to"):
                return obj.to(device, non_blocking=non_blocking)
            if isinstance(obj, tuple):
                return tuple(move(o) for o in obj)
            if isinstance(obj, list):
                return [move(o) for o in obj]
            if isinstance(obj, dict):
                return {k: move(o) for k, o in obj.items()}
            return obj

        return move(inputs), move(labels)

    def _validate(self, val_iter: Any, non_blocking_transfer: bool = True) -> float:
        running, count = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for inputs, labels in val_iter:
                inputs, labels = self._move_to_device(inputs, labels, non_blocking=non_blocking_transfer)
                loss = self.criterion(self.model(inputs), labels)
                running += loss.item() * len(labels)
                count += len(labels)
        # torch-lr-finder divides by the dataset's size; an iterator without one by the count.
        try:
            size = len(val_iter.dataset)
        except (AttributeError, TypeError):
            size = count
        if size == 0:
            raise FerrotorchValueError("LRFinder: val_loader yielded no samples")
        return running / size

    # -- results -------------------------------------------------------------------------------
    def _trimmed(self, skip_start: int, skip_end: int) -> tuple[Any, Any]:
        if skip_start < 0:
            raise FerrotorchValueError("skip_start cannot be negative")
        if skip_end < 0:
            raise FerrotorchValueError("skip_end cannot be negative")
        end = len(self.history["lr"]) - skip_end
        return self.history["lr"][skip_start:end], self.history["loss"][skip_start:end]

    def _check_enough(self, skip_start: int, skip_end: int) -> None:
        need, got = skip_start + skip_end + 2, len(self.history["lr"])
        if got < need:
            raise FerrotorchRuntimeError(f"Need at least {need} iterations to suggest a learning rate. Got {got}")

    def suggestion(self, skip_start: int = 10, skip_end: int = 5) -> float:
        """The lr at the steepest descent of the trimmed loss curve (the lr that
        ``plot(suggest_lr=True)`` returns), without plotting."""
        lrs, losses = self._trimmed(skip_start, skip_end)
        self._check_enough(skip_start, skip_end)
        return lrs[_native.steepest_descent(losses)]

    def plot(
        self,
        skip_start: int = 10,
        skip_end: int = 5,
        log_lr: bool = True,
        show_lr: float | None = None,
        ax: Any = None,
        suggest_lr: bool = True,
        path: str | os.PathLike[str] | None = None,
    ) -> Any:
        """Plots loss against lr with matplotlib, as torch-lr-finder does.

        Returns ``(ax, suggested_lr)`` with ``suggest_lr=True`` (the steepest-descent lr,
        marked on the plot; ``RuntimeError`` when fewer than ``skip_start + skip_end + 2``
        points were recorded), else ``ax``. ``show_lr`` draws a vertical line at that lr.
        Without ``ax`` a figure is made and shown (``plt.show()``); ``path`` saves it as an
        image instead of showing it.
        """
        # No matplotlib.use(): switching the backend would turn off a notebook's inline plots;
        # savefig works under any backend (headless machines fall back to Agg by themselves).
        import matplotlib.pyplot as plt

        if skip_start < 0:
            raise FerrotorchValueError("skip_start cannot be negative")
        if skip_end < 0:
            raise FerrotorchValueError("skip_end cannot be negative")
        if show_lr is not None and (isinstance(show_lr, bool) or not isinstance(show_lr, (int, float))):
            raise FerrotorchValueError("show_lr must be float")
        if suggest_lr:
            self._check_enough(skip_start, skip_end)
        lrs, losses = self._trimmed(skip_start, skip_end)

        fig = None
        if ax is None:
            fig, ax = plt.subplots()
        ax.plot(lrs, losses)
        suggested = None
        if suggest_lr:
            i = _native.steepest_descent(losses)
            suggested = lrs[i]
            print("LR suggestion: steepest gradient")
            print(f"Suggested LR: {suggested:.2E}")
            ax.scatter(lrs[i], losses[i], s=75, marker="o", color="red", zorder=3, label="steepest gradient")
            ax.legend()
        if log_lr:
            ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        ax.set_ylabel("Loss")
        if show_lr is not None:
            ax.axvline(x=show_lr, color="red")
        if path is not None:
            (fig or ax.figure).savefig(path, dpi=100)
        elif fig is not None:
            plt.show()
        if suggest_lr:
            return ax, suggested
        return ax


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
