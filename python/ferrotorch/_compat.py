"""Every private torch internal ferrotorch relies on, in one place.

torch's private helpers move between releases; anything outside this module uses only
torch's public API, so a new torch version is supported by adjusting this file.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import (  # noqa: F401  (re-exported for ferrotorch.optim.lr_scheduler)
    _param_groups_val_list as param_groups_val_list,
    _update_param_group_val as update_param_group_val,
    _warn_get_lr_called_within_step as warn_get_lr_called_within_step,
)
from torch.optim._adafactor import adafactor as _adafactor
from torch.optim._functional import sparse_adam as _sparse_adam
from torch.optim._muon import _adjust_lr as _muon_adjust_lr
from torch.optim._muon import _zeropower_via_newtonschulz as _muon_zeropower
from torch.optim._muon import muon as _muon
from torch.optim.lbfgs import _strong_wolfe
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_scalar_dtype, _to_scalar
from torch.optim.swa_utils import SWALR
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

__all__ = [
    "scalar_dtype",
    "torch_step",
    "is_compiling",
    "check_fused",
    "accelerator",
    "set_version_counters",
    "param_groups_val_list",
    "update_param_group_val",
    "warn_get_lr_called_within_step",
    "sparse_adam",
    "adafactor_init_group",
    "adafactor",
    "graph_capture_health_check",
    "muon_init_group",
    "muon",
    "muon_adjusted_lr",
    "strong_wolfe",
    "lbfgs_maximize",
    "to_scalar",
    "muon_copies_bf16",
    "sched_is_initial",
    "sched_step_count",
    "set_last_lr",
    "one_cycle_phases",
    "one_cycle_cosine",
    "cyclic_custom_scale_fn",
    "swalr_anneal_kind",
    "sequential_start",
    "mark_step_patched",
    "mark_stepped",
    "SCHEDULER_HOOKS",
    "FLOATS",
    "is_plain",
    "is_wrapped",
    "native_ok",
    "modes_active",
    "disjoint",
    "bump_version",
]


def scalar_dtype(is_fused: bool | None = None) -> torch.dtype:
    """The dtype torch gives ``state['step']`` (float32, or float64 under set_default_dtype)."""
    return _get_scalar_dtype(is_fused=is_fused)


def sparse_adam(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, **kw: Any) -> None:
    """torch's own SparseAdam math for one parameter (``torch.optim._functional.sparse_adam``):
    what ferrotorch's SparseAdam runs where its kernel cannot."""
    _sparse_adam([param], [grad], [exp_avg], [exp_avg_sq], [step], **kw)


def adafactor_init_group(opt: torch.optim.Adafactor, group: dict[str, Any]) -> tuple[list[Any], ...]:
    """torch's ``Adafactor._init_group``: validates the group's grads and creates missing
    state as torch does; returns ``(params, grads, row_vars, col_vars, variances, steps)``."""
    lists: tuple[list[Any], ...] = ([], [], [], [], [], [])
    torch.optim.Adafactor._init_group(opt, group, *lists)
    return lists


def adafactor(params: list[torch.Tensor], grads: list[Any], row_vars: list[Any], col_vars: list[Any], variances: list[Any], steps: list[torch.Tensor], **kw: Any) -> None:
    """torch's own Adafactor math (``torch.optim._adafactor.adafactor``)."""
    _adafactor(params, grads, row_vars, col_vars, variances, steps, **kw)


def muon_init_group(opt: Any, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """torch's ``Muon._init_group``: checks the group's grads and creates missing momentum
    buffers as torch does; returns ``(params, grads, momentum_buffers)``."""
    lists: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    torch.optim.Muon._init_group(opt, group, *lists)
    return lists


def muon(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], **kw: Any) -> None:
    """torch's own Muon math (``torch.optim._muon.muon``)."""
    _muon(params, grads, momentum_buffers, has_complex=False, **kw)


