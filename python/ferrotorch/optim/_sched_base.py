"""What every ferrotorch scheduler shares: exact resume and state checks, ``lr_curve``,
torch's removed ``verbose`` argument, and the calls into the Rust schedule math.

    curve = lr_curve(sched, 1000)          # the next 1000 lrs, the scheduler untouched
    plt.plot(curve[:, 0])
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as _tls
from torch.optim.lr_scheduler import LRScheduler

from .. import _compat, _native
from .._compat import update_param_group_val as _update_param_group_val
from .._compat import warn_get_lr_called_within_step as _warn_get_lr_called_within_step
from ..errors import FerrotorchTypeError, FerrotorchValueError

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


_compat.mark_step_patched(_GhostOptimizer.step)


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
    _compat.mark_stepped(ghost)
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
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr()):  # type: ignore[attr-defined]
            _update_param_group_val(group, "lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)

    def lr_curve(self, steps: int, key: str = "lr", metrics: Sequence[float] | None = None) -> np.ndarray:
        """The lrs (or ``key`` values) of the next ``steps`` steps; see :func:`lr_curve`."""
        return lr_curve(self, steps, key, metrics)


def _chain(sched: Any, kind: str, closed: bool = False, a: float = 0.0, b: float = 0.0, c: float = 0.0, milestones: list[int] | None = None) -> list[float] | None:
    # The Rust side reads the groups' lrs itself; hyper-parameters go positionally.
    return _native.schedule_lrs(
        kind, sched.optimizer.param_groups, sched.base_lrs, sched.last_epoch, _compat.sched_is_initial(sched), _compat.sched_step_count(sched), closed, a, b, c, milestones
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



class _FactorLR(_Ferro, LRScheduler):
    """``lr = base_lr * factor(last_epoch)`` with the factor from a named Rust schedule."""

    _ft_required = ("last_epoch", "_last_lr", "base_lrs", "_ft_kind", "_ft_params")
    _ft_kind: str
    _ft_params: dict[str, Any]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        _warn_get_lr_called_within_step(self)
        f = _native.schedule_factor(self._ft_kind, self.last_epoch, self._ft_params)
        return _native.scale_lrs(_floats(self.base_lrs), [f] * len(self.base_lrs))
