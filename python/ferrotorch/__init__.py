"""ferrotorch: fused Rust optimizers for ordinary PyTorch training loops.

    import ferrotorch.optim as optim          # instead of torch.optim
    opt = optim.AdamW(model.parameters(), lr=1e-3)
"""

from __future__ import annotations

__version__ = "0.1.0"
#: The only torch release the compiled extension links against (tch 0.26).
REQUIRED_TORCH = "2.13.0"

# libtorch must be loaded before the extension: importing torch does that.
import torch

_found = torch.__version__.split("+")[0]
if _found != REQUIRED_TORCH:
    raise ImportError(
        f"ferrotorch {__version__} is compiled against torch=={REQUIRED_TORCH}, "
        f"but torch {torch.__version__} is installed. "
        f"Install the matching version: pip install torch=={REQUIRED_TORCH}"
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
