"""Adafactor: torch.optim.Adafactor with the step computed in Rust."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import _compat
from .._native import adafactor_group
from ._fused import _NativeStep, closure_loss

__all__ = ["Adafactor"]


class Adafactor(_NativeStep, torch.optim.Adafactor):
    """Adafactor (Shazeer & Stern): a factored second moment for matrices, so its state is
    rows + cols per matrix instead of rows x cols. torch's class (constructor, state,
    checkpoints) with each parameter's step in Rust.

        opt = ferrotorch.optim.Adafactor(model.parameters(), lr=1e-2)
        loss.backward(); opt.step()

    Norms are summed in float64, so parameters agree with torch to rounding (fp32 ~1e-7,
    fp64 ~1e-15 per step), not bit for bit. bf16/fp16, tensor lrs, GradScaler's
    ``grad_scale``/``found_inf`` and non-CPU tensors are stepped by torch.
    """

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        _compat.graph_capture_health_check(self)
        loss = closure_loss(closure)
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        for group in self.param_groups:
            params, grads, row_vars, col_vars, variances, steps = _compat.adafactor_init_group(self, group)
            eps1, eps2 = group["eps"]
            lr = group["lr"]
            kw = dict(d=group["d"], lr=lr, beta2_decay=group["beta2_decay"], weight_decay=group["weight_decay"], eps2=eps2, maximize=group["maximize"])
            slow: list[int] | range = range(len(params))
            if not scaled and not isinstance(lr, torch.Tensor):
                slow = adafactor_group(params, grads, steps, row_vars, col_vars, variances, eps1=eps1, **kw)
            if slow:
                # One call for all of them: torch's per-call setup, paid once per tensor, made
                # 2000 small bf16 tensors 20 % slower than torch.optim.Adafactor itself.
                pick = [params, grads, row_vars, col_vars, variances, steps]
                _compat.adafactor(
                    *([t[i] for i in slow] for t in pick),
                    eps1=eps1, foreach=False, grad_scale=getattr(self, "grad_scale", None),
                    found_inf=getattr(self, "found_inf", None), **kw,
                )
        return loss
