"""Drop-in replacement for ``torch.optim``: fused Rust optimizers and Rust-computed
schedulers, torch's API.

    import ferrotorch.optim as optim                      # instead of torch.optim
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
"""

from torch.optim import Optimizer

from . import lr_scheduler, warmup
from .optimizers import SGD, Adagrad, Adam, AdamW, RMSprop

__all__ = ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Optimizer", "lr_scheduler", "warmup"]
