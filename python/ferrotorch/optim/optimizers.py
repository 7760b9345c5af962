"""ferrotorch's optimizers: torch.optim's classes with a fused Rust ``step``.

Each class *is* its torch.optim counterpart (same constructor, defaults, validation,
``state_dict`` format), so checkpoints move between the two in both directions:

    opt = ferrotorch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    torch.optim.AdamW(model.parameters()).load_state_dict(opt.state_dict())
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import adadelta as _tadadelta
from torch.optim import adagrad as _tadagrad
from torch.optim import adam as _tadam
from torch.optim import adamax as _tadamax
from torch.optim import asgd as _tasgd
from torch.optim import nadam as _tnadam
from torch.optim import radam as _tradam
from torch.optim import rprop as _trprop
from torch.optim import rmsprop as _trmsprop
from torch.optim import sgd as _tsgd

from .._native import optimizer_spec
from ._fused import _FusedOptimizer
from .. import _compat

__all__ = ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "RAdam", "Adadelta", "Rprop", "NAdam", "ASGD"]


def _complex(params: list[torch.Tensor]) -> bool:
    return any(torch.is_complex(p) for p in params)


class Adam(_FusedOptimizer, torch.optim.Adam):
    """Adam (and AdamW with ``decoupled_weight_decay=True``), fused in Rust.

    Same arguments and results as :class:`torch.optim.Adam`:

        opt = ferrotorch.optim.Adam(model.parameters(), lr=3e-4)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    _spec = optimizer_spec("adam")
    _device_fused = True
    _state_key_set = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
    _group_keys = ("lr", "betas", "eps", "weight_decay", "amsgrad")

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        beta1, beta2 = group["betas"]
        _tadam.adam(
            params,
            grads,
            [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st],
            [s["max_exp_avg_sq"] for s in st] if group["amsgrad"] else [],
            [s["step"] for s in st],
            has_complex=_complex(params),
            decoupled_weight_decay=group.get("decoupled_weight_decay", False),
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            **how,
        )


class AdamW(Adam, torch.optim.AdamW):
    """AdamW (decoupled weight decay, default ``weight_decay=1e-2``), fused in Rust.

        opt = ferrotorch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
        loss.backward(); opt.step()
    """


class SGD(_FusedOptimizer, torch.optim.SGD):
    """SGD with momentum, dampening, Nesterov and weight decay, fused in Rust.

        opt = ferrotorch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        loss.backward(); opt.step()
    """

    _spec = optimizer_spec("sgd")
    _device_fused = True
    _state_key_set = frozenset({"momentum_buffer"})
    _group_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        momentum = group["momentum"] != 0
        bufs = [None if f or not momentum else s["momentum_buffer"] for s, f in zip(st, first)]
        _tsgd.sgd(
            params,
            grads,
            bufs,
            has_sparse_grad=any(g.is_sparse for g in grads),
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            **how,
        )
        if momentum:
            for s, b in zip(st, bufs):
                s["momentum_buffer"] = b


class RMSprop(_FusedOptimizer, torch.optim.RMSprop):
    """RMSprop (centered, momentum, weight decay), fused in Rust.

        opt = ferrotorch.optim.RMSprop(model.parameters(), lr=1e-2, alpha=0.99)
        loss.backward(); opt.step()
    """

    _spec = optimizer_spec("rmsprop")
    _state_key_set = frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"})
    _group_keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")

    def _new_step(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=_compat.scalar_dtype())

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        _trmsprop.rmsprop(
            params,
            grads,
            [s["square_avg"] for s in st],
            [s["grad_avg"] for s in st] if group["centered"] else [],
            [s["momentum_buffer"] for s in st] if group["momentum"] > 0 else [],
            [s["step"] for s in st],
            maximize=group["maximize"],
            has_complex=_complex(params),
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            centered=group["centered"],
            **how,
        )


class Adagrad(_FusedOptimizer, torch.optim.Adagrad):
    """Adagrad (lr decay, initial accumulator, weight decay), fused in Rust.

        opt = ferrotorch.optim.Adagrad(model.parameters(), lr=1e-2, lr_decay=1e-4)
        loss.backward(); opt.step()
    """

    _spec = optimizer_spec("adagrad")
    _state_key_set = frozenset({"step", "sum"})
    _group_keys = ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value")

    def _new_state(self, group: dict[str, Any], p: torch.Tensor, key: str) -> torch.Tensor:
        init = group["initial_accumulator_value"]
        value = complex(init, init) if torch.is_complex(p) else init
        return torch.full_like(p, value, memory_format=torch.preserve_format)

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        _tadagrad.adagrad(
            params,
            grads,
            [s["sum"] for s in st],
            [s["step"] for s in st],
            has_sparse_grad=any(g.is_sparse for g in grads),
            has_complex=_complex(params),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            **how,
        )


