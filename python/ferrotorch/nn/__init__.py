"""Neural-network pieces: a Rust Vision Transformer (``ferrotorch.nn.ViT``) and
``ferrotorch.nn.utils`` (gradient clipping in Rust)."""

from . import utils
from .vit import ViT, empty_cache

__all__ = ["ViT", "empty_cache", "utils"]
