"""SparseAdam: torch.optim.SparseAdam with the row updates computed in Rust."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .. import _compat
from .._native import sparse_adam_step
from ._fused import _NativeStep, closure_loss

__all__ = ["SparseAdam"]

_DENSE = "SparseAdam does not support dense gradients, please consider Adam instead"


class SparseAdam(_NativeStep, torch.optim.SparseAdam):
    """Adam for sparse gradients (``nn.Embedding(..., sparse=True)``): only the rows a
    gradient touches are updated. torch's class (constructor, state, checkpoints) with the
    update in Rust, bit for bit torch's numbers.

        emb = torch.nn.Embedding(10_000, 64, sparse=True)
        opt = ferrotorch.optim.SparseAdam(emb.parameters(), lr=1e-3)

    One difference: a dense gradient raises torch's error before anything is updated
    (torch raises it after stepping the parameters before it).
    """

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.grad.is_sparse:
                    raise RuntimeError(_DENSE)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.dim() != 0:  # torch's _to_scalar
                lr = lr.squeeze()
            hyper = dict(eps=group["eps"], beta1=beta1, beta2=beta2, lr=lr, maximize=group.get("maximize", False))
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                self._step_one(p, state, hyper)
        return loss

    @staticmethod
    def _step_one(p: torch.Tensor, state: dict[str, Any], hyper: dict[str, Any]) -> None:
        grad, step = p.grad, state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        # torch coalesces (summing duplicate indices) before its non-linear update; so do we,
        # with torch's own coalesce. Negating for maximize commutes with the summation.
        g = grad.coalesce() if isinstance(grad, torch.Tensor) and type(grad) is torch.Tensor else None
        if g is not None and g.layout == torch.sparse_coo and isinstance(step, int):
            if g.values().numel() == 0:
                return  # torch skips an empty gradient (the step count still advances)
            kw = dict(hyper)
            lr = kw["lr"]
            if isinstance(lr, torch.Tensor):
                # torch computes the step size in the lr tensor's dtype (float32 by default).
                b1, b2 = kw["beta1"], kw["beta2"]
                kw["tensor_lr_step_size"] = float(lr * math.sqrt(1 - b2**step) / (1 - b1**step))
                kw["lr"] = float(lr)
            # coalesce can return the indices as a transposed view (several sparse dims).
            if sparse_adam_step(p, exp_avg, exp_avg_sq, g.indices().contiguous(), g.values(), step=step, **kw):
                return
        _compat.sparse_adam(p, grad, exp_avg, exp_avg_sq, step, **hyper)
