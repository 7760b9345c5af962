"""``torch.optim.swa_utils`` under ferrotorch's name, so that

    from ferrotorch.optim.swa_utils import AveragedModel, SWALR, update_bn

works where a script imported them from ``torch.optim.swa_utils``. These are torch's own
classes and functions, computed by torch (ferrotorch has no native kernel for them yet).
``SWALR`` takes ferrotorch optimizers as it takes torch's (they are ``torch.optim.Optimizer``
subclasses), and ``AveragedModel`` / ``update_bn`` work with any model ferrotorch trains:

    swa_model = AveragedModel(model)
    swa_sched = SWALR(ferrotorch_optimizer, swa_lr=0.05)
    ...; swa_model.update_parameters(model); swa_sched.step()
    update_bn(train_loader, swa_model)
"""

from __future__ import annotations

from torch.optim.swa_utils import (
    SWALR,
    AveragedModel,
    get_ema_avg_fn,
    get_ema_multi_avg_fn,
    get_swa_avg_fn,
    get_swa_multi_avg_fn,
    update_bn,
)

__all__ = [
    "AveragedModel",
    "update_bn",
    "SWALR",
    "get_ema_multi_avg_fn",
    "get_swa_multi_avg_fn",
    "get_ema_avg_fn",
    "get_swa_avg_fn",
]
