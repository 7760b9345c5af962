"""ferrotorch.optim.Adafactor against torch.optim.Adafactor (foreach=False): torch's own
configurations and error inputs (optim_db), every shape kind (0-d, vectors, matrices,
batched 3-d, degenerate 1-row/1-col), two groups, missing grads, state dicts both ways.
Norms are summed in float64 here, so parameters agree to fp64 1e-12 / fp32 1e-6 (relative)
after 200 steps rather than bit for bit; the step counter is bit for bit."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

import ferrotorch.optim as fopt
from conftest import check_torch_error_input, rel_err
from ferrotorch import _compat

INFO = next(o for o in optim_db if o.optim_cls is torch.optim.Adafactor)
SHAPES = [(), (5,), (4, 3), (2, 3, 4), (1, 1), (6, 1), (1, 7)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def _run(mod, cfg, dtype, steps, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]
    k = len(ps) // 2
    opt = mod.Adafactor([{"params": ps[:k]}, {"params": ps[k:], "lr": 0.02}], **cfg)
    for _ in range(steps):
        for p in ps:
            grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.1 * p.detach().double()).to(dtype)
            p.grad = None if rng.random() < 0.1 else grad
        opt.step()
    return ps, opt


def _close(a, b, dtype):
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    if dtype in TOL:
        assert rel_err(a, b) <= TOL[dtype], rel_err(a, b)
    else:
        assert torch.equal(a, b)


def _configs():
    for oi in INFO.optim_inputs_func(device="cpu"):
        yield pytest.param(oi.kwargs, id="optim_db-" + oi.desc.replace(" ", "_"))
    rng = random.Random(2)
    for i in range(4):
        cfg = {"lr": rng.choice([1e-2, 1e-3]), "beta2_decay": rng.choice([-0.8, -0.5]), "eps": (rng.choice([None, 1e-30, 1e-3]), rng.choice([1e-3, 1e-2])), "d": rng.choice([1.0, 2.0]), "weight_decay": rng.choice([0.0, 0.05]), "maximize": rng.random() < 0.5}
        yield pytest.param(cfg, id=f"random{i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", list(_configs()))
def test_matches_torch(cfg, dtype):
    ours, fo = _run(fopt, dict(cfg), dtype, 200)
    ref, to = _run(torch.optim, dict(cfg, foreach=False), dtype, 200)
    for a, b in zip(ours, ref):
        _close(a.detach(), b.detach(), dtype)
        sa, sb = fo.state[a], to.state[b]
        assert sa.keys() == sb.keys()
        assert torch.equal(sa["step"], sb["step"]) and sa["step"].dtype == sb["step"].dtype
        for key in ("row_var", "col_var", "variance"):
            if key in sb:
                _close(sa[key], sb[key], dtype)


def test_the_kernel_runs_for_float_tensors(monkeypatch):
    calls = []
    real = _compat.adafactor
    monkeypatch.setattr(_compat, "adafactor", lambda *a, **k: (calls.append(a[0][0].dtype), real(*a, **k)))
    _run(fopt, {}, torch.float32, 3)
    _run(fopt, {}, torch.float64, 3)
    assert calls == []
    _run(fopt, {}, torch.bfloat16, 1)
    assert calls and set(calls) == {torch.bfloat16}


@pytest.mark.parametrize("ei", INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32), ids=lambda e: str(e.error_regex)[:40])
def test_torchs_error_inputs_give_torchs_errors(ei):
    check_torch_error_input(fopt.Adafactor, ei)


def test_empty_parameter_gives_torchs_error():
    for mod in (torch.optim, fopt):
        p = torch.nn.Parameter(torch.zeros(0, 3))
        p.grad = torch.zeros(0, 3)
        with pytest.raises(ZeroDivisionError):
            mod.Adafactor([p]).step()


def test_tensor_lr_and_aliased_grad_get_torchs_numbers():
    def run(mod, trick):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
        opt = mod.Adafactor([p], lr=torch.tensor(0.01) if trick == "tensor_lr" else 0.01)
        for _ in range(3):
            p.grad = p.detach() if trick == "grad_is_param" else torch.randn(4, 3, dtype=torch.float64)
            opt.step()
        return p.detach().clone()

    for trick in ("tensor_lr", "grad_is_param"):
        assert torch.equal(run(fopt, trick), run(torch.optim, trick)), trick


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_moves_both_ways_mid_training(direction):
    src, dst = (torch.optim, fopt) if direction == "torch_to_ours" else (fopt, torch.optim)
    params, opt = _run(src, {"weight_decay": 0.01}, torch.float64, 10)
    sd = copy.deepcopy(opt.state_dict())
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    k = len(twin) // 2
    opt2 = dst.Adafactor([{"params": twin[:k]}, {"params": twin[k:], "lr": 0.02}], weight_decay=0.01)
    opt2.load_state_dict(sd)
    g = torch.Generator().manual_seed(9)
    for _ in range(5):
        for p, q in zip(params, twin):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, twin):
        _close(p.detach(), q.detach(), torch.float64)


def test_linear_model_trains_like_torch():
    def train(mod):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        opt = mod.Adafactor(model.parameters(), lr=1e-2)
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        for _ in range(50):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(fopt), train(torch.optim)):
        _close(a, b, torch.float32)


def test_a_parameter_listed_twice_and_a_grad_that_is_another_parameter_go_as_in_torch():
    def run(mod):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
        b = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = mod.Adafactor([a, b, a], lr=0.01)
        for _ in range(3):
            a.grad = torch.randn(5, 4, dtype=torch.float64)
            b.grad = a.detach()  # read while `a` is stepped (twice), as torch reads it
            opt.step()
        return a.detach().clone(), b.detach().clone(), int(opt.state[a]["step"])

    ours, ref = run(fopt), run(torch.optim)
    assert ours[2] == ref[2] == 6
    _close(ours[0], ref[0], torch.float64)
    _close(ours[1], ref[1], torch.float64)
