"""The machinery shared by every ferrotorch optimizer: plans, state init, fallbacks.

A ferrotorch optimizer is torch's own class (constructor, validation, defaults,
``state_dict`` format, hooks) with ``step`` replaced: each param group is resolved once
into a native ``GroupPlan``, and every later step is one Rust call per group that reads
the grads, checks all tensors, bumps the step counters and runs the fused kernel with the
GIL released. Tensors the kernel cannot take (CUDA, non-contiguous, complex, sparse…)
come back to Python and are stepped by torch's own single-tensor functions, so results
are torch's in every case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.optim.optimizer import _get_scalar_dtype

from .._native import GroupPlan
from ..errors import FerrotorchTypeError, FerrotorchValueError

__all__: list[str] = []


class _FusedOptimizer:
    """Mixin placed before a ``torch.optim`` class in the bases of a ferrotorch optimizer."""

    #: Name of the native kernel: "adam", "sgd", "rmsprop" or "adagrad".
    _kind: ClassVar[str]
    #: Every key this optimizer may keep in a parameter's state.
    _state_key_set: ClassVar[frozenset[str]]
    #: Hyper-parameters every param group of this optimizer has (checked on load).
    _group_keys: ClassVar[tuple[str, ...]]

    # ---- per-algorithm hooks -------------------------------------------------------------
    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """State tensors the kernel updates, in its order, for this group's settings."""
        raise NotImplementedError

    def _new_state(self, group: dict[str, Any], p: torch.Tensor, key: str) -> torch.Tensor:
        """A fresh state tensor for ``key``, as torch's ``_init_group`` makes it."""
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _fallback(self, group: dict[str, Any], params: list[torch.Tensor], first: list[bool]) -> None:
        """Steps ``params`` with torch's functional implementation."""
        raise NotImplementedError

    # ---- plans ---------------------------------------------------------------------------
    @property
    def _has_step(self) -> bool:
        return self._kind != "sgd"

    def _plans_cache(self) -> dict[int, tuple[tuple[Any, ...], GroupPlan]]:
        plans = self.__dict__.get("_ft_plans")
        if plans is None:
            plans = self.__dict__["_ft_plans"] = {}
        return plans

    def _invalidate_plans(self) -> None:
        """Forget every plan; the next step rebuilds them (O(params) once)."""
        self.__dict__["_ft_plans"] = {}

    def _new_step(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
        if group.get("fused") or group.get("capturable"):
            return torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device)
        return torch.tensor(0.0, dtype=_get_scalar_dtype())

    def _prepare_state(self, group: dict[str, Any], p: torch.Tensor, keys: tuple[str, ...]) -> bool:
        """Creates missing state for ``p`` (which has a grad); True if a momentum buffer
        is being created, so the kernel must seed it with the gradient (SGD)."""
        state = self.state[p]
        if self._has_step:
            step = state.get("step")
            if step is None:
                state["step"] = self._new_step(group, p)
            elif not torch.is_tensor(step):
                state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())
        first = False
        for key in keys:
            if state.get(key) is None:
                state[key] = self._new_state(group, p, key)
                first = first or key == "momentum_buffer" and self._kind == "sgd"
        return first

    def _build_plan(self, group: dict[str, Any]) -> GroupPlan:
        keys = self._state_keys(group)
        stateless = not keys and not self._has_step
        indices: list[int] = []
        params: list[torch.Tensor] = []
        states: list[list[torch.Tensor]] = []
        steps: list[torch.Tensor] = []
        first: list[bool] = []
        pending: list[torch.Tensor] = []
        for i, p in enumerate(group["params"]):
            if not isinstance(p, torch.Tensor):
                raise FerrotorchTypeError(
                    f"param_groups[...]['params'][{i}] must be a torch.Tensor, got {type(p).__name__}"
                )
            if not stateless and not self.state.get(p):
                if p.grad is None:  # torch creates state at the first step with a grad
                    pending.append(p)
                    continue
            is_first = False if stateless else self._prepare_state(group, p, keys)
            st = self.state[p] if not stateless else {}
            indices.append(i)
            params.append(p)
            states.append([st[k] for k in keys])
            if self._has_step:
                steps.append(st["step"])
            first.append(is_first)
        return GroupPlan(self._kind, indices, params, states, steps if self._has_step else None, first, pending)

    def _plan(self, index: int, group: dict[str, Any]) -> GroupPlan:
        params = group["params"]
        key = (group, params, len(params), self._state_keys(group), self.state)
        cached = self._plans_cache().get(index)
        if cached is not None:
            old = cached[0]
            if all(a is b for a, b in zip(old[:2], key[:2])) and old[2] == key[2] and old[3] == key[3] and old[4] is key[4]:
                return cached[1]
        plan = self._build_plan(group)
        self._plans_cache()[index] = (key, plan)
        return plan

    # ---- torch API -----------------------------------------------------------------------
    def _torch_step(self, closure: Callable[[], Any] | None) -> Any:
        """torch's own step, for settings only torch implements (differentiable, capturable)."""
        base = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.optim"))
        fn = base.step
        return getattr(fn, "__wrapped__", fn)(self, closure)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Performs a single optimization step; returns the closure's loss if one is given."""
        if any(g.get("differentiable") or g.get("capturable") for g in self.param_groups):
            clip = self.__dict__.pop("_ft_clip_coef", None)
            if clip is not None:
                for g in self.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            p.grad.mul_(clip)
            return self._torch_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler hands fused optimizers the scale and the inf flag as attributes.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        scale = float(grad_scale) if grad_scale is not None else None
        clip = self.__dict__.pop("_ft_clip_coef", None)
        with torch.no_grad():
            for index, group in enumerate(self.param_groups):
                plan = self._plan(index, group)
                rebuild, slow = plan.step(group, scale, clip)
                if rebuild:
                    self._plans_cache().pop(index, None)
                    plan = self._plan(index, group)
                    rebuild, slow = plan.step(group, scale, clip)
                if slow:
                    self._run_slow(index, group, slow, scale, clip)
        return loss

    def clip_grad_norm_and_step(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        closure: Callable[[], Any] | None = None,
    ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` followed by ``step()``, fused:
        one read of the grads for the norm, the clip coefficient applied inside the step
        kernel. Parameters and state end exactly as with clip-then-step; the stored grads
        are left unclipped. Returns the total norm before clipping.

            opt.zero_grad(); loss.backward()
            norm = opt.clip_grad_norm_and_step(max_norm=1.0)
        """
        from ..nn.utils import clip_coefficient, get_total_norm

        if closure is not None:
            with torch.enable_grad():
                closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        total_norm = get_total_norm(grads, norm_type, error_if_nonfinite)
        if grads:
            coef = float(clip_coefficient(max_norm, total_norm))
            if coef != 1.0:
                self.__dict__["_ft_clip_coef"] = coef
        try:
            self.step()
        finally:
            self.__dict__.pop("_ft_clip_coef", None)
        return total_norm

    def _run_slow(
        self, index: int, group: dict[str, Any], slow: list[tuple[int, bool]], scale: float | None, clip: float | None = None
    ) -> None:
        params = [group["params"][i] for i, _ in slow]
        if scale is not None:
            for p in params:
                p.grad.div_(scale)
        if clip is not None:  # torch's path reads the grads, so clip them in place here
            for p in params:
                p.grad.mul_(clip)
        first = [f for _, f in slow]
        self._fallback(group, params, first)
        if any(first):
            # The fallback made new momentum buffers: the plan must point at them.
            self._plans_cache().pop(index, None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        self._invalidate_plans()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._invalidate_plans()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict written by this optimizer or by its ``torch.optim`` twin."""
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._invalidate_plans()

    def _check_loadable(self, state_dict: Any) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise FerrotorchValueError(
                f"{name}.load_state_dict expects the dict returned by optimizer.state_dict() "
                f"(keys 'state' and 'param_groups'), got {type(state_dict).__name__}"
                + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else "")
            )
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, dict) for g in saved_groups):
            raise FerrotorchValueError(f"{name}.load_state_dict: 'param_groups' must be a list of dicts")
        for gi, g in enumerate(saved_groups):
            missing = [k for k in self._group_keys if k not in g]
            if missing or "params" not in g:
                raise FerrotorchValueError(
                    f"{name}.load_state_dict: param group {gi} of the loaded state dict has no "
                    f"{missing or ['params']}: it was not written by a {name} optimizer"
                )
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return  # torch raises its own ValueError for mismatched groups
        id_map = {
            old: p
            for s, g in zip(saved_groups, self.param_groups)
            for old, p in zip(s["params"], g["params"])
        }
        saved_state = state_dict["state"]
        if not isinstance(saved_state, dict):
            raise FerrotorchValueError(f"{name}.load_state_dict: 'state' must be a dict")
        for k, st in saved_state.items():
            p = id_map.get(k)
            if p is None:
                continue
            if not isinstance(st, dict):
                raise FerrotorchValueError(f"{name}.load_state_dict: state of parameter {k} must be a dict, got {type(st).__name__}")
            foreign = sorted(set(map(str, st)) - self._state_key_set)
            if foreign:
                raise FerrotorchValueError(
                    f"{name}.load_state_dict: state of parameter {k} has keys {sorted(map(str, st))}; "
                    f"a {name} state only has {sorted(self._state_key_set)} (is it from another optimizer?)"
                )
            for key, v in st.items():
                if key != "step" and torch.is_tensor(v) and v.shape != p.shape:
                    raise FerrotorchValueError(
                        f"{name}.load_state_dict: state '{key}' of parameter {k} has shape "
                        f"{tuple(v.shape)}, but the parameter has shape {tuple(p.shape)}"
                    )
