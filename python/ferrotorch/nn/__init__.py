"""Neural-network utilities (``ferrotorch.nn.utils``: gradient clipping in Rust)."""

from . import utils

__all__ = ["utils"]
