"""Every ``torch.optim.lr_scheduler`` class, with the schedule math computed in Rust.

Each class *is* its torch counterpart (constructor, validation, warnings, ``state_dict``
keys), with the lr arithmetic replaced by ferrotorch's Rust functions, which reproduce
torch's numbers bit for bit. Two things go further than torch:

* resuming is exact: ``load_state_dict`` puts the saved lrs back into the optimizer, so a
  ConstantLR/LinearLR/SequentialLR rebuilt on a restored optimizer does not apply its
  factor twice (torch's does);
* ``SequentialLR`` and ``ChainedScheduler`` accept ``ReduceLROnPlateau`` (call
  ``step(metric)``), so a warm-up can run in front of a plateau schedule;
* the schedulers that took ``verbose`` in torch ≤ 2.6 still take it (keyword or last
  positional argument): it warns as torch 2.2–2.6 did (``UserWarning``, "The verbose
  parameter is deprecated...") and ``verbose=True`` prints the lr changes in torch 2.1's
  words ("Adjusting learning rate of group 0 to 1.0000e-01.", "Epoch 00012: reducing
  learning rate of group 0 to 1.0000e-04."), so older scripts run unchanged.

Every scheduler can also return its curve without touching the optimizer:

    sched = ferrotorch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
    plt.plot(sched.lr_curve(100))
"""

from __future__ import annotations

import copy
import inspect
import warnings
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as _tls
from torch.optim.lr_scheduler import EPOCH_DEPRECATION_WARNING, LRScheduler  # noqa: F401  (torch's public constant)

from .. import _native
from .._compat import param_groups_val_list as _param_groups_val_list
from .._compat import update_param_group_val as _update_param_group_val
from .._compat import warn_get_lr_called_within_step as _warn_get_lr_called_within_step
from ..errors import FerrotorchTypeError, FerrotorchValueError

__all__ = [
    "LRScheduler",
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "OneCycleLR",
    "ReduceLROnPlateau",
    "SequentialLR",
    "ChainedScheduler",
    "WarmupLR",
    "NoamLR",
    "lr_curve",
]


def _lrs(sched: Any) -> list[float]:
    return [float(g["lr"]) for g in sched.optimizer.param_groups]


def _floats(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values]


