"""Training helpers from the seeds: the LR range test (more to come: EMA, early stopping,
checkpointing).

    finder = ferrotorch.train.LRFinder(model, optimizer, criterion)
    lrs, losses = finder.range_test(train_loader, end_lr=10, num_iter=100)
"""

from .lr_finder import LRFinder

__all__ = ["LRFinder"]
