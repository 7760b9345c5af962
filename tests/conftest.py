"""Shared helpers: build twin models/optimizers and feed them identical gradients."""

from __future__ import annotations

import os
import random

# pytest-xdist's workers (and the demo/notebook interpreters they start) share the cores.
# OpenMP threads that spin while they wait steal those cores from the other worker: the
# demo test ran 4-15x slower than alone. Passive waiting keeps every thread count and code
# path and only sleeps instead of spinning. Set before torch loads libgomp.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

import ferrotorch.optim as fopt

SHAPES = [(), (0,), (1,), (7,), (4, 5), (2, 3, 4), (33,), (3, 1, 2)]

OPTIMIZERS = {
    "Adam": (fopt.Adam, torch.optim.Adam),
    "AdamW": (fopt.AdamW, torch.optim.AdamW),
    "SGD": (fopt.SGD, torch.optim.SGD),
    "RMSprop": (fopt.RMSprop, torch.optim.RMSprop),
    "Adagrad": (fopt.Adagrad, torch.optim.Adagrad),
    "Adamax": (fopt.Adamax, torch.optim.Adamax),
    "RAdam": (fopt.RAdam, torch.optim.RAdam),
    "Adadelta": (fopt.Adadelta, torch.optim.Adadelta),
    "Rprop": (fopt.Rprop, torch.optim.Rprop),
    "NAdam": (fopt.NAdam, torch.optim.NAdam),
    "ASGD": (fopt.ASGD, torch.optim.ASGD),
}


def random_config(name: str, rng: random.Random) -> dict:
    """A random valid configuration of every argument torch's class has."""
    wd = rng.choice([0.0, 0.0, 1e-2, 0.1])
    if name in ("Adam", "AdamW"):
        cfg = dict(
            lr=rng.choice([1e-3, 1e-2, 3e-4]),
            betas=(rng.choice([0.9, 0.8, 0.0, 0.5]), rng.choice([0.999, 0.99, 0.9])),
            eps=rng.choice([1e-8, 1e-6, 1e-3]),
            weight_decay=wd,
            amsgrad=rng.random() < 0.5,
            maximize=rng.random() < 0.3,
        )
        if name == "Adam" and rng.random() < 0.3:
            cfg["decoupled_weight_decay"] = True
        return cfg
    if name == "SGD":
        momentum = rng.choice([0.0, 0.9, 0.5])
        nesterov = momentum > 0 and rng.random() < 0.5
        return dict(
            lr=rng.choice([1e-2, 1e-3, 0.1]),
            momentum=momentum,
            dampening=0.0 if nesterov else rng.choice([0.0, 0.1]),
            weight_decay=wd,
            nesterov=nesterov,
            maximize=rng.random() < 0.3,
        )
    if name == "RMSprop":
        return dict(
            lr=rng.choice([1e-2, 1e-3]),
            alpha=rng.choice([0.99, 0.9]),
            eps=rng.choice([1e-8, 1e-6]),
            weight_decay=wd,
            momentum=rng.choice([0.0, 0.9]),
            centered=rng.random() < 0.5,
            maximize=rng.random() < 0.3,
        )
    if name == "Adagrad":
        return dict(
            lr=rng.choice([1e-2, 0.1]),
            lr_decay=rng.choice([0.0, 1e-3]),
            weight_decay=wd,
            initial_accumulator_value=rng.choice([0.0, 0.1]),
            eps=rng.choice([1e-10, 1e-6]),
            maximize=rng.random() < 0.3,
        )
    if name == "Adamax":
        return dict(
            lr=rng.choice([2e-3, 1e-2]),
            betas=(rng.choice([0.9, 0.5, 0.0]), rng.choice([0.999, 0.9])),
            eps=rng.choice([1e-8, 1e-3]),
            weight_decay=wd,
            maximize=rng.random() < 0.3,
        )
    if name == "RAdam":
        return dict(
            lr=rng.choice([1e-3, 1e-2]),
            betas=(rng.choice([0.9, 0.5]), rng.choice([0.999, 0.9])),
            eps=rng.choice([1e-8, 1e-6]),
            weight_decay=wd,
            decoupled_weight_decay=rng.random() < 0.5,
            maximize=rng.random() < 0.3,
        )
    if name == "Adadelta":
        return dict(
            lr=rng.choice([1.0, 0.1]),
            rho=rng.choice([0.9, 0.5]),
            eps=rng.choice([1e-6, 1e-3]),
            weight_decay=wd,
            maximize=rng.random() < 0.3,
        )
    if name == "Rprop":
        return dict(
            lr=rng.choice([1e-2, 1e-3]),
            etas=(rng.choice([0.5, 0.3]), rng.choice([1.2, 1.5])),
            step_sizes=(rng.choice([1e-6, 1e-4]), rng.choice([50.0, 0.05])),
            maximize=rng.random() < 0.3,
        )
    if name == "NAdam":
        return dict(
            lr=rng.choice([2e-3, 1e-2]),
            betas=(rng.choice([0.9, 0.5]), rng.choice([0.999, 0.9])),
            eps=rng.choice([1e-8, 1e-6]),
            weight_decay=wd,
            momentum_decay=rng.choice([4e-3, 0.1]),
            decoupled_weight_decay=rng.random() < 0.5,
            maximize=rng.random() < 0.3,
        )
    if name == "ASGD":
        return dict(
            lr=rng.choice([1e-2, 1e-3]),
            lambd=rng.choice([1e-4, 1e-2]),
            alpha=rng.choice([0.75, 0.5]),
            t0=rng.choice([1e6, 3.0, 0.0]),
            weight_decay=wd,
            maximize=rng.random() < 0.3,
        )
    raise KeyError(name)