class _GhostOptimizer(Optimizer):
    """Stands in for an optimizer while a copied scheduler computes its curve."""

    def __init__(self, param_groups: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
        # No parameters, no Optimizer.__init__: only what schedulers read and write.
        self.param_groups = param_groups
        self.defaults = defaults
        self.state = {}

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never called
        return None


_GhostOptimizer.step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


def lr_curve(scheduler: Any, steps: int, key: str = "lr", metrics: Sequence[float] | None = None) -> np.ndarray:
    """The values of ``group[key]`` (``"lr"``, ``"momentum"``, or ``"betas"``' first
    element) for the next ``steps`` optimizer steps, as an array of shape
    ``(steps, len(param_groups))``. Works on a copy: the scheduler and its optimizer are
    left untouched.

        curve = lr_curve(sched, 1000)          # or sched.lr_curve(1000)
        plt.plot(curve[:, 0])
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise FerrotorchValueError(f"lr_curve: steps must be a non-negative int, got {steps!r}")
    real = scheduler.optimizer
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in real.param_groups]
    ghost = _GhostOptimizer(groups, dict(getattr(real, "defaults", {})))
    ghost._opt_called = True  # type: ignore[attr-defined]
    twin = copy.deepcopy(scheduler, memo={id(real): ghost})
    _silence(twin)
    plateau = isinstance(scheduler, _tls.ReduceLROnPlateau) or any(
        isinstance(s, _tls.ReduceLROnPlateau) for s in getattr(scheduler, "_schedulers", [])
    )
    if plateau and (metrics is None or len(metrics) < steps):
        raise FerrotorchTypeError(
            f"{type(scheduler).__name__}.lr_curve needs the metric of every step: pass metrics=[...] with {steps} values"
        )
    out = np.empty((steps, len(groups)), dtype=np.float64)
    for i in range(steps):
        for j, g in enumerate(ghost.param_groups):
            v = g[key]
            out[i, j] = float(v[0] if key == "betas" else v)
        if plateau:
            twin.step(metrics[i])  # type: ignore[index]
        else:
            twin.step()
    return out


# ---- torch's removed ``verbose`` argument ----------------------------------------------------

_VERBOSE_DEPRECATED = (
    "The verbose parameter is deprecated. Please use get_last_lr() to access the learning rate."
)
_UNSET: Any = object()
_INIT_ARITY: dict[type, int] = {}


def _check_verbose(verbose: Any, stacklevel: int) -> bool:
    """torch 2.2–2.6's ``_check_verbose_deprecated_warning``: any value but the default
    ``"deprecated"`` warns; returns whether to print."""
    if isinstance(verbose, str) and verbose == "deprecated":
        return False
    warnings.warn(_VERBOSE_DEPRECATED, UserWarning, stacklevel=stacklevel + 1)
    return bool(verbose)


def _epoch_str(epoch: float) -> str:
    """torch 2.1's epoch format in its verbose messages."""
    return ("%.2f" if isinstance(epoch, float) else "%.5d") % epoch


def _print_lr(sched: Any, epoch: float | None) -> None:
    """torch 2.1's ``LRScheduler.print_lr`` for every group, when ``verbose`` is on."""
    if not getattr(sched, "verbose", False):
        return
    for i, group in enumerate(sched.optimizer.param_groups):
        lr = float(group["lr"])
        if epoch is None:
            print(f"Adjusting learning rate of group {i} to {lr:.4e}.")
        else:
            print(f"Epoch {_epoch_str(epoch)}: adjusting learning rate of group {i} to {lr:.4e}.")


def _silence(sched: Any) -> None:
    """No verbose output from a copy (``lr_curve``'s twin) or its members."""
    if "verbose" in vars(sched):
        sched.verbose = False
    for s in getattr(sched, "_schedulers", []):
        _silence(s)


def _torch_init_arity(cls: type) -> int:
    """How many arguments (after self) the ``__init__`` behind ``_Ferro`` takes."""
    if cls not in _INIT_ARITY:
        mro = cls.__mro__
        nxt = next(c for c in mro[mro.index(_Ferro) + 1 :] if "__init__" in vars(c))
        params = list(inspect.signature(vars(nxt)["__init__"]).parameters.values())[1:]
        _INIT_ARITY[cls] = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    return _INIT_ARITY[cls]


class _Ferro:
    """Mixin for ferrotorch schedulers: exact resume, state checks, ``lr_curve``, and
    torch's removed ``verbose`` argument."""

    #: Attributes a state dict of this class must carry (checked on load).
    _ft_required: ClassVar[tuple[str, ...]] = ("last_epoch", "_last_lr")
    #: Whether torch's class once took ``verbose`` (SWALR never did).
    _ft_verbose: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not self._ft_verbose:
            super().__init__(*args, **kwargs)
            return
        # torch <= 2.6 took ``verbose`` last (after last_epoch / eps), by keyword or position.
        verbose = kwargs.pop("verbose", _UNSET)
        if verbose is _UNSET and len(args) == _torch_init_arity(type(self)) + 1:
            *args_list, verbose = args
            args = tuple(args_list)
        if verbose is not _UNSET:
            # Set before torch's __init__: its initial step already prints (as torch 2.1's).
            self.verbose = _check_verbose(verbose, stacklevel=2)
        super().__init__(*args, **kwargs)

    def _update_lr(self, epoch: int | None = None) -> None:
        super()._update_lr(epoch)  # type: ignore[misc]
        _print_lr(self, epoch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict written by this class or its torch twin, and puts the saved
        learning rates back into the optimizer so training resumes exactly."""
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise FerrotorchTypeError(f"{name}.load_state_dict expects a dict, got {type(state_dict).__name__}")
        missing = [k for k in self._ft_required if k not in state_dict]
        if missing:
            raise FerrotorchValueError(
                f"{name}.load_state_dict: the state dict has no {missing}; it was not written by a {name}"
            )
        last = state_dict.get("_last_lr")
        if last is not None and len(last) != len(self.optimizer.param_groups):  # type: ignore[attr-defined]
            raise FerrotorchValueError(
                f"{name}.load_state_dict: the state dict has {len(last)} learning rates, "
                f"the optimizer has {len(self.optimizer.param_groups)} param groups"  # type: ignore[attr-defined]
            )
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._restore_group_lrs()

    def _restore_group_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):  # type: ignore[attr-defined]
            _update_param_group_val(group, "lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)

    def lr_curve(self, steps: int, key: str = "lr", metrics: Sequence[float] | None = None) -> np.ndarray:
        """The lrs (or ``key`` values) of the next ``steps`` steps; see :func:`lr_curve`."""
        return lr_curve(self, steps, key, metrics)


def _chain(sched: Any, kind: str, closed: bool = False, a: float = 0.0, b: float = 0.0, c: float = 0.0, milestones: list[int] | None = None) -> list[float] | None:
    # The Rust side reads the groups' lrs itself; hyper-parameters go positionally.
    return _native.schedule_lrs(
        kind, sched.optimizer.param_groups, sched.base_lrs, sched.last_epoch, sched._is_initial, sched._step_count, closed, a, b, c, milestones
    )


class _Chainable(_Ferro):
    """A scheduler whose chainable and closed forms are one Rust schedule ``_ft_kind``."""

    _ft_kind: ClassVar[str]

    def _ft_args(self, closed: bool) -> tuple[Any, ...]:
        """The schedule's hyper-parameters, in ``schedule_lrs``' a, b, c order."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:  # type: ignore[override]
        lrs = _chain(self, self._ft_kind, False, *self._ft_args(False))
        if lrs is None:  # float32/bf16 tensor lrs: torch's formula, in their dtype
            return super().get_lr()  # type: ignore[misc]
        _warn_get_lr_called_within_step(self)
        return lrs

    def _get_closed_form_lr(self) -> list[float]:
        lrs = _chain(self, self._ft_kind, True, *self._ft_args(True))
        return super()._get_closed_form_lr() if lrs is None else lrs  # type: ignore[misc]


class LambdaLR(_Ferro, _tls.LambdaLR):
    """``lr = base_lr * lr_lambda(epoch)``; the lambdas are yours, the product is Rust's.

        sched = LambdaLR(opt, lambda epoch: 0.95 ** epoch)
        for epoch in range(10): train(); sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "lr_lambdas")

    def get_lr(self) -> list[float]:  # type: ignore[override]
        if _native.narrow_tensor_lrs(self.base_lrs):  # float32/bf16 tensor lrs: torch's formula
            return super().get_lr()
        _warn_get_lr_called_within_step(self)
        return _native.scale_lrs(_floats(self.base_lrs), [float(f(self.last_epoch)) for f in self.lr_lambdas])


class MultiplicativeLR(_Ferro, _tls.MultiplicativeLR):
    """``lr *= lr_lambda(epoch)`` at every step after the first.

        sched = MultiplicativeLR(opt, lambda epoch: 0.95)
        sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "lr_lambdas")

    def get_lr(self) -> list[Any]:  # type: ignore[override]
        if _native.narrow_tensor_lrs([g["lr"] for g in self.optimizer.param_groups]):
            return super().get_lr()  # float32/bf16 tensor lrs: torch's formula
        _warn_get_lr_called_within_step(self)
        if self._is_initial:
            return _param_groups_val_list(self.optimizer, "lr")
        return _native.scale_lrs(_lrs(self), [float(f(self.last_epoch)) for f in self.lr_lambdas])


class StepLR(_Chainable, _tls.StepLR):
    """Decays the lr by ``gamma`` every ``step_size`` epochs.

        sched = StepLR(opt, step_size=30, gamma=0.1)
        sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "step_size", "gamma")
    _ft_kind = "step"

    def _ft_args(self, closed: bool) -> tuple[Any, ...]:
        return (self.step_size, self.gamma)


class MultiStepLR(_Chainable, _tls.MultiStepLR):
    """Decays the lr by ``gamma`` at each milestone.

        sched = MultiStepLR(opt, milestones=[30, 80], gamma=0.1)
        sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "milestones", "gamma")
    _ft_kind = "multistep"

    def _ft_args(self, closed: bool) -> tuple[Any, ...]:
        return (self.gamma, 0.0, 0.0, sorted(self.milestones.elements()) if closed else [self.last_epoch] * self.milestones.get(self.last_epoch, 0))