class Adamax(_FusedOptimizer, torch.optim.Adamax):
    """Adamax (Adam with an infinity-norm second moment), fused in Rust.

        opt = ferrotorch.optim.Adamax(model.parameters(), lr=2e-3)
        loss.backward(); opt.step()
    """

    _spec = optimizer_spec("adamax")
    _state_key_set = frozenset({"step", "exp_avg", "exp_inf"})
    _group_keys = ("lr", "betas", "eps", "weight_decay")

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        beta1, beta2 = group["betas"]
        _tadamax.adamax(
            params,
            grads,
            [s["exp_avg"] for s in st],
            [s["exp_inf"] for s in st],
            [s["step"] for s in st],
            has_complex=_complex(params),
            eps=group["eps"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            **how,
        )


class RAdam(_FusedOptimizer, torch.optim.RAdam):
    """RAdam (rectified Adam; ``decoupled_weight_decay=True`` for RAdamW), fused in Rust.

        opt = ferrotorch.optim.RAdam(model.parameters(), lr=1e-3)
        loss.backward(); opt.step()
    """

    _spec = optimizer_spec("radam")
    _state_key_set = frozenset({"step", "exp_avg", "exp_avg_sq"})
    _group_keys = ("lr", "betas", "eps", "weight_decay")

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        beta1, beta2 = group["betas"]
        _tradam.radam(
            params,
            grads,
            [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st],
            [s["step"] for s in st],
            has_complex=_complex(params),
            decoupled_weight_decay=group.get("decoupled_weight_decay", False),
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            **how,
        )


class Adadelta(_FusedOptimizer, torch.optim.Adadelta):
    """Adadelta, fused in Rust.

        opt = ferrotorch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.9)
        loss.backward(); opt.step()
    """

    _spec = optimizer_spec("adadelta")
    _state_key_set = frozenset({"step", "square_avg", "acc_delta"})
    _group_keys = ("lr", "rho", "eps", "weight_decay")

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        _tadadelta.adadelta(
            params,
            grads,
            [s["square_avg"] for s in st],
            [s["acc_delta"] for s in st],
            [s["step"] for s in st],
            has_complex=_complex(params),
            lr=group["lr"],
            rho=group["rho"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            **how,
        )


class Rprop(_FusedOptimizer, torch.optim.Rprop):
    """Rprop (resilient backpropagation), fused in Rust.

        opt = ferrotorch.optim.Rprop(model.parameters(), lr=1e-2, etas=(0.5, 1.2))
        loss.backward(); opt.step()
    """

    _spec = optimizer_spec("rprop")
    _state_key_set = frozenset({"step", "prev", "step_size"})
    _group_keys = ("lr", "etas", "step_sizes")

    def _new_state(self, group: dict[str, Any], p: torch.Tensor, key: str) -> torch.Tensor:
        if key == "step_size":  # torch: full_like(grad, lr)
            lr = group["lr"]
            lr = lr.item() if torch.is_tensor(lr) else lr
            return torch.full_like(p.grad, complex(lr, lr) if p.is_complex() else lr, memory_format=torch.preserve_format)
        return super()._new_state(group, p, key)

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        _trprop.rprop(
            params,
            grads,
            [s["prev"] for s in st],
            [s["step_size"] for s in st],
            [s["step"] for s in st],
            has_complex=_complex(params),
            step_size_min=step_size_min,
            step_size_max=step_size_max,
            etaminus=etaminus,
            etaplus=etaplus,
            maximize=group["maximize"],
            **how,
        )


class NAdam(_FusedOptimizer, torch.optim.NAdam):
    """NAdam (Adam with Nesterov momentum; ``decoupled_weight_decay=True`` for NAdamW),
    fused in Rust.

        opt = ferrotorch.optim.NAdam(model.parameters(), lr=2e-3, momentum_decay=4e-3)
        loss.backward(); opt.step()
    """

    _spec = optimizer_spec("nadam")
    _state_key_set = frozenset({"step", "mu_product", "exp_avg", "exp_avg_sq"})
    _group_keys = ("lr", "betas", "eps", "weight_decay", "momentum_decay")

    def _new_scalar(self, group: dict[str, Any], p: torch.Tensor, key: str) -> torch.Tensor:
        return torch.tensor(1.0, dtype=_compat.scalar_dtype())  # mu_product

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        beta1, beta2 = group["betas"]
        _tnadam.nadam(
            params,
            grads,
            [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st],
            [s["mu_product"] for s in st],
            [s["step"] for s in st],
            decoupled_weight_decay=group.get("decoupled_weight_decay", False),
            has_complex=_complex(params),
            maximize=group["maximize"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum_decay=group["momentum_decay"],
            eps=group["eps"],
            **how,
        )


class ASGD(_FusedOptimizer, torch.optim.ASGD):
    """Averaged SGD, fused in Rust.

        opt = ferrotorch.optim.ASGD(model.parameters(), lr=1e-2, t0=1e6)
        loss.backward(); opt.step()
    """

    _spec = optimizer_spec("asgd")
    _state_key_set = frozenset({"step", "eta", "mu", "ax"})
    _group_keys = ("lr", "lambd", "alpha", "t0", "weight_decay")

    # torch keeps ASGD's step, eta and mu on the parameter's device.
    def _new_step(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=p.device, dtype=_compat.scalar_dtype())

    def _new_scalar(self, group: dict[str, Any], p: torch.Tensor, key: str) -> torch.Tensor:
        if key == "eta":
            lr = group["lr"]
            lr = lr.item() if torch.is_tensor(lr) else lr
            return torch.as_tensor(lr, device=p.device, dtype=_compat.scalar_dtype()).clone().detach()
        return torch.ones((), device=p.device, dtype=_compat.scalar_dtype())  # mu

    def _fallback(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], st: list[dict[str, Any]], first: list[bool], **how: Any
    ) -> None:
        _tasgd.asgd(
            params,
            grads,
            [s["ax"] for s in st],
            [s["mu"] for s in st],
            [s["eta"] for s in st],
            [s["step"] for s in st],
            maximize=group["maximize"],
            has_complex=_complex(params),
            lambd=group["lambd"],
            lr=group["lr"],
            t0=group["t0"],
            alpha=group["alpha"],
            weight_decay=group["weight_decay"],
            **how,
        )
