"""Hugging Face transformers' schedules (``get_*_schedule*``), computed in Rust.

Same names, arguments and values as transformers' functions; they return a scheduler (not
a LambdaLR), so their state dicts pickle without lambdas. ``ferrotorch.optim.lr_scheduler``
re-exports them all.

    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=100, num_training_steps=1000)
    sched.step()
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from .. import _native
from ._sched_base import _FactorLR


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


__all__ = [
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
