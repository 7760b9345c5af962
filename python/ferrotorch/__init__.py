"""ferrotorch: fused Rust optimizers for ordinary PyTorch training loops.

    import ferrotorch.optim as optim          # instead of torch.optim
    opt = optim.AdamW(model.parameters(), lr=1e-3)
"""

from __future__ import annotations

__version__ = "0.1.0"

# libtorch must be loaded before the extension: importing torch does that.
import torch

try:
    # Written by build.rs next to the extension it builds.
    from ._torch_build import TORCH_VERSION as REQUIRED_TORCH
except ImportError:  # pragma: no cover - a source tree that was never built
    raise ImportError(
        "ferrotorch's compiled extension is missing: build it with `pip install .` "
        "(or `maturin develop --release` in a development environment)"
    ) from None
#: The torch release the compiled extension was built against; it loads under no other,
#: since an extension built for one libtorch is not ABI-compatible with another.
REQUIRED_TORCH: str

_found = torch.__version__.split("+")[0]
if _found != REQUIRED_TORCH:
    raise ImportError(
        f"ferrotorch {__version__} was built against torch {REQUIRED_TORCH}, but torch "
        f"{torch.__version__} is installed. Rebuild ferrotorch for this torch (from its source "
        f"directory: pip install --force-reinstall --no-deps .), or install torch=={REQUIRED_TORCH}."
    )

from . import _native  # noqa: E402,F401  (loads the extension, after torch)
from .errors import FerrotorchRuntimeError, FerrotorchTypeError, FerrotorchValueError  # noqa: E402
from . import nn, optim, train  # noqa: E402

__all__ = [
    "REQUIRED_TORCH",
    "FerrotorchRuntimeError",
    "FerrotorchTypeError",
    "FerrotorchValueError",
    "nn",
    "optim",
    "train",
]
