"""The machinery shared by every ferrotorch optimizer: state init, the native step, fallbacks.

A ferrotorch optimizer is torch's own class (constructor, validation, defaults,
``state_dict`` format, hooks) with ``step`` replaced: each param group is one Rust call
that reads the group's params, grads and ``optimizer.state`` as they are at that moment,
checks every tensor and the memory they cover, bumps the step counters and runs the fused
kernel with the GIL released. Nothing about the tensors is cached between steps, so moved,
replaced, cleared or reshaped state is always seen. Tensors the kernel cannot take (CUDA,
non-contiguous, complex, sparse, tensor subclasses such as DTensor…) are stepped by torch's
own single-tensor functions, and a group whose buffers share memory (``Adam([p, p])``, a grad
that is another parameter) is stepped by torch in order, so results are torch's in every case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .. import _compat
from .._native import OptimizerSpec
from ..errors import FerrotorchRuntimeError, FerrotorchValueError

__all__: list[str] = []

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _cuda_plain(p: torch.Tensor) -> bool:
    """A plain tensor (no subclass such as DTensor) in CUDA memory: what the lean device path
    takes."""
    return p.is_cuda and type(p) in _PLAIN


def _place_fused_step(st: dict[str, Any], p: torch.Tensor, one_gpu: bool) -> None:
    """Puts ``st["step"]`` where torch's fused kernels read it: a float32 tensor on ``p``'s
    device (a checkpoint or torch's non-fused optimizer may keep it on the CPU). With
    ``one_gpu`` (``p`` on the only CUDA device) ``is_cuda`` settles the device, cheaper than
    comparing devices on every step."""
    step = st.get("step")
    if step is None:
        return
    if type(step) is torch.Tensor and step.dtype is torch.float32 and (step.is_cuda if one_gpu else step.device == p.device):
        return
    st["step"] = torch.as_tensor(step).to(p.device, torch.float32)


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """Runs a step's closure with grad enabled (steps run under no_grad); its loss, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _FusedOptimizer:
    """Mixin placed before a ``torch.optim`` class in the bases of a ferrotorch optimizer."""

    #: The native algorithm (its state keys, step counter, sparse policy and kernel).
    _spec: ClassVar[OptimizerSpec]
    #: Every key this optimizer may keep in a parameter's state.
    _state_key_set: ClassVar[frozenset[str]]
    #: Hyper-parameters every param group of this optimizer has (checked on load).
    _group_keys: ClassVar[tuple[str, ...]]

    # ---- per-algorithm hooks -------------------------------------------------------------
    def _new_state(self, group: dict[str, Any], p: torch.Tensor, key: str) -> torch.Tensor:
        """A fresh state tensor for ``key``, as torch's ``_init_group`` makes it."""
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _new_scalar(self, group: dict[str, Any], p: torch.Tensor, key: str) -> torch.Tensor:
        """A fresh one-element state tensor other than ``step`` (``mu_product``, ``eta``…)."""
        raise NotImplementedError(key)

    #: torch has a fused kernel for this algorithm on accelerators (Adam, AdamW, SGD).
    _device_fused: ClassVar[bool] = False

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        """Steps ``params`` (whose state dicts are ``st``) with torch's functional
        implementation, reading ``grads``;
        ``how`` picks it (``foreach=True``, ``fused=True`` with ``grad_scale``/``found_inf``),
        torch's default (single-tensor on CPU) otherwise."""
        raise NotImplementedError

    # ---- state ---------------------------------------------------------------------------
    def _new_step(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
        if group.get("fused") or group.get("capturable"):
            return torch.zeros((), dtype=_compat.scalar_dtype(is_fused=group.get("fused")), device=p.device)
        return torch.tensor(0.0, dtype=_compat.scalar_dtype())

    def _prepare_state(self, group: dict[str, Any], p: torch.Tensor, keys: list[str]) -> bool:
        """Creates missing state for ``p`` (which has a grad); True if a state tensor was
        created, so the kernel seeds it from the gradient where torch does (SGD)."""
        if group.get("fused"):
            _compat.check_fused(p)  # torch's error for what its fused kernels cannot take
        state = self.state[p]
        for key in self._spec.scalar_keys:
            value = state.get(key)
            if value is None:
                state[key] = self._new_step(group, p) if key == "step" else self._new_scalar(group, p, key)
            elif not torch.is_tensor(value):  # a float from an old checkpoint, as torch converts it
                state[key] = torch.tensor(float(value), dtype=_compat.scalar_dtype())
        first = False
        for key in keys:
            if state.get(key) is None:
                state[key] = self._new_state(group, p, key)
                first = True
        return first

    def _step_group(self, group: dict[str, Any], scale: float | None, clip: float | None) -> None:
        spec = self._spec
        if group.get("fused") and getattr(self, "_need_device_dtype_check_for_fused", True):
            # torch checks once per optimizer, on the params with grads (state may exist
            # already: Adagrad creates it in __init__).
            for p in group["params"]:
                if p.grad is not None:
                    _compat.check_fused(p)
            self._need_device_dtype_check_for_fused = False
        if self._step_cuda_group(group, clip):
            return
        first: list[int] = []
        before: dict[int, dict[str, Any] | None] = {}
        try:
            for _ in range(3):
                missing, slow, serial = spec.step(self.state, group, scale, clip, first)
                if not missing:
                    break
                keys = spec.state_keys(group)
                for i in missing:
                    p = group["params"][i]
                    before.setdefault(id(p), dict(self.state[p]) if p in self.state else None)
                    if self._prepare_state(group, p, keys):
                        first.append(i)
            else:
                raise FerrotorchRuntimeError(f"{spec.label}: could not create the optimizer state")
        except BaseException:
            # The native step changes nothing when it raises: undo the state made for it.
            for p in group["params"]:
                if id(p) in before:
                    old = before.pop(id(p))
                    if old is None:
                        self.state.pop(p, None)
                    else:
                        self.state[p] = old
            raise
        if serial:
            # Buffers share memory: torch's order, one parameter after the other.
            firsts = set(first)
            slow = [(i, i in firsts) for i, p in enumerate(group["params"]) if p.grad is not None]
        if slow:
            self._run_slow(group, slow, scale, clip)

    # ---- torch API -----------------------------------------------------------------------
    def _torch_step(self, closure: Callable[[], Any] | None) -> Any:
        """torch's own step, for settings only torch implements (differentiable, capturable)."""
        return _compat.torch_step(type(self), self, closure)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Performs a single optimization step; returns the closure's loss if one is given."""
        if _compat.is_compiling():
            # torch.compile(opt.step): the native step runs eagerly behind a graph break
            # (Dynamo would otherwise trace torch's own step, capturable, and never use ours).
            return _eager_step(self, closure)
        return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        if _compat.modes_active() or any(g.get("differentiable") or g.get("capturable") for g in self.param_groups):
            clip = self.__dict__.pop("_ft_clip_coef", None)
            if clip is not None:
                for g in self.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            p.grad.mul_(clip)
            return self._torch_step(closure)
        loss = closure_loss(closure)
        # GradScaler hands fused optimizers the scale and the inf flag as attributes.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        scale = float(grad_scale) if grad_scale is not None else None
        clip = self.__dict__.pop("_ft_clip_coef", None)
        with torch.no_grad():
            for group in self.param_groups:
                self._step_group(group, scale, clip)
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

        closure_loss(closure)
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

    def _run_slow(self, group: dict[str, Any], slow: list[tuple[int, bool]], scale: float | None, clip: float | None) -> None:
        on_device = [(i, f) for i, f in slow if _compat.accelerator(group["params"][i])]
        if on_device:
            dev_params = [group["params"][i] for i, _ in on_device]
            dev_states = [self.state[p] for p in dev_params]
            if self._device_fused:
                for p, st in zip(dev_params, dev_states):
                    _place_fused_step(st, p, one_gpu=False)
            self._device_step(group, dev_params, [p.grad for p in dev_params], dev_states, [f for _, f in on_device], clip)
            if len(on_device) == len(slow):
                return
            taken = {i for i, _ in on_device}
            slow = [(i, f) for i, f in slow if i not in taken]
        params = [group["params"][i] for i, _ in slow]
        # Unscaled/clipped copies, so nothing is written before torch's function has run.
        grads = [p.grad for p in params]
        if scale is not None:
            grads = [g / scale for g in grads]
        unscaled = grads
        if clip is not None:
            grads = [g * clip for g in grads]  # the stored grads stay unclipped
        self._fallback(group, params, grads, [self.state[p] for p in params], [f for _, f in slow])
        if scale is not None:
            # GradScaler's contract for fused optimizers (and the kernel's): grads end unscaled.
            for p, g in zip(params, unscaled):
                p.grad = g

    def _step_cuda_group(self, group: dict[str, Any], clip: float | None) -> bool:
        """A group whose parameters with grads are all plain CUDA tensors goes to torch's
        fused/foreach kernels (``_device_step``) after one Python pass over the parameters,
        the pass torch's own ``_init_group`` makes. The native planner's per-tensor checks
        guard CPU memory the Rust kernels write, and none is written here; skipping them is
        what keeps a GPU step as fast as ``fused=True``. False, with nothing done, for any
        other group (CPU, mixed devices, subclasses, no grads): the general path takes it."""
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for p in group["params"]:
            g = p.grad
            if g is not None:
                if not _cuda_plain(p):
                    return False
                params.append(p)
                grads.append(g)
        if not params:
            return False
        keys = self._spec.state_keys(group)
        want = set(keys).union(self._spec.scalar_keys)
        fused = self._device_fused
        one_gpu = fused and torch.cuda.device_count() == 1
        state = self.state
        first: list[bool] = []
        states: list[dict[str, Any]] = []
        created: dict[torch.Tensor, dict[str, Any] | None] = {}
        try:
            for p in params:
                st = state.get(p)
                new = False
                if st is None or st.keys() != want:  # missing keys (or extra ones: prepare is then a no-op)
                    created.setdefault(p, dict(st) if st is not None else None)
                    new = self._prepare_state(group, p, keys)
                    st = state[p]
                if fused:
                    _place_fused_step(st, p, one_gpu)
                first.append(new)
                states.append(st)
        except BaseException:
            for p, old in created.items():
                if old is None:
                    state.pop(p, None)
                else:
                    state[p] = old
            raise
        self._device_step(group, params, grads, states, first, clip)
        return True

    def _device_step(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        first: list[bool],
        clip: float | None,
    ) -> None:
        """Accelerator (CUDA, XPU, MPS) parameters: one call of torch's fused kernel for the
        group where torch has one (Adam, AdamW, SGD), its foreach kernels otherwise. The
        callers have put each ``step`` where the fused kernels read it."""
        grad_scale = getattr(self, "grad_scale", None)  # GradScaler's fused-optimizer protocol
        found_inf = getattr(self, "found_inf", None)
        # torch's fused SGD seeds momentum buffers only when all of them are new, and its fused
        # kernels take no sparse grads (nn.Embedding(sparse=True)): foreach, as torch's
        # default on a GPU, steps those.
        fused = (
            self._device_fused
            and (not any(first) or all(first) or "momentum_buffer" not in self._state_key_set)
            and not any(g.is_sparse for g in grads)
        )
        if grad_scale is not None and (clip is not None or not fused):
            # The fused kernel unscales by itself; otherwise unscale in place here (GradScaler's
            # contract: grads end unscaled), before clipping, as on the CPU path.
            torch._foreach_div_(grads, grad_scale.to(grads[0].device))
            grad_scale = None
        if clip is not None:
            grads = torch._foreach_mul(grads, clip)  # the stored grads stay unclipped
        if fused:
            self._fallback(group, params, grads, states, first, fused=True, grad_scale=grad_scale, found_inf=found_inf)
        else:
            self._fallback(group, params, grads, states, first, foreach=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict written by this optimizer or by its ``torch.optim`` twin."""
        # After the user's pre-hooks (a migration hook may fix an old checkpoint first).
        handle = self.register_load_state_dict_pre_hook(lambda opt, sd: self._check_loadable(sd))  # type: ignore[attr-defined]
        try:
            super().load_state_dict(state_dict)  # type: ignore[misc]
        finally:
            handle.remove()

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
                if key in self._spec.scalar_keys and torch.is_tensor(v) and v.numel() != 1:
                    raise FerrotorchValueError(
                        f"{name}.load_state_dict: state '{key}' of parameter {k} must have one element, "
                        f"got shape {tuple(v.shape)}"
                    )
                if key not in self._spec.scalar_keys and torch.is_tensor(v) and v.shape != p.shape:
                    raise FerrotorchValueError(
                        f"{name}.load_state_dict: state '{key}' of parameter {k} has shape "
                        f"{tuple(v.shape)}, but the parameter has shape {tuple(p.shape)}"
                    )


@torch.compiler.disable
def _eager_step(opt: _FusedOptimizer | _NativeStep, closure: Callable[[], Any] | None) -> Any:
    """``opt``'s native step, outside any Dynamo trace."""
    return opt._step(closure)


class _NativeStep:
    """The routing of an optimizer whose native step is its own ``_step`` (SparseAdam,
    Adafactor, Muon, LBFGS): under ``torch.compile`` the native step runs eagerly behind a graph break;
    under a torch function/dispatch mode (FakeTensorMode, a user's logging mode) torch's own
    step runs, so the mode sees every op."""

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        raise NotImplementedError

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs a single optimization step; returns the closure's loss if one is given."""
        if _compat.is_compiling():
            return _eager_step(self, closure)
        if _compat.modes_active():
            return _compat.torch_step(type(self), self, closure)
        return self._step(closure)
