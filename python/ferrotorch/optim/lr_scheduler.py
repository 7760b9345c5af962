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

import warnings
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim import lr_scheduler as _tls
from torch.optim.lr_scheduler import EPOCH_DEPRECATION_WARNING, LRScheduler  # noqa: F401  (torch's public constant)

from .. import _compat, _native
from .._compat import param_groups_val_list as _param_groups_val_list
from .._compat import update_param_group_val as _update_param_group_val
from .._compat import warn_get_lr_called_within_step as _warn_get_lr_called_within_step
from ..errors import FerrotorchTypeError, FerrotorchValueError
from ._sched_base import _Chainable, _chain, _check_verbose, _epoch_str, _FactorLR, _Ferro, _floats, _lrs, _print_lr, lr_curve

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
        if _compat.sched_is_initial(self):
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
        _compat.set_last_lr(self, _param_groups_val_list(self.optimizer, "lr"))
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
            _compat.cyclic_custom_scale_fn(self),
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
        cos = _compat.one_cycle_cosine(self)
        values = _native.one_cycle_step(
            self.last_epoch, self.total_steps, self.optimizer.param_groups, _compat.one_cycle_phases(self), cos, momentum
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
        _compat.set_last_lr(self, _param_groups_val_list(self.optimizer, "lr"))

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
        idx = bisect_right(self._milestones, 0)
        _compat.sequential_start(self, self._schedulers[idx])
        _compat.set_last_lr(self, schedulers[idx].get_last_lr())

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
        _compat.set_last_lr(self, scheduler.get_last_lr())


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
        _compat.set_last_lr(self, _param_groups_val_list(self._schedulers[-1].optimizer, "lr"))

    def step(self, metrics: Any = None) -> None:  # type: ignore[override]
        for scheduler in self._schedulers:
            if _is_plateau(scheduler):
                if metrics is None:
                    raise FerrotorchTypeError("ChainedScheduler.step() has a ReduceLROnPlateau member: pass the metric")
                scheduler.step(metrics)
            else:
                scheduler.step()
        _compat.set_last_lr(self, _param_groups_val_list(self._schedulers[-1].optimizer, "lr"))


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


from .hf_schedules import *  # noqa: E402,F401,F403  (transformers-style schedules)
from .hf_schedules import __all__ as _hf_all  # noqa: E402

__all__ += _hf_all