class ConstantLR(_Chainable, _tls.ConstantLR):
    """Multiplies the lr by ``factor`` until ``total_iters`` (resumes exactly, unlike torch's).

        sched = ConstantLR(opt, factor=0.5, total_iters=4)
        sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "factor", "total_iters")
    _ft_kind = "constant"

    def _ft_args(self, closed: bool) -> tuple[Any, ...]:
        return (self.factor, self.total_iters)


class LinearLR(_Chainable, _tls.LinearLR):
    """Ramps the lr factor linearly from ``start_factor`` to ``end_factor`` (a warm-up).

        sched = LinearLR(opt, start_factor=0.1, total_iters=500)
        sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "start_factor", "end_factor", "total_iters")
    _ft_kind = "linear"

    def _ft_args(self, closed: bool) -> tuple[Any, ...]:
        return (self.start_factor, self.end_factor, self.total_iters)


class ExponentialLR(_Chainable, _tls.ExponentialLR):
    """Multiplies the lr by ``gamma`` every epoch.

        sched = ExponentialLR(opt, gamma=0.9)
        sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "gamma")
    _ft_kind = "exponential"

    def _ft_args(self, closed: bool) -> tuple[Any, ...]:
        return (self.gamma,)


class PolynomialLR(_Chainable, _tls.PolynomialLR):
    """Polynomial decay to zero over ``total_iters``.

        sched = PolynomialLR(opt, total_iters=100, power=2.0)
        sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "total_iters", "power")
    _ft_kind = "polynomial"

    def _ft_args(self, closed: bool) -> tuple[Any, ...]:
        return (self.total_iters, self.power)


