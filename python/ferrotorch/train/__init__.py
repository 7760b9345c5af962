"""Training helpers from the seeds: LR range test, model EMA, checkpoints, early stopping.

    finder = ferrotorch.train.LRFinder(model, optimizer, criterion)
    ema = ferrotorch.train.ModelEMA(model, decay=0.999)
"""

from .checkpoint import CheckpointManager, EarlyStopping, load_checkpoint, save_checkpoint
from .ema import ModelEMA
from .lr_finder import DataLoaderIter, LRFinder, TrainDataLoaderIter, ValDataLoaderIter

__all__ = [
    "LRFinder",
    "TrainDataLoaderIter",
    "ValDataLoaderIter",
    "DataLoaderIter",
    "ModelEMA",
    "CheckpointManager",
    "EarlyStopping",
    "save_checkpoint",
    "load_checkpoint",
]
