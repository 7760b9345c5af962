"""Drop-in replacement for ``torch.optim``: fused Rust optimizers, torch's API.

    import ferrotorch.optim as optim                      # instead of torch.optim
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
"""

from torch.optim import Optimizer, lr_scheduler

from .optimizers import SGD, Adagrad, Adam, AdamW, RMSprop

__all__ = ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Optimizer", "lr_scheduler"]