class CosineAnnealingLR(_Chainable, _tls.CosineAnnealingLR):
    """Cosine annealing from the base lr to ``eta_min`` over ``T_max`` steps.

        sched = CosineAnnealingLR(opt, T_max=200)
        sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "T_max", "eta_min")
    _ft_kind = "cosine"

    def _ft_args(self, closed: bool) -> tuple[Any, ...]:
        return (self.T_max, self.eta_min)


class CosineAnnealingWarmRestarts(_Ferro, _tls.CosineAnnealingWarmRestarts):
    """SGDR: cosine annealing restarted every ``T_0 * T_mult**i`` epochs; fractional
    epochs (``step(epoch + i / iters)``) work as in torch.

        sched = CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2)
        sched.step(epoch + i / iters)
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "T_0", "T_i", "T_mult", "T_cur", "eta_min")

    def get_lr(self) -> list[float]:  # type: ignore[override]
        lrs = _chain(self, "warm_restarts", True, self.T_cur, self.T_i, self.eta_min)
        if lrs is None:  # float32/bf16 tensor lrs: torch's formula, in their dtype
            return super().get_lr()
        _warn_get_lr_called_within_step(self)
        return lrs

    def step(self, epoch: float | None = None) -> None:  # type: ignore[override]
        """Advances one epoch, or jumps to ``epoch`` (which may be fractional)."""
        if _native.narrow_tensor_lrs(self.base_lrs):  # float32/bf16 tensor lrs: torch's step
            super().step(epoch)
            _print_lr(self, self.last_epoch if epoch is None else epoch)
            return
        t_cur, t_i, last_epoch, lrs = _native.warm_restarts_step(
            float(self.T_cur),
            float(self.T_i),
            self.last_epoch,
            None if epoch is None else float(epoch),
            self.T_0,
            self.T_mult,
            float(self.eta_min),
            _floats(self.base_lrs),
        )
        # Keep torch's Python types in the state dict (ints stay ints where torch's do).
        if epoch is None:
            int_cur = isinstance(self.T_cur, int) or self.last_epoch < 0
        else:
            int_cur = isinstance(epoch, int) and (epoch < self.T_0 or self.T_mult == 1)
        self.T_cur = int(t_cur) if int_cur else t_cur
        self.T_i = int(t_i)
        self.last_epoch = last_epoch
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            _update_param_group_val(group, "lr", lr)
        self._last_lr = _param_groups_val_list(self.optimizer, "lr")
        # torch 2.1 printed the epoch it stepped to (the one passed, else the new last_epoch).
        _print_lr(self, self.last_epoch if epoch is None else epoch)


