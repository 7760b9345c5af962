"""Muon: torch.optim.Muon with each group's step run through ATen's C++ API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import _compat
from .._native import muon_group
from ._fused import _NativeStep, closure_loss

__all__ = ["Muon"]


def _number(x: Any) -> bool:
    return type(x) in (int, float)


class Muon(_NativeStep, torch.optim.Muon):
    """Muon (momentum orthogonalised by Newton–Schulz) for 2-D parameters: torch's class
    (constructor, state, checkpoints) whose step runs torch's own ops from C++, so the
    numbers are torch's bit for bit without ~20 Python op calls per parameter.

        opt = ferrotorch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
        loss.backward(); opt.step()

    The Newton–Schulz matmuls are libtorch's (bf16, as in torch), so large matrices gain
    little; the saving is per parameter. Tensor lrs, tensor subclasses, non-CPU tensors and
    grads or buffers whose dtype or shape differs from their parameter's are stepped by torch.
    """

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            params, grads, bufs = _compat.muon_init_group(self, group)
            lr = group["lr"]
            kw = dict(
                weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"], eps=group["eps"],
                adjust_lr_fn=group["adjust_lr_fn"],
            )
            scalars = (kw["weight_decay"], kw["momentum"], kw["eps"])
            native = (
                _number(lr)  # a tensor lr makes torch's scalar math tensor math (in its dtype)
                and all(_number(x) for x in scalars)
                and type(kw["nesterov"]) is bool
                and type(kw["ns_steps"]) is int
                and (kw["adjust_lr_fn"] is None or type(kw["adjust_lr_fn"]) is str)
            )
            if native:
                fn = kw["adjust_lr_fn"]
                # (a non-2-D one is refused by muon_group with torch's error)
                adjusted = [_compat.muon_adjusted_lr(lr, fn, p.shape) if p.ndim == 2 else 0.0 for p in params]
                native_kw = {k: v for k, v in kw.items() if k != "adjust_lr_fn"}
                if muon_group(params, grads, bufs, adjusted, lr=float(lr), copy_bf16=_compat.muon_copies_bf16(), **native_kw):
                    continue
            _compat.muon(params, grads, bufs, lr=lr, **kw)
        return loss
