"""Drop-in replacement for ``torch.optim``: fused Rust optimizers and Rust-computed
schedulers, torch's API.

    import ferrotorch.optim as optim                      # instead of torch.optim
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)

Every public name of ``torch.optim`` resolves here, so a script keeps running after the
import swap:

* native (fused Rust kernels): ``Adam``, ``AdamW``, ``SGD``, ``RMSprop``, ``Adagrad``,
  ``Adamax``, ``RAdam``, ``Adadelta``, ``Rprop``, ``NAdam``, ``ASGD``, ``SparseAdam``,
  ``Adafactor``, ``Muon`` (torch's ops run from C++) and ``LBFGS`` (its vector work);
* ``lr_scheduler``: every torch scheduler, schedule math in Rust;
* ``swa_utils``: ``SWALR`` (lr math in Rust) and torch's ``AveragedModel``,
  ``update_bn``, ... re-exported;
* torch's own objects, re-exported as they are: ``Optimizer`` (the base class) and, from
  torch 2.12 on, ``swap_in_optimizer_params_and_state``.
  Any other name a later torch adds to ``torch.optim.__all__`` (such as torch 2.15's
  ``functional`` module) is re-exported the same way.

ferrotorch's additions: ``warmup`` (pytorch_warmup's API).
"""

import types as _types

import torch.optim as _torch_optim

# torch's base class, re-exported unchanged.
from torch.optim import Optimizer

from . import lr_scheduler, swa_utils, warmup
from .optimizers import ASGD, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, RAdam, RMSprop, Rprop
from .adafactor import Adafactor
from .lbfgs import LBFGS
from .muon import Muon
from .sparse_adam import SparseAdam

#: The optimizers ferrotorch runs with its own fused kernels.
NATIVE = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "RAdam", "Adadelta", "Rprop", "NAdam", "ASGD", "SparseAdam", "Adafactor", "Muon", "LBFGS")
#: torch.optim's names that are torch's own objects here (no native kernel yet).
TORCH_COMPUTED = tuple(
    n
    for n in _torch_optim.__all__
    if n not in NATIVE and not isinstance(getattr(_torch_optim, n), _types.ModuleType)
)
#: torch.optim's submodules other than lr_scheduler and swa_utils (torch's own modules here).
_TORCH_MODULES = tuple(
    n
    for n in _torch_optim.__all__
    if n not in ("lr_scheduler", "swa_utils") and isinstance(getattr(_torch_optim, n), _types.ModuleType)
)

# A name a later torch adds to torch.optim.__all__ resolves too (torch's object).
for _name in TORCH_COMPUTED + _TORCH_MODULES:
    globals().setdefault(_name, getattr(_torch_optim, _name))

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adamax",
    "RAdam",
    "Adadelta",
    "Rprop",
    "NAdam",
    "ASGD",
    "SparseAdam",
    "Adafactor",
    "Muon",
    "LBFGS",
    "lr_scheduler",
    "swa_utils",
    "warmup",
    *TORCH_COMPUTED,
    *_TORCH_MODULES,
]
