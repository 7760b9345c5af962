"""``torch.optim.swa_utils`` under ferrotorch's name, so that

    from ferrotorch.optim.swa_utils import AveragedModel, SWALR, update_bn

works where a script imported them from ``torch.optim.swa_utils``. ``SWALR`` is torch's
class with its lr computed in Rust (bit for bit torch's numbers) and ferrotorch's scheduler
extras (exact resume, ``lr_curve``); ``AveragedModel``, ``update_bn`` and the averaging
functions are torch's own and work with any model ferrotorch trains:

    swa_model = AveragedModel(model)
    swa_sched = SWALR(ferrotorch_optimizer, swa_lr=0.05)
    ...; swa_model.update_parameters(model); swa_sched.step()
    update_bn(train_loader, swa_model)
"""

from __future__ import annotations

from typing import Any

from torch.optim import swa_utils as _swa
from torch.optim.swa_utils import (
    AveragedModel,
    get_ema_avg_fn,
    get_ema_multi_avg_fn,
    get_swa_avg_fn,
    get_swa_multi_avg_fn,
    update_bn,
)

from .. import _compat, _native
from .._compat import warn_get_lr_called_within_step as _warn_get_lr_called_within_step
from ._sched_base import _Ferro


class SWALR(_Ferro, _swa.SWALR):
    """Anneals each group's lr to ``swa_lr`` over ``anneal_epochs`` steps (cosine or
    linear), then holds it; torch's SWALR with the lr math in Rust.

        swa_sched = SWALR(opt, swa_lr=0.05, anneal_epochs=5, anneal_strategy="linear")
        for epoch in range(swa_start, epochs): train(); swa_model.update_parameters(model); swa_sched.step()
    """

    _ft_required = ("last_epoch", "_last_lr", "anneal_epochs")
    _ft_verbose = False

    def get_lr(self) -> list[Any]:  # type: ignore[override]
        kind = _compat.swalr_anneal_kind(self)
        if kind is not None:
            lrs = _native.swalr_lrs(self.optimizer.param_groups, _compat.sched_step_count(self), self.anneal_epochs, kind == "cos")
            if lrs is not None:
                _warn_get_lr_called_within_step(self)
                return lrs
        # An anneal function of the user's own, or float32/bf16 tensor lrs (whose arithmetic
        # runs in the tensor's dtype): torch's own formula.
        return super().get_lr()


__all__ = [
    "AveragedModel",
    "update_bn",
    "SWALR",
    "get_ema_multi_avg_fn",
    "get_swa_multi_avg_fn",
    "get_ema_avg_fn",
    "get_swa_avg_fn",
]