class CyclicLR(_Ferro, _tls.CyclicLR):
    """Cyclical learning rates (triangular, triangular2, exp_range or your ``scale_fn``),
    cycling momentum (or Adam's beta1) in the opposite direction.

        sched = CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2000)
        for batch in loader: train_step(); sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "max_lrs", "total_size", "step_ratio", "mode", "scale_mode")

    def get_lr(self) -> list[float]:  # type: ignore[override]
        _warn_get_lr_called_within_step(self)
        momentum = self.cycle_momentum
        lrs, moms = _native.cyclic_step(
            self.last_epoch,
            float(self.total_size),
            float(self.step_ratio),
            self.mode,
            float(self.gamma),
            self._scale_fn_custom,
            self.scale_mode == "cycle",
            _floats(self.base_lrs),
            _floats(self.max_lrs),
            _floats(self.base_momentums) if momentum else None,
            _floats(self.max_momentums) if momentum else None,
        )
        if momentum:
            for group, m in zip(self.optimizer.param_groups, moms, strict=True):
                if self.use_beta1:
                    group["betas"] = (m, *group["betas"][1:])
                else:
                    group["momentum"] = m
        return lrs


class OneCycleLR(_Ferro, _tls.OneCycleLR):
    """The 1cycle policy (two or three phases, cos or linear annealing, momentum cycling).

        sched = OneCycleLR(opt, max_lr=0.01, steps_per_epoch=len(loader), epochs=10)
        for batch in loader: train_step(); sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "total_steps", "_schedule_phases")

    def get_lr(self) -> list[float]:  # type: ignore[override]
        _warn_get_lr_called_within_step(self)
        momentum = self.cycle_momentum
        cos = getattr(self, "_anneal_func_type", "cos") == "cos"
        values = _native.one_cycle_step(
            self.last_epoch, self.total_steps, self.optimizer.param_groups, self._schedule_phases, cos, momentum
        )
        if momentum:
            for group, (_, m) in zip(self.optimizer.param_groups, values, strict=True):
                if self.use_beta1:
                    group["betas"] = (m, *group["betas"][1:])
                else:
                    group["momentum"] = m
        return [lr for lr, _ in values]


class ReduceLROnPlateau(_Ferro, _tls.ReduceLROnPlateau):
    """Reduces the lr by ``factor`` when a metric stops improving (the state machine runs
    in Rust).

        sched = ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=5)
        sched.step(val_loss)
    """

    _ft_required = ("last_epoch", "best", "num_bad_epochs", "cooldown_counter", "mode", "threshold", "factor")

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        """Records ``metrics`` (a float or 1-element tensor) and reduces the lrs when it
        has not improved for ``patience`` epochs."""
        current = float(metrics)
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self.last_epoch = epoch
        self.best, self.num_bad_epochs, self.cooldown_counter, reduce = _native.plateau_step(
            self.mode, self.threshold_mode, self.threshold, self.patience, self.cooldown,
            self.best, self.num_bad_epochs, self.cooldown_counter, current,
        )
        if reduce:
            self._reduce_lr(epoch)
        self._last_lr = _param_groups_val_list(self.optimizer, "lr")

    def _reduce_lr(self, epoch: int) -> None:
        if len(self.optimizer.param_groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                super()._reduce_lr(epoch)  # torch's RuntimeError text
                return
            self.min_lrs = [self.default_min_lr] * len(self.optimizer.param_groups)
        new = _native.plateau_reduce(_lrs(self), float(self.factor), _floats(self.min_lrs), float(self.eps))
        for i, (group, lr) in enumerate(zip(self.optimizer.param_groups, new)):
            if lr is not None:
                _update_param_group_val(group, "lr", lr)
                if getattr(self, "verbose", False):  # torch 2.1's message
                    print(f"Epoch {_epoch_str(epoch)}: reducing learning rate of group {i} to {lr:.4e}.")


def _is_plateau(s: Any) -> bool:
    return isinstance(s, _tls.ReduceLROnPlateau)


class SequentialLR(_Ferro, _tls.SequentialLR):
    """Runs schedulers one after another, switching at ``milestones``. Unlike torch's, a
    phase may be ``ReduceLROnPlateau`` (then call ``step(metric)``), so a warm-up can lead
    into a plateau schedule.

        warm = LinearLR(opt, start_factor=0.01, total_iters=5)
        sched = SequentialLR(opt, [warm, ReduceLROnPlateau(opt)], milestones=[5])
        sched.step(val_loss)
    """

    _ft_required = ("last_epoch", "_last_lr", "_milestones", "_schedulers")

    def __init__(
        self,
        optimizer: Optimizer,
        schedulers: list[Any],
        milestones: list[int],
        last_epoch: int = -1,
        verbose: Any = "deprecated",
    ) -> None:
        # torch <= 2.6 took verbose here too (and printed nothing for SequentialLR itself).
        if not (isinstance(verbose, str) and verbose == "deprecated"):
            self.verbose = _check_verbose(verbose, stacklevel=2)
        if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m < 0 for m in milestones):
            raise FerrotorchValueError(f"SequentialLR: milestones must be non-negative and strictly increasing, got {list(milestones)}")
        plateaus = [i for i, s in enumerate(schedulers) if _is_plateau(s)]
        if not plateaus:
            super().__init__(optimizer, schedulers, milestones, last_epoch)
            return
        # torch refuses ReduceLROnPlateau here; run its checks on the others, then build.
        if plateaus == [0]:
            raise FerrotorchValueError(
                "SequentialLR: ReduceLROnPlateau cannot be the first phase (it has no initial step); "
                "put a warm-up such as LinearLR before it"
            )
        for i, s in enumerate(schedulers):
            if s.optimizer is not optimizer:
                raise ValueError(
                    f"{self.__class__.__name__} expects all schedulers to belong to the same optimizer, but "
                    f"got scheduler {s.__class__.__name__} at index {i} has {s.optimizer}, "
                    f"which is different from {optimizer.__class__.__name__}."
                )
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                "Sequential Schedulers expects number of schedulers provided to be one more "
                f"than the number of milestone points, but got number of schedulers {len(schedulers)} and the "
                f"number of milestones to be equal to {len(milestones)}"
            )
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in self.optimizer.param_groups:
            _update_param_group_val(group, "lr", group["initial_lr"])
        self.recursive_undo()
        idx = bisect_right(self._milestones, 0)
        self._schedulers[idx]._initial_step()
        self._last_lr = schedulers[idx].get_last_lr()

    def step(self, metrics: Any = None) -> None:  # type: ignore[override]
        """One step of the current phase; ``metrics`` is required in a ReduceLROnPlateau phase."""
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[idx]
        if _is_plateau(scheduler):
            if metrics is None:
                raise FerrotorchTypeError(
                    "SequentialLR.step() is in its ReduceLROnPlateau phase: pass the metric, e.g. step(val_loss)"
                )
            if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
                # Entering the plateau phase starts from the base lrs, as any other phase
                # restarts at its epoch 0 (a warm-up before it ends at full lr).
                for group in self.optimizer.param_groups:
                    _update_param_group_val(group, "lr", group["initial_lr"])
            scheduler.step(metrics)
        elif idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()


