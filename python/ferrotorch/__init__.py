"""ferrotorch: fused Rust optimizers for ordinary PyTorch training loops.

    import ferrotorch.optim as optim          # instead of torch.optim
    opt = optim.AdamW(model.parameters(), lr=1e-3)
"""

from __future__ import annotations

__version__ = "0.1.0"

# libtorch must be loaded before the extension: importing torch does that.
import torch


def _built_for_torch() -> str:
    """The torch the extension was compiled against, read from the library file (a marker
    src/lib.rs puts there) without loading it."""
    import importlib.util
    import mmap

    spec = importlib.util.find_spec("ferrotorch._native")
    if spec is None or not spec.origin:
        raise ImportError(
            "ferrotorch's compiled extension is missing: build it with `pip install .` "
            "(or `maturin develop --release` in a development environment)"
        )
    marker = b"ferrotorch-built-for-torch="
    with open(spec.origin, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(marker)
        end = data.find(b";", start) if start >= 0 else -1
        if start < 0 or end < 0 or end - start > 64:
            raise ImportError(f"{spec.origin} does not say which torch it was built for: rebuild ferrotorch")
        return data[start + len(marker) : end].decode("ascii")


#: The torch release the compiled extension was built against; it loads under no other,
#: since an extension built for one libtorch is not ABI-compatible with another.
REQUIRED_TORCH = _built_for_torch()

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
