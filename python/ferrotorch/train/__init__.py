"""Training helpers from the seeds: the LR range test and a model EMA.

    finder = ferrotorch.train.LRFinder(model, optimizer, criterion)
    ema = ferrotorch.train.ModelEMA(model, decay=0.999)
"""

from .ema import ModelEMA
from .lr_finder import LRFinder

__all__ = ["LRFinder", "ModelEMA"]