class ChainedScheduler(_Ferro, _tls.ChainedScheduler):
    """Steps several schedulers together each step; ``ReduceLROnPlateau`` members get the
    metric passed to ``step(metric)``.

        sched = ChainedScheduler([ConstantLR(opt, 0.1, total_iters=2), ExponentialLR(opt, 0.9)])
        sched.step()
    """

    _ft_required = ("_last_lr", "_schedulers")

    def __init__(self, schedulers: Sequence[Any], optimizer: Optimizer | None = None) -> None:
        if not any(_is_plateau(s) for s in schedulers):
            super().__init__(schedulers, optimizer)
            return
        if len(schedulers) < 1:
            raise ValueError(f"{self.__class__.__name__} expects at least one scheduler to be chained, but got no scheduler.")
        optimizer = optimizer or schedulers[0].optimizer
        for i, s in enumerate(schedulers):
            if s.optimizer is not optimizer:
                raise ValueError(
                    f"{self.__class__.__name__} expects all schedulers to belong to the same optimizer, but "
                    f"got scheduler {s.__class__.__name__} at index {i} has {s.optimizer}, "
                    f"which is different from {optimizer.__class__.__name__}."
                )
        self._schedulers = schedulers
        self.optimizer = optimizer
        self._last_lr = _param_groups_val_list(self._schedulers[-1].optimizer, "lr")

    def step(self, metrics: Any = None) -> None:  # type: ignore[override]
        for scheduler in self._schedulers:
            if _is_plateau(scheduler):
                if metrics is None:
                    raise FerrotorchTypeError("ChainedScheduler.step() has a ReduceLROnPlateau member: pass the metric")
                scheduler.step(metrics)
            else:
                scheduler.step()
        self._last_lr = _param_groups_val_list(self._schedulers[-1].optimizer, "lr")


