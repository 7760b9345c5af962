"""Which tensors the Rust kernels may read and write through a raw pointer.

Only plain, dense, contiguous CPU float tensors with real storage, outside any torch mode
(fake, functional, tracing); everything else (DTensor, FakeTensor, meta, subclasses,
expanded or strided views) goes to torch's own implementation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["FLOATS", "native_ok", "modes_active", "disjoint", "bump_version"]

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
_is_functional = getattr(torch, "_is_functional_tensor", lambda t: False)
_set_version = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)


def native_ok(t: object) -> bool:
    """True for a plain ``torch.Tensor``/``Parameter`` the kernels can use as a flat buffer."""
    if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
        return False
    if t.is_meta or t.device.type != "cpu" or t.layout != torch.strided or t.is_nested:
        return False
    if t.dtype not in FLOATS or not t.is_contiguous() or t.is_neg() or t.is_inference():
        return False
    if _is_functorch_wrapped(t) or _is_functional(t):
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
    if _set_version is not None and tensors:
        _set_version(tuple(tensors), tuple(t._version + 1 for t in tensors))
