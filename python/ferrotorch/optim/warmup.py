"""Learning-rate warm-up, compatible with the ``pytorch_warmup`` 0.2.0 package (same classes,
functions, arguments, ``dampening()`` protocol, state and error texts), factors computed in
Rust.

    warmup = ferrotorch.optim.warmup.LinearWarmup(optimizer, warmup_period=2000)
    with warmup.dampening(): lr_scheduler.step()

``import pytorch_warmup as warmup`` → ``import ferrotorch.optim.warmup as warmup``. Each
class's ``warmup_factor`` takes pytorch_warmup's arguments (``LinearWarmup.warmup_factor(step,
warmup_period)``, ``RAdamWarmup.warmup_factor(step, beta2, rho_inf, offset)``), and
``BaseWarmup.warmup_factor`` raises ``NotImplementedError`` for a subclass to override. The
RAdam helpers ``rho_inf_fn``, ``rho_fn`` and ``get_offset`` are pytorch_warmup's scalar
formulas, written in Python as there (the per-step factors are Rust's).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.optim import Optimizer

from .. import _native

__all__ = [
    "BaseWarmup",
    "LinearWarmup",
    "ExponentialWarmup",
    "UntunedLinearWarmup",
    "UntunedExponentialWarmup",
    "RAdamWarmup",
    "rho_fn",
    "rho_inf_fn",
    "get_offset",
    "get_warmup_params",
]


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError("{} ({}) is not an Optimizer.".format(optimizer, type(optimizer).__name__))


def get_warmup_params(warmup_period: int | list[int], group_count: int) -> list[dict[str, Any]]:
    """One ``{"warmup_period": n}`` per param group, validated as pytorch_warmup does."""
    if isinstance(warmup_period, list):
        if len(warmup_period) != group_count:
            raise ValueError(
                "The size of warmup_period ({}) does not match the size of param_groups ({}).".format(
                    len(warmup_period), group_count
                )
            )
        for x in warmup_period:
            if not isinstance(x, int):
                raise TypeError("An element in warmup_period, {}, is not an int.".format(type(x).__name__))
            if x <= 0:
                raise ValueError("An element in warmup_period must be a positive integer, but is {}.".format(x))
        return [dict(warmup_period=x) for x in warmup_period]
    if isinstance(warmup_period, int):
        if warmup_period <= 0:
            raise ValueError("warmup_period must be a positive integer, but is {}.".format(warmup_period))
        return [dict(warmup_period=warmup_period) for _ in range(group_count)]
    raise TypeError("{} ({}) is not a list nor an int.".format(warmup_period, type(warmup_period).__name__))


class BaseWarmup:
    """Dampens each group's lr by a warm-up factor ω_t ∈ [0, 1] after every scheduler step.

        with warmup.dampening():
            lr_scheduler.step()
    """

    _kind = ""

    def __init__(self, optimizer: Optimizer, warmup_params: list[dict[str, Any]], last_step: int = -1) -> None:
        self.optimizer = optimizer
        self.warmup_params = warmup_params
        self.last_step = last_step
        self.lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.dampen()

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the optimizer (as pytorch_warmup)."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)

    def dampen(self, step: int | None = None) -> None:
        """Multiplies each group's lr by the factor of ``step`` (default: the next step)."""
        if step is None:
            step = self.last_step + 1
        self.last_step = step
        for group, params in zip(self.optimizer.param_groups, self.warmup_params):
            group["lr"] *= self.warmup_factor(step, **params)

    @contextmanager
    def dampening(self) -> Iterator[None]:
        """Restores the undampened lrs, lets the body step the lr schedulers, then dampens."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr
        yield
        self.lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.dampen()

    def warmup_factor(self, step: int, **params: Any) -> float:
        """The warm-up factor ω_t of step ``step`` for one group's ``warmup_params``;
        :meth:`dampen` calls it. Subclasses implement it (as in pytorch_warmup)."""
        raise NotImplementedError


class LinearWarmup(BaseWarmup):
    """ω_t = min(1, (t + 1) / warmup_period).

        warmup = LinearWarmup(optimizer, warmup_period=2000)
    """

    _kind = "linear"

    def __init__(self, optimizer: Optimizer, warmup_period: int | list[int], last_step: int = -1) -> None:
        _check_optimizer(optimizer)
        params = get_warmup_params(warmup_period, len(optimizer.param_groups))
        super().__init__(optimizer, params, last_step)

    def warmup_factor(self, step: int, warmup_period: int) -> float:  # type: ignore[override]
        """min(1, (step + 1) / warmup_period)."""
        return _native.warmup_factor(self._kind, step, {"warmup_period": warmup_period})


class ExponentialWarmup(BaseWarmup):
    """ω_t = 1 - exp(-(t + 1) / warmup_period).

        warmup = ExponentialWarmup(optimizer, warmup_period=1000)
    """

    _kind = "exponential"

    def __init__(self, optimizer: Optimizer, warmup_period: int | list[int], last_step: int = -1) -> None:
        _check_optimizer(optimizer)
        params = get_warmup_params(warmup_period, len(optimizer.param_groups))
        super().__init__(optimizer, params, last_step)

    def warmup_factor(self, step: int, warmup_period: int) -> float:  # type: ignore[override]
        """1 - exp(-(step + 1) / warmup_period)."""
        return _native.warmup_factor(self._kind, step, {"warmup_period": warmup_period})


class UntunedLinearWarmup(LinearWarmup):
    """Linear warm-up over ``2 / (1 - beta2)`` steps (Ma & Yarats, 2019).

        warmup = UntunedLinearWarmup(adam_optimizer)
    """

    def __init__(self, optimizer: Optimizer, last_step: int = -1) -> None:
        _check_optimizer(optimizer)
        periods = [_native.untuned_warmup_period("linear", g["betas"][1]) for g in optimizer.param_groups]
        super().__init__(optimizer, periods, last_step)


class UntunedExponentialWarmup(ExponentialWarmup):
    """Exponential warm-up with period ``1 / (1 - beta2)``.

        warmup = UntunedExponentialWarmup(adam_optimizer)
    """

    def __init__(self, optimizer: Optimizer, last_step: int = -1) -> None:
        _check_optimizer(optimizer)
        periods = [_native.untuned_warmup_period("exponential", g["betas"][1]) for g in optimizer.param_groups]
        super().__init__(optimizer, periods, last_step)


class RAdamWarmup(BaseWarmup):
    """RAdam's variance-rectification factor as a warm-up for Adam.

        warmup = RAdamWarmup(adam_optimizer)
    """

    _kind = "radam"

    def __init__(self, optimizer: Optimizer, last_step: int = -1) -> None:
        _check_optimizer(optimizer)
        params = []
        for g in optimizer.param_groups:
            beta2 = g["betas"][1]
            rho_inf, offset = _native.radam_warmup_params(beta2)
            params.append(dict(beta2=beta2, rho_inf=rho_inf, offset=offset))
        super().__init__(optimizer, params, last_step)

    def warmup_factor(self, step: int, beta2: float, rho_inf: float, offset: int) -> float:  # type: ignore[override]
        """RAdam's rectification factor at ``step + offset``."""
        return _native.warmup_factor(self._kind, step, {"beta2": beta2, "rho_inf": rho_inf, "offset": offset})


# ---- RAdam helpers (pytorch_warmup.radam's functions) -------------------------------------


def rho_inf_fn(beta2: float) -> float:
    """RAdam's constant ρ_∞ = 2 / (1 - β₂) - 1."""
    return 2.0 / (1 - beta2) - 1


def rho_fn(t: int, beta2: float, rho_inf: float) -> float:
    """RAdam's ρ_t = ρ_∞ - 2 t β₂ᵗ / (1 - β₂ᵗ) at iteration ``t``."""
    b2t = beta2**t
    return rho_inf - 2 * t * b2t / (1 - b2t)


def get_offset(beta2: float, rho_inf: float) -> int:
    """The smallest offset δ ≥ 1 with ρ_δ > 4 (``ValueError`` unless β₂ > 0.6)."""
    if not beta2 > 0.6:
        raise ValueError("beta2 ({}) must be greater than 0.6".format(beta2))
    offset = 1
    while True:
        if rho_fn(offset, beta2, rho_inf) > 4:
            return offset
        offset += 1
