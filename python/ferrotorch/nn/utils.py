"""``torch.nn.utils``' gradient clipping with the norm computed in one Rust pass.

Same signatures and results as torch's functions:

    total_norm = ferrotorch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    ferrotorch.nn.utils.clip_grad_value_(model.parameters(), clip_value=0.5)
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from .. import _native
from .._compat import bump_version, disjoint, modes_active, native_ok

__all__ = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_coefficient"]

# Norms the kernels compute: 0, inf and -inf exactly; 1 and 2 accumulated in float64.
_NATIVE_NORMS = (0.0, 1.0, 2.0, math.inf, -math.inf)


def _fast(tensors: list[Tensor]) -> bool:
    """Tensors the Rust kernels may touch: plain contiguous CPU floats of one dtype that do
    not overlap and are not part of a graph (create_graph), outside any torch mode."""
    if not tensors or modes_active():
        return False
    dtype = tensors[0].dtype
    return all(t.dtype == dtype and not t.requires_grad and native_ok(t) for t in tensors) and disjoint(tensors)


def _torch_handles(tensors: list[Tensor], norm_type: float) -> bool:
    """Cases torch's own implementation must decide: other norm types, and an infinity
    norm of an empty tensor (torch raises: it has no identity)."""
    if norm_type not in _NATIVE_NORMS or not _fast(tensors):
        return True
    return math.isinf(norm_type) and any(t.numel() == 0 for t in tensors)


def _as_list(tensors: Tensor | Iterable[Tensor]) -> list[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def get_total_norm(tensors: Tensor | Iterable[Tensor], norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    """The norm of all ``tensors`` together, as ``torch.nn.utils.get_total_norm``."""
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    if _torch_handles(tensors, norm_type):
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    # Per-tensor norms from one Rust pass, combined as torch does: rounded to the grads'
    # dtype, then the norm of that vector.
    norms = torch.tensor(_native.grad_norms(tensors, norm_type), dtype=torch.float64).to(tensors[0].dtype)
    total_norm = torch.linalg.vector_norm(norms, norm_type)
    if error_if_nonfinite and (torch.isnan(total_norm) or torch.isinf(total_norm)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    return total_norm


def clip_coefficient(max_norm: float, total_norm: Tensor) -> Tensor:
    """``clamp(max_norm / (total_norm + 1e-6), max=1)``, in ``total_norm``'s dtype (torch's)."""
    return torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Scales the gradients so their total ``norm_type``-norm is at most ``max_norm``;
    returns the norm before clipping.

        norm = clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
    """
    is_generator = isinstance(parameters, types.GeneratorType)
    params = _as_list(parameters)
    if is_generator and len(params) == 0:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [p.grad for p in params if p.grad is not None]
    if _torch_handles(grads, float(norm_type)):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    coef = float(clip_coefficient(max_norm, total_norm))
    if coef != 1.0:  # multiplying by exactly 1 changes nothing
        _native.scale_grads(grads, coef)
    bump_version(grads)  # torch's mul_ always counts as an in-place write
    return total_norm


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """Clamps every gradient element to ``[-clip_value, clip_value]`` (NaN stays NaN).

        clip_grad_value_(model.parameters(), clip_value=0.5)
        optimizer.step()
    """
    params = _as_list(parameters)
    clip_value = float(clip_value)
    grads = [p.grad for p in params if p.grad is not None]
    if math.isnan(clip_value) or not _fast(grads):  # a NaN bound: torch makes every element NaN
        torch.nn.utils.clip_grad_value_(params, clip_value, foreach)
        return
    _native.clamp_grads(grads, clip_value)
    bump_version(grads)
