"""Learning-rate warm-up, compatible with the ``pytorch_warmup`` package (same classes,
arguments, ``dampening()`` protocol, state and error texts), factors computed in Rust.

    warmup = ferrotorch.optim.warmup.LinearWarmup(optimizer, warmup_period=2000)
    with warmup.dampening(): lr_scheduler.step()
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
        return _native.warmup_factor(self._kind, step, params)


class LinearWarmup(BaseWarmup):
    """ω_t = min(1, (t + 1) / warmup_period).

        warmup = LinearWarmup(optimizer, warmup_period=2000)
    """

    _kind = "linear"

    def __init__(self, optimizer: Optimizer, warmup_period: int | list[int], last_step: int = -1) -> None:
        _check_optimizer(optimizer)
        params = get_warmup_params(warmup_period, len(optimizer.param_groups))
        super().__init__(optimizer, params, last_step)


class ExponentialWarmup(BaseWarmup):
    """ω_t = 1 - exp(-(t + 1) / warmup_period).

        warmup = ExponentialWarmup(optimizer, warmup_period=1000)
    """

    _kind = "exponential"

    def __init__(self, optimizer: Optimizer, warmup_period: int | list[int], last_step: int = -1) -> None:
        _check_optimizer(optimizer)
        params = get_warmup_params(warmup_period, len(optimizer.param_groups))
        super().__init__(optimizer, params, last_step)


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
