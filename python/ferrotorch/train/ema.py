"""Exponential moving average of a model's weights (timm's ModelEmaV3, updated in Rust).

    ema = ModelEMA(model, decay=0.999)
    for batch in loader: train_step(); ema.update(model, step)
    with ema.average_parameters(model): evaluate(model)   # or evaluate(ema.module)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from copy import deepcopy

import torch

from .. import _native
from .._compat import bump_version, modes_active, native_ok
from ..errors import FerrotorchValueError

__all__ = ["ModelEMA"]


class ModelEMA(torch.nn.Module):
    """A shadow copy of ``model`` whose floating parameters and buffers follow
    ``ema = decay * ema + (1 - decay) * model`` (integer buffers are copied).

    Same arguments and numbers as timm's ``ModelEmaV3`` (``decay``, ``min_decay``,
    ``update_after_step``, ``use_warmup``, ``warmup_gamma``, ``warmup_power``,
    ``exclude_buffers``), plus ``update_every``: only every N-th ``update(model, step)`` call
    with a step does the (fused, one-pass) update.

        ema = ModelEMA(model, decay=0.9998, use_warmup=True)
        ema.update(model, step=global_step)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        exclude_buffers: bool = False,
        update_every: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ModelEMA: model must be a torch.nn.Module, got {type(model).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise FerrotorchValueError(f"ModelEMA: decay must be in [0, 1], got {decay!r}")
        if not 0.0 <= min_decay <= 1.0:
            raise FerrotorchValueError(f"ModelEMA: min_decay must be in [0, 1], got {min_decay!r}")
        if not isinstance(update_every, int) or update_every < 1:
            raise FerrotorchValueError(f"ModelEMA: update_every must be a positive int, got {update_every!r}")
        if warmup_gamma <= 0:
            raise FerrotorchValueError(f"ModelEMA: warmup_gamma must be positive, got {warmup_gamma!r}")
        self.module = deepcopy(model)
        self.module.eval()
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.exclude_buffers = exclude_buffers
        self.update_every = update_every

    def get_decay(self, step: int | None = None) -> float:
        """The decay used for an update at ``step`` (timm's warm-up formula)."""
        return _native.ema_decay(
            step, self.decay, self.min_decay, self.update_after_step, self.use_warmup, self.warmup_gamma, self.warmup_power
        )

    def _pairs(self, model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.exclude_buffers:
            yield from zip(self.module.parameters(), model.parameters())
        else:
            yield from zip(self.module.state_dict().values(), model.state_dict().values())

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        """Moves the average towards ``model``'s current weights."""
        if step is not None and self.update_every > 1 and step % self.update_every:
            return
        weight = 1.0 - self.get_decay(step)
        native = not modes_active()
        fast_e: list[torch.Tensor] = []
        fast_m: list[torch.Tensor] = []

        def flush() -> None:  # the kernel's pairs, before any later pair (list order, as timm)
            if fast_e:
                _native.ema_update(fast_e, fast_m, weight)
                bump_version(fast_e)
                fast_e.clear()
                fast_m.clear()

        for e, m in self._pairs(model):
            if not e.is_floating_point():
                e.copy_(m)
            elif native and e.dtype == m.dtype and e.shape == m.shape and native_ok(e) and native_ok(m):
                fast_e.append(e)
                fast_m.append(m)
            else:
                flush()
                e.lerp_(m.to(device=e.device, dtype=e.dtype), weight)
        flush()
        if self.exclude_buffers:
            for eb, mb in zip(self.module.buffers(), model.buffers()):
                eb.copy_(mb)

    @torch.no_grad()
    def set(self, model: torch.nn.Module) -> None:
        """Copies ``model``'s weights into the average."""
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            e.copy_(m)

    @contextlib.contextmanager
    def average_parameters(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily loads the averaged weights into ``model`` (to evaluate it), then
        restores its own weights."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.module.state_dict())
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return self.module(*args, **kwargs)