class _FactorLR(_Ferro, LRScheduler):
    """``lr = base_lr * factor(last_epoch)`` with the factor from a named Rust schedule."""

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "_ft_kind", "_ft_params")
    _ft_kind: str
    _ft_params: dict[str, Any]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        _warn_get_lr_called_within_step(self)
        f = _native.schedule_factor(self._ft_kind, self.last_epoch, self._ft_params)
        return _native.scale_lrs(_floats(self.base_lrs), [f] * len(self.base_lrs))


class NoamLR(_FactorLR):
    """The Transformer schedule, ``lr = base_lr * d_model**-0.5 * min(step**-0.5,
    step * warmup_steps**-1.5)`` with ``step = last_epoch + 1`` (set the base lr to 1 for
    the paper's values).

        sched = NoamLR(opt, d_model=512, warmup_steps=4000)
        sched.step()
    """

    def __init__(self, optimizer: Optimizer, d_model: int, warmup_steps: int, last_epoch: int = -1) -> None:
        if not isinstance(d_model, int) or d_model <= 0:
            raise FerrotorchValueError(f"NoamLR: d_model must be a positive int, got {d_model!r}")
        if not isinstance(warmup_steps, int) or warmup_steps <= 0:
            raise FerrotorchValueError(f"NoamLR: warmup_steps must be a positive int, got {warmup_steps!r}")
        self._ft_kind = "noam"
        self._ft_params = {"d_model": float(d_model), "warmup_steps": warmup_steps}
        super().__init__(optimizer, last_epoch)


class WarmupLR(_FactorLR):
    """A warm-up phase as a scheduler, for SequentialLR: the lr factor rises from
    ``start_factor`` to 1 over ``warmup_steps`` steps, linearly or exponentially, then stays 1.

        warm = WarmupLR(opt, warmup_steps=500)
        sched = SequentialLR(opt, [warm, CosineAnnealingLR(opt, T_max=10_000)], milestones=[500])
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int, start_factor: float = 0.0, mode: str = "linear", last_epoch: int = -1
    ) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps <= 0:
            raise FerrotorchValueError(f"WarmupLR: warmup_steps must be a positive int, got {warmup_steps!r}")
        if not 0.0 <= start_factor <= 1.0:
            raise FerrotorchValueError(f"WarmupLR: start_factor must be in [0, 1], got {start_factor!r}")
        if mode not in ("linear", "exponential"):
            raise FerrotorchValueError(f"WarmupLR: mode must be 'linear' or 'exponential', got {mode!r}")
        self._ft_kind = "warmup_" + mode
        self._ft_params = {"warmup_steps": warmup_steps, "start_factor": float(start_factor)}
        super().__init__(optimizer, last_epoch)


# ---- transformers-style schedules --------------------------------------------------------
# Same names, arguments and values as Hugging Face transformers' get_*_schedule* functions;
# they return a scheduler (not a LambdaLR), so their state dicts pickle without lambdas.


class FactorSchedule(_FactorLR):
    """``lr = base_lr * factor(step)`` for a named schedule; made by the ``get_*`` functions.

        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=100, num_training_steps=1000)
        sched.step()
    """

    def __init__(self, optimizer: Optimizer, kind: str, params: dict[str, Any], last_epoch: int = -1) -> None:
        self._ft_kind = kind
        self._ft_params = dict(params)
        _native.schedule_factor(kind, 0, self._ft_params)  # validates kind and parameters
        super().__init__(optimizer, last_epoch)


def get_constant_schedule(optimizer: Optimizer, last_epoch: int = -1) -> FactorSchedule:
    """Constant lr (factor 1)."""
    return FactorSchedule(optimizer, "constant", {"num_warmup_steps": 0}, last_epoch)


def get_constant_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int, last_epoch: int = -1) -> FactorSchedule:
    """Linear warm-up from 0 over ``num_warmup_steps``, then constant."""
    return FactorSchedule(optimizer, "constant", {"num_warmup_steps": num_warmup_steps}, last_epoch)


def get_linear_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1
) -> FactorSchedule:
    """Linear warm-up, then linear decay to 0 at ``num_training_steps``."""
    p = {"num_warmup_steps": num_warmup_steps, "num_training_steps": num_training_steps}
    return FactorSchedule(optimizer, "linear", p, last_epoch)


def get_cosine_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5, last_epoch: int = -1
) -> FactorSchedule:
    """Linear warm-up, then cosine decay (``num_cycles`` waves) to 0."""
    p = {"num_warmup_steps": num_warmup_steps, "num_training_steps": num_training_steps, "num_cycles": float(num_cycles)}
    return FactorSchedule(optimizer, "cosine", p, last_epoch)


def get_cosine_with_hard_restarts_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1, last_epoch: int = -1
) -> FactorSchedule:
    """Linear warm-up, then ``num_cycles`` cosine decays with hard restarts."""
    p = {"num_warmup_steps": num_warmup_steps, "num_training_steps": num_training_steps, "num_cycles": int(num_cycles)}
    return FactorSchedule(optimizer, "cosine_with_restarts", p, last_epoch)


def get_polynomial_decay_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    lr_end: float = 1e-7,
    power: float = 1.0,
    last_epoch: int = -1,
) -> FactorSchedule:
    """Linear warm-up, then polynomial decay from the optimizer's default lr to ``lr_end``."""
    lr_init = optimizer.defaults["lr"]
    if not (lr_init > lr_end):
        raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")
    p = {
        "num_warmup_steps": num_warmup_steps,
        "num_training_steps": num_training_steps,
        "lr_end": float(lr_end),
        "power": float(power),
        "lr_init": float(lr_init),
    }
    return FactorSchedule(optimizer, "polynomial", p, last_epoch)


