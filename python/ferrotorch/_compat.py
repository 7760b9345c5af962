"""Every private torch internal ferrotorch relies on, in one place.

torch's private helpers move between releases; anything outside this module uses only
torch's public API, so a new torch version is supported by adjusting this file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import _get_scalar_dtype

__all__ = ["scalar_dtype", "torch_step", "is_compiling"]


def scalar_dtype(is_fused: bool | None = None) -> torch.dtype:
    """The dtype torch gives ``state['step']`` (float32, or float64 under set_default_dtype)."""
    return _get_scalar_dtype(is_fused=is_fused)


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