def muon_adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's ``_adjust_lr``: Muon's lr for a matrix of ``shape`` (rules vary by version)."""
    return float(_muon_adjust_lr(lr, adjust_lr_fn, shape))


@functools.cache
def muon_copies_bf16() -> bool:
    """Whether torch's Newton–Schulz copies a bf16 input (torch >= 2.15) rather than
    dividing it in place (``.bfloat16()`` returns a bf16 tensor itself): probed once."""
    x = torch.ones(2, 2, dtype=torch.bfloat16)
    _muon_zeropower(x, (3.4445, -4.775, 2.0315), 0, 1e-7)
    return bool((x == 1).all())


def strong_wolfe(obj_func: Callable[..., Any], x: Any, t: Any, d: Tensor, f: float, g: Tensor, gtd: Tensor, **kw: Any) -> tuple[Any, ...]:
    """torch's strong-Wolfe line search for LBFGS (``torch.optim.lbfgs._strong_wolfe``):
    ``(loss, flat_grad, t, func_evals)``."""
    return _strong_wolfe(obj_func, x, t, d, f, g, gtd, **kw)


_LBFGS_MAXIMIZE = "maximize" in inspect.signature(torch.optim.LBFGS.__init__).parameters


def lbfgs_maximize(group: dict[str, Any]) -> bool:
    """Whether LBFGS maximizes: torch >= 2.15 takes ``maximize`` (negated grads and losses);
    older torch has no such option and ignores the key."""
    return _LBFGS_MAXIMIZE and bool(group.get("maximize", False))


def to_scalar(x: Any) -> Any:
    """torch's ``_to_scalar`` for a group's lr (a 1-element tensor stays a tensor)."""
    return _to_scalar(x)


def graph_capture_health_check(opt: torch.optim.Optimizer) -> None:
    """torch's check that a step is not captured into a CUDA graph unsafely."""
    check = getattr(opt, "_accelerator_graph_capture_health_check", None) or getattr(opt, "_cuda_graph_capture_health_check")
    check()


# ---- schedulers: torch's private attributes and the hooks ferrotorch overrides ----------

#: The private methods of torch's schedulers that ferrotorch's subclasses override (checked
#: per torch version by tests/test_compat.py).
SCHEDULER_HOOKS: dict[str, tuple[str, ...]] = {
    "LRScheduler": ("_update_lr", "_initial_step"),
    **{
        name: ("_get_closed_form_lr",)
        for name in ("StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR", "CosineAnnealingLR")
    },
    "ReduceLROnPlateau": ("_reduce_lr",),
    "SequentialLR": ("recursive_undo",),
}


def sched_is_initial(sched: Any) -> bool:
    """Whether the scheduler is in its constructor's initial step (torch's ``_is_initial``)."""
    return bool(sched._is_initial)


def sched_step_count(sched: Any) -> int:
    """How many times ``step()`` has run, the initial one included (``_step_count``)."""
    return int(sched._step_count)


def set_last_lr(sched: Any, lrs: list[Any]) -> None:
    """What ``get_last_lr()`` returns from now on."""
    sched._last_lr = lrs


def one_cycle_phases(sched: Any) -> list[dict[str, Any]]:
    """OneCycleLR's phases (``end_step``, ``start_lr``/``end_lr`` keys, ...)."""
    return sched._schedule_phases


def one_cycle_cosine(sched: Any) -> bool:
    """OneCycleLR anneals with cosine (else linear)."""
    return getattr(sched, "_anneal_func_type", "cos") == "cos"


def cyclic_custom_scale_fn(sched: Any) -> Callable[[float], float] | None:
    """CyclicLR's user-given ``scale_fn``, or None for the built-in modes."""
    return sched._scale_fn_custom


def swalr_anneal_kind(sched: Any) -> str | None:
    """``"cos"`` or ``"linear"`` for SWALR's built-in anneal functions, None for a user's."""
    if sched.anneal_func is SWALR._cosine_anneal:
        return "cos"
    if sched.anneal_func is SWALR._linear_anneal:
        return "linear"
    return None


def sequential_start(sched: Any, first: Any) -> None:
    """torch's SequentialLR construction after its checks: undo the members' initial
    steps, then run the first phase's."""
    sched.recursive_undo()
    first._initial_step()


def mark_step_patched(step: Callable[..., Any]) -> None:
    """Schedulers leave this optimizer ``step`` unwrapped (no step-order tracking)."""
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