def get_inverse_sqrt_schedule(
    optimizer: Optimizer, num_warmup_steps: int, timescale: int | None = None, last_epoch: int = -1
) -> FactorSchedule:
    """Linear warm-up, then ``1 / sqrt((step + shift) / timescale)``."""
    if timescale is None:
        timescale = num_warmup_steps or 10_000
    return FactorSchedule(optimizer, "inverse_sqrt", {"num_warmup_steps": num_warmup_steps, "timescale": timescale}, last_epoch)


def get_cosine_with_min_lr_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
) -> FactorSchedule:
    """Linear warm-up, then cosine decay to ``min_lr`` (or ``min_lr_rate`` × the lr)."""
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("Only one of min_lr or min_lr_rate should be set")
    elif min_lr is not None:
        min_lr_rate = min_lr / optimizer.defaults["lr"]
    elif min_lr_rate is None:
        raise ValueError("One of min_lr or min_lr_rate should be set through the `lr_scheduler_kwargs`")
    p = {
        "num_warmup_steps": num_warmup_steps,
        "num_training_steps": num_training_steps,
        "num_cycles": float(num_cycles),
        "min_lr_rate": float(min_lr_rate),
    }
    return FactorSchedule(optimizer, "cosine_with_min_lr", p, last_epoch)


def get_wsd_schedule(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_decay_steps: int,
    num_training_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
) -> FactorSchedule:
    """Warmup-stable-decay: warm up, hold, then decay to ``min_lr_ratio``."""
    import warnings

    if num_training_steps is None and num_stable_steps is None:
        raise ValueError("Either num_training_steps or num_stable_steps must be specified.")
    if num_training_steps is not None and num_stable_steps is not None:
        warnings.warn("Both num_training_steps and num_stable_steps are specified. num_stable_steps will be used.")
    if warmup_type not in ["linear", "cosine", "1-sqrt"]:
        raise ValueError(f"Unknown warmup type: {warmup_type}, expected 'linear', 'cosine' or '1-sqrt'")
    if decay_type not in ["linear", "cosine", "1-sqrt"]:
        raise ValueError(f"Unknown decay type: {decay_type}, expected 'linear', 'cosine' or '1-sqrt'")
    if num_stable_steps is None:
        num_stable_steps = num_training_steps - num_warmup_steps - num_decay_steps  # type: ignore[operator]
    p = {
        "num_warmup_steps": num_warmup_steps,
        "num_stable_steps": num_stable_steps,
        "num_decay_steps": num_decay_steps,
        "warmup_type": warmup_type,
        "decay_type": decay_type,
        "min_lr_ratio": float(min_lr_ratio),
        "num_cycles": float(num_cycles),
    }
    return FactorSchedule(optimizer, "warmup_stable_decay", p, last_epoch)


__all__ += [
    "FactorSchedule",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_linear_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_polynomial_decay_schedule_with_warmup",
    "get_inverse_sqrt_schedule",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_wsd_schedule",
]