def make_params(seed: int, dtype: torch.dtype, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def twin_groups(params_a, params_b, rng: random.Random, extra: dict | None = None):
    """Two param groups (the seed's backbone/head split): the second with its own lr."""
    k = max(1, len(params_a) // 2)
    extra = extra or {}
    ga = [{"params": params_a[:k]}, {"params": params_a[k:], **extra}]
    gb = [{"params": params_b[:k]}, {"params": params_b[k:], **extra}]
    return ga, gb


def feed_same_grads(params_a, params_b, g: torch.Generator, none_prob: float = 0.0, rng: random.Random | None = None, pull: float = 0.1):
    """Gives both twins the gradient of the same noisy quadratic loss, each at its own
    parameters: grad = noise + pull * p (as in training, differences do not random-walk)."""
    for pa, pb in zip(params_a, params_b):
        if none_prob and rng is not None and rng.random() < none_prob:
            pa.grad = None
            pb.grad = None
            continue
        noise = torch.randn(pa.shape, generator=g, dtype=torch.float64).to(pa.dtype)
        with torch.no_grad():
            pa.grad = noise + pull * pa if pull else noise.clone()
            pb.grad = noise + pull * pb if pull else noise.clone()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| (0 for equal tensors, NaNs must coincide)."""
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    nan = torch.isnan(b64)
    assert torch.equal(torch.isnan(a64), nan), "NaNs differ"
    a64, b64 = a64[~nan], b64[~nan]
    diff = float((a64 - b64).norm())
    return 0.0 if diff == 0 else diff / max(float(b64.norm()), 1e-30)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest element-wise |a-b| / max(|b|, 1e-3): relative where values are not tiny."""
    if a.numel() == 0:
        return 0.0
    a64, b64 = a.detach().double(), b.detach().double()
    if torch.isnan(b64).any() or torch.isnan(a64).any():
        assert torch.equal(torch.isnan(a64), torch.isnan(b64))
        keep = ~torch.isnan(b64)
        a64, b64 = a64[keep], b64[keep]
        if a64.numel() == 0:
            return 0.0
    return float(((a64 - b64).abs() / b64.abs().clamp_min(1e-3)).max())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (sign-magnitude aware; -0 == +0)."""
    if a.numel() == 0:
        return 0

    def key(t):
        bits = t.detach().contiguous().view(torch.int16).int() & 0xFFFF
        mag = bits & 0x7FFF
        return torch.where(bits >= 0x8000, -mag, mag)

    return int((key(a) - key(b)).abs().max())


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a GPU torch can see; elsewhere they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def check_torch_error_input(cls: type, ei) -> None:
    """One of ``optim_db``'s bad inputs (an ``ErrorOptimizerInput``) gives torch's error or
    warning from ferrotorch's ``cls``: at construction, or for a step error at the first
    step with random gradients."""
    inp = ei.optimizer_error_input
    if issubclass(ei.error_type, Warning):  # e.g. torch 2.15's FutureWarning for a set of params
        with pytest.warns(ei.error_type, match=ei.error_regex):
            cls(inp.params, **inp.kwargs)
        return
    with pytest.raises(ei.error_type, match=ei.error_regex):
        opt = cls(inp.params, **inp.kwargs)
        if ei.error_on.name == "STEP_ERROR":
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.rand_like(p)
            opt.step()