def mark_stepped(opt: Any) -> None:
    """As if ``opt.step()`` had run: no "scheduler stepped before optimizer" warning."""
    opt._opt_called = True


def is_compiling() -> bool:
    """True while Dynamo traces (``torch.compile(opt.step)``): torch's step is traced then."""
    return torch.compiler.is_compiling()


def torch_step(cls: type, opt: Any, closure: Callable[[], Any] | None) -> Any:
    """Runs the step of ``cls``'s torch.optim base on ``opt``, with torch's grad-mode
    wrapper but without its hook wrapper (``opt.step`` already ran the hooks)."""
    base = next(c for c in cls.__mro__ if c.__module__.startswith("torch.optim"))
    fn = base.step
    # Optimizer._patch_step_function wraps a class's step in profile_hook_step (marked
    # `hooked`) the first time one of its instances is built; under it lies the
    # _use_grad_for_differentiable wrapper that sets grad mode, which must stay.
    if getattr(fn, "hooked", False):
        fn = fn.__wrapped__
    return fn(opt, closure)


def check_fused(p: Any) -> None:
    """torch's error when ``fused=True`` is given a parameter its fused kernels cannot take."""
    _device_dtype_check_for_fused(p)


def is_plain(t: object) -> bool:
    """Exactly a ``torch.Tensor`` or ``Parameter``, no subclass (DTensor, FakeTensor, ...)."""
    return type(t) is Tensor or type(t) is torch.nn.Parameter


def accelerator(p: Tensor) -> bool:
    """True for a plain tensor on a non-CPU device that torch has fused and foreach
    optimizer kernels for (CUDA, XPU, MPS, ...): such groups are stepped by those kernels."""
    if not is_plain(p):
        return False
    kind = p.device.type
    return kind != "cpu" and kind != "meta" and kind in _get_fused_kernels_supported_devices()


#: ``set_version_counters(tensors, versions)``: what torch's in-place ops do to ``_version``;
#: the native steps call it for every tensor they wrote.
set_version_counters = torch._C._autograd._unsafe_set_version_counter


# ---- which tensors the Rust kernels may use as raw buffers ---------------------------
# Only plain, dense, contiguous CPU float tensors with real storage, outside any torch mode
# (fake, functional, tracing); everything else (DTensor, FakeTensor, meta, subclasses,
# expanded or strided views) goes to torch's own implementation.

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
_is_functional = getattr(torch, "_is_functional_tensor", lambda t: False)


def is_wrapped(t: Tensor) -> bool:
    """A torch.func (functorch) wrapper or a functionalization tensor."""
    return bool(_is_functorch_wrapped(t) or _is_functional(t))


def native_ok(t: object) -> bool:
    """True for a plain ``torch.Tensor``/``Parameter`` the kernels can use as a flat buffer."""
    if not is_plain(t):
        return False
    if t.is_meta or t.device.type != "cpu" or t.layout != torch.strided or t.is_nested:
        return False
    if t.dtype not in FLOATS or not t.is_contiguous() or t.is_neg() or t.is_inference():
        return False
    if is_wrapped(t):
        return False
    try:
        return t.numel() == 0 or t.untyped_storage().data_ptr() != 0
    except (RuntimeError, NotImplementedError):  # no storage (a wrapper of some kind)
        return False


def modes_active() -> bool:
    """A dispatch mode (FakeTensorMode, functionalization, ...), a torch function mode
    other than ``set_default_device``'s, or torch.compile tracing is active."""
    if torch._C._len_torch_dispatch_stack() > 0:
        return True
    if torch._C._is_torch_function_mode_enabled():
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext

        if any(not isinstance(m, DeviceContext) for m in _get_current_function_mode_stack()):
            return True
    return torch.compiler.is_compiling()


def disjoint(tensors: Iterable[Tensor]) -> bool:
    """No two (contiguous) tensors share a byte of memory."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    return all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))


def bump_version(tensors: list[Tensor]) -> None:
    """Marks tensors written by a kernel as modified in place, as torch's in-place ops do
    (autograd then refuses stale saved values)."""
    if tensors:
        set_version_counters(tuple(tensors), tuple(t._version + 1 for t in tensors))
