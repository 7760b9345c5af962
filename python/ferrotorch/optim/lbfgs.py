"""L-BFGS: torch.optim.LBFGS with its vector work (the two-loop recursion, gathering the
grads, moving the parameters) done in Rust on flat buffers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import _compat, _native
from ._fused import _NativeStep

__all__ = ["LBFGS"]


class LBFGS(_NativeStep, torch.optim.LBFGS):
    """L-BFGS with optional strong-Wolfe line search: torch's class (constructor, state
    keys, checkpoints, closures) whose per-iteration vector work runs in Rust: the two-loop
    recursion over the ``history_size`` stored pairs is one call instead of ~4 torch ops per
    pair, and gathering grads or moving parameters is one call instead of one per parameter.

        opt = ferrotorch.optim.LBFGS(model.parameters(), lr=1, line_search_fn="strong_wolfe")
        opt.step(closure)          # closure: zero_grad, loss, backward, return loss

    Dot products are summed in float64 and rounded once, so directions agree with torch's
    to the rounding of the parameters' dtype (torch's BLAS sums in its own order), not bit
    for bit. fp32/fp64 CPU parameters run natively; anything else runs torch's code.
    ``state["al"]`` is a 1-D tensor (torch keeps a list; both read each other's).
    ``maximize`` exists where torch's LBFGS has it (torch >= 2.15).
    """

    # ---- torch's helpers, one native call each (torch's code when the call declines) ----

    def _flat(self, sources: list[Tensor | None]) -> Tensor | None:
        """``cat`` of ``sources`` (one per parameter, None for zeros) in one Rust call, or
        None when it declines (it checks every tensor; ``out`` is a CPU buffer it fills). A
        single parameter is declined too: torch's cat of one view is one op already, and
        checking it costs more than it saves."""
        params = self._params
        if len(params) < 2 or params[0].device.type != "cpu":
            return None
        out = torch.empty(self._numel(), dtype=params[0].dtype)
        return out if _native.lbfgs_gather(params, sources, out) else None

    def _gather_flat_grad(self) -> Tensor:
        out = self._flat([p.grad for p in self._params])
        if out is None:
            return super()._gather_flat_grad()
        if _compat.lbfgs_maximize(self.param_groups[0]):
            out.neg_()  # torch >= 2.15's maximize (its own gather negates too)
        return out

    def _add_grad(self, step_size: Any, update: Tensor) -> None:
        # one parameter: torch's single add_, as in _flat
        if len(self._params) > 1 and type(update) is Tensor and _native.lbfgs_add(self._params, update, float(step_size)):
            return
        super()._add_grad(step_size, update)

    def _clone_param(self) -> Any:
        out = self._flat(list(self._params))  # a flat copy; _set_param takes it back
        return super()._clone_param() if out is None else out

    def _set_param(self, params_data: Any) -> None:
        if isinstance(params_data, Tensor):
            if not _native.lbfgs_set(self._params, params_data):
                offset = 0
                for p in self._params:
                    n = p.numel()
                    p.copy_(params_data[offset : offset + n].view_as(p))
                    offset += n
            return
        super()._set_param(params_data)

    def _direction(self, g: Tensor, dirs: list[Tensor], stps: list[Tensor], ro: list[Any], h_diag: Any, al: Any) -> Tensor:
        """The two-loop recursion: ``d = H(-g)`` from the stored pairs."""
        d = torch.empty_like(g, memory_format=torch.contiguous_format)
        if isinstance(al, Tensor) and _native.lbfgs_two_loop(g, dirs, stps, ro, h_diag, al, d):
            return d
        q = g.neg()
        for i in range(len(dirs) - 1, -1, -1):
            al[i] = stps[i].dot(q) * ro[i]
            q.add_(dirs[i], alpha=-al[i])
        d = r = torch.mul(q, h_diag)
        for i in range(len(dirs)):
            be_i = dirs[i].dot(r) * ro[i]
            r.add_(stps[i], alpha=al[i] - be_i)
        return d

    # ---- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None) -> Any:  # type: ignore[override]
        if len(self.param_groups) != 1:
            raise AssertionError(f"Expected exactly one param_group, but got {len(self.param_groups)}")
        if not self._params:  # torch's own answer (2.15 returns closure(); older ones raise)
            return _compat.torch_step(type(self), self, closure)
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        sign = -1.0 if _compat.lbfgs_maximize(group) else 1.0  # maximize: minimise -loss
        lr = _compat.to_scalar(group["lr"])
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        line_search, history_size = group["line_search_fn"], group["history_size"]

        state = self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        orig_loss = closure()
        loss = sign * float(orig_loss)
        evals = 1
        state["func_evals"] += 1
        g = self._gather_flat_grad()
        if g.abs().max() <= tol_grad:  # already optimal
            return orig_loss

        d, t = state.get("d"), state.get("t")
        dirs, stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        h_diag, prev_g, prev_loss = state.get("H_diag"), state.get("prev_flat_grad"), state.get("prev_loss")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:  # steepest descent to start
                d = g.neg()
                dirs, stps, ro, h_diag = [], [], [], 1
            else:
                # Record the curvature pair of the last step when it keeps H positive definite.
                y = g.sub(prev_g)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:
                    if len(dirs) == history_size:
                        dirs.pop(0)
                        stps.pop(0)
                        ro.pop(0)
                    dirs.append(y)
                    stps.append(s)
                    ro.append(1.0 / ys)
                    h_diag = ys / y.dot(y)
                al = state.get("al")
                if not (isinstance(al, Tensor) and al.dtype == g.dtype and al.numel() == history_size):
                    al = state["al"] = torch.zeros(history_size, dtype=g.dtype, device=g.device)
                d = self._direction(g, dirs, stps, ro, h_diag, al)

            if prev_g is None:
                prev_g = g.clone(memory_format=torch.contiguous_format)
            else:
                prev_g.copy_(g)
            prev_loss = loss

            # The first step is scaled to the gradient; later ones take the lr as it is.
            t = min(1.0, 1.0 / g.abs().sum()) * lr if state["n_iter"] == 1 else lr
            gtd = g.dot(d)
            if gtd > -tol_change:  # not a descent direction
                break

            ls_evals = 0
            if line_search is not None:
                if line_search != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                x_init = self._clone_param()

                def obj_func(x: Any, t: Any, d: Tensor) -> tuple[float, Tensor]:
                    return self._directional_evaluate(closure, x, t, d)

                loss, g, t, ls_evals = _compat.strong_wolfe(obj_func, x_init, t, d, loss, g, gtd, max_ls=max_eval - evals)
                self._add_grad(t, d)
                opt_cond = g.abs().max() <= tol_grad
            else:
                self._add_grad(t, d)
                opt_cond = False
                if n_iter != max_iter:
                    loss = sign * float(closure())
                    g = self._gather_flat_grad()
                    opt_cond = g.abs().max() <= tol_grad
                    ls_evals = 1
            evals += ls_evals
            state["func_evals"] += ls_evals

            if n_iter == max_iter or evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= tol_change or abs(loss - prev_loss) < tol_change:
                break  # no progress

        state["d"], state["t"] = d, t
        state["old_dirs"], state["old_stps"], state["ro"] = dirs, stps, ro
        state["H_diag"], state["prev_flat_grad"], state["prev_loss"] = h_diag, prev_g, prev_loss
        return orig_loss
